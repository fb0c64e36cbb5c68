"""What ``shapkern explain`` writes into ``--out`` as pictures, and what ``--overwrite`` removes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from shapkern.cli.explain_store import not_a_file

__all__ = [
    "OUTPUT_FILES",
    "earlier_outputs",
    "heatmap_name",
    "output_folder",
    "remove_earlier_outputs",
    "run_record",
    "write_record",
]

OUTPUT_FILES = ("explanations.json", "grid.png", "curves.png")  # and heatmap_name(b) per image
HEATMAP = re.compile(r"heatmap_\d{3,}\.png")


def heatmap_name(index: int) -> str:
    """The heatmap file of the ``index``-th image (matches :data:`HEATMAP`)."""
    return f"heatmap_{index:03d}.png"


def earlier_outputs(out: Path) -> list[Path]:
    """The files in ``out`` that an explain run writes: what ``--overwrite`` removes."""
    return sorted(
        p for p in out.iterdir() if p.is_file() and (p.name in OUTPUT_FILES or HEATMAP.fullmatch(p.name))
    )


def output_folder(path: str, overwrite: bool) -> Path:
    """``--out`` as an existing folder without an earlier run's outputs (unless ``overwrite``)."""
    out = not_a_file(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {path}: cannot create the folder ({exc})") from None
    earlier = earlier_outputs(out)
    if earlier and not overwrite:
        shown = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise ValueError(
            f"--out {path} holds the outputs of an earlier `shapkern explain` ({shown}); name another "
            "folder, or pass --overwrite to remove them (and no other file) and write this run's"
        )
    return out


def remove_earlier_outputs(out: Path) -> None:
    """Remove an earlier run's outputs (:func:`output_folder` refused them unless ``--overwrite``)."""
    for path in earlier_outputs(out):
        path.unlink()


def run_record(
    model: str, att, method: str, budget: int | None, device: torch.device, players: int, grid
) -> dict:
    """What explanations.json says of every picture run: the model, the estimator (method, budget,
    evaluations per image, seconds), the device, N and its grid, and the largest efficiency gap of
    the Attribution ``att``."""
    return {
        "model": model,
        "method": method,
        "budget": budget,
        "evaluations_per_image": att.evaluations,
        "seconds": att.seconds,
        "device": str(device),
        "num_players": players,
        "grid": list(grid),
        "efficiency_gap_max": float(att.efficiency_gap().abs().max()),
    }


def write_record(out: Path, record: dict) -> None:
    """explanations.json in ``out``."""
    (out / "explanations.json").write_text(json.dumps(record, indent=2) + "\n")
