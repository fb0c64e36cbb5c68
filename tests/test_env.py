import subprocess
import sys

from shapkern.env import environment


def test_env_reports_versions_kernels_triton_and_gpu():
    info = environment()
    for key in ("python", "torch", "triton", "timm", "extension CPU kernels", "extension CUDA kernels"):
        assert info[key]
    assert info["triton mode"].split()[0] in ("interpreter", "native", "not", "unavailable")
    assert "gpu" in info


def test_python_m_shapkern_env_prints_the_report():
    out = subprocess.run(
        [sys.executable, "-m", "shapkern.env"], capture_output=True, text=True, check=True
    ).stdout
    assert "extension CUDA kernels" in out and "triton mode" in out and "gpu" in out
