"""Linear layer + bias + exact GELU (a transformer MLP's fc1): autograd op, PyTorch reference and dispatch.

``linear_gelu(x, weight, bias) = GELU(x @ weightᵀ + bias)`` with timm's exact (erf) GELU, x (T, K),
weight (N, K), bias (N,). On CUDA one Triton GEMM applies bias and GELU to its fp32 accumulator; when
gradients are needed it also stores the pre-activation, from which the backward computes dz = dy * GELU'(z)
and the bias gradient in one pass and runs the two weight/input GEMMs in cuBLAS.
"""

import torch
import torch.nn.functional as F

try:
    from shapkern.kernels.linear_gelu import gelu_backward, linear_gelu_forward

    _HAS_TRITON = True
except ImportError:  # no triton: every device takes the reference path
    _HAS_TRITON = False

__all__ = ["linear_gelu", "linear_gelu_reference"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch ``gelu(linear(x, weight, bias))``, exact erf GELU: (T, K) -> (T, N). Accepts float64."""
    return F.gelu(F.linear(x, weight, bias))


@torch.library.custom_op("shapkern::linear_gelu_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, save_preactivation: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    y, z = linear_gelu_forward(x, weight, bias, save_preactivation)
    # Custom ops cannot return None: without a backward to feed, z is an empty stand-in.
    return y, x.new_empty(0) if z is None else z


@_fwd_op.register_fake
def _(x, weight, bias, save_preactivation):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_preactivation else (0,))


@torch.library.custom_op("shapkern::linear_gelu_bwd", mutates_args=())
def _bwd_op(grad_y: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gelu_backward(grad_y, z)


@_bwd_op.register_fake
def _(grad_y, z):
    return z.new_empty(z.shape), z.new_empty(z.shape[1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, z = output
    ctx.save_for_backward(x, weight, z)
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(z)


def _backward(ctx, grad_y, _grad_z):
    x, weight, z = ctx.saved_tensors
    if z.dim() != 2:
        raise RuntimeError(
            "linear_gelu: backward through a forward that ran with save_preactivation=False; "
            "call shapkern.ops.linear_gelu, which saves it whenever an input requires grad"
        )
    dz, db = _bwd_op(grad_y, z)
    dx = dz @ weight if ctx.needs_input_grad[0] else None
    dw = dz.t() @ x if ctx.needs_input_grad[1] else None
    return dx, dw, db.to(ctx.bias_dtype), None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _shape(v) -> object:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def _check_inputs(x, weight, bias, triton_path: bool) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"linear_gelu: x must be a (T, K) tensor, got {_shape(x)}")
    K = x.shape[1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(
            f"linear_gelu: weight must be an (N, {K}) tensor for x of shape {tuple(x.shape)}, "
            f"got {_shape(weight)}"
        )
    N = weight.shape[0]
    if not isinstance(bias, torch.Tensor) or bias.shape != (N,):
        raise ValueError(
            f"linear_gelu: bias must be a ({N},) tensor for weight of shape {tuple(weight.shape)}, "
            f"got {_shape(bias)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t.device != x.device:
            raise ValueError(f"linear_gelu: {name} device {t.device} != x device {x.device}")
    dtypes = _TRITON_DTYPES if triton_path else (*_TRITON_DTYPES, torch.float64)
    if x.dtype not in dtypes:
        raise TypeError(f"linear_gelu: x dtype {x.dtype} not supported on {x.device}; use one of {dtypes}")
    if weight.dtype != x.dtype:
        raise TypeError(f"linear_gelu: weight dtype {weight.dtype} != x dtype {x.dtype}")
    if not bias.is_floating_point():
        raise TypeError(f"linear_gelu: bias must be a floating-point tensor, got {bias.dtype}")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x @ weight.T + bias)`` with the exact erf GELU, as ``timm``'s Mlp computes fc1 then act.

    x: (T, K); weight: (N, K), x's dtype; bias: (N,), any floating dtype; all on one device. Under
    autocast the three are cast to the autocast dtype first, as F.linear would. Returns (T, N) in x's
    dtype. CUDA tensors run the Triton GEMM with the bias + GELU epilogue (fp32 accumulation up to the
    GELU); other devices run ``linear_gelu_reference``.
    """
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (x, weight, bias))
    triton_path = _HAS_TRITON and isinstance(x, torch.Tensor) and x.is_cuda
    _check_inputs(x, weight, bias, triton_path)
    if not triton_path:
        return linear_gelu_reference(x, weight, bias)
    save = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    return _fwd_op(x, weight, bias, save)[0]
