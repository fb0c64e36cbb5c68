"""timm Beit on the packed engine, against Beit's own forward on each coalition's kept tokens (the
oracle of benchmarks/families.py: tokens dropped after the positional embedding, every relative
position bias sliced to the kept positions)."""

import functools
import importlib
import os

import pytest
import torch
from timm.models.beit import Beit

import shapkern
from benchmarks.families import dropped_reference, kept_patches
from shapkern import fused_coalition_forward, sample_coalitions
from shapkern.engine import coalition_tokens

# The module (the attribute shapkern.ops.varlen_attention is the op function).
varlen_attention_module = importlib.import_module("shapkern.ops.varlen_attention")

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
VARIANTS = {
    # beit_base_patch16_224's layout: a relative position bias per block, no absolute embedding.
    "rel_pos": {"use_abs_pos_emb": False, "use_rel_pos_bias": True, "init_values": 0.1},
    "shared_rel_pos": {"use_shared_rel_pos_bias": True, "init_values": 0.1},
    "both_biases": {"use_rel_pos_bias": True, "use_shared_rel_pos_bias": True, "init_values": 0.1},
    "abs_pos_only": {},
    "token_pool": {"use_abs_pos_emb": False, "use_rel_pos_bias": True, "global_pool": "token"},
    "swiglu": {"use_rel_pos_bias": True, "swiglu_mlp": True, "scale_mlp": True, "init_values": 0.1},
}


def make_model(name: str, seed: int = 0, **overrides) -> Beit:
    torch.manual_seed(seed)
    model = Beit(**{**SMALL, **VARIANTS[name], **overrides}).eval()
    with torch.no_grad():  # timm zero-inits the biases and tables; make every parameter matter
        for pname, p in model.named_parameters():
            p.add_((0.5 if "relative_position_bias_table" in pname else 0.05) * torch.randn_like(p))
    return model


def random_coalitions(batch, num, players, seed):
    """Random coalitions of varied sizes, the full and the empty one among them."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(batch, num, players, generator=gen) < torch.rand(batch, num, 1, generator=gen)
    masks[:, 0], masks[:, 1] = True, False
    return masks


def test_the_oracle_is_beit_itself_on_the_full_coalition_and_slices_the_bias():
    model = make_model("both_biases")
    images = torch.randn(2, 3, 32, 32)
    full = torch.ones(2, 1, 16, dtype=torch.bool)
    torch.testing.assert_close(dropped_reference(model, images, full), model(images).unsqueeze(1))
    # Dropping patches changes the output, and so does the bias at the kept positions.
    part = random_coalitions(2, 3, 16, seed=0)[:, 2:]
    dropped = dropped_reference(model, images, part)
    assert not torch.allclose(dropped, model(images).unsqueeze(1), atol=1e-3)
    with torch.no_grad():
        table = model.blocks[1].attn.relative_position_bias_table
        table.add_(torch.randn_like(table))  # (not a constant: softmax ignores that)
    assert not torch.allclose(dropped_reference(model, images, part), dropped, atol=1e-4)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("output", ["logits", "pre_logits"])
def test_engine_equals_beit_on_kept_tokens(name, output):
    model = make_model(name)
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 5, 16, seed=len(name))
    got = fused_coalition_forward(model, images, coalitions, output=output)
    want = dropped_reference(model, images, coalitions, output=output)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_timm_attention_without_fused_sdpa_gives_the_same_oracle():
    model = make_model("both_biases")
    images = torch.randn(1, 3, 32, 32)
    coalitions = random_coalitions(1, 4, 16, seed=1)
    fused = dropped_reference(model, images, coalitions)
    for block in model.blocks:
        block.attn.fused_attn = False  # timm's explicit softmax path
    torch.testing.assert_close(dropped_reference(model, images, coalitions), fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        fused_coalition_forward(model, images, coalitions), fused, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", ["rel_pos", "both_biases", "token_pool"])
@pytest.mark.parametrize("paired", [False, True])
def test_engine_gradients_equal_beit_on_kept_tokens(name, paired):
    """Gradients of a weighted sum of outputs to the images and every parameter, the relative
    position bias tables included, on both CPU attention layouts (complementary pairs or not)."""
    model = make_model(name)
    images = torch.randn(2, 3, 32, 32)
    if paired:
        coalitions = sample_coalitions(2, 4, 16, generator=torch.Generator().manual_seed(5))
    else:
        coalitions = random_coalitions(2, 4, 16, seed=7)
    weights = torch.randn(2, 4, 5)
    grads = []
    for fn in (functools.partial(fused_coalition_forward, paired=paired), dropped_reference):
        model.zero_grad()
        x = images.clone().requires_grad_()
        (fn(model, x, coalitions) * weights).sum().backward()
        grads.append({"images": x.grad, **{n: p.grad.clone() for n, p in model.named_parameters()}})
    assert any("relative_position_bias_table" in n for n in grads[0])
    for n, want in grads[1].items():
        torch.testing.assert_close(grads[0][n], want, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels on the CPU")
@pytest.mark.parametrize("paired", [False, True])
def test_engine_on_the_triton_kernels_equals_beit(paired, monkeypatch):
    """The fast path's attention (the Triton kernels with the bias, here in the interpreter; head dim
    32): outputs and gradients to the images and every parameter equal Beit's own forward."""
    monkeypatch.setattr(varlen_attention_module, "_use_triton", lambda q: True)
    model = make_model("both_biases", embed_dim=64)
    images = torch.randn(1, 3, 32, 32)
    coalitions = sample_coalitions(1, 4, 16, generator=torch.Generator().manual_seed(3))
    if not paired:
        coalitions[:, 1] = coalitions[:, 0]
    weights = torch.randn(1, 4, 5)
    results = []
    for fn in (fused_coalition_forward, dropped_reference):
        model.zero_grad()
        x = images.clone().requires_grad_()
        out = fn(model, x, coalitions)
        (out * weights).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_token_features_are_beits_on_kept_tokens():
    model = make_model("token_pool")  # norm per token (no fc_norm)
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, 16, seed=2)
    packed = coalition_tokens(model, images, coalitions)
    want = []
    for image, rows in zip(images, coalitions, strict=True):
        for row in rows:
            with kept_patches(model, row.nonzero().view(-1)):
                want.append(model.forward_features(image[None])[0])
    torch.testing.assert_close(packed.tokens, torch.cat(want), rtol=1e-5, atol=1e-6)


