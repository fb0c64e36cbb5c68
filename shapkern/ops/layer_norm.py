"""Residual add + LayerNorm in one pass: autograd ops, PyTorch references and dispatch.

A pre-norm transformer block computes ``s = x + gamma * y`` (the residual stream x plus a branch
output y, optionally scaled per channel by a LayerScale gamma) and then ``h = LayerNorm(s)``, the
input of the next branch. ``add_layer_norm`` returns both from one read of x and y; ``layer_norm`` is
the plain LayerNorm of the same kernels. Tensors are (T, D) rows of tokens, normalised over D.
"""

import torch
import torch.nn.functional as F

try:
    from shapkern.kernels.layer_norm import MAX_D, layer_norm_backward, layer_norm_forward, stores_grad_y

    _HAS_TRITON = True
except ImportError:  # no triton: every device takes the reference path
    MAX_D = 0
    _HAS_TRITON = False

__all__ = ["add_layer_norm", "add_layer_norm_reference", "layer_norm", "layer_norm_reference"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def add_layer_norm_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    layer_scale: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch ``s = x + layer_scale * y; h = layer_norm(s)``: (T, D) -> s, h (T, D).

    s has the promoted dtype of x and y, h has out_dtype (default: s's). Differentiable; accepts float64.
    """
    branch = y if layer_scale is None else y * layer_scale
    s = (x + branch).to(torch.promote_types(x.dtype, y.dtype))
    return s, layer_norm_reference(s, weight, bias, eps, out_dtype=out_dtype)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain PyTorch LayerNorm over the last dim: (T, D) -> (T, D) in out_dtype (default: x's).

    Computed in the promoted dtype of x, weight and bias (CPU LayerNorm takes no other mix).
    """
    dtype = torch.promote_types(x.dtype, torch.promote_types(weight.dtype, bias.dtype))
    h = F.layer_norm(x.to(dtype), x.shape[-1:], weight.to(dtype), bias.to(dtype), eps)
    return h.to(out_dtype or x.dtype)


@torch.library.custom_op("shapkern::add_layer_norm_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    layer_scale: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s, h, mean, rstd = layer_norm_forward(x, y, weight, bias, layer_scale, eps, out_dtype)
    # Custom ops cannot return None: a plain LayerNorm returns an empty s.
    return x.new_empty(0) if s is None else s, h, mean, rstd


@_fwd_op.register_fake
def _(x, y, weight, bias, layer_scale, eps, out_dtype):
    s_dtype = x.dtype if y is None else torch.promote_types(x.dtype, y.dtype)
    s = x.new_empty(0) if y is None else x.new_empty(x.shape, dtype=s_dtype)
    stats = x.new_empty(x.shape[0], dtype=torch.float32)
    return s, x.new_empty(x.shape, dtype=out_dtype or s_dtype), stats, stats.new_empty(stats.shape)


@torch.library.custom_op("shapkern::add_layer_norm_bwd", mutates_args=())
def _bwd_op(
    grad_s: torch.Tensor | None,
    grad_h: torch.Tensor,
    s: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor,
    layer_scale: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    x_dtype: torch.dtype,
    y_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dy, dw, db, dg = layer_norm_backward(
        grad_s, grad_h, s, y, weight, layer_scale, mean, rstd, x_dtype, y_dtype
    )
    # Empty stand-ins for grad_y when it equals grad_x and for an absent layer_scale's gradient.
    return dx, dx.new_empty(0) if dy is None else dy, dw, db, dw.new_empty(0) if dg is None else dg


@_bwd_op.register_fake
def _(grad_s, grad_h, s, y, weight, layer_scale, mean, rstd, x_dtype, y_dtype):
    D = s.shape[1]
    store_dy = stores_grad_y(x_dtype, y_dtype, layer_scale is not None)
    dy = s.new_empty(s.shape, dtype=y_dtype) if store_dy else s.new_empty(0)
    dg = s.new_empty(D if layer_scale is not None else 0, dtype=torch.float32)
    params = [s.new_empty(D, dtype=torch.float32) for _ in range(2)]
    return s.new_empty(s.shape, dtype=x_dtype), dy, *params, dg


def _setup_context(ctx, inputs, output):
    x, y, weight, bias, layer_scale, _, _ = inputs
    s, _, mean, rstd = output
    has_y = y is not None
    # The backward normalises s again (x for a plain LayerNorm) and reads y only for the LayerScale grad.
    ctx.save_for_backward(
        s if has_y else x, y if layer_scale is not None else None, weight, layer_scale, mean, rstd
    )
    ctx.dtypes = (x.dtype, y.dtype if has_y else None, bias.dtype)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_s, grad_h, _grad_mean, _grad_rstd):
    s, y, weight, layer_scale, mean, rstd = ctx.saved_tensors
    x_dtype, y_dtype, bias_dtype = ctx.dtypes
    dx, dy, dw, db, dg = _bwd_op(
        grad_s if y_dtype is not None else None,
        grad_h,
        s,
        y,
        weight,
        layer_scale,
        mean,
        rstd,
        x_dtype,
        y_dtype,
    )
    if y_dtype is None:
        dy = None
    elif not stores_grad_y(x_dtype, y_dtype, layer_scale is not None):
        dy = dx  # no LayerScale and one dtype: d/dy of x + y is d/dx
    dg = None if layer_scale is None else dg.to(layer_scale.dtype)
    return dx, dy, dw.to(weight.dtype), db.to(bias_dtype), dg, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_vector(op: str, name: str, v, x: torch.Tensor) -> None:
    if not isinstance(v, torch.Tensor) or v.shape != x.shape[-1:]:
        raise ValueError(
            f"{op}: {name} must be a ({x.shape[-1]},) tensor for x of shape {tuple(x.shape)}, got {_shape(v)}"
        )
    if not v.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {v.dtype}")
    if v.device != x.device:
        raise ValueError(f"{op}: {name} device {v.device} != x device {x.device}")


def _shape(v) -> object:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def _check_inputs(op: str, x, y, weight, bias, layer_scale, eps, out_dtype, triton_path: bool) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{op}: x must be a (T, D) tensor, got {_shape(x)}")
    dtypes = _TRITON_DTYPES if triton_path else (*_TRITON_DTYPES, torch.float64)
    named = [("x", x)] if y is None else [("x", x), ("y", y)]
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            raise ValueError(f"{op}: y must have x's shape {tuple(x.shape)}, got {_shape(y)}")
        if y.device != x.device:
            raise ValueError(f"{op}: y device {y.device} != x device {x.device}")
    for name, t in named:
        if t.dtype not in dtypes:
            raise TypeError(f"{op}: {name} dtype {t.dtype} not supported on {t.device}; use one of {dtypes}")
    for name, v in (("weight", weight), ("bias", bias), ("layer_scale", layer_scale)):
        if v is not None or name != "layer_scale":
            _check_vector(op, name, v, x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{op}: eps must be a positive float, got {eps!r}")
    if out_dtype is not None and out_dtype not in dtypes:
        raise TypeError(f"{op}: out_dtype must be None or one of {dtypes}, got {out_dtype}")
    if triton_path and x.shape[1] > MAX_D:
        raise ValueError(f"{op}: D = {x.shape[1]} is above the kernel's limit of {MAX_D} channels")


def add_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    layer_scale: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then LayerNorm: ``s = x + layer_scale * y``, ``h = layer_norm(s, weight, bias, eps)``.

    x, y: (T, D) floating tensors (their dtypes may differ, e.g. an fp32 residual stream and a bf16
    branch under autocast); weight, bias, layer_scale: (D,), any floating dtype, on x's device.
    Returns s (T, D) in the promoted dtype of x and y, and h (T, D) in out_dtype (default: s's dtype;
    pass the autocast dtype to feed a GEMM without a cast). CUDA tensors run one Triton pass forward
    and one backward, with fp32 arithmetic; other devices run ``add_layer_norm_reference``.
    """
    triton_path = _HAS_TRITON and isinstance(x, torch.Tensor) and x.is_cuda
    _check_inputs("add_layer_norm", x, y, weight, bias, layer_scale, eps, out_dtype, triton_path)
    if not triton_path:
        return add_layer_norm_reference(x, y, weight, bias, eps, layer_scale, out_dtype=out_dtype)
    s, h, _, _ = _fwd_op(x, y, weight, bias, layer_scale, float(eps), out_dtype)
    return s, h


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LayerNorm over D of x (T, D) with weight, bias (D,): (T, D) in out_dtype (default: x's).

    CUDA tensors run the Triton kernels of ``add_layer_norm`` without the residual; other devices run
    ``layer_norm_reference``.
    """
    triton_path = _HAS_TRITON and isinstance(x, torch.Tensor) and x.is_cuda
    _check_inputs("layer_norm", x, None, weight, bias, None, eps, out_dtype, triton_path)
    if not triton_path:
        return layer_norm_reference(x, weight, bias, eps, out_dtype=out_dtype)
    return _fwd_op(x, None, weight, bias, None, float(eps), out_dtype)[1]
