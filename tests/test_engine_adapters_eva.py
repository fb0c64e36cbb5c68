"""timm Eva (EVA-02, RoPE ViTs, PE, DINOv3) on the packed engine, against Eva's own forward with the
absent patches removed: its patch dropout path, which gathers the kept tokens and their rope."""

import pytest
import torch
from timm.models.eva import Eva, EvaBlock

from benchmarks.families import dropped_reference, kept_patches
from shapkern import explain, fused_coalition_forward
from shapkern.engine import adapter_for, coalition_tokens
from shapkern.games import model_game

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
EVA02 = {"qkv_fused": False, "mlp_ratio": 4 * 2 / 3, "swiglu_mlp": True, "scale_mlp": True}
ROPE_VIT = {"attn_type": "rope", "init_values": 0.1, "use_abs_pos_emb": False, "rope_grid_indexing": "xy"}
VARIANTS = {
    # eva02_base_patch14_224: rope, SwiGLU with its norm, separate q/k/v, average pooling
    "eva02": {**EVA02, "use_rot_pos_emb": True, "ref_feat_shape": (2, 2)},
    # eva02_base_patch16_clip_224: + attention scale norm, class token pooling
    "eva02_clip": {**EVA02, "scale_attn_inner": True, "use_rot_pos_emb": True, "global_pool": "token"},
    # vit_medium_patch16_rope_reg1_gap_256: fused qkv with q/v biases, LayerScale, a register token
    "rope_reg": {
        "init_values": 0.1,
        "class_token": False,
        "num_reg_tokens": 1,
        "use_rot_pos_emb": True,
        "use_abs_pos_emb": False,
        "swiglu_mlp": True,
    },
    # vit_base_patch16_rope_224 and its mixed / ape variants
    "rope_axial": {
        **ROPE_VIT,
        "use_rot_pos_emb": True,
        "global_pool": "token",
        "use_fc_norm": False,
        "rope_temperature": 100.0,
    },
    "rope_mixed": {**ROPE_VIT, "use_rot_pos_emb": True, "global_pool": "token", "rope_type": "mixed"},
    "rope_ape": {
        **ROPE_VIT,
        "use_rot_pos_emb": True,
        "global_pool": "token",
        "use_abs_pos_emb": True,
        "no_embed_class": True,
    },
    # vit_pe_core_*: pre-transformer norm, rope offset, latent attention pooling over all tokens
    "pe_map": {
        "attn_type": "rope",
        "use_pre_transformer_norm": True,
        "use_rot_pos_emb": True,
        "rope_grid_offset": 1.0,
        "rope_grid_indexing": "xy",
        "global_pool": "map",
        "attn_pool_num_heads": 2,
        "qk_norm": True,
    },
    # vit_*_dinov3 (with dynamic_img_size off): half-rotation rope, class + register tokens
    "dinov3": {
        "qkv_bias": False,
        "init_values": 0.1,
        "rope_type": "dinov3",
        "rope_rotate_half": True,
        "use_rot_pos_emb": True,
        "use_abs_pos_emb": False,
        "num_reg_tokens": 2,
        "use_fc_norm": False,
        "global_pool": "token",
    },
    "mrope_gqa": {
        "attn_type": "rope",
        "qkv_fused": False,
        "num_kv_heads": 1,
        "rope_type": "mrope",
        "use_rot_pos_emb": True,
        "use_abs_pos_emb": False,
        "global_pool": "avg",
    },
    "post_norm_no_rope": {"use_post_norm": True, "global_pool": "avg"},
}


def make_model(name: str, seed: int = 0, **extra) -> Eva:
    torch.manual_seed(seed)
    model = Eva(**SMALL, **VARIANTS[name], **extra).eval()
    with torch.no_grad():  # timm zero-inits some parameters (biases, head); make every one of them matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def random_coalitions(batch, num, players, seed, *, allow_empty=True):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(batch, num, players, generator=gen) < torch.rand(batch, num, 1, generator=gen)
    masks[:, 0] = True
    masks[:, 1] = False
    if not allow_empty:
        masks[:, 1, 5] = True
    return masks


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("output", ["logits", "pre_logits"])
def test_engine_equals_eva_with_patches_dropped(name, output):
    model = make_model(name)
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 4, 16, seed=len(name), allow_empty=model.num_prefix_tokens > 0)
    got = fused_coalition_forward(model, images, coalitions, output=output)
    want = dropped_reference(model, images, coalitions, output=output)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gated_attention_block_equals_eva_with_patches_dropped():
    model = make_model("eva02")
    torch.manual_seed(1)
    model.blocks[1] = EvaBlock(32, 2, gated_attn=True, init_values=0.1, scale_attn_inner=True).eval()
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, 16, seed=4)
    got = fused_coalition_forward(model, images, coalitions)
    torch.testing.assert_close(got, dropped_reference(model, images, coalitions), rtol=1e-5, atol=1e-5)


