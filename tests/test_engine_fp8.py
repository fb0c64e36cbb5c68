"""The fp8 engine path (precision="fp8"): the same numbers as the plain path with every qkv, proj, fc1 and
fc2 GEMM fake-quantised (exactly, on the CPU), within a derived fp8 bound of the plain path, a weight cache
that follows the weights, and clear errors."""

import copy

import pytest
import torch
from tiny_models import BLOCK_VARIANTS, tiny_shapley_vit, tiny_vit

from shapkern import fused_coalition_forward, sample_coalitions
from shapkern.engine import coalition_tokens
from shapkern.engine.fp8 import clear_fp8_weights, fp8_weight, supports_fp8, supports_fp8_blocks
from shapkern.explainers import explain
from shapkern.games import model_game
from shapkern.ops.fp8_reference import quantize_rows_reference, quantize_weight

# fp8 against the unquantised path, relative L2 over all logits. Each e4m3 operand has a relative
# rounding error of at most 2^-4 (rms <= 2^-3 / sqrt(12) = 3.6%, uniform over a relative step of at
# most 2^-3); a GEMM with two quantised operands errs by <= sqrt(2) * 3.6% = 5.1% rms, and the 4 * depth
# GEMMs of the model add in quadrature at worst: sqrt(8) * 5.1% = 14.4% for depth 2. Measured: 1-6%.
FP8_TOLERANCE = 0.15


