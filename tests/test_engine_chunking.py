import pytest
import torch

from shapkern import fused_coalition_forward, sample_coalitions
from shapkern.engine import chunking
from shapkern.engine.chunking import CPU_MAX_CHUNK_ROWS, default_chunk_rows, run_chunks


def test_chunks_are_balanced_and_keep_pairs_together():
    coalitions = sample_coalitions(2, 32, 16, generator=torch.Generator().manual_seed(3))
    sizes = [chunk.shape[1] for chunk in run_chunks(lambda c: c, coalitions, chunk_rows=60, paired=True)]
    assert sizes == [16, 16]  # 30 coalitions per chunk would leave a remainder of 2
    sizes = [
        chunk.shape[1] for chunk in run_chunks(lambda c: c, coalitions[:, :7], chunk_rows=6, paired=False)
    ]
    assert sizes == [3, 3, 1] and sum(sizes) == 7


def test_cpu_chunks_follow_the_available_memory(monkeypatch):
    row_bytes = 30 << 20  # a vit_tiny row at 224 with gradients: ~30 MB
    monkeypatch.setattr(chunking, "_available_host_bytes", lambda: 24 << 30)
    assert default_chunk_rows(torch.device("cpu"), row_bytes) == CPU_MAX_CHUNK_ROWS
    monkeypatch.setattr(chunking, "_available_host_bytes", lambda: 2 << 30)
    assert default_chunk_rows(torch.device("cpu"), row_bytes) == int(0.5 * (2 << 30) / row_bytes) == 34
    monkeypatch.setattr(chunking, "_available_host_bytes", lambda: 1 << 20)
    assert default_chunk_rows(torch.device("cpu"), row_bytes) == 2  # never below one pair


def test_the_engine_splits_by_memory_on_the_cpu(monkeypatch):
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, num_classes=3
    )
    images = torch.randn(2, 3, 16, 16)
    coalitions = sample_coalitions(2, 16, 16, generator=torch.Generator().manual_seed(0))
    calls = []
    original = chunking.run_chunks

    def spy(fn, coalitions, chunk_rows, paired):
        calls.append(chunk_rows)
        return original(fn, coalitions, chunk_rows, paired)

    monkeypatch.setattr("shapkern.engine.forward.run_chunks", spy)
    want = fused_coalition_forward(model, images, coalitions, paired=True)
    monkeypatch.setattr(chunking, "_available_host_bytes", lambda: 64 << 10)  # almost no memory
    got = fused_coalition_forward(model, images, coalitions, paired=True)
    assert calls[0] == CPU_MAX_CHUNK_ROWS and calls[1] < 8
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_chunks_follow_free_device_memory():
    free = chunking.free_memory_bytes(torch.device("cuda"))
    assert free > 0 and default_chunk_rows(torch.device("cuda"), free) == 2
