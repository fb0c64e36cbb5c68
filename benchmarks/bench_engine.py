"""Engine throughput at the engine's reference sizes, against the alternatives in one run.

    python -m benchmarks.bench_engine [--device cpu|cuda] [any option of benchmarks/throughput.py]

CPU: vit_tiny_patch16_224, fp32, 4 images × 32 paired coalitions, forward only, against the
zero-input, key-masked and dense-pairs full forwards. CUDA: vit_base_patch16_224, bf16, 32 × 32,
forward and forward+backward, against every alternative of benchmarks/baselines.py. Writes
engine.{json,md,png}; see throughput.py for the columns and the timing.
"""

from benchmarks import throughput

CPU = {
    "images": 4,
    "no_backward": True,
    "methods": ["shapkern engine", "zero-input full forward", "key mask, SDPA", "pairs + dense mask, SDPA"],
}

if __name__ == "__main__":
    throughput.main(description=__doc__, stem="engine", device_defaults={"cpu": CPU})
