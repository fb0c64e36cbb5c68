"""The README's GPU recipe, and one epoch of it timed on the synthetic evidence data.

    python -m benchmarks.recipe_epoch [--device cuda|cpu] [--epochs E] [--batch-size B] [--out DIR] [-- FLAGS]

:data:`RECIPE` fine-tunes timm's ViT-S/16 (AugReg, ImageNet-21k then 1k) from its pretrained weights
on CIFAR-10 at 224 px (N = 196 patches) with M = 32 paired coalitions per image, over K GPUs with
torchrun (bf16 autocast is automatic on CUDA). tests/test_cli_train.py runs these very flags on a
tiny fake CIFAR-10 and a fake cached "pretrained" model, and checks that the README shows this
command.

Run as a benchmark it needs no downloads: the recipe's model with random weights, on ``evidence``
at 224 px (2,000 train / 500 test images), one process at the recipe's per-GPU batch, for
``--epochs`` epochs (the first includes torch.compile's compilation; the last is the warm one).
FLAGS after ``--`` are more ``shapkern train`` flags (for a CPU smoke run: a tiny model and image).
Writes recipe_epoch.{json,md}: per epoch the training time, images/s, evaluation times, peak GPU
memory, the FLOP rate against the bf16 GEMM rate measured in the same run, and what that implies
for an epoch of CIFAR-10 (50,000 training images at the warm rate, evaluation scaled to 10,000).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time

import torch

from benchmarks import harness
from shapkern.cli import build_parser
from shapkern.cli.train import config_from_args
from shapkern.training import Trainer
from shapkern.training.evaluation import default_evaluators
from shapkern.training.trainer import METRICS

RECIPE = (
    "torchrun --nproc-per-node 4 -m shapkern train --data cifar10 --download "
    "--model vit_small_patch16_224.augreg_in21k_ft_in1k --pretrained --img-size 224 --patch-size 16 "
    "--num-coalitions 32 --batch-size 256 --lr 1e-4 --warmup-epochs 1 --epochs 10 --num-workers 8 "
    "--out runs/cifar10-vit-small"
)
CIFAR10 = {"train": 50_000, "test": 10_000}


def recipe_gpus() -> int:
    words = shlex.split(RECIPE)
    return int(words[words.index("--nproc-per-node") + 1])


def recipe_args() -> list[str]:
    """The ``shapkern train`` flags of :data:`RECIPE`."""
    words = shlex.split(RECIPE)
    return words[words.index("train") + 1 :]


def step_flops(depth: int, dim: int, players: int, prefix: int, coalitions: int, graded: int) -> float:
    """FLOPs of one image's training step in the blocks (docs/design.md, "Performance model"):
    depth · (24 D² s + 4 D s²) per row of s tokens, for the full/empty pair and M paired coalitions
    with sizes from the Shapley kernel (expected s²); forward + backward (3×) for the ends and the
    ``graded`` coalitions, forward only for the others."""
    sizes = torch.arange(1, players, dtype=torch.float64)
    weight = 1.0 / (sizes * (players - sizes))
    weight /= weight.sum()
    pair_square = float((weight * ((sizes + prefix) ** 2 + (players - sizes + prefix) ** 2)).sum())
    pair_tokens = players + 2 * prefix

    def pairs(count: float, square: float) -> float:
        return depth * count * (24 * dim**2 * pair_tokens + 4 * dim * square)

    ends = pairs(1, (players + prefix) ** 2 + prefix**2)  # the full and the empty coalition
    return 3 * (ends + pairs(graded / 2, pair_square)) + pairs((coalitions - graded) / 2, pair_square)


class Timed:
    """An evaluator that also reports its own wall time (``<name>_s``)."""

    def __init__(self, evaluator):
        self.evaluator, self.name = evaluator, type(evaluator).__name__

    def __call__(self, model, test_set, device):
        harness.synchronize(device)
        start = time.perf_counter()
        record = self.evaluator(model, test_set, device)
        harness.synchronize(device)
        return {**record, f"{self.name}_s": time.perf_counter() - start}


def evaluation_seconds(record: dict, evaluators: list[Timed]) -> float:
    """The seconds an epoch's record gives its timed evaluators (their ``<name>_s``); the record's
    other keys ending in ``_s`` (epoch_time_s, images_per_s) are not evaluation times."""
    return sum(record.get(f"{evaluator.name}_s", 0.0) for evaluator in evaluators)


def train_timed(args, out) -> tuple[Trainer, list[dict]]:
    """The recipe's configuration on evidence, random weights, one device: trained for --epochs,
    with the trainer and its metrics record per epoch."""
    recipe, _ = config_from_args(build_parser().parse_args(["train", *recipe_args(), *args.flags]))
    cfg = dataclasses.replace(
        recipe,
        data="evidence",
        pretrained=False,  # random weights: no hub here
        download=False,
        batch_size=args.batch_size or recipe.batch_size // recipe_gpus(),
        epochs=args.epochs,
        device=args.device,
        out=str(out / "run"),
        progress=False,
        heatmap_images=0,
        overwrite=True,  # a rerun into the same --out replaces the previous run
    )
    trainer = Trainer(cfg, evaluators=[Timed(e) for e in default_evaluators(cfg)])
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    try:
        trainer.fit()
    finally:
        trainer.close()
    with open(out / "run" / METRICS) as f:
        return trainer, [json.loads(line) for line in f]


def measure(trainer: Trainer, epochs: list[dict]) -> dict:
    """The result: per-epoch records, peak memory, the FLOP rate of the warm (last) epoch against
    the bf16 GEMM rate, and the implied CIFAR-10 epoch on one device."""
    cfg, device, backbone = trainer.cfg, trainer.device, trainer.model.backbone
    flops = step_flops(
        len(backbone.blocks),
        backbone.embed_dim,
        trainer.model.num_players,
        backbone.num_prefix_tokens,
        cfg.num_coalitions,
        trainer.loss.grad_coalitions,
    )
    gemm = harness.gemm_tflops(device, torch.bfloat16) if device.type == "cuda" else None
    warm = epochs[-1]
    held_out = warm.get("HeldOutLoss_s", 0.0) * CIFAR10["test"] / len(trainer.test_set)
    return {
        "environment": harness.environment(device),
        "command": harness.command_line(),
        "recipe": RECIPE,
        "config": cfg.to_dict(),
        "epochs": epochs,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "step_gflop_per_image": flops / 1e9,
        "gemm_tflops": gemm,
        "achieved_tflops": flops * warm["images_per_s"] / 1e12,  # blocks only, the engine's FLOPs
        "cifar10_epoch_one_gpu_s": {
            "train": CIFAR10["train"] / warm["images_per_s"],
            "evaluation": held_out + warm.get("Faithfulness_s", 0.0),
        },
    }


def markdown(result: dict, trainer: Trainer) -> str:
    cfg, epochs, warm = trainer.cfg, result["epochs"], result["epochs"][-1]
    rows = [
        [
            r["epoch"],
            f"{r['epoch_time_s']:.1f}",
            f"{r['images_per_s']:.0f}",
            f"{evaluation_seconds(r, trainer.evaluators):.1f}",
            f"{r['train_loss']:.3f}",
            f"{r.get('test_acc', float('nan')):.3f}",
        ]
        for r in epochs
    ]
    memory, gemm = result["peak_memory_gib"], result["gemm_tflops"]
    memory = "n/a" if memory is None else f"{memory:.1f} GiB"
    evaluation = evaluation_seconds(warm, trainer.evaluators)
    rate = f"{result['achieved_tflops']:.1f} TFLOP/s ({result['step_gflop_per_image']:.0f} GFLOP per image"
    rate += " and step)"
    if gemm is not None:
        rate += f", {result['achieved_tflops'] / gemm:.0%} of the bf16 GEMM rate measured here ({gemm:.0f})"
    cifar = result["cifar10_epoch_one_gpu_s"]
    return "\n".join(
        [
            f"# The GPU recipe on evidence at {cfg.img_size} px: "
            f"{harness.hardware_name(result['environment'])}",
            "",
            f"Recipe: `{RECIPE}`",
            "",
            f"Timed: `{cfg.model}` with random weights, {trainer.model.num_players} patches, "
            f"M = {cfg.num_coalitions}, batch {cfg.batch_size} on one device, "
            f"{len(trainer.train_set)} train / {len(trainer.test_set)} test images: "
            f"`{harness.command_line()}`.",
            "",
            harness.markdown_table(
                ["epoch", "train s", "images/s", "evaluation s", "loss", "test acc"], rows, align="rrrrrr"
            ),
            f"Warm epoch (the last): {warm['images_per_s']:.0f} images/s, {rate}; evaluation "
            f"{evaluation:.1f} s; peak memory {memory}.",
            "",
            f"Implied CIFAR-10 epoch on one such device: {cifar['train']:.0f} s of training (50,000 images) "
            f"+ {cifar['evaluation']:.0f} s of evaluation (held-out loss scaled "
            "to 10,000 test images); with torchrun at the same per-GPU batch the training part divides by "
            "the GPU count.",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=2, help="epochs to time (the first compiles)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: per GPU)")
    parser.add_argument("flags", nargs="*", help="more `shapkern train` flags, after --")
    args = parser.parse_args(argv)
    out = harness.results_dir(args.out, args.device)
    trainer, epochs = train_timed(args, out)
    result = measure(trainer, epochs)
    text = markdown(result, trainer)
    harness.write_results(out, "recipe_epoch", result, text)
    print(text, flush=True)
    return result


if __name__ == "__main__":
    main()