def test_compiled_blocks_match_plain_path_forward_and_backward():
    model = make_model("both_biases")
    images = torch.randn(2, 3, 32, 32)
    coalitions = sample_coalitions(2, 4, 16, generator=torch.Generator().manual_seed(6))
    results = []
    for blocks in ("plain", "compiled"):
        model.zero_grad()
        x = images.clone().requires_grad_()
        out = fused_coalition_forward(model, x, coalitions, paired=True, blocks=blocks)
        out.square().sum().backward()
        results.append([out.detach(), x.grad] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_explain_needs_no_arguments_and_its_values_add_up():
    """``explain(beit, images)`` picks the packed game and exact Shapley values (N = 16); they add up to
    the predicted class's logit on the full image minus that on the class token alone (by the oracle)."""
    model = make_model("rel_pos")
    images = torch.randn(1, 3, 32, 32)
    attribution = shapkern.explain(model, images, progress=False)
    assert attribution.method == "exact" and attribution.values.shape == (1, 16, 1)
    ends = torch.stack([torch.ones(16, dtype=torch.bool), torch.zeros(16, dtype=torch.bool)])[None]
    with torch.no_grad():
        full, empty = dropped_reference(model, images, ends)[0]
    target = int(full.argmax())
    torch.testing.assert_close(
        attribution.values.sum(),
        (full[target] - empty[target]).to(attribution.values.dtype),
        rtol=1e-4,
        atol=1e-5,
    )


def test_train_mode_drop_path_per_coalition_matches_beit():
    # Rates linspace(0, 1) over 2 blocks: block 0 never drops, block 1 always does, so timm's
    # train-mode forward is deterministic and the packed path must drop exactly the same branches.
    model = make_model("rel_pos", drop_path_rate=1.0).train()
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, 16, seed=8)
    got = fused_coalition_forward(model, images, coalitions)
    torch.testing.assert_close(got, dropped_reference(model, images, coalitions), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, train, match",
    [
        ({"global_pool": ""}, False, r"Beit .*global_pool ''"),
        ({"attn_drop_rate": 0.1}, True, r"Beit .*attention dropout in train mode"),
    ],
)
def test_unsupported_variants_raise(overrides, train, match):
    model = make_model("rel_pos", **overrides).train(train)
    images, coalitions = torch.randn(1, 3, 32, 32), torch.ones(1, 2, 16, dtype=torch.bool)
    with pytest.raises(NotImplementedError, match=match):
        fused_coalition_forward(model, images, coalitions)
    with pytest.raises(NotImplementedError, match="mode='input'"):
        fused_coalition_forward(model, images, coalitions)


def test_a_bias_window_unlike_the_patch_grid_is_refused():
    model = make_model("rel_pos")
    model.blocks[0].attn.set_window_size((2, 2))
    with pytest.raises(NotImplementedError, match=r"relative position window \(2, 2\) unlike the patch grid"):
        fused_coalition_forward(model, torch.randn(1, 3, 32, 32), torch.ones(1, 2, 16, dtype=torch.bool))


@pytest.mark.parametrize("blocks", ["fused"])
def test_fused_blocks_are_refused_with_the_paths_beit_runs(blocks):
    model = make_model("rel_pos")
    with pytest.raises(
        NotImplementedError, match=r"does not run timm Beit models; they run \('plain', 'compiled'\)"
    ):
        fused_coalition_forward(
            model, torch.randn(1, 3, 32, 32), torch.ones(1, 2, 16, dtype=torch.bool), blocks=blocks
        )


# ----------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_engine_matches_fp32_beit_on_kept_tokens(dtype, compiled):
    """Triton attention with the relative position bias on the GPU (head dim 64), plain and compiled
    blocks: logits and gradients (images, every parameter) against Beit's own fp32 forward, within
    1e-5 (fp32) or 1e-2 (bf16 autocast) relative."""
    model = make_model("both_biases", embed_dim=128).cuda()
    images = torch.randn(2, 3, 32, 32, device="cuda")
    coalitions = sample_coalitions(2, 6, 16, generator=torch.Generator().manual_seed(8)).cuda()
    weights = torch.randn(2, 6, 5, device="cuda")
    engine = functools.partial(
        fused_coalition_forward, paired=True, blocks="compiled" if compiled else "plain"
    )
    results = []
    for fn, autocast in ((engine, dtype != torch.float32), (dropped_reference, False)):
        model.zero_grad()
        x = images.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = fn(model, x, coalitions)
        (out.float() * weights).sum().backward()
        results.append([out.detach().float(), x.grad] + [p.grad.clone() for p in model.parameters()])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in zip(*results, strict=True):
        assert ((got - want).norm() / want.norm()).item() < tolerance