def fake_quantized(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose four GEMMs per block see e4m3-rounded operands (dequantised to fp32) on the plain path:
    weights replaced by their dequantised e4m3 values, inputs rounded per row by a forward pre-hook."""
    model = copy.deepcopy(model)

    def quantize_input(module, args):
        q, scale = quantize_rows_reference(args[0])
        return (q.float() * scale,)

    for block in model.blocks:
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            weight, scale = quantize_weight(linear.weight)
            with torch.no_grad():
                linear.weight.copy_(weight.float() * scale.t())
            linear.register_forward_pre_hook(quantize_input)
    return model


def inputs(batch=2, coalitions=6, seed=1):
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return images, sample_coalitions(batch, coalitions, 16, generator=torch.Generator().manual_seed(seed))


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("variant", BLOCK_VARIANTS)
@torch.no_grad()
def test_fp8_path_is_the_plain_path_with_quantised_gemms(variant):
    model = tiny_vit(variant)
    assert supports_fp8_blocks(model)
    images, coalitions = inputs()
    got = fused_coalition_forward(model, images, coalitions, paired=True, precision="fp8")
    fake = fused_coalition_forward(fake_quantized(model), images, coalitions, paired=True, blocks="plain")
    torch.testing.assert_close(got, fake, rtol=1e-5, atol=1e-6)
    plain = fused_coalition_forward(model, images, coalitions, paired=True, blocks="plain")
    assert 0 < relative_error(got, plain) < FP8_TOLERANCE


@torch.no_grad()
def test_coalition_tokens_and_unpaired_coalitions():
    model = tiny_vit("registers")
    images, coalitions = inputs()
    coalitions[:, 0] = True  # unpaired: a full coalition next to a random one
    got = coalition_tokens(model, images, coalitions, precision="fp8")
    fake = coalition_tokens(fake_quantized(model), images, coalitions, blocks="plain")
    torch.testing.assert_close(got.tokens, fake.tokens, rtol=1e-5, atol=1e-5)
    assert got.shape == fake.shape == (2, 6)


@torch.no_grad()
def test_fp8_drops_paths_like_the_plain_path_in_train_mode():
    # Drop rates linspace(0, 1) over 2 blocks: block 0 never drops, block 1 always does.
    model = tiny_vit("layer_scale", drop_path_rate=1.0).train()
    images, coalitions = inputs()
    got = fused_coalition_forward(model, images, coalitions, paired=True, precision="fp8")
    fake = fused_coalition_forward(fake_quantized(model), images, coalitions, paired=True, blocks="plain")
    torch.testing.assert_close(got, fake, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_fp8_under_cpu_autocast_writes_bf16_gemm_outputs():
    model = tiny_vit("layer_scale")
    images, coalitions = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_coalition_forward(model, images, coalitions, paired=True, precision="fp8")
        plain = fused_coalition_forward(model, images, coalitions, paired=True, blocks="plain")
    fp32 = fused_coalition_forward(model, images, coalitions, paired=True, blocks="plain")
    assert torch.isfinite(got).all()
    assert relative_error(got, fp32) < FP8_TOLERANCE
    assert relative_error(got, plain) < FP8_TOLERANCE


@torch.no_grad()
def test_fp8_on_a_bf16_model():
    # A bf16 model without autocast (the GPU benchmarks' setting): bf16 GEMM outputs and residual stream.
    model = tiny_vit("layer_scale")
    images, coalitions = inputs()
    fp32 = fused_coalition_forward(model, images, coalitions, paired=True, blocks="plain")
    model = model.to(torch.bfloat16)
    got = fused_coalition_forward(model, images.bfloat16(), coalitions, paired=True, precision="fp8")
    assert got.dtype == torch.bfloat16
    assert relative_error(got, fp32) < FP8_TOLERANCE


def test_weight_cache_follows_the_weights():
    model = tiny_vit()
    qkv = model.blocks[0].attn.qkv
    clear_fp8_weights()
    first = fp8_weight(qkv)
    assert all(a is b for a, b in zip(fp8_weight(qkv), first, strict=True))  # cached
    for got, want in zip(first, quantize_weight(qkv.weight), strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)

    # An optimizer step updates the weights in place (a new _version): the cache must requantise.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    images, coalitions = inputs()
    fused_coalition_forward(model, images, coalitions, paired=True, blocks="plain").square().mean().backward()
    optimizer.step()
    after = fp8_weight(qkv)
    assert not torch.equal(after[0].float(), first[0].float())
    for got, want in zip(after, quantize_weight(qkv.weight), strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)
    with torch.no_grad():
        got = fused_coalition_forward(model, images, coalitions, paired=True, precision="fp8")
        fake = fused_coalition_forward(fake_quantized(model), images, coalitions, paired=True, blocks="plain")
    torch.testing.assert_close(got, fake, rtol=1e-5, atol=1e-6)

    # load_state_dict copies in place; a replaced Parameter has a new address.
    state = {k: v.clone() for k, v in tiny_vit("cls_token").state_dict().items()}
    model.load_state_dict(state)
    torch.testing.assert_close(fp8_weight(qkv)[1], quantize_weight(qkv.weight)[1], rtol=0, atol=0)
    qkv.weight = torch.nn.Parameter(qkv.weight.detach() * 2)
    torch.testing.assert_close(fp8_weight(qkv)[1], quantize_weight(qkv.weight)[1], rtol=0, atol=0)

    # Writes through .data bypass the version counter; clear_fp8_weights drops the entries.
    cached = fp8_weight(qkv)
    qkv.weight.data.mul_(3)
    assert fp8_weight(qkv)[1] is cached[1]
    clear_fp8_weights(model)
    torch.testing.assert_close(fp8_weight(qkv)[1], quantize_weight(qkv.weight)[1], rtol=0, atol=0)


def test_inference_tensors_are_quantised_but_never_cached():
    with torch.inference_mode():  # inference tensors have no version counter to key a cache entry on
        linear = torch.nn.Linear(32, 16)
    first = fp8_weight(linear)
    assert fp8_weight(linear)[0] is not first[0]
    for got, want in zip(first, quantize_weight(linear.weight), strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


def test_explain_with_fp8_is_close_to_fp32_at_the_same_seed():
    model = tiny_vit()
    images = inputs()[0]
    kwargs = {"method": "kernel", "budget": 256, "seed": 3, "progress": False, "target": "all"}
    fp32 = explain(model, images, **kwargs)
    fp8 = explain(model, images, precision="fp8", **kwargs)
    assert fp8.values.shape == fp32.values.shape == (2, 16, 5)
    assert relative_error(fp8.full, fp32.full) < FP8_TOLERANCE
    assert 0 < relative_error(fp8.values, fp32.values) < 2 * FP8_TOLERANCE


def test_precision_errors():
    model = tiny_vit()
    images, coalitions = inputs()
    with pytest.raises(ValueError, match="precision must be one of \\('auto', 'fp8'\\), got 'bf16'"):
        fused_coalition_forward(model, images, coalitions, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        model_game(model, images, precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        explain(model, images, precision="int8", progress=False)
    with torch.no_grad():
        for blocks in ("fused", "compiled"):
            with pytest.raises(
                ValueError, match=f"precision='fp8' runs its own block path: it excludes blocks='{blocks}'"
            ):
                fused_coalition_forward(model, images, coalitions, precision="fp8", blocks=blocks)
        with pytest.raises(ValueError, match="needs mode='packed'"):
            fused_coalition_forward(model, images, coalitions, precision="fp8", mode="input")
    # Gradients: parameters that require grad, or images that do, under grad mode.
    with pytest.raises(RuntimeError, match="forward-only; use precision='auto' for gradients"):
        fused_coalition_forward(model, images, coalitions, precision="fp8")
    model.requires_grad_(False)
    with pytest.raises(RuntimeError, match="forward-only"):
        fused_coalition_forward(model, images.requires_grad_(), coalitions, precision="fp8")
    assert not fused_coalition_forward(model, images.detach(), coalitions, precision="fp8").requires_grad


def test_unsupported_blocks_are_errors():
    from timm.layers import SwiGLU

    images, coalitions = inputs()
    model = tiny_vit(mlp_layer=SwiGLU)
    assert not supports_fp8_blocks(model)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="precision='fp8' needs timm Blocks"):
        fused_coalition_forward(model, images, coalitions, precision="fp8")
    gated = tiny_vit()
    gated.blocks[1].attn.gate = torch.nn.Linear(32, 32)
    assert not supports_fp8_blocks(gated)
    assert supports_fp8("cpu")


# -- CUDA --------------------------------------------------------------------------------------


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_fp8_path_matches_fake_quantisation_and_bf16():
    if not supports_fp8("cuda"):
        pytest.skip("needs compute capability 8.9+")
    model = tiny_vit("layer_scale").cuda()
    images, coalitions = (t.cuda() for t in inputs(batch=4, coalitions=8))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fused_coalition_forward(model, images, coalitions, paired=True, precision="fp8")
        plain = fused_coalition_forward(model, images, coalitions, paired=True, blocks="plain")
    fp32 = fused_coalition_forward(model, images, coalitions, paired=True, blocks="plain")
    assert relative_error(got, fp32) < FP8_TOLERANCE
    assert relative_error(got, plain) < FP8_TOLERANCE
    # fp32 residual stream and GEMM outputs on the GPU against the CPU's fp8 numerics.
    cpu = fused_coalition_forward(model.cpu(), images.cpu(), coalitions.cpu(), paired=True, precision="fp8")
    model.cuda()
    got = fused_coalition_forward(model, images, coalitions, paired=True, precision="fp8")
    assert relative_error(got.cpu(), cpu) < 0.02


@pytest.mark.cuda
def test_cuda_before_sm89_is_an_error():
    if supports_fp8("cuda"):
        pytest.skip("this GPU runs fp8")
    model = tiny_vit().cuda()
    images, coalitions = (t.cuda() for t in inputs())
    with torch.no_grad(), pytest.raises(RuntimeError, match="compute capability 8.9 or newer"):
        fused_coalition_forward(model, images, coalitions, precision="fp8")


def test_shapley_vit_values_and_explanations_take_fp8():
    model = tiny_shapley_vit(5, img_size=32, patch_size=8, depth=2, embed_dim=32)
    images = inputs()[0]
    coalitions = sample_coalitions(2, 4, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval().coalition_values(images, coalitions, paired=True)
        got = model.coalition_values(images, coalitions, paired=True, precision="fp8")
    assert 0 < relative_error(got, want) < FP8_TOLERANCE
    kwargs = {"method": "exact", "target": "all", "progress": False}
    fp8 = explain(model, images, precision="fp8", **kwargs)
    assert relative_error(fp8.values, explain(model, images, **kwargs).values) < 2 * FP8_TOLERANCE
