import itertools

import pytest
import torch

from shapkern.ops import _extension as ext
from shapkern.ops import reduce as R

needs_ext = pytest.mark.skipif(
    not ext.extension_loaded(), reason=f"extension not loaded: {ext.extension_error()}"
)
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


@pytest.mark.parametrize("n", [1, 31, 32, 33, 196])
def test_pack_unpack_roundtrip(n):
    mask = torch.rand(3, 5, n) < 0.5
    packed = R.pack_masks(mask)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5, (n + 31) // 32)
    assert torch.equal(packed, R.pack_masks_reference(mask))
    assert torch.equal(R.unpack_masks(packed, n), mask)
    assert torch.equal(R.unpack_masks_reference(packed, n), mask)


def test_pack_masks_bit_order():
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[0, 5, 31, 32]] = True
    assert R.pack_masks(mask).tolist() == [1 + 2**5 - 2**31, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("b", "m", "n", "k"), [(2, 7, 1, 3), (3, 300, 33, 1), (2, 600, 196, 20), (1, 5, 64, 8)]
)
def test_coalition_reduce_matches_reference(b, m, n, k, dtype):
    mask, values, weights = random_coalitions(b, m, n, k, dtype)
    z, w, v = mask.double(), weights.double(), values.double()
    expected = torch.einsum("bmn,bm,bmk->bnk", z, w, v).to(dtype), torch.einsum("bmn,bm->bn", z, w).to(dtype)
    packed = R.pack_masks(mask)
    for actual in (
        R.coalition_reduce(packed, values, weights, n),
        R.coalition_reduce_reference(packed, values, weights, n),
    ):
        close(actual[0], expected[0], dtype, m)
        close(actual[1], expected[1], dtype, m)


def test_coalition_reduce_extra_words_and_no_coalitions():
    mask, values, weights = random_coalitions(2, 9, 20, 4, torch.float64)
    packed = torch.cat(
        [R.pack_masks(mask), torch.randint(-(2**31), 2**31 - 1, (2, 9, 1), dtype=torch.int32)], -1
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
    packed = R.pack_masks(mask)
    values.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, w: R.coalition_reduce(packed, v, w, 35), (values, weights))
    assert torch.autograd.gradcheck(
        lambda v: R.coalition_reduce(packed, v, weights.detach(), 35)[0], (values,)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(dtype):
    mask, values, weights = random_coalitions(2, 40, 50, 6, dtype)
    packed = R.pack_masks(mask)
    grads = []
    for fn in (R.coalition_reduce, R.coalition_reduce_reference):
        v, w = values.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        sums, wsums = fn(packed, v, w, 50)
        ((sums.float() ** 2).sum() + wsums.float().sum()).backward()
        grads.append((v.grad, w.grad))
    for a, e in zip(*grads):
        torch.testing.assert_close(
            a.float(), e.float(), rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-3
        )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(values, cu, packed, weights):
        seq = R.segment_sum(values, cu)  # (R, K) with R = B * M
        mask = R.unpack_masks(R.pack_masks(R.unpack_masks(packed, 40)), 40)
        return R.coalition_reduce(R.pack_masks(mask), seq.view(2, 3, 4), weights, 40)

    cu = random_cu_seqlens([2, 0, 3, 1, 4, 2])
    values = torch.randn(12, 4, requires_grad=True)
    mask, _, weights = random_coalitions(2, 3, 40, 4, torch.float32)
    args = (values, cu, R.pack_masks(mask), weights)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, e in zip(compiled(*args), f(*args)):
        torch.testing.assert_close(a, e)
    compiled(*args)[0].sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0


@needs_ext
def test_fallback_matches_extension(monkeypatch):
    mask, values, weights = random_coalitions(3, 50, 70, 9, torch.float32)
    cu = random_cu_seqlens([4, 0, 9, 1])
    tokens = torch.randn(14, 9)

    def run():
        packed = R.pack_masks(mask)
        return (
            packed,
            R.unpack_masks(packed, 70),
            R.segment_sum(tokens, cu),
            *R.coalition_reduce(packed, values, weights, 70),
        )

    with_ext = run()
    monkeypatch.setattr(ext, "has_kernels", lambda device: False)
    for a, e in zip(run(), with_ext):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


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
        (lambda: R.pack_masks(torch.ones(3, 4)), "mask must be bool"),
        (lambda: R.unpack_masks(torch.ones(3, 1, dtype=torch.int32), 33), "packed has W=1"),
        (lambda: R.unpack_masks(torch.ones(3, 1), 3), "packed must be int32"),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda p, v, w: (p[..., :1], v, w), "masks has W=1"),
        (lambda p, v, w: (p.long(), v, w), "masks must be int32"),
        (lambda p, v, w: (p, v.int(), w), "values must be float32"),
        (lambda p, v, w: (p, v, w.double()), "weights must have the dtype"),
        (lambda p, v, w: (p, v, w[:, :-1]), "weights shape"),
        (lambda p, v, w: (p[:, :-1], v, w), "masks shape"),
        (lambda p, v, w: (p, v[0], w), "values must be 3-D"),
        (lambda p, v, w: (p, v, w.to("meta")), "weights is on meta"),
    ],
)
def test_coalition_reduce_bad_inputs(change, match):
    mask, values, weights = random_coalitions(2, 4, 40, 3, torch.float32)
    with pytest.raises(ValueError, match=match):
        R.coalition_reduce(*change(R.pack_masks(mask), values, weights), num_players=40)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    assert ext.has_cuda_kernels(), f"CUDA kernels not compiled in: {ext.extension_error()}"
    mask, values, weights = random_coalitions(3, 257, 196, 130, dtype)
    packed = R.pack_masks(mask)
    cuda = [t.cuda() for t in (mask, packed, values, weights)]
    assert torch.equal(R.pack_masks(cuda[0]).cpu(), packed)
    assert torch.equal(R.unpack_masks(cuda[1], 196).cpu(), mask)
    for a, e in zip(R.coalition_reduce(*cuda[1:], 196), R.coalition_reduce(packed, values, weights, 196)):
        close(a.cpu(), e, dtype)
    lengths = [3, 0, 1, 700, 0, 5]
    cu, tokens = random_cu_seqlens(lengths), torch.randn(sum(lengths), 130, dtype=torch.float64).to(dtype)
    close(R.segment_sum(tokens.cuda(), cu.cuda()).cpu(), R.segment_sum(tokens, cu), dtype, terms=max(lengths))


@pytest.mark.cuda
def test_cuda_backward_and_determinism():
    mask, values, weights = random_coalitions(2, 64, 50, 7, torch.float64, device="cuda")
    packed = R.pack_masks(mask)
    values.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, w: R.coalition_reduce(packed, v, w, 50), (values, weights))
    cu = random_cu_seqlens([2, 0, 3, 1]).cuda()
    tokens = torch.randn(6, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: R.segment_sum(v, cu), (tokens,))
    first = R.coalition_reduce(packed, values.float(), weights.float(), 50)
    again = R.coalition_reduce(packed, values.float(), weights.float(), 50)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
