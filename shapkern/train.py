"""A thin trainer for self-explaining ViTs (design.md §2): plain PyTorch, resumable, DDP-ready.

AdamW with linear warm-up and cosine decay per step, bf16 autocast on CUDA, gradient clipping,
tqdm bars with the loss components and images/s, per-epoch evaluation (accuracy, held-out ℓ_sv,
a quick faithfulness figure), a JSON-lines metrics log and atomic checkpoints holding everything
needed to resume bit-exactly: model, optimiser, scheduler, RNG states and epoch.

Launched with ``torchrun --nproc-per-node K``, it trains with DistributedDataParallel (gloo on
CPU, nccl on CUDA); rank 0 logs, evaluates and writes checkpoints. Every sample's coalitions are
seeded by (seed, epoch, sample index), so a run does not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from shapkern.data import DataBundle, load_dataset
from shapkern.explain import explain
from shapkern.losses import ShapleyLoss, seeded_coalitions, shapley_regression_loss
from shapkern.metrics import relative_l2
from shapkern.models import ShapleyViT

__all__ = ["TrainConfig", "Trainer", "build_model", "load_checkpoint", "train"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
HEATMAPS = "explanations.png"
ARCH_FIELDS = ("model", "img_size", "patch_size", "depth", "embed_dim", "num_heads", "head", "data")
EVAL_EPOCH = -1  # coalition seed "epoch" of the held-out ℓ_sv, the same at every evaluation


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in every checkpoint. Defaults: the digits quick start."""

    data: str = "digits"
    model: str = "vit_tiny_patch16_224"
    img_size: int = 32
    patch_size: int = 8
    depth: int | None = 3  # backbone overrides (None: the timm model's own)
    embed_dim: int | None = 64
    num_heads: int | None = 2
    head: str = "linear"
    weights: str | None = None  # local pretrained backbone weights
    epochs: int = 30
    batch_size: int = 64  # global, over all processes
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    clip_grad: float = 1.0
    lam: float = 0.1  # on digits, λ = 0.1 keeps the accuracy of λ = 0 (benchmarks/train_figures.py)
    mu: float = 1.0
    num_coalitions: int = 8
    mask_loss: str | None = "kl"
    stop_grad: bool = True
    seed: int = 0
    out: str = "runs/digits"
    resume: bool = False
    device: str = "auto"
    num_workers: int = 0
    limit_train: int | None = None  # use only the first n train / test images (smoke runs, tests)
    limit_test: int | None = None
    faith_images: int = 16  # per-epoch faithfulness: images and antithetic permutations
    faith_permutations: int = 16
    heatmap_images: int = 16
    progress: bool = True


# --------------------------------------------------------------------------------------- helpers


def build_model(cfg: TrainConfig, bundle: DataBundle) -> ShapleyViT:
    """The ShapleyViT of a config: timm ``cfg.model`` at the data's image size and channels."""
    kwargs = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "in_chans": bundle.in_chans}
    for name in ("depth", "embed_dim", "num_heads"):
        if getattr(cfg, name) is not None:
            kwargs[name] = getattr(cfg, name)
    try:
        return ShapleyViT(cfg.model, bundle.num_classes, cfg.head, checkpoint=cfg.weights, **kwargs)
    except TypeError as exc:  # a timm model that takes none of these keywords: not a ViT
        raise ValueError(f"model {cfg.model!r} cannot be built as a ViT with {kwargs}: {exc}") from exc


def _unwrap(model: nn.Module) -> ShapleyViT:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same folder, then rename: a kill leaves old or new."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint written by the trainer (the model is under ``"model"``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def _cosine_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def save_heatmaps(
    model: ShapleyViT, images: torch.Tensor, labels: torch.Tensor, path: str, classes=None
) -> None:
    """A PNG grid: each held-out image overlaid with Φ of its predicted class over the patch grid."""
    from shapkern.viz import plot_grid

    model.eval()
    with torch.no_grad():
        phi, logits = model(images)
    pred = logits.argmax(-1)
    name = (lambda c: classes[c]) if classes else str
    titles = [f"pred {name(int(p))} / {name(int(y))}" for p, y in zip(pred, labels)]
    maps = phi[torch.arange(len(pred)), :, pred].float().cpu()
    grid = tuple(model.backbone.patch_embed.grid_size)
    fig = plot_grid(images.float().cpu(), maps, titles=titles, grid=grid, dpi=110)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


# --------------------------------------------------------------------------------------- trainer


