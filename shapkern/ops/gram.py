"""The weighted Gram matrix of bit-packed coalitions, KernelSHAP's ``A = Σ_m w_m z_m z_mᵀ``.

On the CPU the native kernel counts with AND + popcount over the coalitions' bits transposed per
player when an image's weights are equal (exact), and with a sparse row update otherwise; on CUDA a
Triton GEMM on the packed coalitions (``shapkern.kernels.coalition_reduce``). Differentiable in the
weights.
"""

from __future__ import annotations

import torch

from shapkern.ops import _extension as _ext
from shapkern.ops._checks import acc_dtype, check, check_float, check_packed, check_same_device
from shapkern.ops.bitpack import unpack_coalitions, unpack_coalitions_reference

try:
    from shapkern.kernels import coalition_reduce as _gemm

    _HAS_TRITON = True
except ImportError:  # no triton: CUDA tensors take the reference
    _HAS_TRITON = False

__all__ = ["coalition_gram", "coalition_gram_reference"]


def coalition_gram_reference(packed: torch.Tensor, weights: torch.Tensor, num_players: int) -> torch.Tensor:
    """PyTorch reference of :func:`coalition_gram`: the dense product over the unpacked coalitions."""
    acc = acc_dtype(weights.dtype)
    z = unpack_coalitions_reference(packed, num_players).to(acc)
    return torch.einsum("bmi,bm,bmj->bij", z, weights.to(acc), z).to(weights.dtype)


def coalition_gram(packed: torch.Tensor, weights: torch.Tensor, num_players: int) -> torch.Tensor:
    """Weighted Gram matrix of the coalitions: ``A[b] = sum_m weights[b, m] z_m z_mᵀ``.

    KernelSHAP's ``A = E[z zᵀ]`` is ``coalition_gram(packed, weights, N)`` with equal weights (e.g.
    ``1 / M``). On the CPU, images whose weights are all equal take an AND + popcount over the bits
    transposed per player (exact counts), the others a sparse row update; on CUDA, a Triton GEMM.

    Args:
        packed: (B, M, W) int32, bit-packed coalitions (:func:`~shapkern.ops.pack_coalitions`),
            W >= ceil(N / 32).
        weights: (B, M) floating, a weight per coalition.
        num_players: N.

    Returns:
        (B, N, N) in the dtype of ``weights``, exactly symmetric (the reference is symmetric only up to
        rounding); differentiable in ``weights`` (``grad_w[b, m] = z_mᵀ G[b] z_m``).
    """
    op = "coalition_gram"
    check_packed(packed, num_players, op)
    check(weights.dim() == 2, op, f"weights must be 2-D (B, M), got shape {tuple(weights.shape)}")
    check_float(weights, "weights", op)
    check(
        packed.shape[:2] == weights.shape,
        op,
        f"packed shape {tuple(packed.shape)} does not match weights shape {tuple(weights.shape)} in (B, M)",
    )
    check_same_device(op, weights=weights, packed=packed)
    has_kernel = _ext.extension_loaded() and (
        weights.device.type == "cpu" or (weights.is_cuda and _HAS_TRITON)
    )
    if has_kernel:
        return torch.ops.shapkern.coalition_gram(packed, weights, num_players)
    return coalition_gram_reference(packed, weights, num_players)


def _register() -> None:
    lib = "shapkern::coalition_gram"

    @torch.library.register_fake(lib)
    def _(packed, weights, num_players):
        return weights.new_empty((packed.shape[0], num_players, num_players))

    def gram_setup(ctx, inputs, output):
        packed, weights, num_players = inputs
        ctx.save_for_backward(packed, weights)
        ctx.num_players = num_players

    def coalition_gram_backward(ctx, grad):
        # d A[b] / d w[b, m] = z_m z_mᵀ, so grad_w[b, m] = z_mᵀ G[b] z_m
        packed, weights = ctx.saved_tensors
        acc = acc_dtype(weights.dtype)
        z = unpack_coalitions(packed, ctx.num_players).to(acc)
        return None, (torch.bmm(z, grad.to(acc)) * z).sum(-1).to(weights.dtype), None

    torch.library.register_autograd(lib, coalition_gram_backward, setup_context=gram_setup)
    if _HAS_TRITON:
        torch.library.register_kernel(lib, "cuda", _gemm.coalition_gram)


if _ext.extension_loaded():
    _register()
