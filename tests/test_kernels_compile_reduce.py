"""Compile the coalition GEMM kernels for Hopper (sm_90) without a GPU and check ptxas spills.

Same scheme as test_kernels_compile.py (tests/sm90_compile.py): the kernels are compiled
in a subprocess without TRITON_INTERPRET, at the launch configurations of
``shapkern.kernels.coalition_reduce.CONFIGS``. Run ``python tests/test_kernels_compile_reduce.py``
to print the register report.
"""

import json

from sm90_compile import KERNELS_DIR, compile_sm90, load_module, report_from_script

# (kernel, its config name, dtype of the floating tensors, extra constexprs)
CASES = [
    ("_reduce_fwd_kernel", "forward", "fp32", {}),
    ("_reduce_fwd_kernel", "forward", "bf16", {}),
    ("_reduce_bwd_kernel", "backward", "fp32", {"NEED_VALUES": True, "NEED_WEIGHTS": True}),
    ("_reduce_bwd_kernel", "backward", "bf16", {"NEED_VALUES": True, "NEED_WEIGHTS": False}),
    ("_gram_kernel", "gram", "fp32", {"FP64": False}),
    ("_gram_kernel", "gram", "fp16", {"FP64": False}),
    ("_gram_kernel", "gram_fp64", "fp64", {"FP64": True}),
]


def _signature(kernel, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Triton >= 3.2 signature (name -> type, "constexpr" for constants); pointers 16-byte aligned."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.islower() or len(name) == 1:  # sizes and tile counts
            signature[name] = "i32"
        else:
            signature[name] = {"MASKS": "*i32", "GRAD_W_PARTS": "*fp32"}.get(name, f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_report() -> list[dict]:
    """Compile every case; ptxas -v registers and spills per kernel."""
    kernels = load_module(KERNELS_DIR / "coalition_reduce.py")
    report = []
    for name, config, dtype, extra in CASES:
        kernel = getattr(kernels, name)
        cfg = kernels.block_config(config)
        launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        constexprs = {**cfg, **extra}
        signature, attrs = _signature(kernel, dtype, constexprs)
        entry = {
            "kernel": name,
            "dtype": dtype,
            "config": {**constexprs, **launch},
            **compile_sm90(kernel, signature, constexprs, attrs, **launch),
        }
        report.append(entry)
    return report


def test_coalition_kernels_compile_for_hopper_without_spills():
    report = report_from_script(__file__, timeout=300)
    assert len(report) == len(CASES)
    for entry in report:
        assert entry["ptx_chars"] > 0 and entry["cubin_bytes"] > 0, entry
        # fp32 products go through tf32 tensor cores (two parts), never the FMA units.
        assert entry["tf32_mma"] == (entry["dtype"] != "fp64"), entry
        assert entry.get("spill_bytes", 0) == 0, f"register spills: {entry}"


if __name__ == "__main__":
    print(json.dumps(compile_report()))
