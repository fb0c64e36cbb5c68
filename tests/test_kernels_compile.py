"""Compile the varlen attention kernels for Hopper (sm_90) without a GPU and check ptxas spills.

Kernels decorated under TRITON_INTERPRET=1 (set by conftest when there is no GPU) are interpreted
functions that cannot be compiled, so the check runs this file as a script in a subprocess without
that variable. Run ``python tests/test_kernels_compile.py`` to print the register report.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

KERNELS_FILE = Path(__file__).resolve().parents[1] / "shapkern" / "kernels" / "varlen_attention.py"
# (dtype, head dim): bf16 at ViT's D=64 and at the largest padded tile; fp16 with a padded head dim;
# fp32 (FMA dots).
CASES = [("bf16", 64), ("bf16", 128), ("fp16", 80), ("fp32", 64)]


def _ptxas() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    for path in ("/usr/local/cuda/bin/ptxas", shutil.which("ptxas"), bundled):
        if path and os.access(path, os.X_OK):
            return str(path)
    return None


def _signature(kernel, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Triton >= 3.2 signature (name -> type, "constexpr" for constants) and 16-divisibility attrs."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name == "CU_SEQLENS":
            signature[name] = "*i32"
        elif name.startswith("stride") or name == "H":
            signature[name] = "i32"
        elif name.endswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = f"*{dtype}"
        # What a launch with 16-byte-aligned pointers and (T, 3, H, D) qkv strides would specialise on.
        if signature[name].startswith("*") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_report() -> list[dict]:
    """Compile fwd, dK/dV and dQ kernels for every case; ptxas -v registers and spills per kernel."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    spec = importlib.util.spec_from_file_location("varlen_attention_kernels", KERNELS_FILE)
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    ptxas = _ptxas()
    report = []
    for dtype, D in CASES:
        block_d = triton.next_power_of_2(D)
        for name, kernel in (
            ("fwd", kernels._fwd_kernel),
            ("dkdv", kernels._bwd_dkdv_kernel),
            ("dq", kernels._bwd_dq_kernel),
        ):
            block_m, block_n, num_warps, num_stages = kernels.block_config(name, torch_dtypes[dtype], block_d)
            constexprs = {
                "D": D,
                "BLOCK_D": block_d,
                "BLOCK_M": block_m,
                "BLOCK_N": block_n,
                "PRECISION": kernels._precision(torch_dtypes[dtype]),
            }
            signature, attrs = _signature(kernel, dtype, constexprs)
            src = triton.compiler.ASTSource(
                fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs
            )
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": num_warps, "num_stages": num_stages},
            )
            ptx = compiled.asm["ptx"]
            entry = {
                "kernel": name,
                "dtype": dtype,
                "D": D,
                "config": [block_m, block_n, num_warps, num_stages],
                "ptx_chars": len(ptx),
                "cubin_bytes": len(compiled.asm["cubin"]),
                "wgmma": "wgmma" in ptx,
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


def test_kernels_compile_for_hopper_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert len(report) == 3 * len(CASES)
    for entry in report:
        assert entry["ptx_chars"] > 0 and entry["cubin_bytes"] > 0, entry
        if entry["dtype"] != "fp32":
            assert entry["wgmma"], f"16-bit dots should use Hopper wgmma: {entry}"
        assert entry.get("spill_bytes", 0) == 0, f"register spills: {entry}"


if __name__ == "__main__":
    print(json.dumps(compile_report()))
