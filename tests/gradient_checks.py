"""Checks the adapter tests share: a model's outputs and gradients, compared relative to their size."""

import torch


def assert_relative_close(got: list, want: list, tolerance: float) -> None:
    """|g - w| <= tolerance |w| + 1e-6 for every pair: relative, but absolute for a tensor that is zero
    up to rounding (the gradient of a key bias, to which softmax is invariant)."""
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        error, scale = (g.double() - w.double()).norm().item(), w.double().norm().item()
        assert error <= tolerance * scale + 1e-6, f"tensor {index}: error {error:.3g}, norm {scale:.3g}"


def assert_flat_close(got: list, want: list, tolerance: float) -> None:
    """The output, and all gradients as one vector, within ``tolerance`` relative (the CUDA tests)."""
    for g, w in (
        (got[0], want[0]),
        (torch.cat([t.flatten() for t in got[1:]]), torch.cat([t.flatten() for t in want[1:]])),
    ):
        assert ((g.cpu().double() - w.double()).norm() / w.double().norm()).item() < tolerance


def outputs_and_gradients(fn, model, images, weights):
    """fn(images) and the gradients of a weighted sum of it to the images and every parameter."""
    model.zero_grad()
    x = images.clone().requires_grad_()
    out = fn(x)
    (out * weights).sum().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    return [out.detach(), x.grad] + grads
