import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from shapkern.checkpoint import load_checkpoint
from shapkern.training import TrainConfig, Trainer, train
from shapkern.training.config import INVOCATION_FIELDS

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
        "threads": 1,  # bitwise comparisons between runs need one thread count, whatever the machine's load
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


def files_of(folder) -> dict:
    """Bytes and modification time of every run file in ``folder`` (the hidden lock file aside)."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if not p.name.startswith(".")
    }


def quick(out, **kw) -> TrainConfig:
    """tiny_config without the per-epoch faithfulness and the heatmaps: 3 steps per epoch."""
    return tiny_config(out, **({"faith_images": 0, "heatmap_images": 0} | kw))


class NaNLoss:
    """The trainer's loss, made NaN at the given optimiser steps (as a diverging run's)."""

    def __init__(self, trainer: Trainer, steps):
        self.trainer, self.loss, self.steps = trainer, trainer.loss, set(steps)

    def __getattr__(self, name):  # the step reads the loss's options
        return getattr(self.loss, name)

    def __call__(self, *args, **kwargs):
        out = self.loss(*args, **kwargs)
        if self.trainer.step_count in self.steps:
            out = dataclasses.replace(out, total=out.total * float("nan"))
        return out


def test_resume_stops_when_no_checkpoint_loads_and_changes_nothing(tmp_path):
    from shapkern.checkpoint import CheckpointError
    from shapkern.training import resumed_config

    train(quick(tmp_path, epochs=2))
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:-1])  # both cut by one byte
    before = files_of(tmp_path)
    for attempt in (
        lambda: Trainer(quick(tmp_path, resume=True)),
        lambda: resumed_config(quick(tmp_path), set()),
    ):
        with pytest.raises(CheckpointError, match="cannot resume") as info:
            attempt()
        assert "checkpoint.pt:" in str(info.value) and "checkpoint.prev.pt:" in str(info.value)
    assert files_of(tmp_path) == before


def test_a_diverging_run_stops_before_writing_and_keeps_the_last_good_checkpoint(tmp_path):
    from shapkern.training.trainer import TrainingDiverged

    train(quick(tmp_path, epochs=1))
    before = files_of(tmp_path)
    trainer = Trainer(quick(tmp_path, epochs=3, resume=True))
    trainer.loss = NaNLoss(trainer, steps=[4])  # the second step of epoch 2
    with pytest.raises(TrainingDiverged, match=r"not finite .* at step 5 \(epoch 2.*epoch 1 is kept"):
        trainer.fit()
    trainer.close()
    assert files_of(tmp_path) == before  # no NaN checkpoint rotated the good one out, no metrics line


def test_skip_nonfinite_skips_that_many_bad_steps_then_stops(tmp_path):
    from shapkern.training.trainer import TrainingDiverged

    trainer = Trainer(quick(tmp_path / "a", epochs=2, skip_nonfinite=1))
    trainer.loss = NaNLoss(trainer, steps=[1])
    trainer.fit()
    assert trainer.skipped_steps == 1 and trainer.step_count == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pt")["skipped_steps"] == 1
    assert all(math.isfinite(r["train_loss"]) for r in read_jsonl(tmp_path / "a" / "metrics.jsonl"))
    trainer = Trainer(quick(tmp_path / "b", epochs=2, skip_nonfinite=1))
    trainer.loss = NaNLoss(trainer, steps=[1, 4])
    with pytest.raises(TrainingDiverged, match="2 such steps"):
        trainer.fit()
    trainer.close()
    assert [r["epoch"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1]


def test_a_resumed_lr_and_weight_decay_apply_to_the_optimizer_and_its_schedule(tmp_path):
    from shapkern.training.setup import cosine_warmup

    Trainer(quick(tmp_path, epochs=3, max_steps=3)).fit()  # epoch 1 saved, at lr 3e-3 and decay 0.05
    trainer = Trainer(quick(tmp_path, epochs=3, lr=1e-2, weight_decay=0.2, resume=True))
    factor = cosine_warmup(total_steps=9, warmup_steps=6)  # 3 steps per epoch, 2 warm-up epochs
    decay, no_decay = trainer.optimizer.param_groups
    assert trainer.step_count == 3 and trainer.scheduler.base_lrs == [1e-2, 1e-2]
    assert decay["lr"] == no_decay["lr"] == pytest.approx(1e-2 * factor(3))
    assert (decay["weight_decay"], no_decay["weight_decay"], decay["initial_lr"]) == (0.2, 0.0, 1e-2)
    trainer.fit()
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert lrs[1:] == [pytest.approx(1e-2 * factor(6)), pytest.approx(1e-2 * factor(9), abs=1e-12)]


def test_metrics_start_at_the_epoch_the_run_continues_from(tmp_path):
    for resume in (False, True):  # a run killed before its first checkpoint, restarted either way
        out = tmp_path / str(resume)
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 123.0}\n')
        train(quick(out, epochs=1, resume=resume))
        lines = read_jsonl(out / "metrics.jsonl")
        assert [r["epoch"] for r in lines] == [1] and lines[0]["train_loss"] != 123.0


def test_a_new_run_refuses_a_folder_that_holds_one_unless_told_to_overwrite(tmp_path):
    train(quick(tmp_path, epochs=2))
    before = files_of(tmp_path)
    with pytest.raises(ValueError, match="already holds a run .*--resume .*--overwrite"):
        Trainer(quick(tmp_path, epochs=1))
    assert files_of(tmp_path) == before
    train(quick(tmp_path, epochs=1, overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "checkpoint.pt",
        "metrics.jsonl",
    ]  # the old run's checkpoint.prev.pt went with it
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_resuming_a_complete_run_writes_nothing(tmp_path, capsys):
    train(quick(tmp_path, epochs=1, heatmap_images=2))
    before = files_of(tmp_path)
    assert "explanations.png" in before
    assert train(quick(tmp_path, epochs=1, heatmap_images=2, resume=True)) == {}
    assert "is complete (1 epochs done, --epochs 1); nothing to do" in capsys.readouterr().out
    assert files_of(tmp_path) == before


def test_a_resumed_run_needs_no_weights_file(tmp_path):
    train(quick(tmp_path / "source", epochs=1))
    weights = tmp_path / "weights.pt"
    (tmp_path / "source" / "checkpoint.pt").rename(weights)
    Trainer(quick(tmp_path / "run", epochs=2, weights=str(weights), max_steps=3)).fit()
    weights.unlink()  # moved away or deleted: the run's checkpoint holds its weights
    resumed = Trainer(quick(tmp_path / "run", epochs=2, weights=str(weights), resume=True))
    assert resumed.epoch == 1
    resumed.fit()


def test_every_config_field_is_checked(tmp_path):
    for f in dataclasses.fields(TrainConfig):
        with pytest.raises(ValueError, match="--" + f.name.replace("_", "-")):
            TrainConfig(**{f.name: object()}).validate()
    with pytest.raises(ValueError, match="--num-heads 3 does not divide --embed-dim 64"):
        TrainConfig(num_heads=3).validate()
    with pytest.raises(ValueError, match="give --resume or --overwrite, not both"):
        TrainConfig(resume=True, overwrite=True).validate()
    with pytest.raises(ValueError, match="cannot be built"):  # the heads do not divide the model's own width
        Trainer(quick(tmp_path, embed_dim=None, num_heads=5))


def test_configs_of_older_runs_and_paths_are_read(tmp_path):
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), "limit_train": 0, "unknown_key": 1})
    assert cfg.limit_train is None  # written before 0 was refused: it meant every image
    cfg.validate()
    assert TrainConfig(out=tmp_path).out == str(tmp_path)  # a Path would make the checkpoint unsafe to load


class SeenCoalitions:
    """The trainer's loss, keeping the coalitions of every call."""

    def __init__(self, loss):
        self.loss, self.seen = loss, []

    def __getattr__(self, name):
        return getattr(self.loss, name)

    def __call__(self, outputs, targets, coalitions, **kwargs):
        self.seen.append(coalitions)
        return self.loss(outputs, targets, coalitions, **kwargs)