def test_full_coalition_equals_eva_forward():
    model = make_model("eva02")
    images = torch.randn(3, 3, 32, 32)
    got = fused_coalition_forward(model, images, torch.ones(2, 16, dtype=torch.bool))
    torch.testing.assert_close(got, model(images).unsqueeze(1).expand(3, 2, 5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["eva02", "rope_mixed", "pe_map", "dinov3", "mrope_gqa"])
def test_gradients_equal_eva_with_patches_dropped(name):
    """Gradients to the images and every parameter (mixed rope's learned frequencies included)."""
    model = make_model(name)
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, 16, seed=7, allow_empty=model.num_prefix_tokens > 0)
    weights = torch.randn(2, 3, 5)
    grads = []
    for fn in (fused_coalition_forward, dropped_reference):
        model.zero_grad()
        x = images.clone().requires_grad_()
        (fn(model, x, coalitions) * weights).sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in model.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[1])  # every parameter matters in this game
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rope_mixed_learns_through_the_engine():
    model = make_model("rope_mixed")
    coalitions = random_coalitions(1, 2, 16, seed=1)
    fused_coalition_forward(model, torch.randn(1, 3, 32, 32), coalitions).sum().backward()
    assert model.rope.freqs.grad is not None and model.rope.freqs.grad.abs().sum() > 0


def test_compiled_blocks_match_plain_path_forward_and_backward():
    model = make_model("rope_mixed")
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 4, 16, seed=6)
    results = []
    for blocks in ("plain", "compiled"):
        model.zero_grad()
        x = images.clone().requires_grad_()
        out = fused_coalition_forward(model, x, coalitions, blocks=blocks)
        out.square().sum().backward()
        results.append([out.detach(), x.grad] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_tokens_output_is_eva_features_of_kept_tokens():
    model = make_model("dinov3")
    images = torch.randn(1, 3, 32, 32)
    coalitions = random_coalitions(1, 3, 16, seed=2)
    packed = coalition_tokens(model, images, coalitions)
    for m in range(3):
        keep = coalitions[0, m].nonzero().view(-1)
        with kept_patches(model, keep):
            want = model.forward_features(images)[0]
        start, end = packed.plan.cu_seqlens[m : m + 2].tolist()
        torch.testing.assert_close(packed.tokens[start:end], want, rtol=1e-5, atol=1e-5)


def test_train_mode_drop_path_per_coalition_matches_eva():
    # Rates linspace(0, 1) over 2 blocks: block 0 never drops, block 1 always does (deterministic).
    model = make_model("eva02", drop_path_rate=1.0).train()
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, 16, seed=8)
    got = fused_coalition_forward(model, images, coalitions)
    torch.testing.assert_close(got, dropped_reference(model, images, coalitions), rtol=1e-5, atol=1e-5)


def test_explain_exact_runs_packed_and_is_efficient():
    model = make_model("eva02_clip")
    images = torch.randn(1, 3, 32, 32)
    assert type(model_game(model, images)).__name__ == "PackedGame"
    att = explain(model, images, method="exact", progress=False)
    assert att.values.shape == (1, 16, 1) and att.evaluations == 1 << 16
    logits = model(images)
    torch.testing.assert_close(att.full[:, 0], logits.max(-1).values, rtol=1e-5, atol=1e-5)
    empty = dropped_reference(model, images, torch.zeros(1, 1, 16, dtype=torch.bool))[0, 0]
    torch.testing.assert_close(att.base[0, 0], empty[logits.argmax()], rtol=1e-5, atol=1e-5)
    assert att.efficiency_gap().abs().max() < 1e-4


@pytest.mark.parametrize(
    "model, match",
    [
        (lambda: make_model("eva02", global_pool="max"), "global_pool 'max'"),
        (lambda: make_model("eva02", dynamic_img_size=True), "dynamic_img_size"),
        (lambda: make_model("eva02", attn_drop_rate=0.1).train(), "attention dropout"),
        (lambda: make_model("eva02", patch_drop_rate=0.5).train(), "patch dropout"),
        (lambda: make_model("rope_axial", rope_shift_coords=1.0).train(), "coordinate augmentation"),
    ],
)
def test_unsupported_eva_variants_raise(model, match):
    model = model()
    with pytest.raises(NotImplementedError, match=match) as error:
        fused_coalition_forward(model, torch.randn(1, 3, 32, 32), torch.ones(1, 2, 16, dtype=torch.bool))
    assert "mode='input'" in str(error.value)


@pytest.mark.parametrize("options", [{"blocks": "fused"}, {"precision": "fp8"}])
def test_fused_and_fp8_paths_are_refused_naming_the_paths_eva_runs(options):
    model = make_model("eva02")
    full = torch.ones(1, 2, 16, dtype=torch.bool)
    with pytest.raises(NotImplementedError, match="'plain', 'compiled'"), torch.no_grad():
        fused_coalition_forward(model, torch.randn(1, 3, 32, 32), full, **options)
    assert adapter_for(model).block_paths == ("plain", "compiled")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["eva02", "rope_mixed", "pe_map"])
def test_cuda_triton_attention_bf16_matches_fp32_reference(name):
    model = make_model(name).cuda()
    images = torch.randn(2, 3, 32, 32, device="cuda")
    coalitions = random_coalitions(2, 4, 16, seed=3, allow_empty=model.num_prefix_tokens > 0).cuda()
    want = dropped_reference(model, images, coalitions)
    got = fused_coalition_forward(model, images, coalitions, blocks="plain")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = fused_coalition_forward(model, images, coalitions, paired=False)
    torch.testing.assert_close(low.float(), want, rtol=5e-2, atol=5e-2)
