"""Benchmark shapkern's reductions against the obvious PyTorch formulations, and check their outputs.

coalition_reduce vs torch.einsum("bmn,bm,bmk->bnk") over unpacked bool masks; segment_sum vs
index_add_ over a repeat_interleave'd sequence index; segment_expand (its backward) vs
repeat_interleave; pack/unpack_masks vs their PyTorch references. Segment sums use --segments
sequences of random length in [0, N] (default 1024, about 100k tokens).

    python benchmarks/bench_reductions.py [--device cpu|cuda] [--batch 32 --coalitions 1024 ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from shapkern.ops import _extension as ext
from shapkern.ops import reduce as R


def median_ms(fn, repeats: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cases(args, device: torch.device):
    """Yield (name, shapkern fn, baseline fn, tolerance) on fresh random inputs."""
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    b, m, n, k = args.batch, args.coalitions, args.players, args.classes
    mask = (torch.rand(b, m, n, generator=g) < 0.5).to(device)
    values = torch.randn(b, m, k, generator=g).to(device, dtype)
    weights = torch.rand(b, m, generator=g).to(device, dtype)
    packed = R.pack_masks(mask)
    yield (
        "coalition_reduce",
        lambda: R.coalition_reduce(packed, values, weights, n)[0],
        lambda: torch.einsum("bmn,bm,bmk->bnk", mask.to(dtype), weights, values),
        1e-3,
    )

    lengths = torch.randint(0, n + 1, (args.segments,), generator=g).to(device)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    tokens = torch.randn(int(lengths.sum()), k, generator=g).to(device, dtype)
    grad = torch.randn(args.segments, k, generator=g).to(device, dtype)

    def index_add():
        seq = torch.repeat_interleave(torch.arange(args.segments, device=device), lengths)
        return torch.zeros(args.segments, k, device=device, dtype=dtype).index_add_(0, seq, tokens)

    yield "segment_sum", lambda: R.segment_sum(tokens, cu), index_add, 1e-3
    if ext.has_kernels(device):
        yield (
            "segment_expand",
            lambda: torch.ops.shapkern.segment_expand(grad, cu, tokens.shape[0]),
            lambda: grad.repeat_interleave(lengths, dim=0),
            0.0,
        )
    yield "pack_masks", lambda: R.pack_masks(mask), lambda: R.pack_masks_reference(mask), 0.0
    yield "unpack_masks", lambda: R.unpack_masks(packed, n), lambda: R.unpack_masks_reference(packed, n), 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32, help="B, images")
    parser.add_argument("--coalitions", type=int, default=1024, help="M, coalitions per image")
    parser.add_argument("--players", type=int, default=196, help="N, patches")
    parser.add_argument("--classes", type=int, default=1000, help="K, values per coalition")
    parser.add_argument("--segments", type=int, default=1024, help="sequences for segment_sum")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--out", type=Path, help="JSON path (default benchmarks/results/reductions-<device>.json)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(__file__).parent / "results" / f"reductions-{device.type}.json"

    rows = []
    print(f"{'op':<18}{'shapkern ms':>13}{'torch ms':>11}{'speedup':>9}  max |diff|")
    for name, ours, baseline, tol in cases(args, device):
        actual, expected = ours().double(), baseline().double()
        diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
        ok = diff <= tol * max(1.0, expected.abs().max().item())
        del actual, expected
        ms, base_ms = median_ms(ours, args.repeats, device), median_ms(baseline, args.repeats, device)
        rows.append(
            {
                "op": name,
                "shapkern_ms": ms,
                "torch_ms": base_ms,
                "speedup": base_ms / ms,
                "max_abs_diff": diff,
                "correct": ok,
            }
        )
        print(
            f"{name:<18}{ms:>13.2f}{base_ms:>11.2f}{base_ms / ms:>8.2f}x  {diff:.2e}{'' if ok else '  WRONG'}"
        )

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "extension_loaded": ext.extension_loaded(),
        "cuda_kernels": ext.has_cuda_kernels(),
        "python": platform.python_version(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"environment": env, "config": {**vars(args), "out": str(out)}, "results": rows}, indent=2)
    )
    print(f"wrote {out}")
    if not all(r["correct"] for r in rows):
        raise SystemExit("some outputs differ from the PyTorch formulation")


if __name__ == "__main__":
    main()
