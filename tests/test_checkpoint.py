import os
import random

import numpy as np
import pytest
import torch

from shapkern.checkpoint import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    CheckpointError,
    clean_temporary_files,
    load_checkpoint,
    newest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from shapkern.cli import main
from shapkern.models import ShapleyViT


class Payload:
    """Unpickling this runs os.system: the attack a checkpoint loader must not allow."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(path, marker):
    state = {
        "model": {"w": torch.zeros(2)},
        "arch": {"backbone": "vit_tiny_patch16_224"},
        "hook": Payload(marker),
    }
    torch.save(state, path)
    return path


def test_a_malicious_checkpoint_runs_no_code_anywhere(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / CHECKPOINT, marker)
    with pytest.raises(CheckpointError, match="refused to load .*arbitrary code"):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="refused"):
        ShapleyViT.from_checkpoint(path)
    argv = ["explain", "--checkpoint", str(path), "--data", "digits", "--out", str(tmp_path / "e")]
    assert main(argv) == 2 and "refused" in capsys.readouterr().err
    loaded = newest_checkpoint(str(tmp_path))
    assert loaded.state is None and "refused" in loaded.skipped[0][1]
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the unsafe loader runs the payload: the test can fail
    assert marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"\x80\x02garbage", "corrupt"), ("half", "truncated or corrupt")],
)
def test_damaged_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "c.pt"
    if content == "half":
        torch.save({"x": torch.randn(1000)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_saves_rotate_and_a_damaged_newest_falls_back(tmp_path):
    save_checkpoint({"epoch": 1}, str(tmp_path))
    save_checkpoint({"epoch": 2}, str(tmp_path))
    assert load_checkpoint(str(tmp_path / CHECKPOINT))["epoch"] == 2
    assert load_checkpoint(str(tmp_path / PREVIOUS_CHECKPOINT))["epoch"] == 1
    assert newest_checkpoint(str(tmp_path)).state["epoch"] == 2
    data = (tmp_path / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(data[:10])  # a kill in the middle of a copy
    loaded = newest_checkpoint(str(tmp_path))
    assert loaded.state["epoch"] == 1 and loaded.path.endswith(PREVIOUS_CHECKPOINT)
    assert loaded.skipped[0][0].endswith(CHECKPOINT) and "corrupt" in loaded.skipped[0][1]
    assert newest_checkpoint(str(tmp_path / "nothing")).state is None


def test_temporary_files_of_a_killed_save_are_cleaned(tmp_path):
    stale = tmp_path / f".{CHECKPOINT}.tmp-12345"
    stale.write_bytes(b"partial")
    (tmp_path / "keep.txt").write_text("x")
    assert clean_temporary_files(str(tmp_path)) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_rng_state_round_trips_through_the_safe_loader(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # a cached Gaussian in numpy's state
    save_checkpoint({"rng": rng_state()}, str(tmp_path))
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    set_rng_state(load_checkpoint(str(tmp_path / CHECKPOINT))["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def flip_a_bit_of_tensor_data(path):
    """Flip one bit in the first tensor's bytes inside the checkpoint archive at ``path``."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entry = next(e for e in archive.infolist() if "/data/" in e.filename and e.file_size > 0)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    data[entry.header_offset + 30 + name_len + extra_len + 5] ^= 0x08
    path.write_bytes(bytes(data))


def test_a_flipped_bit_fails_its_checksum_and_the_previous_checkpoint_is_used(tmp_path):
    save_checkpoint({"epoch": 1, "w": torch.ones(64)}, str(tmp_path))
    save_checkpoint({"epoch": 2, "w": torch.ones(64)}, str(tmp_path))
    flip_a_bit_of_tensor_data(tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="CRC-32 checksum of its entry .*data/0.* does not match"):
        load_checkpoint(str(tmp_path / CHECKPOINT))
    loaded = newest_checkpoint(str(tmp_path))
    assert loaded.state["epoch"] == 1 and torch.equal(loaded.state["w"], torch.ones(64))
    assert "checksum" in loaded.skipped[0][1]


