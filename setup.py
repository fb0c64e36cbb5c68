"""Builds the extension shapkern._C from csrc/ (metadata lives in pyproject.toml).

CPU kernels are always built. CUDA kernels are built when a CUDA toolkit and a CUDA build of torch
are present and either a GPU is visible or TORCH_CUDA_ARCH_LIST names the GPUs to build for (on a
CPU-only machine they would add minutes to the install for nothing); SHAPKERN_CUDA=0/1 forces
either way. TORCH_CUDA_ARCH_LIST (default "8.0;9.0") and MAX_JOBS are respected.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup


def _set_cuda_home() -> None:
    """torch.utils.cpp_extension reads CUDA_HOME on import and may guess wrong (/usr/local)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(os.path.realpath(nvcc)).parent.parent] if nvcc else []
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file():
            os.environ["CUDA_HOME"] = str(home)
            return


_set_cuda_home()

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _use_cuda() -> bool:
    flag = os.environ.get("SHAPKERN_CUDA", "")
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"SHAPKERN_CUDA must be 0 or 1, got {flag!r}")
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if flag == "1" and not available:
        raise RuntimeError(
            "SHAPKERN_CUDA=1 but CUDA kernels cannot be built: "
            f"CUDA_HOME={CUDA_HOME!r} (set it to the CUDA toolkit), torch.version.cuda={torch.version.cuda!r}"
        )
    if flag == "":
        return available and (torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST")))
    return flag == "1"


# torch >= 2.13 headers require C++20 (older ones compile as C++20 too): named here, and in CMakeLists.txt, so
# that every supported torch builds the same language for the host compiler and nvcc.
CXX_STANDARD = "-std=c++20"


def _extension():
    sources = ["csrc/bindings.cpp", "csrc/schemas.cpp", "csrc/reduce_cpu.cpp"]
    # at::parallel_for is OpenMP in torch's headers: without -fopenmp the CPU kernels run on one thread.
    args = {"cxx": ["-O3", "-fopenmp", CXX_STANDARD]}
    link = ["-fopenmp"]
    if not _use_cuda():
        return CppExtension("shapkern._C", sources, extra_compile_args=args, extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    args["cxx"].append("-DWITH_CUDA")
    args["nvcc"] = ["-O3", "-DWITH_CUDA", CXX_STANDARD]
    sources += ["csrc/reduce_cuda_host.cpp", "csrc/reduce_cuda.cu"]
    return CUDAExtension("shapkern._C", sources, extra_compile_args=args, extra_link_args=link)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
