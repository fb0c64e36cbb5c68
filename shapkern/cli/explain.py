"""``shapkern explain``: Shapley values of a model's predictions, for a few images or a whole dataset.

    shapkern explain --checkpoint runs/digits/checkpoint.pt --data digits --num-images 8 --out expl/
    shapkern explain --checkpoint runs/digits/checkpoint.pt --images my.png --resize --out expl/
    shapkern explain --model vit_base_patch16_224 --pretrained --data imagenette --limit 1024 --out store/

The model is a ``shapkern train`` checkpoint (``--checkpoint``) or a name (``--model``: timm, ``hf:ID``,
``open_clip:ARCH``), preprocessed as it records or as its weights expect. Two outputs:

- pictures, for ``--images FILE...`` or ``--data NAME --num-images N``: ``explanations.json`` (φ, base
  and full values, target classes, evaluations, insertion and deletion AUC, localisation where the
  data has masks), a heatmap PNG per image, ``grid.png`` and ``curves.png``. A folder holding an
  earlier run's pictures is refused unless ``--overwrite``, which removes exactly those files
  (:func:`earlier_outputs`) and nothing else;
- a store, for ``--data NAME`` without ``--num-images``: every image of a split, in shards, by one
  process or many, resumable (:mod:`shapkern.cli.explain_store`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from shapkern.cli.explain_inputs import Inputs, read_inputs
from shapkern.cli.explain_outputs import (
    OUTPUT_FILES,
    earlier_outputs,
    heatmap_name,
    output_folder,
    remove_earlier_outputs,
    run_record,
    write_record,
)
from shapkern.cli.explain_store import (
    STORE_FLAGS,
    add_store_arguments,
    model_of,
    not_a_file,
    parse_target,
    run_store,
)
from shapkern.cli.explain_texts import check_text_model, explain_texts_to_dir
from shapkern.coalitions import MAX_EXACT_PLAYERS
from shapkern.data import DATASETS
from shapkern.engine import patch_grid
from shapkern.explainers import (
    DEFAULT_BUDGET,
    DEFAULT_COALITIONS_PER_CALL,
    GAME_METHODS,
    METHODS,
    NamedModel,
    Target,
    explain,
    insertion_deletion,
    localization,
    plot_curves,
    plot_grid,
    plot_heatmap,
    resolve_method,
)
from shapkern.games import model_game
from shapkern.runlock import FolderLock
from shapkern.threads import apply_thread_policy
from shapkern.training import DEVICES

__all__ = ["add_parser", "earlier_outputs", "explain_to_dir", "run"]

SAMPLING_METHODS = tuple(m for m in GAME_METHODS if m not in ("auto", "exact"))  # they spend --budget
TOL_METHODS = tuple(m for m in SAMPLING_METHODS if m != "bayes")  # bayes spends its whole budget


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``shapkern explain``; its handler is :func:`run`."""
    p = subparsers.add_parser(
        "explain",
        help="explain a model's predictions with Shapley values (PNG heatmaps + JSON, or a dataset's store)",
        description="Shapley values of the patches of images for a checkpoint or a named model: heatmaps, "
        "insertion/deletion curves and a JSON file of the values for --images or --data with --num-images; "
        "for --data alone, a resumable store of a whole split (torchrun for several processes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_arguments(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--images", nargs="+", metavar="FILE", help="PNG/JPEG files to explain (8 or 16 bits): pictures"
    )
    source.add_argument(
        "--data",
        metavar="NAME",
        help=f"a dataset ({', '.join(DATASETS)}): its test split's first --num-images as pictures, or "
        "without --num-images the store of a whole split",
    )
    p.add_argument("--num-images", type=int, default=None, help="pictures of this many --data images")
    p.add_argument("--resize", action="store_true", help="resize --images to the model's input size")
    p.add_argument(
        "--texts",
        nargs="+",
        metavar="TEXT",
        help="for an image-text model (image-text checkpoint, open_clip:ARCH, hf: CLIPModel/SiglipModel): "
        "explain each image's similarity with each text, a heatmap per text",
    )
    _add_estimator_arguments(p)
    p.add_argument("--device", default="auto", choices=DEVICES, help="where the model runs")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: the cores this process may use that the machine's load leaves free; "
        "OMP_NUM_THREADS or MKL_NUM_THREADS when set)",
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder: new, or without an earlier run's outputs (see --overwrite); a store resumes",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse an --out folder holding an earlier explain run's outputs: they are removed first "
        f"(pictures: {', '.join(OUTPUT_FILES)}, heatmap_NNN.png; a store: its files; no other file)",
    )
    add_store_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model: a checkpoint, or a name with --pretrained or --weights."""
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--checkpoint",
        help="a checkpoint written by `shapkern train` (RUN/checkpoint.pt), with its preprocessing",
    )
    model.add_argument(
        "--model",
        help="a timm name (vit_base_patch16_224, arch.tag), hf:ID_OR_FOLDER (Hugging Face transformers) or "
        "open_clip:ARCH[:TAG] (its image tower), preprocessed as its weights expect; random weights "
        "(seeded) unless --pretrained or --weights",
    )
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="--model: its pretrained weights, from the Hugging Face hub or cache (HF_HUB_OFFLINE=1: the "
        "cache only)",
    )
    p.add_argument("--weights", metavar="FILE", help="--model (timm, open_clip): a local weights file")


def _add_estimator_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the estimator: method, budget, tol, target, coalitions per call, seed."""
    p.add_argument(
        "--method",
        choices=METHODS,
        default="auto",
        help="estimator: auto (= self for these checkpoints), for --model exact, bayes or leverage by N and "
        "--budget; self (a self-explaining ViT's own Φ, one forward pass), exact (all 2^N coalitions, N <= "
        f"{MAX_EXACT_PLAYERS}), or one that samples --budget coalitions: {', '.join(SAMPLING_METHODS)}",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        help=f"evaluations per image for {', '.join(SAMPLING_METHODS)} ({DEFAULT_BUDGET} when not given)",
    )
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help=f"{', '.join(TOL_METHODS)}: stop when every standard error < tol",
    )
    p.add_argument(
        "--target", default="pred", help="'pred', 'label' (the true class), 'all' or a class index"
    )
    p.add_argument(
        "--coalitions-per-call",
        "--batch-size",  # its name before 0.3
        dest="coalitions_per_call",
        type=int,
        default=None,
        help=f"coalitions per image per model call ({DEFAULT_COALITIONS_PER_CALL} when not given)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling estimators")


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _target(text: str, labels: list[int | None], device: torch.device) -> Target:
    """``--target`` for explain(): 'label' becomes the images' true classes."""
    target = parse_target(text)
    if target != "label":
        return target
    if None in labels:
        raise ValueError("--target label needs --data: the true classes of --images are not known")
    return torch.tensor(labels, device=device)