class Trainer:
    """One training run: ``Trainer(cfg).fit()``. Building blocks (``backward``, ``step``,
    ``evaluate``, ``save``) are public for tests and custom loops."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._init_distributed()
        self.bundle = load_dataset(cfg.data, img_size=cfg.img_size, patch_size=cfg.patch_size, seed=cfg.seed)
        train_set, test_set = self.bundle.train, self.bundle.test
        if cfg.limit_train:
            train_set = Subset(train_set, range(min(cfg.limit_train, len(train_set))))
        if cfg.limit_test:
            test_set = Subset(test_set, range(min(cfg.limit_test, len(test_set))))
        self.train_set, self.test_set = train_set, test_set
        if cfg.batch_size % self.world:
            raise ValueError(f"batch size {cfg.batch_size} must be divisible by the {self.world} processes")
        self.sampler = DistributedSampler(
            train_set, num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed, drop_last=False
        )
        self.loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size // self.world,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
        )

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = build_model(cfg, self.bundle).to(self.device)
        self.loss = ShapleyLoss(
            lam=cfg.lam,
            mu=cfg.mu,
            num_coalitions=cfg.num_coalitions,
            stop_grad=cfg.stop_grad,
            mask_loss=cfg.mask_loss,
        )
        self.ddp = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        decay = [p for n, p in self.model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
        )
        steps = len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _cosine_warmup(cfg.epochs * steps, max(1, round(cfg.warmup_epochs * steps)))
        )
        self.epoch = 0  # completed epochs
        self.step_count = 0
        if self.is_main:
            os.makedirs(cfg.out, exist_ok=True)
        if cfg.resume:
            self.resume(os.path.join(cfg.out, CHECKPOINT))

    # ------------------------------------------------------------------ setup
    def _init_distributed(self) -> None:
        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
        if cfg.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {cfg.device!r}")
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.is_main = self.rank == 0

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------ checkpoints
    def _arch(self) -> dict:
        arch = {name: getattr(self.cfg, name) for name in ARCH_FIELDS}
        arch["num_classes"] = self.bundle.num_classes
        return arch

    def save(self, path: str | None = None) -> None:
        """Atomically write model, optimiser, scheduler, RNG states and epoch (rank 0 only)."""
        if not self.is_main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "epoch": self.epoch,
            "step": self.step_count,
            "arch": self._arch(),
            "config": dataclasses.asdict(self.cfg),
        }
        _atomic_write(path or os.path.join(self.cfg.out, CHECKPOINT), lambda tmp: torch.save(state, tmp))

    def resume(self, path: str) -> None:
        """Restore a run from its checkpoint; the metrics log is cut back to the checkpoint's epoch."""
        state = load_checkpoint(path, map_location=self.device)
        arch, ours = state.get("arch", {}), self._arch()
        diff = {k: (arch.get(k), v) for k, v in ours.items() if arch.get(k) != v}
        if diff:
            raise ValueError(
                f"checkpoint {path} is from another architecture or dataset: "
                + ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in diff.items())
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {path} does not fit this model: {exc}") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.epoch, self.step_count = state["epoch"], state["step"]
        metrics = os.path.join(self.cfg.out, METRICS)
        if self.is_main and os.path.exists(metrics):
            with open(metrics) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("epoch", 0) <= self.epoch]

            def write(tmp: str) -> None:
                with open(tmp, "w") as f:
                    f.writelines(kept)

            _atomic_write(metrics, write)

    def log(self, record: dict) -> None:
        if self.is_main:
            with open(os.path.join(self.cfg.out, METRICS), "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def backward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, epoch: int):
        """Loss and gradients of one local batch (coalitions seeded per sample): LossOutput."""
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        coalitions = seeded_coalitions(
            indices,
            seed=self.cfg.seed,
            epoch=epoch,
            num=self.cfg.num_coalitions,
            players=self.model.num_players,
            device=self.device,
        )
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.loss(self.ddp, images, labels, coalitions)
        out.total.backward()
        return out

    def step(self) -> None:
        """Clip the gradients, step the optimiser and the schedule."""
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1

    def _bar(self, epoch: int):
        from tqdm.auto import tqdm

        return tqdm(
            self.loader,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            disable=not (self.cfg.progress and self.is_main),
            leave=False,
            dynamic_ncols=True,
        )

    def train_epoch(self, epoch: int, *, stop_after_steps: int | None = None) -> dict:
        self.model.train()
        self.sampler.set_epoch(epoch)
        sums = {"loss": 0.0, "cls": 0.0, "sv": 0.0, "mask": 0.0}
        correct = seen = 0
        start = time.perf_counter()
        bar = self._bar(epoch)
        for images, labels, indices in bar:
            if stop_after_steps is not None and self.step_count >= stop_after_steps:
                raise KeyboardInterrupt(f"stopped after {self.step_count} steps")
            out = self.backward(images, labels, indices, epoch)
            self.step()
            n = labels.shape[0]
            for k, v in out.components().items():
                sums[k] += v * n
            correct += int((out.logits.argmax(-1).cpu() == labels).sum())
            seen += n
            rate = seen * self.world / (time.perf_counter() - start)
            bar.set_postfix({k: f"{v / seen:.3f}" for k, v in sums.items()} | {"img/s": f"{rate:.0f}"})
        elapsed = time.perf_counter() - start
        record = {f"train_{k}": v / max(seen, 1) for k, v in sums.items()}
        record["train_acc"] = correct / max(seen, 1)
        record["images_per_s"] = seen * self.world / elapsed
        record["epoch_time_s"] = elapsed
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test accuracy, held-out ℓ_sv (fixed coalitions), and the faithfulness ‖Φ - φ‖/‖φ‖ against
        a permutation-sampling estimate of the model's own Shapley values on a few test images."""
        model = self.model.eval()
        loader = DataLoader(self.test_set, batch_size=max(64, self.cfg.batch_size))
        correct = count = 0
        sv = 0.0
        for images, labels, indices in loader:
            images, labels = images.to(self.device), labels.to(self.device)
            coalitions = seeded_coalitions(
                indices,
                seed=self.cfg.seed,
                epoch=EVAL_EPOCH,
                num=self.cfg.num_coalitions,
                players=model.num_players,
                device=self.device,
            )
            with self._autocast():
                out = model.forward_coalitions(images, coalitions, paired=True)
            correct += int((out.logits.argmax(-1) == labels).sum())
            sv += float(shapley_regression_loss(out.phi, out.values, coalitions)) * labels.shape[0]
            count += labels.shape[0]
        record = {"test_acc": correct / max(count, 1), "test_sv": sv / max(count, 1)}
        if self.cfg.faith_images > 0:
            images = torch.stack([self.test_set[i][0] for i in range(min(self.cfg.faith_images, count))])
            images = images.to(self.device)
            with self._autocast():
                phi, _ = model(images)
                pairs = max(2, self.cfg.faith_permutations // 2)  # antithetic pairs of orderings
                budget = 2 + 2 * pairs * (model.num_players - 1)  # ∅ and N once, N - 1 per ordering
                ref = explain(
                    model,
                    images,
                    method="permutation",
                    budget=budget,
                    target="all",
                    seed=self.cfg.seed,
                    progress=False,
                ).values
            record["faithfulness_rel_err"] = float(relative_l2(phi, ref).mean())
        return record

    # ------------------------------------------------------------------ loop
    def fit(self, *, stop_after_steps: int | None = None) -> dict:
        """Train from the current epoch to ``cfg.epochs``; returns the last metrics record.

        ``stop_after_steps`` interrupts the run (KeyboardInterrupt) before that optimiser step,
        as a kill would: tests use it to check that ``--resume`` loses nothing.
        """
        record: dict = {}
        if self.is_main:
            print(
                f"shapkern train: {self.cfg.data} ({len(self.train_set)} train / {len(self.test_set)} test), "
                f"{self.cfg.model} {self.model.num_players} patches, "
                f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, "
                f"{self.world} process(es) on {self.device}, from epoch {self.epoch} -> {self.cfg.out}",
                flush=True,
            )
        while self.epoch < self.cfg.epochs:
            epoch = self.epoch
            record = {"epoch": epoch + 1, **self.train_epoch(epoch, stop_after_steps=stop_after_steps)}
            self.epoch = epoch + 1
            if self.is_main:
                record.update(self.evaluate())
                record.update(step=self.step_count, lr=self.scheduler.get_last_lr()[0], time=time.time())
                self.log(record)  # before the checkpoint: resume cuts lines past the checkpoint's epoch
                self.save()
                print(
                    "epoch {epoch}: loss {train_loss:.4f} (cls {train_cls:.4f} sv {train_sv:.4f} mask "
                    "{train_mask:.4f}) test acc {test_acc:.4f} test sv {test_sv:.4f} faith {f:.3f} "
                    "{images_per_s:.0f} img/s".format(
                        f=record.get("faithfulness_rel_err", float("nan")), **record
                    ),
                    flush=True,
                )
            self._barrier()
        if self.is_main and self.cfg.heatmap_images > 0:
            count = min(self.cfg.heatmap_images, len(self.test_set))
            images = torch.stack([self.test_set[i][0] for i in range(count)]).to(self.device)
            labels = torch.tensor([self.test_set[i][1] for i in range(count)])
            save_heatmaps(
                self.model, images, labels, os.path.join(self.cfg.out, HEATMAPS), self.bundle.classes
            )
        self._barrier()
        return record

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig | None = None, **overrides) -> dict:
    """Run (or resume, with ``resume=True``) a training run; returns the last epoch's metrics."""
    cfg = dataclasses.replace(cfg or TrainConfig(), **overrides)
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
