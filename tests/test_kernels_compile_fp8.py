"""Compile the fp8 quantisation kernel for Hopper (sm_90) without a GPU; check ptxas spills.

As in tests/test_kernels_compile.py, the compile runs this file as a script in a subprocess without
TRITON_INTERPRET (interpreted kernels cannot be compiled). The kernel is compiled with the launch
configuration its launcher picks, for every prologue the fp8 engine uses at ViT-B/L widths. Run
``python tests/test_kernels_compile_fp8.py`` to print the report.
"""

import json

from sm90_compile import KERNELS_DIR, compile_typed, load_module, ptxas, report_from_script

# (prologue, storage dtypes of x, y, s and the LayerNorm parameters, K, residual add, LayerScale):
# the attention output before proj, fc1's output before fc2 (GELU), the first LayerNorm of a model, the
# residual add + LayerNorm of pure 16-bit models and of autocast's fp32 stream with a bf16 branch.
CASES = [
    ("none", ("bf16",) * 4, 768, False, False),
    ("none", ("fp32",) * 4, 1024, False, False),
    ("gelu", ("bf16",) * 4, 3072, False, False),
    ("gelu", ("fp16",) * 4, 4096, False, False),
    ("layer_norm", ("fp32",) * 4, 768, False, False),
    ("layer_norm", ("bf16",) * 4, 768, True, True),
    ("layer_norm", ("bf16",) * 4, 1024, True, False),
    ("layer_norm", ("fp32", "bf16", "fp32", "fp32"), 768, True, True),
]


def compile_report() -> list[dict]:
    kernels = load_module(KERNELS_DIR / "fp8.py")
    report = []
    for prologue, (x, y, s, param), K, has_y, has_gamma in CASES:
        block_k, block_m, num_warps = kernels.block_config(K)
        types = {"X": x, "Y": y, "S": s, "G": param, "W": param, "B": param}
        types = {k: f"*{v}" for k, v in types.items()} | {
            "Q": "*fp8e4nv",
            "SCALE": "*fp32",
            "eps": "fp32",
            "amax_floor": "fp32",
        }
        constexprs = {
            "PROLOGUE": prologue,
            "HAS_Y": has_y,
            "HAS_GAMMA": has_gamma,
            "BLOCK_M": block_m,
            "BLOCK_K": block_k,
        }
        entry = compile_typed(
            kernels._quantize_kernel, types, constexprs, num_warps, divisible={"D", "K", "N"}
        )
        dtypes = "/".join((x, y, s, param))
        report.append({"kernel": f"quantize_{prologue}", "dtype": dtypes, "K": K, "y": has_y, **entry})
    return report


def test_fp8_kernel_compiles_for_hopper_without_spills():
    report = report_from_script(__file__)
    assert len(report) == len(CASES)
    assert ptxas() is None or all("spill_bytes" in entry for entry in report)
    for entry in report:
        assert entry["ptx_chars"] > 0 and entry["cubin_bytes"] > 0, entry
        assert entry.get("spill_bytes", 0) == 0, f"register spills: {entry}"


if __name__ == "__main__":
    print(json.dumps(compile_report()))
