import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from shapkern.checkpoint import load_checkpoint
from shapkern.training import TrainConfig, Trainer, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def tiny_config(out, **kw) -> TrainConfig:
    base = {
        "data": "digits",
        "img_size": 16,
        "patch_size": 4,
        "depth": 1,
        "embed_dim": 32,
        "num_heads": 2,
        "epochs": 2,
        "batch_size": 16,
        "num_coalitions": 4,
        "limit_train": 48,
        "limit_test": 16,
        "faith_images": 2,
        "faith_permutations": 2,
        "heatmap_images": 4,
        "progress": False,
        "out": str(out),
        "lr": 3e-3,
    }
    return TrainConfig(**(base | kw))


def weights(trainer_or_path):
    if isinstance(trainer_or_path, Trainer):
        return trainer_or_path.model.state_dict()
    return load_checkpoint(trainer_or_path)["model"]


def test_run_writes_checkpoint_metrics_and_heatmaps(tmp_path):
    record = train(tiny_config(tmp_path))
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2] and record["epoch"] == 2
    for key in (
        "train_loss",
        "train_cls",
        "train_sv",
        "train_mask",
        "test_acc",
        "test_sv",
        "faithfulness_rel_err",
        "images_per_s",
    ):
        assert key in lines[-1]
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "arch", "config"} <= set(ckpt) and ckpt[
        "epoch"
    ] == 2
    assert (tmp_path / "explanations.png").stat().st_size > 1000
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_killed_run_resumes_bit_exactly(tmp_path):
    full = Trainer(tiny_config(tmp_path / "full"))
    full.fit()
    steps = len(full.loader)
    killed = Trainer(tiny_config(tmp_path / "killed", max_steps=steps + 1))  # stops in the middle of epoch 2
    killed.fit()
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1
    resumed = Trainer(tiny_config(tmp_path / "killed", resume=True))
    assert resumed.epoch == 1
    resumed.fit()
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    lines = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2]


def test_checkpoint_from_another_architecture_fails_clearly(tmp_path):
    train(tiny_config(tmp_path, epochs=1, faith_images=0, heatmap_images=0))
    with pytest.raises(ValueError, match="another architecture"):
        Trainer(tiny_config(tmp_path, embed_dim=48, epochs=2, resume=True))
    fresh = Trainer(tiny_config(tmp_path / "empty", resume=True))  # no checkpoint yet: a new run
    assert fresh.epoch == 0


WORKER = textwrap.dedent(
    """
    import os, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r})
    from shapkern.training import TrainConfig, Trainer
    cfg = TrainConfig(**{cfg!r})
    trainer = Trainer(cfg)
    images, labels, indices = next(iter(trainer.loader))
    trainer.backward(images, labels, indices, epoch=0)
    grads = {{n: p.grad.clone() for n, p in trainer.model.named_parameters()}}
    trainer.optimizer.zero_grad()
    trainer.fit()
    path = os.path.join({out!r}, f"rank{{trainer.dist.rank}}.pt")
    torch.save({{"grads": grads, "weights": trainer.model.state_dict()}}, path)
    trainer.close()
    """
)


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    cfg = dict(vars(tiny_config(tmp_path, epochs=1, faith_images=0, heatmap_images=0, limit_train=32)))
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=ROOT, cfg=cfg, out=str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
    ]
    result = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name  # ranks stay identical

    single = Trainer(TrainConfig(**(cfg | {"out": str(tmp_path / "single")})))
    images, labels, indices = next(iter(single.loader))  # the same global batch as both ranks together
    single.backward(images, labels, indices, epoch=0)
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(rank0["grads"][name], p.grad, atol=1e-5, rtol=1e-5, msg=name)
    # The logged training metrics cover both ranks' batches: they equal a single process's.
    ddp_log = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    alone = Trainer(TrainConfig(**(cfg | {"out": str(tmp_path / "alone")})))
    alone.fit()
    single_log = read_jsonl(tmp_path / "alone" / "metrics.jsonl")[-1]
    for key in ("train_loss", "train_cls", "train_sv", "train_mask", "train_acc"):
        assert ddp_log[key] == pytest.approx(single_log[key], rel=1e-4, abs=1e-6), key


def test_resume_skips_a_damaged_checkpoint_and_a_half_written_log_line(tmp_path, capsys):
    train(tiny_config(tmp_path, epochs=2, faith_images=0, heatmap_images=0))
    assert load_checkpoint(tmp_path / "checkpoint.prev.pt")["epoch"] == 1
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 3])  # killed while copying the newest
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # killed while logging
    (tmp_path / ".checkpoint.pt.tmp-999").write_bytes(b"partial save")
    resumed = Trainer(tiny_config(tmp_path, epochs=2, faith_images=0, heatmap_images=0, resume=True))
    out = capsys.readouterr().out
    assert resumed.epoch == 1 and "skipped" in out and "checkpoint.pt" in out and "corrupt" in out
    assert "removed" in out and not (tmp_path / ".checkpoint.pt.tmp-999").exists()
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    resumed.fit()
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_too_little_data_for_one_batch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        Trainer(tiny_config(tmp_path, limit_train=10, batch_size=64))


def test_cpu_runs_with_the_same_seed_are_bitwise_identical(tmp_path):
    first = Trainer(tiny_config(tmp_path / "a", epochs=3))
    first.fit()
    second = Trainer(tiny_config(tmp_path / "b", epochs=3))
    second.fit()
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    strip = lambda r: {k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s", "time")}  # noqa: E731
    assert [strip(r) for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")] == [
        strip(r) for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")
    ]


def test_the_same_batch_gives_bitwise_identical_gradients(tmp_path):
    # A last, smaller batch of the default digits run: the packed gather's backward once summed each
    # image token's gradients with atomics, and repeated calls differed in the last bits.
    trainer = Trainer(TrainConfig(out=str(tmp_path), faith_images=0, heatmap_images=0, progress=False))
    items = [trainer.train_set[i] for i in range(29)]
    images, labels, indices = (torch.stack([torch.as_tensor(item[k]) for item in items]) for k in range(3))
    grads = []
    for _ in range(8):
        trainer.backward(images, labels, indices, epoch=0)
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
    for trial in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(trial, grads[0], strict=True))
