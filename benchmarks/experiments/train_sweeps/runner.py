"""Training the sweeps' runs (each kept in --runs/<name>/result.json and reused while its settings
match), timing the training step, and running the parts of the command line."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.experiments.train_sweeps import config
from benchmarks.experiments.train_sweeps.analysis import aggregate, check_targets, decide_grad, find
from benchmarks.experiments.train_sweeps.config import STOP_GRAD_DEFAULT, Run
from benchmarks.train_figures import exact_faithfulness
from shapkern.explainers.metrics import localization
from shapkern.training import TrainConfig, Trainer


def _train_config(run: Run, args, out: Path) -> TrainConfig:
    cfg = TrainConfig(
        data=run.data,
        lam=run.lam,
        mu=run.mu,
        sv_scale=run.sv_scale,
        grad_coalitions=run.grad_coalitions,
        target_precision=run.target_precision,
        stop_grad=run.stop_grad,
        seed=run.seed,
        out=str(out),
        device=args.device,
        progress=False,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        img_size=args.img_size,
        patch_size=args.patch_size,
    )
    if args.epochs:
        cfg.epochs = args.epochs
    return cfg


def _trainer(run: Run, args, out: Path, **overrides) -> Trainer:
    return Trainer(dataclasses.replace(_train_config(run, args, out), **overrides))


@torch.no_grad()
def test_outputs(trainer: Trainer, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Φ (n, N, K) and f(x) (n, K) of the whole test set, and its labels (n,)."""
    model = trainer.model.eval()
    phis, logits, labels = [], [], []
    for first in range(0, len(trainer.test_set), batch):
        items = [trainer.test_set[i] for i in range(first, min(first + batch, len(trainer.test_set)))]
        out = model(torch.stack([item[0] for item in items]).to(trainer.device))
        phis.append(out.phi.float().cpu())
        logits.append(out.logits.float().cpu())
        labels += [item[1] for item in items]
    return torch.cat(phis), torch.cat(logits), torch.tensor(labels)


def self_localization(trainer: Trainer, phi: torch.Tensor, labels: torch.Tensor) -> dict:
    """Pointing game, AUROC, mIoU of Φ(x) for the true class against the evidence patches."""
    grid = tuple(trainer.model.backbone.patch_embed.grid_size)
    masks = trainer.bundle.test.patch_masks(grid)[: len(labels)] >= 0.5  # as `shapkern explain` does
    return localization(phi[torch.arange(len(labels)), :, labels], masks, grid)


def train_run(run: Run, args, *, exact: bool) -> dict:
    """Train one run (or reuse its result.json when the settings match) and score it."""
    folder = Path(args.runs) / run.name
    settings = {
        **run.settings,
        "epochs": args.epochs or TrainConfig.epochs,
        "limit_train": args.limit_train,
        "limit_test": args.limit_test,
        "img_size": args.img_size,
        "patch_size": args.patch_size,
        "exact_images": args.exact_images if exact else 0,
    }
    cached = folder / "result.json"
    if cached.exists():
        result = json.loads(cached.read_text())
        if result["settings"] == settings:
            print(f"reusing {cached}", flush=True)
            return result
    shutil.rmtree(folder, ignore_errors=True)
    trainer = _trainer(run, args, folder)
    start = time.perf_counter()
    last = trainer.fit()
    result = {
        "settings": settings,
        "test_acc": last["test_acc"],
        "test_sv": last["test_sv"],
        "faith_perm_rel_err": last.get("faithfulness_rel_err"),
        "train_seconds": time.perf_counter() - start,
    }
    phi, logits, labels = test_outputs(trainer)
    result["test_logit_sq"] = float(logits.square().sum(-1).mean())
    result["test_logit_sq_centered"] = float((logits - logits.mean(-1, keepdim=True)).square().sum(-1).mean())
    if exact and args.exact_images:
        result["exact"] = exact_faithfulness(trainer, args.exact_images)
    if hasattr(trainer.bundle.test, "patch_masks"):
        result["localization"] = self_localization(trainer, phi, labels)
    trainer.close()
    harness.write_json(cached, result)
    print(run.name, json.dumps({k: v for k, v in result.items() if k != "settings"}), flush=True)
    return result


def step_times(args) -> dict:
    """Trainer.backward + step of every G (stop-gradient form) and of the default step (ℓ_sv's
    gradient through its targets, all M graded) on the same batches, interleaved round-robin."""
    seed, full = args.seeds[0], args.grad_coalitions[0]
    runs = [Run("digits", *STOP_GRAD_DEFAULT, "raw", g, seed) for g in args.grad_coalitions]
    runs.append(Run("digits", TrainConfig.lam, TrainConfig.mu, "raw", full, seed, stop_grad=False))
    labels = [f"G={run.grad_coalitions}" if run.stop_grad else "default" for run in runs]
    trainers = [_trainer(run, args, Path(args.runs) / "timing" / run.name, faith_images=0) for run in runs]
    batches = list(itertools.islice(iter(trainers[0].loader), args.timing_steps))

    def steps(trainer: Trainer):
        trainer.model.train()
        for images, labels, indices in batches:
            trainer.backward(images, labels, indices, 0)
            trainer.step()

    clock = "process" if torch.device(trainers[0].device).type == "cpu" else "wall"
    fns = {label: (lambda t=t: steps(t)) for label, t in zip(labels, trainers, strict=True)}
    stats = harness.time_interleaved(
        fns, trainers[0].device, warmup=1, repeats=args.timing_repeats, clock=clock
    )
    base = stats[f"G={full}"]["times_ms"]
    out = {"clock": clock, "steps_per_call": len(batches), "repeats": args.timing_repeats, "rows": []}
    for run, label in zip(runs, labels, strict=True):
        times = stats[label]["times_ms"]
        ratios = [t / b for t, b in zip(times, base, strict=True)]  # same round, same machine state
        out["rows"].append(
            {
                "grad_coalitions": run.grad_coalitions,
                "stop_grad": run.stop_grad,
                "lam": run.lam,
                "ms_per_step": statistics.median(times) / len(batches),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "times_ms": times,
            }
        )
    for trainer in trainers:
        trainer.close()
    return out


def sweep(runs: list[Run], args, exact) -> list[dict]:
    """Train (or reuse) every run, scored against exact values where ``exact(run)``; one row per group."""
    return aggregate([(run, train_run(run, args, exact=exact(run))) for run in runs])


def run_parts(args) -> dict:
    """The parts of --parts: part name -> its rows (and the grad part's decision, the λ part's targets)."""
    result: dict = {}
    if "grad" in args.parts:
        result["grad"] = {"rows": sweep(config.grad_runs(args), args, lambda run: True)}
    if "timing" in args.parts:
        result["timing"] = step_times(args)
    if "grad" in result:
        full = args.grad_coalitions[0]
        result["grad"]["decision"] = decide_grad(result["grad"]["rows"], result.get("timing"), full)
    if "lam" in args.parts:
        rows = sweep(config.lam_runs(args), args, lambda run: run.lam > 0)
        reference = find(rows, lam=0.0, mu=0.0)
        result["lam"] = {"rows": rows, "targets": check_targets(rows, reference, args.target_lams)}
    if "evidence" in args.parts:
        result["evidence"] = {"rows": sweep(config.evidence_runs(args), args, lambda run: False)}
    if "fp8" in args.parts:
        result["fp8"] = {"rows": sweep(config.fp8_runs(args), args, lambda run: True)}
    return result
