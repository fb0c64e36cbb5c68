"""Compile the varlen attention kernels for Hopper (sm_90) without a GPU and check ptxas spills.

Kernels decorated under TRITON_INTERPRET=1 (set by conftest when there is no GPU) are interpreted
functions that cannot be compiled, so the check runs this file as a script in a subprocess without
that variable. Run ``python tests/test_kernels_compile.py`` to print the register report, or
``python tests/test_kernels_compile.py bwd_short bf16 64 64,32,8,2 [bias]`` to try one tile.
"""

import json
import sys

from sm90_compile import KERNELS_DIR, compile_sm90, load_module, report_from_script

# (dtype, head dim, with an additive score bias): bf16 at ViT's D=64 and at the largest padded tile;
# fp16 with a padded head dim; fp32 (FMA dots); each without a bias and with one (BEiT's relative
# position bias: an fp32 (H, L, L) matrix, int32 positions, an fp32 gradient buffer).
CASES = [
    (dtype, D, bias)
    for bias in (False, True)
    for dtype, D in (("bf16", 64), ("bf16", 128), ("fp16", 80), ("fp32", 64))
]
# Every kernel, by its block_config name: the long schedule's three and the short schedule's two.
KERNELS = {
    "fwd": "_fwd_kernel",
    "dkdv": "_bwd_dkdv_kernel",
    "dq": "_bwd_dq_kernel",
    "fwd_short": "_fwd_short_kernel",
    "bwd_short": "_bwd_short_kernel",
}


def _signature(kernel, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Triton >= 3.2 signature (name -> type, "constexpr" for constants) and 16-divisibility attrs."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("LSE", "DELTA", "DQ_ACC", "BIAS", "DBIAS"):
            signature[name] = "*fp32"
        elif name in ("CU_SEQLENS", "BIAS_INDEX"):
            signature[name] = "*i32"
        elif name.startswith("stride") or name in ("H", "num_seqs"):
            signature[name] = "i32"
        elif name.endswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = f"*{dtype}"
        # What a launch with 16-byte-aligned pointers and (T, 3, H, D) qkv strides would specialise on.
        if signature[name].startswith("*") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _constexprs(kernels, kernel, name: str, dtype, D: int, config, bias: bool) -> dict:
    """The launchers' compile-time arguments for one kernel: without a bias its pointers are None,
    which Triton specialises as constants."""
    block_m, block_n = config[:2]
    constexprs = {
        "D": D,
        "BLOCK_D": kernels.triton.next_power_of_2(D),
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "HAS_BIAS": bias,
        "PRECISION": kernels._precision(dtype),
    }
    if name.endswith("short"):
        constexprs["SEQS"] = kernels.SEQS_PER_PROGRAM
    if not bias:
        constexprs.update({arg: None for arg in ("BIAS", "BIAS_INDEX", "DBIAS") if arg in kernel.arg_names})
    return constexprs


def compile_report(cases=None, kernel_names=tuple(KERNELS), config=None) -> list[dict]:
    """Compile every kernel for every (dtype, D, bias) case; ptxas -v registers and spills per kernel.

    config: a (BLOCK_M, BLOCK_N, num_warps, num_stages) tile to try instead of block_config's.
    """
    import torch
    import triton

    kernels = load_module(KERNELS_DIR / "varlen_attention.py")
    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    report = []
    for dtype, D, bias in cases or CASES:
        for name in kernel_names:
            kernel = getattr(kernels, KERNELS[name])
            tile = config or kernels.block_config(name, torch_dtypes[dtype], triton.next_power_of_2(D), bias)
            block_m, block_n, num_warps, num_stages = tile
            constexprs = _constexprs(kernels, kernel, name, torch_dtypes[dtype], D, tile, bias)
            signature, attrs = _signature(kernel, dtype, constexprs)
            entry = {
                "kernel": name,
                "dtype": dtype,
                "D": D,
                "bias": bias,
                "config": [block_m, block_n, num_warps, num_stages],
                **compile_sm90(kernel, signature, constexprs, attrs, num_warps, num_stages),
            }
            report.append(entry)
    return report


def test_kernels_compile_for_hopper_without_spills():
    report = report_from_script(__file__, timeout=300)
    assert len(report) == len(KERNELS) * len(CASES)
    for entry in report:
        assert entry["ptx_chars"] > 0 and entry["cubin_bytes"] > 0, entry
        if entry["dtype"] != "fp32":
            assert entry["wgmma"], f"16-bit dots should use Hopper wgmma: {entry}"
        assert entry.get("spill_bytes", 0) == 0, f"register spills: {entry}"


if __name__ == "__main__":
    if len(sys.argv) > 1:  # kernel dtype D BLOCK_M,BLOCK_N,warps,stages [bias]
        name, dtype, D, tile = sys.argv[1:5]
        config = tuple(int(x) for x in tile.split(","))
        print(json.dumps(compile_report([(dtype, int(D), sys.argv[5:] == ["bias"])], (name,), config)))
    else:
        print(json.dumps(compile_report()))
