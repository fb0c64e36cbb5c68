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
