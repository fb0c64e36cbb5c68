import os
from functools import partial

import pytest
import torch

from shapkern.kernels.varlen_attention import varlen_attention_backward, varlen_attention_forward
from shapkern.ops import varlen_attention
from shapkern.ops.varlen_attention import VarlenAttentionFunction, varlen_attention_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RUN_KERNELS = INTERPRET or torch.cuda.is_available()
# The interpreter runs Triton kernels on CPU tensors.
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernels = pytest.mark.skipif(
    not RUN_KERNELS, reason="Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU"
)


def make_inputs(lengths, H, D, dtype, device="cpu", seed=0):
    """Random q, k, v (T, H, D) as strided views of one fused qkv tensor, and cu_seqlens (R + 1,)."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    T = int(cu[-1])
    qkv = torch.randn(T, 3, H, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k, v = qkv.unbind(1)
    return q, k, v, cu.to(KERNEL_DEVICE)


def naive_attention(q, k, v, cu, scale):
    """Per-sequence loop with an explicit softmax, float64."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[s:e].double().transpose(0, 1) for x in (q, k, v))  # (H, L, D)
        p = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        out[s:e] = (p @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("buckets", [0, 1, 2, 4])
# [3, 9, 12, 0, 7, 5] and [0, 6, 6, 0]: complementary pairs filling equal rows (the dense-row path).
@pytest.mark.parametrize(
    "lengths", [[5], [0, 1, 7, 0, 17], [3, 33, 1, 10], [3, 9, 12, 0, 7, 5], [0, 6, 6, 0]]
)
def test_reference_matches_naive(lengths, buckets):
    q, k, v, cu = make_inputs(lengths, 2, 8, torch.float64)
    scale = 0.3
    out = varlen_attention_reference(q, k, v, cu, max(lengths) + 4, scale, length_buckets=buckets)
    torch.testing.assert_close(out, naive_attention(q, k, v, cu, scale), rtol=1e-12, atol=1e-12)
    # Default scale is D ** -0.5; CPU dispatch goes to the reference.
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, max(lengths)),
        naive_attention(q, k, v, cu, 8**-0.5),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("buckets, lengths", [(0, [2, 0, 3]), (2, [2, 0, 3]), (2, [2, 3, 5, 0])])
def test_reference_gradcheck_and_empty_sequence(buckets, lengths):
    q, k, v, cu = make_inputs(lengths, 1, 4, torch.float64)
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    attend = partial(varlen_attention_reference, cu_seqlens=cu, max_seqlen=5, length_buckets=buckets)
    assert torch.autograd.gradcheck(attend, (q, k, v))
    out = varlen_attention_reference(q, k, v, cu, 5)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def run_kernels(lengths, H, D, dtype, max_seqlen, device="cpu", seed=0):
    """Triton forward and backward and the float64 reference: (got, want) pairs, lse and reference inputs."""
    q, k, v, cu = make_inputs(lengths, H, D, dtype, device, seed)
    scale = D**-0.5
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(
        device=device, dtype=dtype
    )
    out, lse = varlen_attention_forward(q, k, v, cu, max_seqlen, scale)
    dq, dk, dv = varlen_attention_backward(dout, q, k, v, out, lse, cu, max_seqlen, scale)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = varlen_attention_reference(q64, k64, v64, cu, max_seqlen, scale)
    ref.backward(dout.double())
    return (out, ref), (dq, q64.grad), (dk, k64.grad), (dv, v64.grad), lse, (q64, k64, cu, scale)


def assert_matches(pairs, dtype):
    tol = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 5e-3), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    for name, (got, want) in zip(("out", "dq", "dk", "dv"), pairs):
        assert got.dtype == dtype, name
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(
            got.double(), want, rtol=tol[0], atol=tol[1], msg=lambda m, n=name: f"{n}: {m}"
        )


@needs_kernels
@pytest.mark.parametrize(
    "lengths, D, dtype",
    [
        ([1], 32, torch.float32),
        ([7], 32, torch.float16),
        ([17], 80, torch.float32),
        ([33], 32, torch.float32),
        ([7, 0, 17, 1, 33], 32, torch.float32),
        ([7, 0, 17, 1, 33], 32, torch.float16),
        ([7, 33, 1], 80, torch.float16),
        ([5, 12], 64, torch.float16),
        ([9, 20], 96, torch.float32),
        ([17, 3], 128, torch.float16),
    ],
)
def test_kernels_match_reference(lengths, D, dtype):
    *pairs, lse, (q64, k64, cu, scale) = run_kernels(lengths, 2, D, dtype, max(lengths) + 5, KERNEL_DEVICE)
    assert_matches(pairs, dtype)
    # The saved log-sum-exp is natural-log, (T, H) fp32.
    want_lse = torch.cat(
        [
            torch.logsumexp(torch.einsum("qhd,khd->hqk", q64[s:e], k64[s:e]) * scale, dim=-1).T
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())
        ]
    )
    assert lse.dtype == torch.float32 and lse.shape == q64.shape[:2]
    torch.testing.assert_close(lse.double().cpu(), want_lse.detach().cpu(), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_kernels_very_negative_scores():
    """All scores around -500: padded keys must not overflow exp in the backward (lse is very negative)."""
    q, k, v, cu = make_inputs([7, 3], 1, 32, torch.float32, KERNEL_DEVICE)
    q, k = q + 10, -(k.abs() + 10)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE)
    out, lse = varlen_attention_forward(q, k, v, cu, 16, 0.2)
    grads = varlen_attention_backward(dout, q, k, v, out, lse, cu, 16, 0.2)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = varlen_attention_reference(*leaves, cu, 16, 0.2)
    ref.backward(dout.double())
    assert lse.max() < -100
    assert_matches([(out, ref)] + [(g, x.grad) for g, x in zip(grads, leaves)], torch.float32)