@pytest.mark.parametrize("sampler, paired, num", [("uniform", False, 3), ("bernoulli", True, 4)])
def test_the_trainer_draws_coalitions_with_the_configs_sampler(tmp_path, sampler, paired, num):
    from shapkern.coalitions import CoalitionSampler

    cfg = quick(tmp_path, epochs=1, sampler=sampler, paired=paired, num_coalitions=num)
    trainer = Trainer(cfg)
    drawn = CoalitionSampler(num, sampler, paired, cfg.seed)
    assert trainer.coalition_sampler == drawn
    trainer.loss = SeenCoalitions(trainer.loss)
    images, labels, indices = next(iter(trainer.loader))
    trainer.backward(images, labels, indices, epoch=0)
    (seen,) = trainer.loss.seen
    assert torch.equal(seen, drawn(indices, 0, trainer.model.num_players))
    assert seen.shape[1] == num and bool((seen[:, 0::2] ^ seen[:, 1::2]).all()) == paired
    trainer.loss = trainer.loss.loss
    trainer.fit()
    trainer.close()
    assert TrainConfig.from_dict(load_checkpoint(tmp_path / "checkpoint.pt")["config"]) == cfg
    with pytest.raises(ValueError, match=r"--num-coalitions 3: .*\(even with --paired"):
        TrainConfig(num_coalitions=3).validate()
    with pytest.raises(ValueError, match="--sampler must be one of"):
        TrainConfig(sampler="sobol").validate()


