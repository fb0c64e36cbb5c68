"""``shapkern explain``: Shapley values of a trained checkpoint on the user's images or a built-in set.

    shapkern explain --checkpoint runs/digits/checkpoint.pt --data digits --method exact --out expl/
    shapkern explain --checkpoint runs/digits/checkpoint.pt --images my.png --resize --out expl/

Writes ``explanations.json`` (φ, base and full values, target classes, evaluations, insertion and
deletion AUC, localisation where the data has masks), a heatmap PNG per image, ``grid.png`` and
``curves.png`` (insertion and deletion curves).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from shapkern.explain import METHODS, explain, find_patch_embed, value_function
from shapkern.metrics import insertion_deletion, localization
from shapkern.viz import plot_curves, plot_grid, plot_heatmap

__all__ = ["ExplainError", "add_explain_parser", "explain_to_dir", "load_images", "load_model", "run_explain"]

BUILTIN = ("digits", "evidence")


class ExplainError(ValueError):
    """A user error of ``shapkern explain``: the message says what to change."""


def add_explain_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``explain`` subcommand to an argparse subparsers object; its handler is ``run_explain``."""
    p = subparsers.add_parser(
        "explain",
        help="explain a checkpoint's predictions with Shapley values (PNG heatmaps + JSON)",
        description="Shapley values of the patches of images for a trained checkpoint: heatmaps, "
        "insertion/deletion curves and a JSON file of the values.",
    )
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint written by `shapkern train` (RUN/checkpoint.pt)"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="FILE", help="PNG/JPEG files to explain")
    source.add_argument(
        "--data", choices=BUILTIN, help="explain the first --num-images test images of a built-in set"
    )
    p.add_argument("--num-images", type=int, default=8, help="images taken from --data (default 8)")
    p.add_argument(
        "--method",
        choices=("auto", *METHODS),
        default="auto",
        help="estimator; auto = 'self' for a self-explaining model, else 'exact' up to 16 patches, else 'kernel'",
    )
    p.add_argument(
        "--budget", type=int, default=None, help="evaluations per image for kernel/permutation (2048)"
    )
    p.add_argument(
        "--tol", type=float, default=None, help="kernel/permutation: stop when every standard error < tol"
    )
    p.add_argument("--target", default="pred", help="'pred' (default), 'all' or a class index")
    p.add_argument("--resize", action="store_true", help="resize --images to the model's input size")
    p.add_argument("--batch-size", type=int, default=None, help="coalitions per image per model call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run_explain)
    return p


# -- model and images -----------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ExplainError("--device cuda requested but CUDA is not available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def load_model(path: str, device: torch.device):
    """A trained ShapleyViT and its training config from a ``shapkern train`` checkpoint."""
    from shapkern.train import TrainConfig, build_model, load_checkpoint

    if not os.path.isfile(path):
        raise ExplainError(f"no checkpoint at {path}")
    try:
        state = load_checkpoint(path)
    except Exception as exc:
        raise ExplainError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ExplainError(
            f"{path} is not a checkpoint written by `shapkern train` (no 'model' and 'config')"
        )
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in state["config"].items() if k in fields})
    cfg = dataclasses.replace(cfg, weights=None)  # the weights come from the checkpoint
    in_chans = state["model"]["backbone.patch_embed.proj.weight"].shape[1]
    bundle = SimpleNamespace(num_classes=state["arch"]["num_classes"], in_chans=in_chans)
    model = build_model(cfg, bundle)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def _preprocess(image, cfg, size: tuple[int, int], channels: int, normalisation) -> torch.Tensor:
    """A PIL image -> (C, H, W) float32 as the training data was preprocessed.

    normalisation: (mean, std) of the digits training split; None for other data.
    """
    import numpy as np

    if cfg.data.startswith("imagefolder:"):
        from timm.data import create_transform

        return create_transform(input_size=size[0], is_training=False)(image.convert("RGB"))
    gray = cfg.data == "digits"
    array = np.asarray(image.convert("L" if gray else "RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(array)
    x = x.unsqueeze(0) if gray else x.permute(2, 0, 1)
    if cfg.data == "digits":  # standardised with the training split's statistics, 3 equal channels
        mean, std = normalisation
        x = ((x - mean) / std).expand(channels, -1, -1)
    elif cfg.data == "evidence":  # ±1 patterns
        x = 2 * x - 1
    return x.contiguous()


def load_images(files: list[str], cfg, model, *, resize: bool) -> torch.Tensor:
    """Image files -> (B, C, H, W), checked against (or, with ``resize``, resized to) the model's size."""
    from PIL import Image, UnidentifiedImageError

    embed = find_patch_embed(model)
    size, channels = tuple(embed.img_size), embed.proj.in_channels
    normalisation = None
    if cfg.data == "digits":  # the training split's statistics, computed once
        from shapkern.data import load_dataset

        normalisation = load_dataset(
            "digits", img_size=cfg.img_size, patch_size=cfg.patch_size, seed=cfg.seed
        ).normalisation
    out = []
    for file in files:
        if not os.path.isfile(file):
            raise ExplainError(f"image file not found: {file}")
        try:
            with Image.open(file) as img:
                img.load()
                image = img.copy()
        except (UnidentifiedImageError, OSError) as exc:
            raise ExplainError(f"cannot read {file} as an image (PNG, JPEG, ...): {exc}") from exc
        imagefolder = cfg.data.startswith("imagefolder:")
        if (image.height, image.width) != size and not imagefolder:
            if not resize:
                raise ExplainError(
                    f"{file} is {image.width}x{image.height} pixels but the model takes {size[1]}x{size[0]}; "
                    f"pass --resize to resize it"
                )
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        out.append(_preprocess(image, cfg, size, channels, normalisation))
    return torch.stack(out)


def _builtin(cfg, name: str, count: int, grid: tuple[int, int]):
    """The first ``count`` test images of a built-in set: images, labels, patch masks bool (B, N) or
    None, class names."""
    from shapkern.data import load_dataset

    if count < 1:
        raise ExplainError(f"--num-images must be positive, got {count}")
    bundle = load_dataset(name, img_size=cfg.img_size, patch_size=cfg.patch_size, seed=cfg.seed)
    if name != cfg.data:
        print(f"note: the checkpoint was trained on {cfg.data!r}, explaining {name!r} images")
    test = bundle.test
    count = min(count, len(test))
    images = torch.stack([test[i][0] for i in range(count)])
    labels = [int(test[i][1]) for i in range(count)]
    masks = test.patch_masks(grid)[:count] >= 0.5 if hasattr(test, "patch_masks") else None
    return images, labels, masks, bundle.classes if name == cfg.data else None


# -- the command ----------------------------------------------------------------------------------


def _target(text: str):
    if text in ("pred", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ExplainError(f"--target must be 'pred', 'all' or a class index, got {text!r}") from None


def run_explain(args: argparse.Namespace) -> int:
    """Handler of ``shapkern explain``: writes the outputs, returns the exit status 0. User errors
    raise ValueError (ExplainError) or FileNotFoundError with a message to print."""
    explain_to_dir(args)
    return 0


def explain_to_dir(args: argparse.Namespace) -> dict:
    """Explain the images named by ``args`` and write the outputs to ``args.out``; returns the JSON record."""
    device = _device(args.device)
    model, cfg = load_model(args.checkpoint, device)
    classes = None
    grid = tuple(find_patch_embed(model).grid_size)
    if args.data:
        images, labels, masks, classes = _builtin(cfg, args.data, args.num_images, grid)
        sources = [f"{args.data}:test[{i}]" for i in range(images.shape[0])]
    else:
        images = load_images(args.images, cfg, model, resize=args.resize)
        labels, masks, sources = [None] * images.shape[0], None, list(args.images)
    images = images.to(device)
    method = args.method
    if method == "auto":
        method = (
            "self" if hasattr(model, "coalition_values") else "exact" if model.num_players <= 16 else "kernel"
        )
    att = explain(
        model,
        images,
        method=method,
        budget=args.budget,
        target=_target(args.target),
        tol=args.tol,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
    phi = att.values[..., 0]
    game = value_function(model, images)
    curves = insertion_deletion(game, phi, att.target[:, 0])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = lambda k: classes[k] if classes and k < len(classes) else str(k)
    with torch.no_grad():
        predictions = game(torch.ones(images.shape[0], 1, model.num_players, dtype=torch.bool, device=device))
    predictions = predictions[:, 0].argmax(-1).tolist()
    records = []
    for b in range(images.shape[0]):
        target = att.target[b].tolist()
        heatmap = f"heatmap_{b:03d}.png"
        title = f"{Path(sources[b]).name}: φ for class {name(target[0])}"
        plot_heatmap(images[b].cpu(), phi[b].cpu(), out / heatmap, grid=grid, title=title)
        records.append(
            {
                "source": sources[b],
                "label": labels[b],
                "prediction": predictions[b],
                "target": target,
                "base": att.base[b].tolist(),
                "full": att.full[b].tolist(),
                "values": att.values[b].tolist(),
                "std_error": None if att.std_error is None else att.std_error[b].tolist(),
                "insertion_auc": float(curves["insertion_auc"][b]),
                "deletion_auc": float(curves["deletion_auc"][b]),
                "heatmap": heatmap,
            }
        )
    titles = [f"{name(p)}" + ("" if l is None else f" (true {name(l)})") for p, l in zip(predictions, labels)]
    plot_grid(images.cpu(), phi.cpu(), out / "grid.png", titles=titles, grid=grid)
    plot_curves({method: curves["insertion"]}, {method: curves["deletion"]}, out / "curves.png")
    result = {
        "checkpoint": str(args.checkpoint),
        "method": method,
        "budget": args.budget,
        "evaluations_per_image": att.evaluations,
        "seconds": att.seconds,
        "device": str(device),
        "num_players": model.num_players,
        "grid": list(grid),
        "classes": classes,
        "values_layout": "values[image] is N x K_t: patch n (row-major on the grid), target class column",
        "efficiency_gap_max": float(att.efficiency_gap().abs().max()),
        "insertion_auc": float(curves["insertion_auc"].mean()),
        "deletion_auc": float(curves["deletion_auc"].mean()),
        "images": records,
    }
    if masks is not None:
        result["localization"] = localization(phi.cpu(), masks)
    (out / "explanations.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"shapkern explain: {images.shape[0]} image(s), method {method}, {att.evaluations} evaluations/image, "
        f"{att.seconds:.2f} s, insertion AUC {result['insertion_auc']:.3f}, deletion AUC "
        f"{result['deletion_auc']:.3f} -> {out}"
    )
    return result


def main(argv: list[str] | None = None) -> None:
    """Stand-alone entry point (``python -m shapkern.explain_cli ...``); errors exit with their message."""
    parser = argparse.ArgumentParser(prog="shapkern")
    sub = parser.add_subparsers(dest="command", required=True)
    add_explain_parser(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # ExplainError and the library's input errors
        parser.exit(2, f"shapkern explain: error: {exc}\n")


if __name__ == "__main__":
    main()
