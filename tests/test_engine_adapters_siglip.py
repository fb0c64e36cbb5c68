"""timm VisionTransformer with latent attention pooling (global_pool='map': SigLIP, SigLIP 2) on the
packed engine, against timm's own forward with the absent patches removed."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from benchmarks.families import dropped_reference
from shapkern import explain, fused_coalition_forward
from shapkern.engine import adapter_for
from shapkern.engine.adapters.latent_pool import segment_softmax
from shapkern.games import model_game
from shapkern.packed import pack_plan

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
SIGLIP = {"class_token": False, "global_pool": "map"}
VARIANTS = {
    "siglip": {**SIGLIP},  # vit_base_patch16_siglip_224
    "siglip_gelu_tanh": {**SIGLIP, "act_layer": "gelu_tanh"},  # vit_base_patch32_siglip_256
    "reg_map": {**SIGLIP, "reg_tokens": 2},  # vit_so150m_patch16_reg4_map_256: the pool skips registers
    # test_vit3: the pool sees the register token too
    "reg_map_prefix": {**SIGLIP, "reg_tokens": 1, "pool_include_prefix": True, "init_values": 0.1},
    "cls_map_qk_norm": {"global_pool": "map", "qk_norm": True},
}


def make_model(name: str, seed: int = 0, **extra) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(**SMALL, **VARIANTS[name], **extra).eval()
    with torch.no_grad():  # timm zero-inits some parameters (biases, head); make every one of them matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def random_coalitions(batch, num, players, seed):
    """Row 0 full, row 1 a single patch, the rest random and non-empty."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(batch, num, players, generator=gen) < torch.rand(batch, num, 1, generator=gen)
    masks[:, :, 3] = True
    masks[:, 0] = True
    masks[:, 1] = False
    masks[:, 1, 9] = True
    return masks


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("output", ["logits", "pre_logits"])
def test_engine_equals_timm_with_patches_dropped(name, output):
    model = make_model(name)
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 4, 16, seed=len(name))
    got = fused_coalition_forward(model, images, coalitions, output=output)
    want = dropped_reference(model, images, coalitions, output=output)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_engine_equals_timm_key_masked_pool():
    """The same game through timm's attention masks: blocks and attn_pool both masking absent keys."""
    model = make_model("siglip")
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, 16, seed=1)
    keep = coalitions.view(6, 1, 1, 16)
    feats = model.forward_features(images.repeat_interleave(3, 0), attn_mask=keep)
    want = model.head(model.fc_norm(model.attn_pool(feats, attn_mask=keep))).view(2, 3, 5)
    torch.testing.assert_close(fused_coalition_forward(model, images, coalitions), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("latent_len, pool_type", [(1, "token"), (3, "avg")])
def test_gradients_equal_timm_with_patches_dropped(latent_len, pool_type):
    model = make_model("reg_map")
    pool = model.attn_pool
    with torch.no_grad():
        pool.latent_len, pool.pool = latent_len, pool_type
        pool.latent = nn.Parameter(torch.randn(1, latent_len, 32))
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, 16, seed=7)
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


def test_empty_coalition_attends_to_nothing():
    """No token to pool: the attention output is zero (as an empty row's average pool is zero)."""
    model = make_model("siglip")
    images = torch.randn(2, 3, 32, 32)
    got = fused_coalition_forward(model, images, torch.zeros(2, 1, 16, dtype=torch.bool), output="pre_logits")
    pool = model.attn_pool
    out = pool.proj(torch.zeros(1, 32))
    want = model.fc_norm(out + pool.mlp(pool.norm(out)))
    torch.testing.assert_close(got, want.expand(2, 1, 32))
    assert torch.isfinite(got).all()


def test_segment_softmax_is_a_softmax_per_row():
    masks = torch.tensor([[True, False, True, True], [False] * 4, [True] * 4])
    plan = pack_plan(masks, torch.zeros(3, dtype=torch.long), num_prefix_tokens=1)
    scores = 30 * torch.randn(plan.num_tokens, 2)
    scores[0, 1] = -torch.inf  # a masked token
    got = segment_softmax(scores, plan)
    bounds = plan.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        torch.testing.assert_close(got[start:end], scores[start:end].softmax(0))
    only_masked = segment_softmax(torch.full((plan.num_tokens, 1), -torch.inf), plan)
    assert torch.equal(only_masked, torch.zeros_like(only_masked))


def test_fused_and_compiled_blocks_match_plain():
    model = make_model("reg_map")
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 4, 16, seed=2)
    plain = fused_coalition_forward(model, images, coalitions, blocks="plain")
    for blocks in ("fused", "compiled"):
        got = fused_coalition_forward(model, images, coalitions, blocks=blocks)
        torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-5, msg=blocks)
    with torch.no_grad():
        fp8 = fused_coalition_forward(model, images, coalitions, precision="fp8")
    assert (fp8 - plain).abs().max() < 0.05 * plain.abs().max()  # e4m3 GEMMs, same pool


def test_each_adapter_claims_its_pooling():
    assert type(adapter_for(make_model("siglip"))).__name__ == "TimmViTLatentPool"
    assert type(adapter_for(VisionTransformer(**SMALL))).__name__ == "TimmViT"
    assert type(adapter_for(VisionTransformer(**SMALL, global_pool="avg"))).__name__ == "TimmViT"


def test_unsupported_pool_variants_raise():
    model = make_model("siglip")
    model.attn_pool.pool = ""
    with pytest.raises(NotImplementedError, match="pool_type ''.*mode='input'"):
        fused_coalition_forward(model, torch.randn(1, 3, 32, 32), torch.ones(1, 2, 16, dtype=torch.bool))
    model = make_model("siglip")
    model.attn_pool.pos_embed = nn.Parameter(torch.zeros(16, 32))
    with pytest.raises(NotImplementedError, match="position embedding"):
        fused_coalition_forward(model, torch.randn(1, 3, 32, 32), torch.ones(1, 2, 16, dtype=torch.bool))


def test_train_mode_drop_path_per_coalition_matches_timm():
    model = make_model("siglip", drop_path_rate=1.0).train()  # block 0 never drops, block 1 always
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, 16, seed=8)
    got = fused_coalition_forward(model, images, coalitions)
    torch.testing.assert_close(got, dropped_reference(model, images, coalitions), rtol=1e-5, atol=1e-5)


def test_explain_with_defaults_runs_exact_packed_and_is_efficient():
    model = make_model("siglip")
    images = torch.randn(1, 3, 32, 32)
    assert type(model_game(model, images)).__name__ == "PackedGame"
    att = explain(model, images, progress=False)  # auto: exact for N = 16
    assert att.values.shape == (1, 16, 1) and att.evaluations == 1 << 16
    logits = model(images)
    torch.testing.assert_close(att.full[:, 0], logits.max(-1).values, rtol=1e-5, atol=1e-5)
    assert att.efficiency_gap().abs().max() < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["siglip", "reg_map"])
def test_cuda_triton_attention_bf16_matches_fp32_reference(name):
    model = make_model(name).cuda()
    images = torch.randn(2, 3, 32, 32, device="cuda")
    coalitions = random_coalitions(2, 4, 16, seed=3).cuda()
    want = dropped_reference(model, images, coalitions)
    got = fused_coalition_forward(model, images, coalitions, blocks="plain")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for blocks in ("plain", "fused", "compiled"):
            low = fused_coalition_forward(model, images, coalitions, blocks=blocks)
            torch.testing.assert_close(low.float(), want, rtol=5e-2, atol=5e-2, msg=blocks)