@needs_kernels
def test_autograd_function_matches_reference():
    """The Triton autograd.Function (via its custom ops) called directly, also on CPU under the interpreter."""
    q, k, v, cu = make_inputs([9, 0, 20], 2, 32, torch.float32, KERNEL_DEVICE)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = VarlenAttentionFunction.apply(*leaves, cu, 24, 0.2)
    ref = varlen_attention_reference(*refs, cu, 24, 0.2)
    dout = torch.randn(out.shape, dtype=torch.float64, device=KERNEL_DEVICE)
    out.backward(dout.float())
    ref.backward(dout)
    assert_matches([(out, ref)] + [(a.grad, b.grad) for a, b in zip(leaves, refs)], torch.float32)


@needs_kernels
def test_autograd_function_traces_under_torch_compile():
    """Fake kernels let torch.compile trace forward and backward in one graph (aot_eager: no codegen)."""
    q, k, v, cu = make_inputs([9, 20], 2, 32, torch.float32, KERNEL_DEVICE)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    fn = torch.compile(
        lambda q, k, v: VarlenAttentionFunction.apply(q, k, v, cu, 24, 0.2),
        backend="aot_eager",
        fullgraph=True,
    )
    out = fn(*leaves)
    out.sum().backward()
    ref = varlen_attention_reference(q, k, v, cu, 24, 0.2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert all(torch.isfinite(x.grad).all() for x in leaves)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_vit_shapes(D, dtype):
    lengths = torch.randint(1, 200, (24,), generator=torch.Generator().manual_seed(D)).tolist()
    lengths[3], lengths[7] = 0, 197
    *pairs, _, _ = run_kernels(lengths, 12, D, dtype, 256, "cuda")
    assert_matches(pairs, dtype)


@pytest.mark.cuda
def test_cuda_more_sequences_than_a_grid_y_dimension():
    """Sequences sit on the grid's x axis: more than 65535 of them must work."""
    lengths = [1, 2, 0] * 23000
    *pairs, _, _ = run_kernels(lengths, 1, 32, torch.float16, 2, "cuda")
    assert_matches(pairs, torch.float16)


@pytest.mark.cuda
def test_cuda_op_autograd_and_compile():
    q, k, v, cu = make_inputs([50, 197, 0, 120], 12, 64, torch.bfloat16, "cuda")
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = varlen_attention(q, k, v, cu, 256)
    ref = varlen_attention_reference(q.double(), k.double(), v.double(), cu, 256)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    out.sum().backward()
    compiled = torch.compile(lambda q, k, v: varlen_attention(q, k, v, cu, 256), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), out)


def test_bad_inputs_name_the_argument():
    q, k, v, cu = make_inputs([3, 4], 2, 32, torch.float32)
    with pytest.raises(ValueError, match="k shape"):
        varlen_attention(q, k[:, :1], v, cu, 4)
    with pytest.raises(ValueError, match="v dtype"):
        varlen_attention(q, k, v.double(), cu, 4)
    with pytest.raises(ValueError, match="q must be"):
        varlen_attention(q[0], k, v, cu, 4)
    with pytest.raises(ValueError, match="q dtype"):
        varlen_attention(q.int(), k.int(), v.int(), cu, 4)
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        varlen_attention(q, k, v, cu.long(), 4)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D"):
        varlen_attention(q, k, v, cu[None], 4)
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention(q, k, v, cu, torch.tensor(4))


@pytest.mark.cuda
def test_bad_inputs_cuda():
    q, k, v, cu = make_inputs([3, 4], 2, 48, torch.float32, "cuda")
    with pytest.raises(ValueError, match="head dim of q"):
        varlen_attention(q, k, v, cu, 4)
    q, k, v, cu = make_inputs([3, 4], 2, 32, torch.float32, "cuda")
    with pytest.raises(ValueError, match="cu_seqlens device"):
        varlen_attention(q, k, v, cu.cpu(), 4)
    with pytest.raises(ValueError, match="q dtype"):
        varlen_attention(q.double(), k.double(), v.double(), cu, 4)
