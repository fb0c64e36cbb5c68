"""The models and inputs that several benchmarks measure on.

- :func:`timm_vit`: a random-weight timm model of a family the benchmarks know (ViT, SigLIP,
  EVA-02, BEiT: benchmarks/families.py), random images and paired coalitions (throughput,
  profile_engine, and through them bench_engine and bench_scaling).
- :func:`attention_inputs`: packed q, k, v of paired Shapley-kernel coalitions at ViT shapes
  (bench_attention, tune_attention).
- :func:`trained_checkpoint`: a digits ShapleyViT trained with the CLI when missing (estimators,
  estimators_large).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import shapkern
from benchmarks import families, harness

HEADS, HEAD_DIM = 12, 64  # ViT-B's attention


# throughput.py's options that go to timm.create_model when given.
MODEL_OPTIONS = ("img_size", "patch_size", "depth", "embed_dim", "num_heads")


def timm_vit(args):
    """device, the fp32 reference model, the model in ``args.dtype``, images (B, C, H, W), coalitions
    (B, M, N), from throughput.py's options (model, :data:`MODEL_OPTIONS`, images, coalitions, dtype).

    Every model gets a 1000-class head: SigLIP and EVA-02 configs have none (num_classes 0), and
    the benchmarks time the logits.
    """
    device = torch.device(args.device)
    kwargs = {key: getattr(args, key) for key in MODEL_OPTIONS if getattr(args, key, None)}
    reference_model = timm.create_model(args.model, pretrained=False, num_classes=1000, **kwargs)
    try:
        families.family(reference_model)
    except ValueError as error:
        raise SystemExit(f"--model {args.model}: {error}") from None
    reference_model = reference_model.eval().to(device)
    model = copy.deepcopy(reference_model).to(harness.DTYPES[args.dtype])
    size = reference_model.patch_embed.img_size
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.images, 3, *size, device=device, generator=gen)
    players = reference_model.patch_embed.num_patches
    coalitions = shapkern.sample_coalitions(args.images, args.coalitions, players, generator=gen)
    return device, reference_model, model, images, coalitions


def attention_inputs(players: int, sequences: int, dtype, device):
    """Packed q, k, v (T, H, D) of paired Shapley-kernel coalitions, plus the pair grouping:
    (q, k, v, cu_seqlens, max_seqlen, lengths), a class token in every sequence."""
    gen = torch.Generator(device=device).manual_seed(players)
    masks = shapkern.sample_coalitions(1, sequences, players, generator=gen)[0]
    lengths = (masks.sum(-1) + 1).to(torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    total = int(cu_seqlens[-1])
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, device=device, generator=gen).to(dtype) for _ in range(3))
    return q, k, v, cu_seqlens, players + 1, lengths


def trained_checkpoint(run: Path, flags: list[str]) -> Path:
    """``run/checkpoint.pt``, trained with ``shapkern train`` and ``flags`` when missing."""
    path = run / "checkpoint.pt"
    if not path.exists():
        command = [sys.executable, "-m", "shapkern", "train", "--out", str(path.parent), "--no-progress"]
        command += ["--faith-images", "0", "--heatmap-images", "0", *flags]
        print("training:", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
    return path
