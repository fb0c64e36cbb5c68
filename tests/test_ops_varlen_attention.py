import importlib
import os
import warnings
from functools import partial

import pytest
import torch

from shapkern.kernels import varlen_attention as kernels
from shapkern.kernels.varlen_attention import varlen_attention_backward, varlen_attention_forward
from shapkern.ops import varlen_attention
from shapkern.ops.varlen_attention import varlen_attention_reference

# The module (the attribute shapkern.ops.varlen_attention is the op function).
op_module = importlib.import_module("shapkern.ops.varlen_attention")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RUN_KERNELS = INTERPRET or torch.cuda.is_available()
# The interpreter runs Triton kernels on CPU tensors.
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernels = pytest.mark.skipif(
    not RUN_KERNELS, reason="Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU"
)
# The shapkern::varlen_attention_fwd op with its registered autograd: the Triton path of
# varlen_attention on any device the kernels run on (CUDA, or the CPU under the interpreter).
triton_attention = torch.ops.shapkern.varlen_attention_fwd


def make_inputs(lengths, H, D, dtype, device="cpu", seed=0):
    """Random q, k, v (T, H, D) as strided views of one fused qkv tensor, and cu_seqlens (R + 1,)."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    T = int(cu[-1])
    qkv = torch.randn(T, 3, H, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k, v = qkv.unbind(1)
    return q, k, v, cu.to(device)


def paired_lengths(players: int, prefix: int, first_sizes):
    """Sequence lengths of complementary coalition pairs: (P + s, P + N - s) for each s."""
    return [n for s in first_sizes for n in (prefix + s, prefix + players - s)]


def naive_attention(q, k, v, cu, scale, bias=None, bias_index=None):
    """Per-sequence loop with an explicit softmax, float64; with a bias (H, L, L), the scores of each
    sequence gain bias[:, positions][:, :, positions] at its tokens' positions bias_index (T,).
    Differentiable in every input."""
    pieces = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (x[s:e].double().cpu().transpose(0, 1) for x in (q, k, v))  # (H, L, D)
        scores = qs @ ks.transpose(1, 2) * scale
        if bias is not None:
            positions = bias_index[s:e].long().cpu()
            scores = scores + bias.double().cpu()[:, positions][:, :, positions]
        pieces.append((torch.softmax(scores, dim=-1) @ vs).transpose(0, 1))
    return torch.cat(pieces) if pieces else torch.zeros(q.shape, dtype=torch.float64)


def make_bias(lengths, H, dtype=torch.float64, device="cpu", seed=0, extra_positions=3):
    """A random bias (H, L, L) and each token's position (T,) int32, as the engine packs coalitions:
    every sequence holds position 0 (a class token) then a sorted random subset of 1 ... L - 1."""
    gen = torch.Generator().manual_seed(seed + 100)
    positions = max(lengths, default=0) + extra_positions
    bias = torch.randn(H, positions, positions, generator=gen, dtype=torch.float64)
    index = [
        torch.cat(
            [
                torch.zeros(1, dtype=torch.long),
                1 + torch.randperm(positions - 1, generator=gen)[: n - 1].sort()[0],
            ]
        )
        for n in lengths
        if n
    ]
    index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    return bias.to(device=device, dtype=dtype), index.to(device=device, dtype=torch.int32)


class _LaunchSpy:
    """Stands in for a Triton kernel in the launchers' module and records each launch by name."""

    def __init__(self, kernel, name: str, launched: list):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


SCHEDULE_KERNELS = {
    "short": ["_fwd_short_kernel", "_bwd_short_kernel"],
    "long": ["_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"],
}


@pytest.fixture(params=["short", "long"])
def schedule(request, monkeypatch):
    """Run the kernels under the short schedule (whole sequences per program) or the long one.

    Returns (schedule, names of the kernels launched so far), to compare with SCHEDULE_KERNELS.
    """
    if request.param == "long":
        monkeypatch.setattr(kernels, "SHORT_MAX_SEQLEN", {"fwd": 0, "bwd": 0})
    launched = []
    for name in SCHEDULE_KERNELS["short"] + SCHEDULE_KERNELS["long"]:
        monkeypatch.setattr(kernels, name, _LaunchSpy(getattr(kernels, name), name, launched))
    return request.param, launched


# ------------------------------------------------------------------------------------------ reference


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


