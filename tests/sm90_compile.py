"""Compile Triton kernels for Hopper (sm_90) without a GPU, and read ptxas's register report.

Shared by tests/test_kernels_compile*.py. Kernels decorated under TRITON_INTERPRET=1 (set by
conftest when there is no GPU) are interpreted functions that cannot be compiled, so each test runs
its own file as a script in a subprocess without that variable (:func:`report_from_script`), and
the script loads the kernel module by path (:func:`load_module`) and compiles it (:func:`compile_sm90`).
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

KERNELS_DIR = Path(__file__).resolve().parents[1] / "shapkern" / "kernels"


def load_module(path: Path):
    """A module from its file, without importing shapkern."""
    spec = importlib.util.spec_from_file_location(f"_{path.stem}_sm90", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ptxas() -> str | None:
    """The ptxas of the CUDA toolkit, of PATH, or the one Triton bundles; None without one."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    for path in ("/usr/local/cuda/bin/ptxas", shutil.which("ptxas"), bundled):
        if path and os.access(path, os.X_OK):
            return str(path)
    return None


def compile_sm90(kernel, signature: dict, constexprs: dict, attrs: dict, num_warps: int, num_stages: int):
    """Compile one kernel for sm_90: PTX and cubin sizes, which tensor-core instructions the PTX
    uses, shared memory, and (with ptxas) registers and spill bytes per thread."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    ptx = compiled.asm["ptx"]
    entry = {
        "ptx_chars": len(ptx),
        "cubin_bytes": len(compiled.asm["cubin"]),
        "wgmma": "wgmma" in ptx,
        "tf32_mma": bool(re.search(r"mma\S*\.tf32", ptx)),
        "shared_bytes": compiled.metadata.shared,
    }
    tool = ptxas()
    if tool:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            info = subprocess.run(
                [tool, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                capture_output=True,
                text=True,
                check=True,
            ).stderr
        entry["registers"] = int(re.search(r"Used (\d+) registers", info).group(1))
        entry["spill_bytes"] = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    return entry


def compile_typed(kernel, types: dict, constexprs: dict, num_warps: int, num_stages: int = 3, divisible=()):
    """:func:`compile_sm90` with a signature from ``types`` (argument name -> Triton type; "i32" for
    names not listed): pointers, strides and the ``divisible`` scalars get the 16-divisibility hint
    that a launch with aligned tensors at ViT sizes specialises on."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name, "i32")
        if signature[name].startswith("*") or name.startswith("stride") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return compile_sm90(kernel, signature, constexprs, attrs, num_warps, num_stages)


def report_from_script(script: str, timeout: int = 600) -> list[dict]:
    """Run a test file as a script without TRITON_INTERPRET; the JSON report on its last line."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])
