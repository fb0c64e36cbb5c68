import itertools

import pytest
import torch

from shapkern.ops import _extension as ext
from shapkern.ops import bitpack as B
from shapkern.ops import gram as G
from shapkern.ops import reduce as R

needs_ext = pytest.mark.skipif(
    not ext.extension_loaded(), reason=f"extension not loaded: {ext.extension_error()}"
)
try:
    from shapkern.kernels import coalition_reduce as K
except ImportError:  # no triton
    K = None
needs_triton = pytest.mark.skipif(K is None, reason="needs triton")
# The Triton kernels run compiled on a GPU, in the interpreter (TRITON_INTERPRET=1, see conftest) otherwise.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def close(actual, expected, dtype, terms=1):
    """Compare in float64; rounding error of a sum grows like sqrt(terms)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOL[dtype] * terms**0.5
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


def random_cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def random_coalitions(b, m, n, k, dtype, device="cpu", generator=None):
    mask = torch.rand(b, m, n, generator=generator) < 0.5
    values = torch.randn(b, m, k, generator=generator, dtype=torch.float64).to(dtype)
    weights = (torch.rand(b, m, generator=generator, dtype=torch.float64) + 0.5).to(dtype)
    return mask.to(device), values.to(device), weights.to(device)


SEGMENTS = {
    "mixed": [3, 0, 1, 7, 0, 5],
    "single_tokens": [1, 1, 1, 1],
    "empty_edges": [0, 4, 0],
    "long": [3000, 2],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", SEGMENTS)
@pytest.mark.parametrize("k", [1, 37, 300])
def test_segment_sum_matches_reference(case, k, dtype):
    lengths = SEGMENTS[case]
    cu = random_cu_seqlens(lengths)
    values = torch.randn(sum(lengths), k, dtype=torch.float64).to(dtype)
    expected = torch.stack([values[s:e].double().sum(0) for s, e in itertools.pairwise(cu)]).to(dtype)
    close(R.segment_sum(values, cu), expected, dtype, max(lengths))
    close(R.segment_sum_reference(values, cu), expected, dtype, max(lengths))


def test_segment_sum_no_sequences():
    out = R.segment_sum(torch.randn(0, 4), torch.zeros(1, dtype=torch.int32))
    assert out.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", SEGMENTS)
@pytest.mark.parametrize("k", [1, 37, 300])
def test_segment_expand_matches_reference(case, k, dtype):
    lengths = SEGMENTS[case]
    cu = random_cu_seqlens(lengths)
    rows = torch.randn(len(lengths), k, dtype=torch.float64).to(dtype)
    expected = torch.cat([rows[r : r + 1].expand(n, k) for r, n in enumerate(lengths)])
    assert torch.equal(R.segment_expand(rows, cu, sum(lengths)), expected)
    assert torch.equal(R.segment_expand_reference(rows, cu, sum(lengths)), expected)


def test_gradcheck_segment_expand():
    cu = random_cu_seqlens([2, 0, 3, 1])
    rows = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: R.segment_expand(r, cu, 6), (rows,))
    assert torch.autograd.gradgradcheck(lambda r: R.segment_expand(r, cu, 6), (rows,))


@pytest.mark.parametrize("n", [1, 31, 32, 33, 196])
def test_pack_unpack_roundtrip(n):
    mask = torch.rand(3, 5, n) < 0.5
    packed = B.pack_coalitions(mask)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5, (n + 31) // 32)
    assert torch.equal(packed, B.pack_coalitions_reference(mask))
    assert torch.equal(B.unpack_coalitions(packed, n), mask)
    assert torch.equal(B.unpack_coalitions_reference(packed, n), mask)


def test_pack_coalitions_bit_order():
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[0, 5, 31, 32]] = True
    assert B.pack_coalitions(mask).tolist() == [1 + 2**5 - 2**31, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("b", "m", "n", "k"), [(2, 7, 1, 3), (3, 300, 33, 1), (2, 600, 196, 20), (1, 5, 64, 8)]
)
def test_coalition_reduce_matches_reference(b, m, n, k, dtype):
    mask, values, weights = random_coalitions(b, m, n, k, dtype)
    z, w, v = mask.double(), weights.double(), values.double()
    expected = torch.einsum("bmn,bm,bmk->bnk", z, w, v).to(dtype), torch.einsum("bmn,bm->bn", z, w).to(dtype)
    packed = B.pack_coalitions(mask)
    for actual in (
        R.coalition_reduce(packed, values, weights, n),
        R.coalition_reduce_reference(packed, values, weights, n),
    ):
        close(actual[0], expected[0], dtype, m)
        close(actual[1], expected[1], dtype, m)


def test_coalition_reduce_extra_words_and_no_coalitions():
    mask, values, weights = random_coalitions(2, 9, 20, 4, torch.float64)
    packed = torch.cat(
        [B.pack_coalitions(mask), torch.randint(-(2**31), 2**31 - 1, (2, 9, 1), dtype=torch.int32)], -1
    )
    sums, wsums = R.coalition_reduce(packed, values, weights, num_players=20)
    close(sums, torch.einsum("bmn,bm,bmk->bnk", mask.double(), weights, values), torch.float64)
    sums, wsums = R.coalition_reduce(packed[:, :0], values[:, :0], weights[:, :0], num_players=20)
    assert sums.shape == (2, 20, 4) and not sums.any() and not wsums.any()


def test_gradcheck_segment_sum():
    cu = random_cu_seqlens([2, 0, 3, 1])
    values = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: R.segment_sum(v, cu), (values,))
    assert torch.autograd.gradgradcheck(lambda v: R.segment_sum(v, cu), (values,))


def test_gradcheck_coalition_reduce():
    mask, values, weights = random_coalitions(2, 5, 35, 3, torch.float64)
    packed = B.pack_coalitions(mask)
    values.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, w: R.coalition_reduce(packed, v, w, 35), (values, weights))
    assert torch.autograd.gradcheck(
        lambda v: R.coalition_reduce(packed, v, weights.detach(), 35)[0], (values,)
    )
    assert torch.autograd.gradgradcheck(
        lambda v, w: R.coalition_reduce(packed, v, w, 35), (values, weights), fast_mode=True
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(dtype):
    mask, values, weights = random_coalitions(2, 40, 50, 6, dtype)
    packed = B.pack_coalitions(mask)
    grads = []
    for fn in (R.coalition_reduce, R.coalition_reduce_reference):
        v, w = values.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        sums, wsums = fn(packed, v, w, 50)
        ((sums.float() ** 2).sum() + wsums.float().sum()).backward()
        grads.append((v.grad, w.grad))
    for a, e in zip(*grads, strict=True):
        torch.testing.assert_close(
            a.float(), e.float(), rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-3
        )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(values, cu, packed, weights):
        seq = R.segment_sum(values, cu)  # (R, K) with R = B * M
        mask = B.unpack_coalitions(B.pack_coalitions(B.unpack_coalitions(packed, 40)), 40)
        return R.coalition_reduce(B.pack_coalitions(mask), seq.view(2, 3, 4), weights, 40)

    cu = random_cu_seqlens([2, 0, 3, 1, 4, 2])
    values = torch.randn(12, 4, requires_grad=True)
    mask, _, weights = random_coalitions(2, 3, 40, 4, torch.float32)
    args = (values, cu, B.pack_coalitions(mask), weights)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, e in zip(compiled(*args), f(*args), strict=True):
        torch.testing.assert_close(a, e)
    compiled(*args)[0].sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0


@needs_ext
def test_fallback_matches_extension(monkeypatch):
    mask, values, weights = random_coalitions(3, 50, 70, 9, torch.float32)
    cu = random_cu_seqlens([4, 0, 9, 1])
    tokens = torch.randn(14, 9)

    def run():
        packed = B.pack_coalitions(mask)
        return (
            packed,
            B.unpack_coalitions(packed, 70),
            R.segment_sum(tokens, cu),
            R.segment_expand(tokens[:4], cu, 14),
            *R.coalition_reduce(packed, values, weights, 70),
            G.coalition_gram(packed, weights, 70),
            G.coalition_gram(packed, torch.ones_like(weights), 70),
        )

    with_ext = run()
    monkeypatch.setattr(ext, "has_kernels", lambda device: False)
    for a, e in zip(run(), with_ext, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@needs_ext
def test_opcheck_extension_ops():
    """Schemas, fake kernels (shapes and strides), autograd registration, AOT dispatch."""
    mask = torch.rand(2, 20, 37) < 0.5
    packed = B.pack_coalitions(mask)
    values, weights = torch.randn(2, 20, 5, requires_grad=True), torch.rand(2, 20, requires_grad=True)
    cu = random_cu_seqlens([2, 0, 3])
    ops = torch.ops.shapkern
    for op, args in [
        (ops.segment_sum.default, (torch.randn(5, 4, requires_grad=True), cu)),
        (ops.segment_expand.default, (torch.randn(3, 4, requires_grad=True), cu, 5)),
        (ops.coalition_reduce.default, (packed, values, weights, 37)),
        (ops.coalition_gram.default, (packed, weights, 37)),
        (ops.pack_masks.default, (mask,)),
        (ops.unpack_masks.default, (packed, 37)),
    ]:
        torch.library.opcheck(op, args)


@needs_triton
def test_opcheck_triton_ops():
    mask, values, weights = random_coalitions(2, 20, 37, 5, torch.float32, device=KERNEL_DEVICE)
    packed = B.pack_coalitions(mask)
    grads = torch.randn(2, 37, 5, device=KERNEL_DEVICE), torch.randn(2, 37, device=KERNEL_DEVICE)
    ops = torch.ops.shapkern
    torch.library.opcheck(
        ops.coalition_reduce_gemm.default,
        (packed, values.requires_grad_(True), weights.requires_grad_(True), 37),
    )
    for need in ((True, True), (True, False), (False, True)):
        args = (*grads, packed, values.detach(), weights.detach(), 37, *need)
        torch.library.opcheck(ops.coalition_reduce_gemm_backward.default, args)


def test_extension_status():
    assert ext.extension_loaded() == (ext.extension_error() is None)
    assert ext.has_cpu_kernels() == ext.extension_loaded()
    assert not ext.has_cuda_kernels() or ext.extension_loaded()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: R.segment_sum(torch.randn(5), random_cu_seqlens([5])), "values must be 2-D"),
        (lambda: R.segment_sum(torch.randn(5, 2).int(), random_cu_seqlens([5])), "values must be float32"),
        (lambda: R.segment_sum(torch.randn(5, 2), random_cu_seqlens([5]).long()), "cu_seqlens must be int32"),
        (
            lambda: R.segment_sum(torch.randn(5, 2), torch.tensor([1, 5], dtype=torch.int32)),
            r"cu_seqlens\[0\]",
        ),
        (
            lambda: R.segment_sum(torch.randn(5, 2), torch.tensor([0, 4], dtype=torch.int32)),
            r"cu_seqlens\[-1\]",
        ),
        (
            lambda: R.segment_sum(torch.randn(5, 2), torch.tensor([0, 4, 2, 5], dtype=torch.int32)),
            "non-decreasing",
        ),
        (lambda: R.segment_sum(torch.randn(5, 2, device="meta"), random_cu_seqlens([5])), "cu_seqlens is on"),
        (lambda: R.segment_expand(torch.randn(3, 2), random_cu_seqlens([5]), 5), "values has 3 rows"),
        (lambda: R.segment_expand(torch.randn(1, 2), random_cu_seqlens([5]), 4), r"cu_seqlens\[-1\]"),
        (
            lambda: R.segment_expand(torch.randn(1, 2).int(), random_cu_seqlens([5]), 5),
            "values must be float32",
        ),
        (lambda: B.pack_coalitions(torch.ones(3, 4)), "coalitions must be bool"),
        (lambda: B.unpack_coalitions(torch.ones(3, 1, dtype=torch.int32), 33), "packed has W=1"),
        (lambda: B.unpack_coalitions(torch.ones(3, 1), 3), "packed must be int32"),
        (lambda: B.unpack_coalitions(torch.ones(3, 1, dtype=torch.int32), 5.0), "num_players must be an int"),
        (
            lambda: R.coalition_reduce(
                torch.ones(1, 2, 1, dtype=torch.int32), torch.randn(1, 2, 3), torch.ones(1, 2), 5.0
            ),
            "num_players must be an int",
        ),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda p, v, w: (p[..., :1], v, w), "packed has W=1"),
        (lambda p, v, w: (p.long(), v, w), "packed must be int32"),
        (lambda p, v, w: (p, v.int(), w), "values must be float32"),
        (lambda p, v, w: (p, v, w.double()), "weights must have the dtype"),
        (lambda p, v, w: (p, v, w[:, :-1]), "weights shape"),
        (lambda p, v, w: (p[:, :-1], v, w), "packed shape"),
        (lambda p, v, w: (p, v[0], w), "values must be 3-D"),
        (lambda p, v, w: (p, v, w.to("meta")), "weights is on meta"),
    ],
)
def test_coalition_reduce_bad_inputs(change, match):
    mask, values, weights = random_coalitions(2, 4, 40, 3, torch.float32)
    with pytest.raises(ValueError, match=match):
        R.coalition_reduce(*change(B.pack_coalitions(mask), values, weights), num_players=40)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    assert ext.has_cuda_kernels(), f"CUDA kernels not compiled in: {ext.extension_error()}"
    mask, values, weights = random_coalitions(3, 257, 196, 130, dtype)
    packed = B.pack_coalitions(mask)
    cuda = [t.cuda() for t in (mask, packed, values, weights)]
    assert torch.equal(B.pack_coalitions(cuda[0]).cpu(), packed)
    assert torch.equal(B.unpack_coalitions(cuda[1], 196).cpu(), mask)
    for a, e in zip(
        R.coalition_reduce(*cuda[1:], 196), R.coalition_reduce(packed, values, weights, 196), strict=True
    ):
        close(a.cpu(), e, dtype, terms=257)
    lengths = [3, 0, 1, 700, 0, 5]
    cu, tokens = random_cu_seqlens(lengths), torch.randn(sum(lengths), 130, dtype=torch.float64).to(dtype)
    close(R.segment_sum(tokens.cuda(), cu.cuda()).cpu(), R.segment_sum(tokens, cu), dtype, terms=max(lengths))


@pytest.mark.cuda
def test_cuda_backward_and_determinism():
    mask, values, weights = random_coalitions(2, 64, 50, 7, torch.float64, device="cuda")
    packed = B.pack_coalitions(mask)
    values.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, w: R.coalition_reduce(packed, v, w, 50), (values, weights))
    cu = random_cu_seqlens([2, 0, 3, 1]).cuda()
    tokens = torch.randn(6, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: R.segment_sum(v, cu), (tokens,))
    first = R.coalition_reduce(packed, values.float(), weights.float(), 50)
    again = R.coalition_reduce(packed, values.float(), weights.float(), 50)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


# ------------------------------------------------------------------------------------- coalition_gram


def gram_weights(b, m, dtype, kind, generator=None):
    """(B, M) weights: "equal" per image (KernelSHAP), "random", or "mixed" (image 0 equal, others random)."""
    w = (torch.rand(b, m, generator=generator, dtype=torch.float64) + 0.5).to(dtype)
    if kind == "equal":
        return w[:, :1].expand(b, m).contiguous()
    if kind == "mixed":
        w[0] = 0.25
    return w


def dense_gram(mask, weights):
    z = mask.double()
    return torch.einsum("bmi,bm,bmj->bij", z, weights.double(), z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["equal", "random", "mixed"])
@pytest.mark.parametrize(("b", "m", "n"), [(2, 7, 1), (3, 300, 33), (2, 130, 196), (1, 1, 64), (2, 64, 45)])
def test_coalition_gram_matches_reference(b, m, n, kind, dtype):
    mask = torch.rand(b, m, n) < 0.5
    weights = gram_weights(b, m, dtype, kind)
    expected = dense_gram(mask, weights).to(dtype)
    packed = B.pack_coalitions(mask)
    actual = G.coalition_gram(packed, weights, n)
    close(actual, expected, dtype, m)
    assert torch.equal(actual, actual.mT)
    close(G.coalition_gram_reference(packed, weights, n), expected, dtype, m)


@needs_ext
def test_coalition_gram_equal_weights_are_exact_counts():
    mask = torch.rand(3, 1000, 70) < 0.5
    counts = dense_gram(mask, torch.ones(3, 1000)).float()
    assert torch.equal(G.coalition_gram(B.pack_coalitions(mask), torch.ones(3, 1000), 70), counts)
    assert torch.equal(G.coalition_gram(B.pack_coalitions(mask), torch.full((3, 1000), 0.5), 70), counts / 2)


def test_coalition_gram_extra_words_no_coalitions_no_players():
    mask = torch.rand(2, 9, 20) < 0.5
    weights = gram_weights(2, 9, torch.float64, "mixed")
    garbage = torch.randint(-(2**31), 2**31 - 1, (2, 9, 1), dtype=torch.int32)
    # Bits past N in the last used word and whole extra words are ignored.
    packed = torch.cat([B.pack_coalitions(mask) | (-1 << 20), garbage], -1)
    close(G.coalition_gram(packed, weights, 20), dense_gram(mask, weights), torch.float64)
    empty = G.coalition_gram(packed[:, :0], weights[:, :0], 20)
    assert empty.shape == (2, 20, 20) and not empty.any()
    assert G.coalition_gram(packed, weights, 0).shape == (2, 0, 0)


@pytest.mark.parametrize("kind", ["equal", "random"])
def test_gradcheck_coalition_gram(kind):
    mask = torch.rand(2, 6, 35) < 0.5
    weights = gram_weights(2, 6, torch.float64, kind).requires_grad_(True)
    packed = B.pack_coalitions(mask)
    # fast mode (random projections): the slow mode runs one backward per entry of the (B, N, N) output
    assert torch.autograd.gradcheck(lambda w: G.coalition_gram(packed, w, 35), (weights,), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda w: G.coalition_gram(packed, w, 35), (weights,), fast_mode=True)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda p, w: (p[..., :1], w), "packed has W=1"),
        (lambda p, w: (p.long(), w), "packed must be int32"),
        (lambda p, w: (p[0], w), "packed must be 3-D"),
        (lambda p, w: (p, w.int()), "weights must be float32"),
        (lambda p, w: (p, w[:, :-1]), "does not match weights shape"),
        (lambda p, w: (p, w[0]), "weights must be 2-D"),
        (lambda p, w: (p, w.to("meta")), "packed is on cpu but weights is on meta"),
    ],
)
def test_coalition_gram_bad_inputs(change, match):
    packed = B.pack_coalitions(torch.rand(2, 4, 40) < 0.5)
    with pytest.raises(ValueError, match=match):
        G.coalition_gram(*change(packed, torch.rand(2, 4)), num_players=40)


def test_coalition_gram_torch_compile_fullgraph():
    torch._dynamo.reset()
    packed = B.pack_coalitions(torch.rand(2, 16, 40) < 0.5)
    weights = torch.rand(2, 16, requires_grad=True)
    compiled = torch.compile(lambda p, w: G.coalition_gram(p, w, 40), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(packed, weights), G.coalition_gram(packed, weights, 40))
    compiled(packed, weights).sum().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0


# ----------------------------------------------------- Triton GEMM kernels (interpreter here, GPU there)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("b", "m", "n", "k"), [(2, 40, 37, 5), (1, 1, 1, 1), (1, 33, 64, 20), (2, 0, 5, 3)])
def test_triton_coalition_reduce_matches_reference(b, m, n, k, dtype):
    mask, values, weights = random_coalitions(b, m, n, k, dtype)
    grads = (
        torch.randn(b, n, k, dtype=torch.float64).to(dtype),
        torch.randn(b, n, dtype=torch.float64).to(dtype),
    )
    packed = B.pack_coalitions(mask)
    z, w, v = mask.double(), weights.double(), values.double()
    zg = z @ grads[0].double()
    expected = (
        torch.einsum("bmn,bm,bmk->bnk", z, w, v),
        torch.einsum("bmn,bm->bn", z, w),
        w[..., None] * zg,
        (zg * v).sum(-1) + (z @ grads[1].double()[..., None])[..., 0],
    )
    dev = [t.to(KERNEL_DEVICE) for t in (packed, values, weights, *grads)]
    sums, weight_sums = K.coalition_reduce_forward(*dev[:3], n)
    grad_values, grad_weights = K.coalition_reduce_backward(*dev[3:], *dev[:3], n)
    for actual, exp, terms in zip(
        (sums, weight_sums, grad_values, grad_weights), expected, (m, m, n, n * k), strict=True
    ):
        close(actual.cpu(), exp.to(dtype), dtype, max(terms, 1))
    only_values = K.coalition_reduce_backward(*dev[3:], *dev[:3], n, need_weights=False)
    assert only_values[1] is None and torch.equal(only_values[0], grad_values)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize(("b", "m", "n"), [(2, 40, 37), (1, 3, 1), (1, 20, 50)])
def test_triton_coalition_gram_matches_reference(b, m, n, dtype):
    mask = torch.rand(b, m, n) < 0.5
    weights = gram_weights(b, m, dtype, "random")
    actual = K.coalition_gram(B.pack_coalitions(mask).to(KERNEL_DEVICE), weights.to(KERNEL_DEVICE), n).cpu()
    close(actual, dense_gram(mask, weights).to(dtype), dtype, m)
    assert torch.equal(actual, actual.mT)


# ------------------------------------------------------------------------------------------ CUDA only


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_gemm_precision_and_determinism(dtype):
    """fp32 outputs within 1e-5 of the largest output: a plain tf32 dot (~3e-4) fails this."""
    mask, values, weights = random_coalitions(4, 1024, 196, 300, dtype, device="cuda")
    packed = B.pack_coalitions(mask)
    z, w, v = mask.double(), weights.double(), values.double()
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    values.requires_grad_(True)
    weights.requires_grad_(True)
    sums, weight_sums = R.coalition_reduce(packed, values, weights, 196)
    expected = torch.einsum("bmn,bm,bmk->bnk", z, w, v)
    assert (sums.double() - expected).abs().max() <= tol * expected.abs().max()
    close(weight_sums, torch.einsum("bmn,bm->bn", z, w).to(dtype), dtype, 1024)
    grad = torch.randn_like(sums)
    first = torch.autograd.grad(sums, (values, weights), grad)
    zg = z @ grad.double()
    expected_grads = (w[..., None] * zg, (zg * v).sum(-1))
    for actual, exp in zip(first, expected_grads, strict=True):
        assert (actual.double() - exp).abs().max() <= tol * exp.abs().max()
    again = R.coalition_reduce(packed, values, weights, 196)
    assert torch.equal(again[0], sums) and torch.equal(again[1], weight_sums)
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.autograd.grad(again[0], (values, weights), grad), first, strict=True)
    )
    gram_w = gram_weights(4, 1024, dtype, "random").cuda()
    gram = G.coalition_gram(packed, gram_w, 196)
    expected_gram = dense_gram(mask, gram_w)
    assert (gram.double() - expected_gram).abs().max() <= tol * expected_gram.abs().max()
    assert torch.equal(gram, gram.mT) and torch.equal(G.coalition_gram(packed, gram_w, 196), gram)


@pytest.mark.cuda
def test_cuda_gram_float64_and_backward():
    mask = torch.rand(3, 300, 70, device="cuda") < 0.5
    packed = B.pack_coalitions(mask)
    weights = gram_weights(3, 300, torch.float64, "mixed").cuda()
    gram = G.coalition_gram(packed, weights, 70)
    close(gram, dense_gram(mask, weights), torch.float64, 300)
    assert torch.equal(gram, gram.mT)
    ones = torch.ones(3, 300, device="cuda")
    assert torch.equal(G.coalition_gram(packed, ones, 70), dense_gram(mask, ones).float())
    small = B.pack_coalitions(mask[:, :6, :35])
    w = weights[:, :6].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: G.coalition_gram(small, w, 35), (w,), fast_mode=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3, 37, 1000])
def test_cuda_segment_expand(dtype, k):
    lengths = [3, 0, 1, 700, 0, 5, 196]
    cu = random_cu_seqlens(lengths)
    # An offset view: rows not 16-byte aligned for most k, so the copy picks narrower units.
    rows = torch.randn(len(lengths) + 1, k, dtype=torch.float64).to(dtype)[1:]
    expected = R.segment_expand(rows, cu, sum(lengths))
    assert torch.equal(R.segment_expand(rows.cuda(), cu.cuda(), sum(lengths)).cpu(), expected)
    rows64 = rows.double().cuda().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda r: R.segment_expand(r, cu.cuda(), sum(lengths)), (rows64,))