@pytest.mark.parametrize("buckets", [0, 1, 2, 4])
@pytest.mark.parametrize("lengths", [[5], [0, 1, 7, 0, 17], [3, 9, 12, 0, 7, 5], [0, 6, 6, 0]])
def test_reference_with_bias_matches_naive_forward_and_backward(lengths, buckets):
    """Both CPU layouts (dense pair rows for [3, 9, 12, 0, 7, 5] and [0, 6, 6, 0], length buckets
    otherwise) add the bias at the tokens' positions; gradients reach q, k, v and the bias."""
    q, k, v, cu = make_inputs(lengths, 2, 8, torch.float64)
    bias, index = make_bias(lengths, 2)
    grads = []
    reference = partial(varlen_attention_reference, max_seqlen=max(lengths) + 4, length_buckets=buckets)
    for attend in (reference, naive_attention):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, bias)]
        out = attend(*leaves[:3], cu, scale=0.3, bias=leaves[3], bias_index=index)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape))
        grads.append([out] + [x.grad for x in leaves])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The bias changes the result (the test can fail), and CPU dispatch takes the reference.
    assert not torch.allclose(grads[0][0], naive_attention(q, k, v, cu, 0.3))
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, max(lengths), 0.3, bias=bias, bias_index=index.long()), grads[1][0]
    )


@pytest.mark.parametrize("buckets, lengths", [(0, [2, 0, 3]), (2, [2, 3, 5, 0]), (4, [2, 3, 4, 1])])
def test_reference_with_bias_gradcheck(buckets, lengths):
    q, k, v, cu = make_inputs(lengths, 2, 4, torch.float64)
    bias, index = make_bias(lengths, 2)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, bias)]

    def attend(q, k, v, bias):
        return varlen_attention_reference(q, k, v, cu, 5, bias=bias, bias_index=index, length_buckets=buckets)

    assert torch.autograd.gradcheck(attend, leaves)


# -------------------------------------------------------------------------------------------- kernels


def run_kernels(lengths, H, D, dtype, max_seqlen, device="cpu", seed=0):
    """Triton forward and backward and the float64 reference: (got, want) pairs, lse and reference inputs."""
    q, k, v, cu = make_inputs(lengths, H, D, dtype, device, seed)
    scale = D**-0.5
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(
        device=device, dtype=dtype
    )
    out, lse = varlen_attention_forward(q, k, v, cu, max_seqlen, scale)
    dq, dk, dv, dbias = varlen_attention_backward(dout, q, k, v, out, lse, cu, max_seqlen, scale)
    assert dbias is None

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = varlen_attention_reference(q64, k64, v64, cu, max_seqlen, scale)
    ref.backward(dout.double())
    return (out, ref), (dq, q64.grad), (dk, k64.grad), (dv, v64.grad), lse, (q64, k64, cu, scale)


def assert_matches(pairs, dtype):
    tol = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 5e-3), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    for name, (got, want) in zip(("out", "dq", "dk", "dv"), pairs, strict=True):
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
def test_kernels_match_reference(lengths, D, dtype, schedule):
    *pairs, lse, (q64, k64, cu, scale) = run_kernels(lengths, 2, D, dtype, max(lengths) + 5, KERNEL_DEVICE)
    name, launched = schedule
    assert launched == SCHEDULE_KERNELS[name]
    assert_matches(pairs, dtype)
    # The saved log-sum-exp is natural-log, (T, H) fp32.
    want_lse = torch.cat(
        [
            torch.logsumexp(torch.einsum("qhd,khd->hqk", q64[s:e], k64[s:e]) * scale, dim=-1).T
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
        ]
    )
    assert lse.dtype == torch.float32 and lse.shape == q64.shape[:2]
    torch.testing.assert_close(lse.double().cpu(), want_lse.detach().cpu(), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("seqs_per_program", [1, 2, 3])
@pytest.mark.parametrize(
    "lengths, dtype",
    [
        # Complementary pairs (P = 1, N = 30), including the empty and the full coalition's partner.
        (paired_lengths(30, 1, [0, 1, 29, 12, 30]), torch.float32),
        (paired_lengths(30, 1, [3, 15, 30]), torch.float16),
        # Empty sequences and single tokens around sequences of 1-3 key blocks (the dQ partial sums);
        # an odd count leaves a program with fewer sequences than seqs_per_program.
        ([0, 1, 0, 33, 1, 16, 17, 0, 48], torch.float32),
    ],
)
def test_short_schedule_groups_of_sequences(lengths, dtype, seqs_per_program, monkeypatch):
    monkeypatch.setattr(kernels, "SEQS_PER_PROGRAM", seqs_per_program)
    max_seqlen = max(lengths)
    assert kernels.short_schedule("fwd", max_seqlen) and kernels.short_schedule("bwd", max_seqlen)
    *pairs, _, _ = run_kernels(lengths, 2, 32, dtype, max_seqlen, KERNEL_DEVICE, seed=seqs_per_program)
    assert_matches(pairs, dtype)


@needs_kernels
def test_kernels_very_negative_scores(schedule):
    """All scores around -500: padded keys must not overflow exp in the backward (lse is very negative)."""
    q, k, v, cu = make_inputs([7, 3], 1, 32, torch.float32, KERNEL_DEVICE)
    q, k = q + 10, -(k.abs() + 10)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE)
    out, lse = varlen_attention_forward(q, k, v, cu, 16, 0.2)
    *grads, _ = varlen_attention_backward(dout, q, k, v, out, lse, cu, 16, 0.2)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = varlen_attention_reference(*leaves, cu, 16, 0.2)
    ref.backward(dout.double())
    assert lse.max() < -100
    assert_matches([(out, ref)] + [(g, x.grad) for g, x in zip(grads, leaves, strict=True)], torch.float32)


