"""Where the engine's time goes: device time per kernel class, forward and forward+backward.

    python -m benchmarks.profile_engine [--device cuda|cpu] [--model vit_base_patch16_224]
                                        [--images 32] [--coalitions 32] [--dtype bf16] [--out DIR]
                                        [--methods "shapkern engine" "pairs + dense mask, SDPA" ...]

Runs the engine (plain and, on CUDA, compiled blocks), or any methods of benchmarks/baselines.py
named with --methods, under torch.profiler and sums kernel time by class: GEMM, attention,
LayerNorm, GELU, elementwise, gather/index, copies, reductions. The gap between wall time (CUDA
events) and summed kernel time is launch gaps and host work. On the CPU it classifies operator
self time instead. Options and per-device sizes as benchmarks/throughput.py. Writes
profile.{json,md}.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import baselines, cases, harness, throughput

# First match wins: attention before GEMM (flash kernels mention gemm), LayerNorm before the
# elementwise catch-all (inductor names fused kernels after the ops they hold).
KERNEL_CLASSES = [
    ("attention", r"_fwd_kernel|_bwd_dkdv|_bwd_dq|_bwd_preprocess|flash|fmha|attention|sdpa"),
    ("GEMM", r"gemm|gemv|cutlass|nvjet|xmma|cublas|sm90_|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("LayerNorm", r"layer_norm|layernorm"),
    ("GELU", r"gelu"),
    ("gather / index", r"index|gather|scatter|nonzero|cumsum|repeat_interleave|embedding"),
    ("copy / cat", r"copy|cat_|catarray|aten::cat$|contiguous|clone"),
    ("reduction", r"reduce|aten::sum$|aten::mean$"),
    ("elementwise (add, mul, ...)", r"elementwise|vectorized|triton_|aten::(add|mul|div|sub|where)"),
]
PHASES = ("forward", "forward+backward")


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for label, pattern in KERNEL_CLASSES:
        if re.search(pattern, lowered):
            return label
    return "other"


def breakdown(prof, device: torch.device, iterations: int) -> dict:
    """Per-iteration milliseconds by kernel class, and the eight most expensive kernels."""
    per_kernel: dict[str, float] = {}
    for event in prof.key_averages():
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            per_kernel[event.key] = per_kernel.get(event.key, 0.0) + us / 1e3 / iterations
    classes: dict[str, float] = {}
    for name, ms in per_kernel.items():
        label = kernel_class(name)
        classes[label] = classes.get(label, 0.0) + ms
    top = sorted(per_kernel.items(), key=lambda item: -item[1])[:8]
    return {
        "classes_ms": dict(sorted(classes.items(), key=lambda item: -item[1])),
        "kernels_ms": sum(per_kernel.values()),
        "top_kernels_ms": dict(top),
    }


def profile_method(fn, model, images, coalitions, device, iterations: int, backward: bool = True) -> dict:
    """Wall time and profiled time by kernel class per call, forward (and forward+backward)."""
    steps = {
        "forward": partial(throughput.forward, fn, model, images, coalitions),
        "forward+backward": partial(
            throughput.forward_backward, fn, model, images.clone().requires_grad_(), coalitions
        ),
    }
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    result = {}
    for phase in PHASES if backward else PHASES[:1]:
        step = steps[phase]
        wall = harness.time_fn(step, device, repeats=iterations)
        with profile(activities=activities) as prof:
            for _ in range(iterations):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        result[phase] = {"wall_ms": wall["median_ms"], **breakdown(prof, device, iterations)}
        result[phase]["gaps_ms"] = max(0.0, result[phase]["wall_ms"] - result[phase]["kernels_ms"])
        model.zero_grad(set_to_none=True)
    return result


def markdown(payload: dict) -> str:
    env, config = payload["environment"], payload["config"]
    unit = "device time" if env["device"].startswith("cuda") else "operator self CPU time"
    lines = [
        f"# Time by kernel class on {harness.hardware_name(env)}",
        "",
        (
            f"{config['model']}, {config['dtype']}, {config['images']} images × {config['coalitions']} "
            f"paired coalitions; torch {env['torch']}, triton {env['triton']}, {env['date']}. Milliseconds "
            f"per call ({unit} summed per class; gaps = wall time − summed kernel time). "
            f"Command: `{payload['command']}`"
        ),
        "",
    ]
    for method, phases in payload["methods"].items():
        for phase, stats in phases.items():
            wall = stats["wall_ms"]
            table = [[label, f"{ms:.2f}", f"{ms / wall:.0%}"] for label, ms in stats["classes_ms"].items()]
            table.append(["launch gaps / host", f"{stats['gaps_ms']:.2f}", f"{stats['gaps_ms'] / wall:.0%}"])
            lines += [
                f"## {method}, {phase}: {wall:.2f} ms wall",
                "",
                harness.markdown_table(["class", "ms", "share"], table, align="lrr"),
                "Top kernels: "
                + "; ".join(f"`{k[:60]}` {v:.2f} ms" for k, v in stats["top_kernels_ms"].items()),
                "",
            ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    engines = ["shapkern engine", "shapkern engine, compiled"]
    args = throughput.parse_args(
        argv,
        description=__doc__,
        stem="profile",
        device_defaults={"cpu": {"methods": engines[:1]}, "cuda": {"methods": engines}},
    )
    harness.configure_cpu_threads()
    device, _, model, images, coalitions = cases.timm_vit(args)
    images = images.to(harness.DTYPES[args.dtype])
    payload = {
        "environment": harness.environment(device),
        "command": harness.command_line(),
        "config": {
            "model": args.model,
            "images": coalitions.shape[0],
            "coalitions": coalitions.shape[1],
            "dtype": args.dtype,
        },
        "methods": {},
    }
    out = harness.results_dir(args.out, args.device)
    for name in args.methods:
        reason = baselines.unavailable_reason(name, device)
        if reason:
            print(f"{name}: unavailable ({reason})", flush=True)
            continue
        fn = baselines.METHODS[name].fn
        iterations = min(args.repeats, 5)
        payload["methods"][name] = profile_method(
            fn, model, images, coalitions, device, iterations, backward=not args.no_backward
        )
        harness.write_results(out, args.stem, payload, markdown(payload))  # a run cut short keeps it
    print(markdown(payload))
    print(f"wrote {out}/{args.stem}.{{json,md}}")
    return payload


if __name__ == "__main__":
    main()