def run(args: argparse.Namespace) -> int:
    """Handler of ``shapkern explain``: writes the outputs; user errors raise ValueError."""
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        print(f"shapkern explain: {apply_thread_policy(args.threads)} on the CPU", flush=True)
    if args.data is not None and args.num_images is None:
        if args.texts is not None:
            raise ValueError("--texts writes pictures: give --images FILE ... or --data NAME --num-images N")
        return run_store(args)
    given = [f"--{flag.replace('_', '-')}" for flag in STORE_FLAGS if getattr(args, flag) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} go with --data without --num-images (a whole split into a store); "
            "--images and --num-images write pictures"
        )
    not_a_file(args.out)  # before the lock, which creates the folder
    with FolderLock(args.out):  # one writer per output folder (a second process is refused)
        explain_to_dir(args)
    return 0


def _write_pictures(out: Path, inputs: Inputs, att, predictions: list[int], curves: dict, grid, method: str):
    """A heatmap per image, grid.png and curves.png; returns the per-image records of the JSON file."""
    phi, name, records = att.values[..., 0], inputs.class_name, []
    for b in range(inputs.images.shape[0]):
        target, label = att.target[b].tolist(), inputs.labels[b]
        truth = "" if label is None else f", true {name(label)}"
        title = f"{Path(inputs.sources[b]).name}: φ for class {name(target[0])}{truth}"
        plot_heatmap(inputs.images[b].cpu(), phi[b].cpu(), out / heatmap_name(b), grid=grid, title=title)
        records.append(
            {
                "source": inputs.sources[b],
                "label": label,
                "prediction": predictions[b],
                "target": target,
                "base": att.base[b].tolist(),
                "full": att.full[b].tolist(),
                "values": att.values[b].tolist(),
                "std_error": None if att.std_error is None else att.std_error[b].tolist(),
                "insertion_auc": float(curves["insertion_auc"][b]),
                "deletion_auc": float(curves["deletion_auc"][b]),
                "heatmap": heatmap_name(b),
            }
        )
    titles = [
        f"pred {name(p)}" + ("" if y is None else f", true {name(y)}")
        for p, y in zip(predictions, inputs.labels, strict=False)
    ]
    plot_grid(inputs.images.cpu(), phi.cpu(), out / "grid.png", titles=titles, grid=grid)
    plot_curves({method: curves["insertion"]}, {method: curves["deletion"]}, out / "curves.png")
    return records


