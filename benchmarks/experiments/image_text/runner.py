"""Training one run (kept in --runs/<name>/result.json and reused while its settings match) and scoring
it: retrieval, the error of Φ against the exact Shapley values of its own similarity game and of the
cosine game, and localisation from the text query (Φ, and post-hoc KernelSHAP)."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.experiments.image_text.config import Run
from shapkern.coalitions import all_coalitions
from shapkern.data import load_caption_dataset
from shapkern.engine import patch_grid
from shapkern.explainers import estimate
from shapkern.explainers.metrics import localization, relative_l2
from shapkern.games import TabulatedGame, ValueFunction
from shapkern.models import ShapleyCLIP
from shapkern.training import TrainConfig, Trainer
from shapkern.training.retrieval import caption_heatmaps


@torch.no_grad()
def coalition_table(model, image: torch.Tensor) -> torch.Tensor:
    """f(x_S) (2^N, D) of every coalition of one image (1, C, H, W), in integer order."""
    forward = model.coalition_forward(image)
    return torch.cat(
        [
            forward(chunk.unsqueeze(0))[0]
            for chunk in all_coalitions(model.num_players, coalitions_per_chunk=4096)
        ]
    )


@torch.no_grad()
def exact_errors(model, data, count: int) -> dict:
    """‖Φ·e/‖f(x)‖ − φ‖/‖φ‖ per image over its captions, φ the exact Shapley values (all 2^N
    coalitions) of (a) its own game exp(τ)⟨f(x_S), e_t⟩/‖f(x)‖ and (b) the cosine game
    exp(τ) cos(f(x_S), e_t) (v(∅) = 0; both equal the similarity at the full coalition)."""
    own, cosine, start = [], [], time.perf_counter()
    for j in range(min(count, data.num_images)):
        image = data.images[j : j + 1]
        captions = (data.caption_image == j).nonzero()[:, 0]
        text = model.encode_text(data.tokens[captions]) * model.scale  # (K, D), the scale folded in
        table = coalition_table(model, image)
        out = model(image)
        norm = out.image[0].norm()
        phi = out.phi[0] @ text.T / norm  # (N, K)
        for game, errors in ((table @ text.T / norm, own), (F.normalize(table, dim=-1) @ text.T, cosine)):
            exact = estimate(TabulatedGame(game[None]), method="exact", target="all", progress=False).values[
                0
            ]
            errors.append(float(relative_l2(phi[None], exact[None])))
    return {
        "images": len(own),
        "rel_err_mean": statistics.fmean(own),
        "rel_err_max": max(own),
        "cosine_rel_err_mean": statistics.fmean(cosine),
        "seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def kernel_heatmaps(model, data, captions: torch.Tensor, budget: int, seed: int) -> torch.Tensor:
    """Post-hoc KernelSHAP at ``budget`` evaluations on the model's own game, per caption (P, N). The
    similarity is linear in f(x_S), and so is KernelSHAP in the values: one estimate of the
    embedding game (K = D) per image gives every caption's."""
    owners = data.caption_image[captions]
    images = sorted(set(owners.tolist()))
    phi = {}
    for first in range(0, len(images), 16):
        batch = images[first : first + 16]
        x = torch.stack([data.images[j] for j in batch])
        game = ValueFunction(model.coalition_forward(x), len(batch), model.num_players)
        values = estimate(
            game, method="kernel", budget=budget, target="all", seed=seed, progress=False
        ).values
        norms = model(x).image.norm(dim=-1).view(-1, 1, 1)  # the game's constant per image
        phi.update(zip(batch, values.float() / norms, strict=True))
    text = model.encode_text(data.tokens[captions]) * model.scale
    return torch.stack([phi[int(j)] @ t for j, t in zip(owners, text, strict=True)])


