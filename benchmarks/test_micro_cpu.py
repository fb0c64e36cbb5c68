"""pytest-benchmark micro-benchmarks of the CPU paths: ``pytest benchmarks --benchmark-only``.

Kept out of the CI test command; small sizes so that the whole file runs in about a minute.
pytest-benchmark calibrates and times each case; the machine each result was measured on is
recorded from benchmarks/harness.py in every case's ``extra_info`` (in ``--benchmark-json``).
"""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import shapkern
from benchmarks import harness
from shapkern.ops import coalition_reduce, pack_coalitions, segment_sum
from shapkern.ops.varlen_attention import varlen_attention_reference


@pytest.fixture(scope="module")
def environment():
    harness.configure_cpu_threads()
    return harness.environment("cpu")


@pytest.fixture(autouse=True)
def record_environment(request, environment):
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info.update(environment)


@pytest.fixture(scope="module")
def packed():
    gen = torch.Generator().manual_seed(0)
    masks = shapkern.sample_coalitions(8, 32, 196, generator=gen)
    lengths = (masks.view(-1, 196).sum(-1) + 1).to(torch.int32)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return masks, cu_seqlens, int(cu_seqlens[-1])


def test_sample_coalitions(benchmark):
    benchmark(shapkern.sample_coalitions, 32, 32, 196)


def test_pack_coalitions(benchmark, packed):
    benchmark(pack_coalitions, packed[0])


def test_segment_sum(benchmark, packed):
    _, cu_seqlens, total = packed
    values = torch.randn(total, 100)
    benchmark(segment_sum, values, cu_seqlens)


def test_coalition_reduce(benchmark, packed):
    coalitions = pack_coalitions(packed[0])
    values, weights = torch.randn(8, 32, 100), torch.randn(8, 32)
    benchmark(coalition_reduce, coalitions, values, weights, num_players=196)


def test_varlen_attention_reference(benchmark, packed):
    _, cu_seqlens, total = packed
    q, k, v = torch.randn(3, total, 3, 64).unbind(0)
    benchmark(varlen_attention_reference, q, k, v, cu_seqlens, 197)


def test_engine_forward(benchmark):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3).eval()
    images = torch.randn(2, 3, 64, 64)
    coalitions = shapkern.sample_coalitions(2, 16, 64)
    with torch.no_grad():
        benchmark(shapkern.fused_coalition_forward, model, images, coalitions, paired=True)