def run_bias_kernels(lengths, H, D, dtype, bias_dtype, max_seqlen, device="cpu", seed=0, extra_positions=3):
    """Triton forward and backward with a bias, and the float64 naive reference: (got, want) pairs of
    out, dq, dk, dv and d bias."""
    q, k, v, cu = make_inputs(lengths, H, D, dtype, device, seed)
    bias, index = make_bias(lengths, H, bias_dtype, device, seed, extra_positions)
    scale = D**-0.5
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(
        device=device, dtype=dtype
    )
    out, lse = varlen_attention_forward(q, k, v, cu, max_seqlen, scale, bias, index)
    *grads, dbias = varlen_attention_backward(dout, q, k, v, out, lse, cu, max_seqlen, scale, bias, index)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, bias)]
    ref = naive_attention(*leaves[:3], cu, scale, bias=leaves[3], bias_index=index)
    ref.backward(dout.double().cpu())
    return [(out, ref)] + list(zip([*grads, dbias], [x.grad for x in leaves], strict=True))


def assert_bias_matches(pairs, dtype):
    """out, dq, dk, dv as assert_matches; d bias in fp32, to the same tolerance."""
    assert_matches(pairs[:4], dtype)
    dbias, want = pairs[4]
    assert dbias.dtype == torch.float32
    tol = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 5e-3), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    torch.testing.assert_close(dbias.double().cpu(), want, rtol=tol[0], atol=tol[1])


@needs_kernels
@pytest.mark.parametrize(
    "lengths, D, dtype, bias_dtype",
    [
        ([1], 32, torch.float32, torch.float32),
        ([7, 0, 17, 1, 33], 32, torch.float32, torch.float32),
        ([7, 0, 17, 1, 33], 32, torch.float16, torch.float32),
        # Complementary pairs (P = 1, N = 14), the empty and the full coalition among them.
        (paired_lengths(14, 1, [0, 5, 14]), 32, torch.float32, torch.float16),
        ([9, 20], 80, torch.float16, torch.bfloat16),
    ],
)
def test_kernels_with_bias_match_reference(lengths, D, dtype, bias_dtype, schedule):
    """The bias tile is gathered through the query and key blocks' positions, forward and backward;
    d bias sums every sequence's score gradients at their positions (atomics), in fp32."""
    pairs = run_bias_kernels(lengths, 2, D, dtype, bias_dtype, max(lengths) + 5, KERNEL_DEVICE)
    name, launched = schedule
    assert launched == SCHEDULE_KERNELS[name]
    assert_bias_matches(pairs, dtype)


@needs_kernels
@pytest.mark.parametrize("seqs_per_program", [1, 3])
def test_short_schedule_with_bias_and_groups_of_sequences(seqs_per_program, monkeypatch):
    """Sequences of 1-3 key blocks (the dQ partial sums) and empty ones, grouped per program."""
    monkeypatch.setattr(kernels, "SEQS_PER_PROGRAM", seqs_per_program)
    lengths = [0, 1, 33, 0, 16, 17]
    assert kernels.short_schedule("bwd", max(lengths))
    pairs = run_bias_kernels(lengths, 1, 32, torch.float32, torch.float32, max(lengths), KERNEL_DEVICE)
    assert_bias_matches(pairs, torch.float32)


