"""Compile the fused LayerNorm and linear + GELU kernels for Hopper (sm_90) without a GPU; check ptxas spills.

As in tests/test_kernels_compile.py, the compile runs this file as a script in a subprocess without
TRITON_INTERPRET (interpreted kernels cannot be compiled). Every kernel is compiled with the launch
configuration its launcher picks, all optional paths on (residual, LayerScale, grad_s, grad_y,
pre-activation store): the most registers any call needs. Run ``python tests/test_kernels_compile_fused.py``
to print the report.
"""

import json

from sm90_compile import KERNELS_DIR, compile_typed, load_module, ptxas, report_from_script

# LayerNorm (storage dtypes x, y, s, h, parameters; D): pure 16-bit models at ViT-B, ViT-S and ViT-L widths,
# and autocast training's fp32 residual stream with a bf16 branch and bf16 h at ViT-B.
LAYER_NORM_CASES = [
    (("bf16",) * 5, 768),
    (("bf16",) * 5, 384),
    (("fp16",) * 5, 768),
    (("fp16",) * 5, 384),
    (("bf16",) * 5, 1024),
    (("fp32", "bf16", "fp32", "bf16", "fp32"), 768),
]
# linear + GELU (dtype, K, N): ViT-B's fc1 (768 -> 3072) in both 16-bit types, fp32 on FMA units.
GEMM_CASES = [("bf16", 768, 3072), ("fp16", 768, 3072), ("fp32", 768, 3072)]
# Scalars that are multiples of 16 at ViT sizes (D, K, N, row strides) and get Triton's divisibility hint.
_DIVISIBLE = {"D", "K", "N"}


def _compile(kernel, types: dict, constexprs: dict, num_warps: int, num_stages: int = 3) -> dict:
    return compile_typed(kernel, types, constexprs, num_warps, num_stages, divisible=_DIVISIBLE)


def _layer_norm_report() -> list[dict]:
    kernels = load_module(KERNELS_DIR / "layer_norm.py")
    report = []
    for (x, y, s, h, param), D in LAYER_NORM_CASES:
        block_d, block_m, num_warps = kernels.block_config(D)
        shapes = {"BLOCK_M": block_m, "BLOCK_D": block_d}
        fwd_types = {"X": x, "Y": y, "G": param, "W": param, "B": param, "S": s, "H": h}
        fwd_types = {k: f"*{v}" for k, v in fwd_types.items()} | {
            "MEAN": "*fp32",
            "RSTD": "*fp32",
            "eps": "fp32",
        }
        bwd_types = {"DS": s, "DH": h, "S": s, "Y": y, "G": param, "W": param, "DX": x, "DY": y}
        bwd_types = {k: f"*{v}" for k, v in bwd_types.items()}
        bwd_types |= {name: "*fp32" for name in ("MEAN", "RSTD", "DW", "DB", "DG")}
        for name, kernel, types, flags in (
            ("layer_norm_fwd", kernels._fwd_kernel, fwd_types, {"HAS_Y": True, "HAS_GAMMA": True}),
            (
                "layer_norm_bwd",
                kernels._bwd_kernel,
                bwd_types,
                {"HAS_DS": True, "STORE_DY": True, "HAS_GAMMA": True},
            ),
        ):
            entry = _compile(kernel, types, flags | shapes, num_warps)
            report.append({"kernel": name, "dtype": f"{x}/{y}/{s}/{h}/{param}", "D": D, **entry})
    return report


def _linear_gelu_report() -> list[dict]:
    kernels = load_module(KERNELS_DIR / "linear_gelu.py")
    torch_dtypes = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    import torch

    report = []
    for dtype, K, N in GEMM_CASES:
        config = kernels.gemm_config(getattr(torch, torch_dtypes[dtype]))
        block_m, block_n, block_k, group_m, num_warps, num_stages = config
        types = {name: f"*{dtype}" for name in ("X", "W", "B", "Y", "Z")}
        constexprs = {
            "STORE_Z": True,
            "PRECISION": "ieee" if dtype == "fp32" else "tf32",
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "BLOCK_K": block_k,
            "GROUP_M": group_m,
        }
        entry = _compile(kernels._fwd_kernel, types, constexprs, num_warps, num_stages)
        report.append(
            {"kernel": "linear_gelu_fwd", "dtype": dtype, "K": K, "N": N, "config": config, **entry}
        )
        if dtype == "fp32":
            continue
        block_m, block_n, num_warps = kernels._BWD_CONFIG
        types = {"DY": f"*{dtype}", "Z": f"*{dtype}", "DZ": f"*{dtype}", "DB": "*fp32"}
        entry = _compile(kernels._bwd_kernel, types, {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps)
        report.append({"kernel": "gelu_bwd", "dtype": dtype, "N": N, **entry})
    return report


def compile_report() -> list[dict]:
    return _layer_norm_report() + _linear_gelu_report()


def test_fused_kernels_compile_for_hopper_without_spills():
    report = report_from_script(__file__)
    assert len(report) == 2 * len(LAYER_NORM_CASES) + 2 * len(GEMM_CASES) - 1
    assert ptxas() is None or all("spill_bytes" in entry for entry in report)
    for entry in report:
        assert entry["ptx_chars"] > 0 and entry["cubin_bytes"] > 0, entry
        assert entry.get("spill_bytes", 0) == 0, f"register spills: {entry}"
        if entry["kernel"] == "linear_gelu_fwd":
            # 16-bit dots must run on Hopper's wgmma; every config fits the 227 KiB of shared memory.
            assert entry["wgmma"] == (entry["dtype"] != "fp32"), entry
            assert entry["shared_bytes"] <= 227 * 1024, entry


if __name__ == "__main__":
    print(json.dumps(compile_report()))