def test_a_checkpoint_from_before_the_sampler_settings_resumes_with_the_shapley_kernel(tmp_path):
    from shapkern.checkpoint import save_checkpoint
    from shapkern.training import resumed_config

    train(quick(tmp_path, epochs=1))
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    for name in ("sampler", "paired"):
        del state["config"][name]
    save_checkpoint(state, str(tmp_path))
    cfg, _ = resumed_config(quick(tmp_path, epochs=2, resume=True), {"epochs"})
    assert (cfg.sampler, cfg.paired) == ("shapley", True)
    trainer = Trainer(cfg)
    assert trainer.epoch == 1
    trainer.fit()
    trainer.close()
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_importing_shapkern_imports_no_plotting_library():
    code = "import shapkern, sys; assert 'matplotlib' not in sys.modules, 'matplotlib was imported'"
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_thread_counts_change_results_only_by_rounding(tmp_path):
    """The thread count is not part of the run (an invocation field): 1 and 2 threads give the same
    run up to rounding (torch's CPU LayerNorm backward sums per-thread partials), and the count used
    is recorded in the metrics and the checkpoint."""
    before = torch.get_num_threads()
    try:
        runs = {}
        for threads in (1, 2):
            torch.set_num_threads(3)  # the library caller's own setting
            trainer = Trainer(quick(tmp_path / str(threads), threads=threads))
            runs[threads] = trainer.fit()
            assert torch.get_num_threads() == threads and runs[threads]["threads"] == threads
            trainer.close()
            assert torch.get_num_threads() == 3  # close() gives the caller's count back
            assert load_checkpoint(tmp_path / str(threads) / "checkpoint.pt")["threads"] == threads
    finally:
        torch.set_num_threads(before)
    for key in ("train_loss", "train_cls", "train_sv", "train_mask", "test_sv"):
        assert runs[1][key] == pytest.approx(runs[2][key], rel=1e-5), key
    assert "threads" in INVOCATION_FIELDS  # a resumed run takes it from the command line
