"""Compile the coalition GEMM kernels for Hopper (sm_90) without a GPU and check ptxas spills.

Same scheme as test_kernels_compile.py (whose ptxas lookup it shares): the kernels are compiled
in a subprocess without TRITON_INTERPRET, at the launch configurations of
``shapkern.kernels.coalition_reduce.CONFIGS``. Run ``python tests/test_kernels_compile_reduce.py``
to print the register report.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

KERNELS_FILE = Path(__file__).resolve().parents[1] / "shapkern" / "kernels" / "coalition_reduce.py"
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


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    import triton
    from triton.backends.compiler import GPUTarget

    kernels = _load(KERNELS_FILE, "coalition_reduce_kernels")
    # pytest imports test files by path (--import-mode=importlib): the sibling is loaded the same way.
    ptxas = _load(Path(__file__).with_name("test_kernels_compile.py"), "test_kernels_compile")._ptxas()
    report = []
    for name, config, dtype, extra in CASES:
        kernel = getattr(kernels, name)
        cfg = kernels.block_config(config)
        launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        constexprs = {**cfg, **extra}
        signature, attrs = _signature(kernel, dtype, constexprs)
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch)
        ptx = compiled.asm["ptx"]
        entry = {
            "kernel": name,
            "dtype": dtype,
            "config": {**constexprs, **launch},
            "ptx_chars": len(ptx),
            "cubin_bytes": len(compiled.asm["cubin"]),
            "tf32_mma": bool(re.search(r"mma\S*\.tf32", ptx)),
        }
        if ptxas:
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(ptx)
                f.flush()
                info = subprocess.run(
                    [ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stderr
            entry["registers"] = int(re.search(r"Used (\d+) registers", info).group(1))
            entry["spill_bytes"] = sum(
                int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)
            )
        report.append(entry)
    return report


def test_coalition_kernels_compile_for_hopper_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert len(report) == len(CASES)
    for entry in report:
        assert entry["ptx_chars"] > 0 and entry["cubin_bytes"] > 0, entry
        # fp32 products go through tf32 tensor cores (two parts), never the FMA units.
        assert entry["tf32_mma"] == (entry["dtype"] != "fp64"), entry
        assert entry.get("spill_bytes", 0) == 0, f"register spills: {entry}"


if __name__ == "__main__":
    print(json.dumps(compile_report()))
