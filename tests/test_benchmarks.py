import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_run_py_smoke_on_cpu(tmp_path):
    cmd = [sys.executable, str(BENCHMARKS / "run.py"), "--device", "cpu", "--img-size", "64", "--images", "1"]
    cmd += ["--coalitions", "4", "--repeats", "1", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "throughput.json").read_text())
    assert {"environment", "config", "gemm_tflops", "floor_evals_per_s", "methods"} <= result.keys()
    assert result["environment"]["torch"] and result["config"]["players"] == 16
    names = [row["method"] for row in result["methods"]]
    assert names[:5] == [
        "shapkern engine",
        "shapkern engine, compiled",
        "zero-input full forward",
        "key mask, SDPA",
        "pairs + dense mask, SDPA",
    ]
    for row in result["methods"]:
        if "unavailable" in row:
            assert row["unavailable"]
            continue
        assert "failed" not in row and row["correct"], row
        assert row["gradient_relative_error"] < 1e-4
        for phase in ("forward", "forward+backward"):
            assert row[phase]["evals_per_s"] > 0 and row[phase]["min_ms"] <= row[phase]["max_ms"]
    assert (tmp_path / "throughput.md").read_text().startswith("# Coalition throughput")
    assert (tmp_path / "throughput.png").stat().st_size > 1000


def test_train_step_benchmark_smoke_on_cpu(tmp_path):
    cmd = [sys.executable, str(BENCHMARKS / "bench_train_step.py"), "--device", "cpu", "--images", "2"]
    cmd += ["--coalitions", "2", "--repeats", "1", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "train_step.json").read_text())
    assert [row["method"] for row in result["rows"]] == [
        "shapkern engine",
        "zero-input masking, timm forward",
    ]
    assert all(
        row["steps_per_s"] > 0 and row["images_per_s"] == 2 * row["steps_per_s"] for row in result["rows"]
    )
