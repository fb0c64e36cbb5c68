"""Engine throughput at the coalition-engine issue's sizes, against the alternatives in one run.

    python benchmarks/bench_engine.py [--device cpu|cuda] [any flag of benchmarks/run.py]

CPU: vit_tiny_patch16_224, fp32, 4 images × 32 paired coalitions, against the zero-input and the
key-masked full forward. CUDA: vit_base_patch16_224, bf16, 32 × 32, forward and forward+backward,
against every alternative of design.md §5. Results go to benchmarks/results/<date>-<device>/engine.*.
"""

import sys

import common
import run

CPU_METHODS = ["shapkern engine", "zero-input full forward", "key mask, SDPA"]

if __name__ == "__main__":
    cuda = "--device" not in sys.argv and common.default_device() == "cuda" or "cuda" in sys.argv
    defaults = {} if cuda else {"images": 4, "methods": CPU_METHODS, "no_backward": True}
    run.main(stem="engine", **defaults)
