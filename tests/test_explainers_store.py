"""The explanation store's files (explainers/store.py): shards written atomically and checked when
read, the manifest, and load_explanations."""

import json

import pytest
import torch

from shapkern.explainers import store


def tensors(n=3, players=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "values": torch.randn(n, players, 1, generator=gen),
        "image_ids": torch.arange(n),
        "targets": torch.zeros(n, 1, dtype=torch.int64),
        "labels": torch.ones(n, dtype=torch.int64),
        "base": torch.randn(n, 1, generator=gen),
        "full": torch.randn(n, 1, generator=gen),
        "evaluations": torch.full((n,), 16),
        "insertion": torch.rand(n, players + 1, generator=gen),
        "deletion": torch.rand(n, players + 1, generator=gen),
    }


def write(folder, index=0, key="k", **kw):
    path = folder / store.shard_name(index)
    store.write_shard(path, index, tensors(**kw), sources=[f"img{i}" for i in range(3)], key=key)
    return path


def test_a_shard_reads_back_exactly_and_its_file_is_reproducible(tmp_path):
    path = write(tmp_path)
    got, meta = store.read_shard(path, key="k", index=0)
    for name, value in tensors().items():
        assert torch.equal(got[name], value), name
    assert meta["sources"] == ["img0", "img1", "img2"]
    first = path.read_bytes()
    write(tmp_path)  # the same shard again: the same bytes (no timestamps, metadata in one key)
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "truncated or corrupt"),
        (lambda b: b"", "truncated or corrupt"),
        (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], "do not match their SHA-256"),  # a bit in a tensor
    ],
)
def test_a_damaged_shard_is_a_shard_error(tmp_path, damage, message):
    path = write(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(store.ShardError, match=message):
        store.read_shard(path, key="k", index=0)


def test_a_shard_of_other_settings_or_another_index_is_refused(tmp_path):
    path = write(tmp_path, key="other")
    with pytest.raises(store.ForeignShardError, match="made with other settings"):
        store.read_shard(path, key="k", index=0)
    with pytest.raises(store.ShardError, match="holds shard 0, not 1"):
        store.read_shard(path, key="other", index=1)


def test_a_failed_write_leaves_neither_a_shard_nor_a_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    def half_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="no space left on device"):
        write(tmp_path)
    assert list(tmp_path.iterdir()) == []


def manifest(tmp_path, shards, complete=True):
    record = {"format": store.FORMAT, "fingerprint": "k", "complete": complete, "num_shards": len(shards)}
    record["shards"] = [{"file": p.name, "sha256": store.read_shard(p)[1]["sha256"]} for p in shards]
    store.write_json(tmp_path / store.MANIFEST, record)


def test_load_explanations_concatenates_the_shards_in_order(tmp_path):
    shards = [write(tmp_path, 0, seed=0), write(tmp_path, 1, seed=1)]
    manifest(tmp_path, shards)
    (tmp_path / store.METRICS).write_text(json.dumps({"insertion_auc": 0.5}))
    got = store.load_explanations(tmp_path)
    assert torch.equal(got.values, torch.cat([tensors(seed=0)["values"], tensors(seed=1)["values"]]))
    assert got.sources == ["img0", "img1", "img2"] * 2 and got.std_error is None
    assert got.metrics == {"insertion_auc": 0.5} and got.manifest["num_shards"] == 2


def test_load_explanations_refuses_what_is_not_a_complete_sound_store(tmp_path):
    with pytest.raises(ValueError, match="holds no explanations"):
        store.load_explanations(tmp_path)
    shards = [write(tmp_path, 0), write(tmp_path, 1, seed=1)]
    manifest(tmp_path, shards, complete=False)
    with pytest.raises(ValueError, match="has not finished; resume it"):
        store.load_explanations(tmp_path)
    manifest(tmp_path, shards)
    write(tmp_path, 1, seed=2)  # a sound shard, but not the one the manifest lists
    with pytest.raises(store.ShardError, match="not the shard the manifest lists"):
        store.load_explanations(tmp_path)
    shards[1].unlink()
    with pytest.raises(store.ShardError, match="is missing: resume the run"):
        store.load_explanations(tmp_path)
    (tmp_path / store.MANIFEST).write_text('{"format": ')
    with pytest.raises(ValueError, match="is damaged"):
        store.load_explanations(tmp_path)


def test_store_files_are_the_stores_own_files_only(tmp_path):
    write(tmp_path, 3)
    for name in (store.MANIFEST, store.METRICS, store.METRICS_PLOT, "notes.txt", "shard-7.safetensors"):
        (tmp_path / name).write_text("x")
    names = [p.name for p in store.store_files(tmp_path)]
    assert names == ["manifest.json", "metrics.json", "metrics.png", "shard-00003.safetensors"]