# ------------------------------------------------------------------------------ custom op and autograd


@needs_kernels
def test_custom_op_autograd_matches_reference(schedule):
    """shapkern::varlen_attention_fwd's registered autograd (backward: shapkern::varlen_attention_bwd)."""
    q, k, v, cu = make_inputs([9, 0, 20], 2, 32, torch.float32, KERNEL_DEVICE)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = triton_attention(*leaves, cu, 24, 0.2)
    assert not lse.requires_grad
    ref = varlen_attention_reference(*refs, cu, 24, 0.2)
    dout = torch.randn(out.shape, dtype=torch.float64, device=KERNEL_DEVICE)
    out.backward(dout.float())
    ref.backward(dout)
    pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(leaves, refs, strict=True)]
    assert_matches(pairs, torch.float32)


@needs_kernels
def test_custom_ops_pass_opcheck():
    """Schemas, fake kernels and autograd registration agree with the real kernels (torch.library.opcheck)."""
    q, k, v, cu = make_inputs([5, 0, 9], 1, 32, torch.float32, KERNEL_DEVICE)
    q, k, v = (x.contiguous().requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.shapkern.varlen_attention_fwd, (q, k, v, cu, 12, 0.3))
    out, lse = triton_attention(q, k, v, cu, 12, 0.3)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.shapkern.varlen_attention_bwd,
        (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu, 12, 0.3),
    )


@needs_kernels
def test_op_traces_under_torch_compile_fullgraph(schedule, monkeypatch):
    """The public op (validation included, skipped while tracing) in one graph, forward and backward
    (aot_eager: the fake kernels trace, the real kernels run)."""
    monkeypatch.setattr(op_module, "_use_triton", lambda q: True)  # the interpreter's kernels on the CPU
    q, k, v, cu = make_inputs([9, 20, 0, 3], 2, 32, torch.float32, KERNEL_DEVICE)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    fn = torch.compile(
        lambda q, k, v: varlen_attention(q, k, v, cu, 24, 0.2), backend="aot_eager", fullgraph=True
    )
    out = fn(*leaves)
    ref = varlen_attention_reference(*refs, cu, 24, 0.2)
    dout = torch.randn(out.shape, dtype=torch.float64, device=KERNEL_DEVICE)
    out.backward(dout.float())
    ref.backward(dout)
    pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(leaves, refs, strict=True)]
    assert_matches(pairs, torch.float32)


@needs_kernels
def test_custom_op_with_bias_autograd_and_compile(schedule, monkeypatch):
    """The public op with a bias on the Triton path, eager and traced with fullgraph=True (aot_eager):
    gradients reach q, k, v and the bias, in the bias's dtype; an int64 bias_index is accepted."""
    monkeypatch.setattr(op_module, "_use_triton", lambda q: True)  # the interpreter's kernels on the CPU
    lengths = [9, 20, 0, 3]
    q, k, v, cu = make_inputs(lengths, 2, 32, torch.float32, KERNEL_DEVICE)
    bias, index = make_bias(lengths, 2, torch.float16, KERNEL_DEVICE)
    refs = [x.detach().double().requires_grad_() for x in (q, k, v, bias)]
    ref = naive_attention(*refs[:3], cu, 0.2, bias=refs[3], bias_index=index)
    dout = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(dout)

    def attend(q, k, v, bias):
        return varlen_attention(q, k, v, cu, 24, 0.2, bias=bias, bias_index=index.long())

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    for fn in (attend, compiled):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, bias)]
        out = fn(*leaves)
        out.backward(dout.float().to(KERNEL_DEVICE))
        assert leaves[3].grad.dtype == torch.float16
        assert_matches(
            [(out, ref)] + [(a.grad, b.grad) for a, b in zip(leaves[:3], refs[:3], strict=True)], q.dtype
        )
        torch.testing.assert_close(leaves[3].grad.double().cpu(), refs[3].grad, rtol=1e-2, atol=2e-3)