def test_checkpoints_written_without_checksums_still_load(tmp_path):
    import zipfile

    from torch.utils.serialization import config

    (tmp_path / "ours").mkdir()
    previous, config.save.compute_crc32 = config.save.compute_crc32, False
    try:
        torch.save({"epoch": 3, "w": torch.ones(4)}, tmp_path / CHECKPOINT)  # CRC fields of 0
        save_checkpoint({"epoch": 4, "w": torch.ones(4)}, str(tmp_path / "ours"))  # writes them regardless
    finally:
        config.save.compute_crc32 = previous
    assert load_checkpoint(str(tmp_path / CHECKPOINT))["epoch"] == 3
    with zipfile.ZipFile(tmp_path / "ours" / CHECKPOINT) as archive:
        assert all(entry.CRC != 0 for entry in archive.infolist() if entry.file_size)


def test_resume_refuses_a_folder_whose_checkpoints_all_fail(tmp_path):
    from shapkern.checkpoint import checkpoint_to_resume

    assert checkpoint_to_resume(str(tmp_path)).state is None  # nothing there: a new run may start
    save_checkpoint({"epoch": 1}, str(tmp_path))
    save_checkpoint({"epoch": 2}, str(tmp_path))
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:-1])  # both truncated by one byte
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match="cannot resume") as info:
        checkpoint_to_resume(str(tmp_path))
    assert str(tmp_path / CHECKPOINT) in str(info.value) and str(tmp_path / PREVIOUS_CHECKPOINT) in str(
        info.value
    )
    assert str(info.value).count("truncated or corrupt") == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_memory_and_device_errors_are_not_called_corrupt(tmp_path, monkeypatch):
    save_checkpoint({"epoch": 1, "w": torch.ones(4)}, str(tmp_path))
    if not torch.cuda.is_available():  # moving to a missing device fails: the file itself is fine
        with pytest.raises(Exception) as info:
            load_checkpoint(str(tmp_path / CHECKPOINT), map_location="cuda")
        assert not isinstance(info.value, CheckpointError)
        with pytest.raises(Exception) as info:
            newest_checkpoint(str(tmp_path), map_location="cuda")
        assert not isinstance(info.value, CheckpointError)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no memory for the checkpoint")

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(MemoryError):
        newest_checkpoint(str(tmp_path))  # not skipped as corrupt, nor a fall back to an older file


@pytest.mark.parametrize("content", ["random", "jsonl"])
def test_files_that_are_not_checkpoints_say_so_without_unsafe_advice(tmp_path, capsys, content):
    path = tmp_path / ("metrics.jsonl" if content == "jsonl" else "random.pt")
    if content == "jsonl":
        path.write_text('{"epoch": 1, "train_loss": 2.3}\n{"epoch": 2, "train_loss": 2.1}\n')
    else:
        path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    with pytest.raises(CheckpointError, match="is not a shapkern checkpoint") as info:
        load_checkpoint(str(path))
    assert "weights_only" not in str(info.value)
    argv = ["explain", "--checkpoint", str(path), "--data", "digits", "--out", str(tmp_path / "e")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not a shapkern checkpoint" in err and "weights_only" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1792 vs 1690"),
    ],
    ids=["oserror", "torch-writer"],
)
def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    save_checkpoint({"epoch": 1}, str(tmp_path))
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)  # part of the file is written, then the disk is full
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="no space left on device") as info:
        save_checkpoint({"epoch": 2}, str(tmp_path))
    assert info.value.errno == 28 and str(tmp_path / CHECKPOINT) in str(info.value)
    assert "unchanged" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT]  # no temporary file, nothing rotated
    assert load_checkpoint(str(tmp_path / CHECKPOINT))["epoch"] == 1