def localisation(model, data, images: int, budget: int, seed: int) -> dict:
    """Pointing game, AUROC and mIoU of Φ and of KernelSHAP against each caption's cells, over the
    captions of the first ``images`` test images (and the pointing game of single-object captions)."""
    captions = (data.caption_image < images).nonzero()[:, 0]
    grid = patch_grid(model.image.backbone, model.num_players)
    labels = data.patch_masks(grid)[captions] >= 0.5
    single = labels.sum(1) == 1
    out = {}
    for name, heat in (
        ("self", caption_heatmaps(model, data, captions, torch.device("cpu"))),
        (f"kernel{budget}", kernel_heatmaps(model, data, captions, budget, seed)),
    ):
        scores = localization(heat, labels, grid)
        scores["pointing_single"] = localization(heat[single], labels[single], grid)["pointing"]
        out[name] = scores
    return {"captions": len(captions), **out}


# The settings that define a trained model; the others only score it (a run changed in those alone is
# re-scored from its checkpoint, not trained again).
TRAINING_SETTINGS = ("lam", "mu", "seed", "epochs", "limit_train", "limit_test")


def _score(result: dict, model, data, run: Run, args, exact_images: int) -> dict:
    """``result`` with the errors against exact values and the localisation of ``model`` on ``data``."""
    result["exact"] = exact_errors(model, data, exact_images) if exact_images else None
    result["localization"] = localisation(model, data, args.local_images, args.kernel_budget, run.seed)
    return result


def _rescored(folder: Path, result: dict, settings: dict, run: Run, args, exact_images: int) -> dict | None:
    """The run in ``folder`` (its earlier ``result``) scored with ``settings``, from its checkpoint, when
    it was trained with the same training settings; else None."""
    checkpoint = folder / "checkpoint.pt"
    if not checkpoint.exists() or any(result["settings"].get(k) != settings[k] for k in TRAINING_SETTINGS):
        return None
    print(f"re-scoring {checkpoint}", flush=True)
    model = ShapleyCLIP.from_checkpoint(checkpoint)
    size = TrainConfig.for_task("image-text").img_size
    data = load_caption_dataset("captions", img_size=size, seed=run.seed).test.first(args.limit_test)
    return _score({**result, "settings": settings}, model, data, run, args, exact_images)


def train_run(run: Run, args) -> dict:
    """Train one run (or reuse its result.json when the settings match, or re-score its checkpoint
    when only the scoring settings changed) and score it."""
    folder = Path(args.runs) / run.name
    exact_images = args.exact_images if run.setting == "self-explaining" else 0
    settings = {
        "lam": run.lam,
        "mu": run.mu,
        "seed": run.seed,
        "epochs": args.epochs,
        "exact_images": exact_images,
        "local_images": args.local_images,
        "kernel_budget": args.kernel_budget,
        "limit_train": args.limit_train,
        "limit_test": args.limit_test,
    }
    cached = folder / "result.json"
    earlier = json.loads(cached.read_text()) if cached.exists() else None
    if earlier is not None and earlier["settings"] == settings:
        print(f"reusing {cached}", flush=True)
        return earlier
    rescored = None if earlier is None else _rescored(folder, earlier, settings, run, args, exact_images)
    if rescored is not None:
        harness.write_json(cached, rescored)
        return rescored
    shutil.rmtree(folder, ignore_errors=True)
    cfg = TrainConfig.for_task(
        "image-text",
        lam=run.lam,
        mu=run.mu,
        seed=run.seed,
        epochs=args.epochs,
        out=str(folder),
        progress=False,
        faith_images=0,
        heatmap_images=0,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
    )
    trainer = Trainer(cfg)
    start = time.perf_counter()
    last = trainer.fit()
    result = {
        "settings": settings,
        "setting": run.setting,
        "train_seconds": time.perf_counter() - start,
        **{k: last[k] for k in last if k.startswith("test_r")},
        "test_sv": last["test_sv"],
    }
    _score(result, trainer.model.eval(), trainer.test_set, run, args, exact_images)
    trainer.close()
    harness.write_json(cached, result)
    print(run.name, json.dumps({k: v for k, v in result.items() if k != "settings"}), flush=True)
    return result