@needs_kernels
def test_custom_ops_with_bias_pass_opcheck():
    q, k, v, cu = make_inputs([5, 0, 9], 1, 32, torch.float32, KERNEL_DEVICE)
    q, k, v = (x.contiguous().requires_grad_() for x in (q, k, v))
    bias, index = make_bias([5, 0, 9], 1, torch.float32, KERNEL_DEVICE)
    bias.requires_grad_()
    torch.library.opcheck(torch.ops.shapkern.varlen_attention_fwd, (q, k, v, cu, 12, 0.3, bias, index))
    out, lse = triton_attention(q, k, v, cu, 12, 0.3, bias, index)
    detached = [x.detach() for x in (q, k, v, out)]
    torch.library.opcheck(
        torch.ops.shapkern.varlen_attention_bwd,
        (torch.randn_like(out), *detached[:3], detached[3], lse, cu, 12, 0.3, bias.detach(), index),
    )


# ------------------------------------------------------------------------------------- pairs=True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "players, prefix, first_sizes", [(16, 1, [0, 3, 16, 8]), (9, 0, [4, 1]), (6, 2, [6])]
)
def test_pairs_match_naive_forward_and_backward(players, prefix, first_sizes, dtype):
    """pairs=True (dense rows, block-diagonal mask built on the device) is the same attention."""
    lengths = paired_lengths(players, prefix, first_sizes)
    q, k, v, cu = make_inputs(lengths, 2, 8, dtype)
    got_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    want_in = [x.detach().double().clone().requires_grad_() for x in (q, k, v)]
    got = varlen_attention(*got_in, cu, prefix + players, pairs=True)
    want = naive_attention(*want_in, cu, 8**-0.5)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got.double(), want, **tol)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got.backward(grad.to(dtype))
    want.backward(grad)
    for a, b in zip(got_in, want_in, strict=True):
        torch.testing.assert_close(a.grad.double(), b.grad, **tol)


def test_pairs_gradcheck_with_bias():
    lengths = paired_lengths(5, 1, [2, 0, 5])
    q, k, v, cu = make_inputs(lengths, 2, 4, torch.float64)
    bias, index = make_bias(lengths, 2)
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v, bias)]
    torch.autograd.gradcheck(
        lambda q, k, v, b: varlen_attention(q, k, v, cu, 6, bias=b, bias_index=index, pairs=True), inputs
    )
    want = naive_attention(q, k, v, cu, 0.5, bias, index)
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, 6, bias=bias, bias_index=index, pairs=True), want
    )


def test_pairs_read_no_values_without_validate(monkeypatch):
    """The engine's path: no host read of the plan (the mask is built on the device)."""
    monkeypatch.setattr(op_module, "_check_plan", lambda *a: (_ for _ in ()).throw(AssertionError("read")))
    q, k, v, cu = make_inputs(paired_lengths(4, 1, [1, 3]), 2, 8, torch.float32)
    out = varlen_attention(q, k, v, cu, 5, validate=False, pairs=True)
    torch.testing.assert_close(out, naive_attention(q, k, v, cu, 8**-0.5).float())


@pytest.mark.parametrize(
    "lengths, match",
    [
        ([3, 4, 5], r"pairs=True needs an even number of sequences R .* got R = 3, T = 12"),
        ([3, 4, 5, 3], r"pairs=True needs an even number .* got R = 4, T = 15"),
        (
            [3, 5, 5, 1],
            r"pairs=True: sequences 0 and 1 hold 8 tokens together, but every pair must fill a row of",
        ),
    ],
)
def test_pairs_that_do_not_fill_equal_rows_are_refused(lengths, match):
    q, k, v, cu = make_inputs(lengths, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, v, cu, 8, pairs=True)


# --------------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    "cu_seqlens, max_seqlen, match",
    [
        ([0, 2, 5, 8], 10, r"cu_seqlens\[-1\] must equal the number of tokens T = q.shape\[0\] = 10, got 8"),
        ([2, 4, 6, 10], 10, r"cu_seqlens\[0\] must be 0, got 2"),
        (
            [0, 7, 3, 10],
            10,
            r"cu_seqlens must be non-decreasing, got cu_seqlens\[2\] = 3 < cu_seqlens\[1\] = 7",
        ),
        ([0, 3, 6, 14], 10, r"cu_seqlens\[-1\] must equal the number of tokens .* got 14"),
        ([0, 4, 8], 10, r"cu_seqlens\[-1\] must equal the number of tokens .* got 8"),
        ([0, 3, 10], 5, r"max_seqlen = 5 is less than the longest sequence: sequence 1 holds 7 tokens"),
    ],
)
def test_bad_plan_is_a_value_error(cu_seqlens, max_seqlen, match):
    q, k, v, _ = make_inputs([10], 2, 8, torch.float32)
    with pytest.raises(ValueError, match=f"varlen_attention: {match}"):
        varlen_attention(q, k, v, torch.tensor(cu_seqlens, dtype=torch.int32), max_seqlen)


