"""The fused block path computes what the plain path computes (the ops' references on the CPU;
Triton kernels on CUDA), forward and backward, in eval and train mode."""

import pytest
import torch
from tiny_models import BLOCK_VARIANTS, tiny_vit

from shapkern import fused_coalition_forward, sample_coalitions
from shapkern.engine.blocks import supports_fused_blocks


def outputs_and_grads(model, images, coalitions, **kwargs):
    model.zero_grad()
    x = images.clone().requires_grad_()
    out = fused_coalition_forward(model, x, coalitions, paired=True, **kwargs)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("variant", BLOCK_VARIANTS)
def test_fused_blocks_match_the_plain_path(variant):
    model = tiny_vit(variant)
    assert supports_fused_blocks(model)
    images = torch.randn(2, 3, 32, 32)
    coalitions = sample_coalitions(2, 6, 16, generator=torch.Generator().manual_seed(1))
    plain = outputs_and_grads(model, images, coalitions, blocks="plain")
    fused = outputs_and_grads(model, images, coalitions, blocks="fused")
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_blocks_drop_paths_like_timm_in_train_mode():
    # Drop rates linspace(0, 1) over 2 blocks: block 0 never drops, block 1 always does, so the
    # result is deterministic and must equal the plain path's.
    model = tiny_vit("layer_scale", drop_path_rate=1.0).train()
    images = torch.randn(2, 3, 32, 32)
    coalitions = sample_coalitions(2, 4, 16, generator=torch.Generator().manual_seed(2))
    plain = fused_coalition_forward(model, images, coalitions, paired=True, blocks="plain")
    fused = fused_coalition_forward(model, images, coalitions, paired=True, blocks="fused")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_unsupported_blocks_and_conflicting_options_are_errors():
    from timm.layers import SwiGLU

    model = tiny_vit("cls_token", mlp_layer=SwiGLU)
    assert not supports_fused_blocks(model)
    images, coalitions = torch.randn(1, 3, 32, 32), sample_coalitions(1, 2, 16)
    with pytest.raises(NotImplementedError, match="blocks='fused' needs timm Blocks"):
        fused_coalition_forward(model, images, coalitions, paired=True, blocks="fused")
    with pytest.raises(ValueError, match="blocks must be one of"):
        fused_coalition_forward(tiny_vit("cls_token"), images, coalitions, blocks="fast")


def test_compiled_and_fused_keywords_are_deprecated_spellings_of_blocks():
    model = tiny_vit("cls_token")
    images, coalitions = torch.randn(1, 3, 32, 32), sample_coalitions(1, 2, 16)
    want = fused_coalition_forward(model, images, coalitions, blocks="fused")
    with pytest.warns(DeprecationWarning, match="pass blocks="):
        torch.testing.assert_close(fused_coalition_forward(model, images, coalitions, fused=True), want)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="exclude each other"):
        fused_coalition_forward(model, images, coalitions, fused=True, compiled=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_blocks_match_the_plain_path(dtype):
    model = tiny_vit("layer_scale").cuda()
    images = torch.randn(4, 3, 32, 32, device="cuda")
    coalitions = sample_coalitions(4, 8, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        plain = outputs_and_grads(model, images, coalitions, blocks="plain")
        fused = outputs_and_grads(model, images, coalitions, blocks="fused")
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got.float(), want.float(), **tol)