def _players_and_grid(named: NamedModel, device: torch.device) -> tuple[int, tuple[int, int]]:
    """N and the patch grid of the model's game (on a blank image of its input size)."""
    channels = named.preprocessing.channels if named.preprocessing is not None else 3
    blank = torch.zeros(1, channels, *named.input_size, device=device)
    players = model_game(named.model, blank).players
    return players, patch_grid(named.model, players)


def explain_to_dir(args: argparse.Namespace) -> dict:
    """Explain the images named by ``args`` and write the outputs to ``args.out``; returns the JSON record."""
    out = output_folder(args.out, args.overwrite)
    device = _device(args.device)
    named = model_of(args, device)
    check_text_model(args, named)
    if args.texts is not None:
        return explain_texts_to_dir(args, named, out, device)
    model, players, grid = named.model, *_players_and_grid(named, device)
    inputs = read_inputs(args, named, grid)
    images = inputs.images = inputs.images.to(device)
    method = resolve_method(args.method, model, players, args.budget, args.tol)
    att = explain(
        model,
        images,
        method=method,
        budget=args.budget,
        target=_target(args.target, inputs.labels, device),
        tol=args.tol,
        coalitions_per_call=args.coalitions_per_call,
        seed=args.seed,
        progress=args.progress,
    )
    phi = att.values[..., 0]
    game = model_game(model, images)
    curves = insertion_deletion(game, phi, att.target[:, 0])
    with torch.no_grad():  # v(N): the model's logits (a ShapleyViT's f(x))
        full = game(torch.ones(images.shape[0], 1, players, dtype=torch.bool, device=device))
    predictions = full[:, 0].argmax(-1).tolist()
    remove_earlier_outputs(out)  # refused above unless --overwrite
    result = {
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        **run_record(named.name, att, method, args.budget, device, players, grid),
        "classes": inputs.classes,
        "values_layout": "values[image] is N x K_t: patch n (row-major on the grid), target class column",
        "insertion_auc": float(curves["insertion_auc"].mean()),
        "deletion_auc": float(curves["deletion_auc"].mean()),
        "images": _write_pictures(out, inputs, att, predictions, curves, grid, method),
    }
    if inputs.masks is not None:
        result["localization"] = localization(phi.cpu(), inputs.masks)
    write_record(out, result)
    print(
        f"shapkern explain: {images.shape[0]} image(s), method {method}, "
        f"{att.evaluations} evaluations/image, "
        f"{att.seconds:.2f} s, insertion AUC {result['insertion_auc']:.3f}, deletion AUC "
        f"{result['deletion_auc']:.3f} -> {out}"
    )
    return result