def test_validate_false_skips_the_value_checks(monkeypatch):
    """validate=False is the engine's no-sync path: the plan's values are not read."""

    def read_plan(*args):
        raise AssertionError("the plan's values were read")

    monkeypatch.setattr(op_module, "_check_plan", read_plan)
    q, k, v, cu = make_inputs([3, 7], 2, 8, torch.float32)
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, 7, validate=False), naive_attention(q, k, v, cu, 8**-0.5).float()
    )
    with pytest.raises(AssertionError, match="values were read"):
        varlen_attention(q, k, v, cu, 7)


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


# ----------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_vit_shapes(D, dtype, schedule):
    lengths = torch.randint(1, 200, (24,), generator=torch.Generator().manual_seed(D)).tolist()
    lengths[3], lengths[7] = 0, 197
    *pairs, _, _ = run_kernels(lengths, 12, D, dtype, 256, "cuda")
    assert_matches(pairs, dtype)


@pytest.mark.cuda
def test_cuda_vit_base_coalition_pairs(schedule):
    """ViT-B/16 at 224: complementary pairs of N = 196 patches + 1 class token, 12 heads x 64, bf16."""
    sizes = torch.randint(0, 197, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    sizes[:4] = [0, 1, 195, 196]
    *pairs, _, _ = run_kernels(paired_lengths(196, 1, sizes), 12, 64, torch.bfloat16, 197, "cuda")
    assert_matches(pairs, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_beit_base_coalition_pairs_with_bias(dtype, schedule):
    """BEiT-B/16 at 224: complementary pairs of N = 196 patches + 1 class token, 12 heads x 64, an fp32
    relative position bias over L = 197 positions (d bias sums 64 sequences at each position)."""
    sizes = torch.randint(0, 197, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    sizes[:4] = [0, 1, 195, 196]
    lengths = paired_lengths(196, 1, sizes)
    pairs = run_bias_kernels(lengths, 12, 64, dtype, torch.float32, 197, "cuda", extra_positions=0)
    assert_bias_matches(pairs, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_pairs_at_vit_base_match_the_reference(dtype):
    """pairs=True (SDPA's fused kernels over dense pair rows) at ViT-B/16 pairs, forward and backward,
    and under torch.compile (the engine's compiled blocks)."""
    sizes = torch.randint(0, 197, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    sizes[:4] = [0, 1, 195, 196]
    q, k, v, cu = make_inputs(paired_lengths(196, 1, sizes), 12, 64, dtype, "cuda")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    for attend in (varlen_attention, torch.compile(varlen_attention)):
        inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = attend(*inputs, cu, 197, validate=False, pairs=True)
        out.backward(dout)
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        ref = varlen_attention_reference(q64, k64, v64, cu, 197)
        ref.backward(dout.double())
        assert_matches(
            [(out, ref), *((x.grad, r.grad) for x, r in zip(inputs, (q64, k64, v64), strict=True))], dtype
        )


@pytest.mark.cuda
def test_cuda_more_sequences_than_a_grid_y_dimension(schedule):
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
    eager_grads = [x.grad for x in (q, k, v)]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    compiled = torch.compile(lambda q, k, v: varlen_attention(q, k, v, cu, 256), fullgraph=True)
    out_compiled = compiled(*leaves)
    out_compiled.sum().backward()
    torch.testing.assert_close(out_compiled, out)
    for got, want in zip([x.grad for x in leaves], eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def _count_syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.cuda
def test_cuda_host_syncs():
    """validate=True costs one host sync; validate=False none, forward and backward."""
    q, k, v, cu = make_inputs([50, 197, 0, 120], 2, 64, torch.bfloat16, "cuda")
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    varlen_attention(q, k, v, cu, 197).sum().backward()  # compile the kernels first
    assert _count_syncs(lambda: varlen_attention(q, k, v, cu, 197)) == 1
    assert _count_syncs(lambda: varlen_attention(q, k, v, cu, 197, validate=False).sum().backward()) == 0
    bias, index = make_bias([50, 197, 0, 120], 2, torch.float32, "cuda", extra_positions=0)
    bias.requires_grad_()
    attend = partial(varlen_attention, q, k, v, cu, 197, bias=bias, bias_index=index)
    attend().sum().backward()  # compile the bias kernels first
    assert _count_syncs(attend) == 1  # the plan and the positions' range in one read
    assert _count_syncs(lambda: attend(validate=False).sum().backward()) == 0


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
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal"):
        varlen_attention(q, k, v, cu[:-1], 4)


def test_bad_bias_names_the_argument():
    q, k, v, cu = make_inputs([3, 4], 2, 32, torch.float32)
    bias, index = make_bias([3, 4], 2, torch.float32)  # L = 7
    bad = [
        ({"bias": bias}, "bias and bias_index go together"),
        ({"bias_index": index}, "bias and bias_index go together"),
        ({"bias": bias[:1], "bias_index": index}, r"bias must be a \(H, L, L\) = \(2, L, L\) tensor"),
        ({"bias": bias[0], "bias_index": index}, r"bias must be a \(H, L, L\)"),
        ({"bias": bias[:, :5], "bias_index": index}, r"bias must be square .* got \(2, 5, 7\)"),
        ({"bias": bias.int(), "bias_index": index}, "bias dtype torch.int32 not supported"),
        ({"bias": bias.to("meta"), "bias_index": index}, "bias device meta != q device cpu"),
        ({"bias": bias, "bias_index": index[:-1]}, r"bias_index must be a \(T,\) = \(7,\) tensor"),
        ({"bias": bias, "bias_index": index.float()}, "bias_index must be int32 or int64"),
        ({"bias": bias, "bias_index": index.to("meta")}, "bias_index device meta != q device cpu"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=f"varlen_attention: {match}"):
            varlen_attention(q, k, v, cu, 4, **kwargs)


@pytest.mark.parametrize("token, position", [(3, 7), (0, -1), (6, 100)])
def test_bias_index_out_of_range_is_a_value_error(token, position):
    q, k, v, cu = make_inputs([3, 4], 2, 8, torch.float32)
    bias, index = make_bias([3, 4], 2, torch.float32)
    index[token] = position
    with pytest.raises(
        ValueError, match=rf"in \[0, L\) = \[0, 7\) .* got bias_index\[{token}\] = {position}"
    ):
        varlen_attention(q, k, v, cu, 4, bias=bias, bias_index=index)
    # A bad plan is named first.
    with pytest.raises(ValueError, match="max_seqlen = 3"):
        varlen_attention(q, k, v, cu, 3, bias=bias, bias_index=index)


@pytest.mark.parametrize("edit", ["data", "numpy"])
def test_cpu_layout_follows_an_in_place_edit_of_cu_seqlens(edit):
    # The CPU reference keeps the layout of the last plan: it must notice new content however the
    # tensor was changed (.data and numpy views bypass the version counter).
    q = torch.randn(8, 2, 4, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    varlen_attention(q, q, q, cu_seqlens, 8)
    if edit == "data":
        cu_seqlens.data[1] = 5
    else:
        cu_seqlens.numpy()[1] = 5
    got = varlen_attention(q, q, q, cu_seqlens, 8)
    torch.testing.assert_close(got, varlen_attention(q, q, q, cu_seqlens.clone(), 8))
    torch.testing.assert_close(got, naive_attention(q, q, q, cu_seqlens.clone(), 4**-0.5))


def test_cpu_reference_runs_under_inference_mode_and_autograd_after_it():
    q = torch.randn(8, 2, 4, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    with torch.inference_mode():
        inside = varlen_attention(q, q, q, cu_seqlens, 8)
    leaf = q.clone().requires_grad_(True)
    outside = varlen_attention(leaf, leaf, leaf, cu_seqlens, 8)  # the same plan, now with autograd
    outside.sum().backward()
    torch.testing.assert_close(inside, outside.detach())
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("shape", [(4, 2, 0), (4, 0, 8)])
def test_zero_heads_or_head_dim_is_a_value_error(shape):
    q = torch.randn(shape)
    with pytest.raises(ValueError, match="at least one head and a head dim >= 1"):
        varlen_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32), 4)
