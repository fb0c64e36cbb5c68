import functools
import json
import os
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def test_time_interleaved_round_robin():
    calls = []

    def make(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)

        return fn

    fns = {"slow": make("slow", 0.02), "fast": make("fast", 0.002), "mid": make("mid", 0.01)}
    result = harness.time_interleaved(fns, "cpu", warmup=1, repeats=3)
    # Warm-up: every callable once, in order; then three rounds, each starting one callable later.
    assert calls[:3] == ["slow", "fast", "mid"]
    assert calls[3:] == ["slow", "fast", "mid", "fast", "mid", "slow", "mid", "slow", "fast"]
    assert list(result) == ["slow", "fast", "mid"]
    for name, seconds in (("slow", 0.02), ("fast", 0.002), ("mid", 0.01)):
        stats = result[name]
        assert len(stats["times_ms"]) == 3 and stats["peak_mib"] is None
        assert stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
        assert stats["min_ms"] >= 1e3 * seconds
    assert result["fast"]["median_ms"] < result["mid"]["median_ms"] < result["slow"]["median_ms"]


def test_time_interleaved_failures():
    calls = []

    def broken():
        calls.append("broken")
        raise RuntimeError("boom")

    fns = {"ok": lambda: calls.append("ok"), "broken": broken}
    with pytest.raises(RuntimeError, match="boom"):
        harness.time_interleaved(fns, "cpu", warmup=1, repeats=2)
    calls.clear()
    result = harness.time_interleaved(fns, "cpu", warmup=2, repeats=2, catch=True)
    assert result["broken"] == {"failed": "RuntimeError('boom')"}
    assert calls.count("broken") == 1 and calls.count("ok") == 4  # dropped after its first failure
    assert len(result["ok"]["times_ms"]) == 2
    with pytest.raises(ValueError, match="repeats"):
        harness.time_interleaved(fns, "cpu", repeats=0)


def test_time_interleaved_process_clock():
    def spin():  # 5 ms of CPU work, however long the machine makes it take
        start = time.process_time()
        while time.process_time() - start < 0.005:
            pass

    result = harness.time_interleaved(
        {"sleep": lambda: time.sleep(0.03), "spin": spin}, "cpu", warmup=0, repeats=3, clock="process"
    )
    assert result["sleep"]["max_ms"] < 5 <= result["spin"]["min_ms"]  # sleeping uses no CPU time
    with pytest.raises(ValueError, match="clock"):
        harness.time_interleaved({"spin": spin}, "cuda", clock="process")
    with pytest.raises(ValueError, match="clock"):
        harness.time_interleaved({"spin": spin}, "cpu", clock="cpu")


def test_markdown_table():
    table = harness.markdown_table(
        ["method", "a|b", "evals/s"], [["x", 0.012345, 24590.4], ["y", None], ["z|w", "text", 7]], align="lcr"
    )
    assert table == (
        "| method | a\\|b | evals/s |\n"
        "|---|:-:|--:|\n"
        "| x | 0.0123 | 24,590 |\n"
        "| y | — |  |\n"
        "| z\\|w | text | 7 |\n"
    )
    with pytest.raises(ValueError, match="align"):
        harness.markdown_table(["a", "b"], [], align="l")
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        harness.markdown_table(["a", "b"], [[1, 2, 3]])


def test_results_dir_is_fresh_and_ignored(tmp_path, monkeypatch):
    # The default root is runs/benchmarks/ of the checkout, which .gitignore lists.
    assert harness.RUNS == BENCHMARKS.parent / "runs" / "benchmarks"
    assert "runs/" in (BENCHMARKS.parent / ".gitignore").read_text().split()
    monkeypatch.setattr(harness, "RUNS", tmp_path / "runs")
    first, second = harness.results_dir(None, "cpu"), harness.results_dir(None, "cpu")
    assert first != second and first.is_dir() and second.is_dir()  # a fresh folder per run
    assert first.parent == tmp_path / "runs" and first.name.split("-")[3] == "cpu"
    assert harness.results_dir(tmp_path / "chosen", "cpu") == tmp_path / "chosen"


# Every benchmark's command, `python -m benchmarks.<module>` (the GPU session's included).
COMMANDS = [
    "bench_attention", "bench_engine", "bench_fused", "bench_reductions", "bench_scaling", "bench_train_step",
    "dispatch_table", "estimators", "estimators_large", "explanation_quality", "fp8_error", "profile_engine",
    "recipe_epoch", "thread_policy", "throughput", "train_figures", "tune_attention", "experiments.peers",
    "experiments.train_sweeps", "experiments.image_text",
]  # fmt: skip


def test_commands_are_every_benchmark():
    """COMMANDS lists every module that runs as a command (a new benchmark joins the next test)."""
    found = set()
    for path in BENCHMARKS.rglob("*.py"):
        if 'if __name__ == "__main__":' in path.read_text():
            module = path.relative_to(BENCHMARKS).with_suffix("").parts
            found.add(".".join(module[:-1] if module[-1] == "__main__" else module))
    assert found == set(COMMANDS)


@pytest.mark.parametrize("module", COMMANDS)
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy, for an imported module
def test_help_of_every_benchmark(module, monkeypatch, capsys):
    """`python -m benchmarks.<module> --help` parses its command line on the CPU (CUDA-only ones too)."""
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / f"{module.replace('.', '/')}.py"), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(f"benchmarks.{module}", run_name="__main__", alter_sys=True)
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def test_command_line_is_the_module_command(monkeypatch):
    """A result records the command to retype from the repository root: `python -m` for a benchmark."""
    cases = {
        BENCHMARKS
        / "throughput.py": "python -m benchmarks.throughput --device cpu --methods 'key mask, SDPA'",
        BENCHMARKS / "experiments" / "peers" / "__main__.py": (
            "python -m benchmarks.experiments.peers --device cpu --methods 'key mask, SDPA'"
        ),
        ROOT / "examples" / "x.py": "python examples/x.py --device cpu --methods 'key mask, SDPA'",
        Path("/elsewhere/x.py"): "python /elsewhere/x.py --device cpu --methods 'key mask, SDPA'",
    }
    for script, want in cases.items():
        monkeypatch.setattr(sys, "argv", [str(script), "--device", "cpu", "--methods", "key mask, SDPA"])
        assert harness.command_line() == want


def _run(module: str, *args: str, out: Path) -> None:
    """``python -m benchmarks.<module>`` from the repository root, on the CPU."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--device", "cpu", *args, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_help_shows_defaults():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0 and "(default: 32)" in done.stdout and "runs/benchmarks/" in done.stdout


def test_throughput_smoke_on_cpu(tmp_path):
    _run(
        "throughput",
        "--img-size",
        "64",
        "--images",
        "1",
        "--coalitions",
        "4",
        "--repeats",
        "2",
        out=tmp_path,
    )
    result = json.loads((tmp_path / "throughput.json").read_text())
    assert {
        "environment",
        "command",
        "config",
        "gemm_tflops",
        "floor_evals_per_s",
        "methods",
    } <= result.keys()
    assert result["environment"]["torch"] and result["config"]["players"] == 16
    assert result["config"]["timing"] == "interleaved" and result["config"]["repeats"] == 2
    names = [row["method"] for row in result["methods"]]
    assert names[:2] == ["shapkern engine", "shapkern engine, compiled"]
    measured = [row["method"] for row in result["methods"] if "unavailable" not in row]
    # The others need CUDA here; fp8 runs on the CPU, forward only.
    assert measured == [
        "shapkern engine",
        "shapkern engine, pair attention",
        "shapkern default",
        "shapkern engine, fp8",
        "zero-input full forward",
        "key mask, SDPA",
        "pairs + dense mask, SDPA",
    ]
    measured = [row for row in result["methods"] if "unavailable" not in row]
    for row in measured:
        assert "failed" not in row and row["correct"], row
        if row["forward_only"]:  # fp8: e4m3 operands, held to its own tolerance; no backward to time
            assert (
                row["method"] == "shapkern engine, fp8" and row["relative_error"] < row["tolerance"] == 0.15
            )
            assert "gradient_relative_error" not in row and "forward+backward" not in row
            continue
        assert row["relative_error"] < 1e-4 and row["gradient_relative_error"] < 1e-4
        for phase in ("forward", "forward+backward"):
            stats = row[phase]
            assert len(stats["times_ms"]) == 2 and stats["min_ms"] <= stats["max_ms"]
            assert stats["evals_per_s"] > 0 and stats["best_alternative"] != "shapkern engine"
            assert stats["vs_best_alternative"] > 0
    markdown = (tmp_path / "throughput.md").read_text()
    assert markdown.startswith("# Coalition throughput") and "| shapkern engine |" in markdown
    fp8_row = next(line for line in markdown.splitlines() if line.startswith("| shapkern engine, fp8 |"))
    assert "| forward only |" in fp8_row and "needs CUDA" not in fp8_row


def throughput_run(device: str, speeds: dict, capability: str | None = "9.0") -> dict:
    """A throughput result with rows of the given {method: (forward, forward+backward)} evals/s."""
    environment = {"device": device, "gpu": "NVIDIA H200", "cpu": "AMD EPYC"}
    if capability:
        environment["capability"] = capability
    config = {"model": "vit_base_patch16_224", "engine_family": "timm VisionTransformer", "tokens": 197}
    rows = [
        {"method": method, "shapkern": method.startswith("shapkern"), "correct": True,
         "forward": {"evals_per_s": fwd}, "forward+backward": {"evals_per_s": both}}
        for method, (fwd, both) in speeds.items()
    ]  # fmt: skip
    return {"environment": environment, "config": config | {"compute_dtype": "bfloat16"}, "methods": rows}


def test_the_dispatch_table_takes_a_route_only_where_it_beats_the_default(tmp_path, capsys):
    """benchmarks.dispatch_table: a route where it is faster than the default by the margin, in the
    JSON the engine reads and in the source of shapkern/engine/dispatch_table.py; a report that says
    where the engine is still behind the best alternative."""
    from benchmarks import dispatch_table
    from shapkern.engine import dispatch

    run = throughput_run(
        "cuda:0",
        {
            "shapkern engine": (900, 300),
            "shapkern engine, compiled": (1000, 400),  # the default on CUDA
            "shapkern engine, compiled, pair attention": (1030, 520),  # forward within the margin
            "pairs + dense mask, torch.compile": (950, 500),
        },
    )
    (tmp_path / "run.json").write_text(json.dumps(run))
    routes = dispatch_table.main([str(tmp_path / "run.json"), "--out", str(tmp_path)])
    assert [(r.phase, r.blocks, r.attention, r.device, r.tokens, r.speedup) for r in routes] == [
        ("forward+backward", "compiled", "pairs", "cuda:9.0", 197, 1.3)
    ]
    assert dispatch._routes_from_file(str(tmp_path / "dispatch_table.json")) == tuple(routes)
    namespace = {}
    exec((tmp_path / "dispatch_table.py").read_text(), namespace)
    assert namespace["ROUTES"] == tuple(routes)
    report = (tmp_path / "dispatch_table.md").read_text()
    forward = "| forward | compiled + varlen | compiled + varlen | 1.00 | pairs + dense mask, torch.compile |"
    assert f"{forward} 1.05 |" in report
    assert "| forward+backward | compiled + varlen | compiled + pairs | 1.30 |" in report
    run["methods"][1]["forward+backward"]["evals_per_s"] = 600  # now the default beats every route
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert dispatch_table.main([str(tmp_path / "run.json"), "--out", str(tmp_path)]) == []
    (tmp_path / "old.json").write_text(json.dumps(throughput_run("cuda:0", {}, capability=None)))
    with pytest.raises(ValueError, match="records no compute capability"):
        dispatch_table.main([str(tmp_path / "old.json"), "--out", str(tmp_path)])


def test_throughput_chart_legend_covers_no_bar(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from benchmarks.throughput_render import bar_chart

    result = json.loads((ROOT / "benchmarks/results/2026-11-26-h200/throughput.json").read_text())
    fig = bar_chart(result, tmp_path / "throughput.png")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    legend = fig.legends[0].get_window_extent(canvas.get_renderer())
    bars = [patch.get_window_extent() for patch in fig.axes[0].patches]
    assert bars and not any(legend.overlaps(bar) for bar in bars)
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert (tmp_path / "throughput.png").stat().st_size > 1000


# Each family of the packed engine (benchmarks/families.py), a tiny config of the GPU session's model,
# with the methods that cannot run that family (fp8 runs timm's ViT Block only).
FAMILY_SMOKE = {
    "vit_tiny_patch16_224": [],
    "vit_base_patch16_siglip_224": [],  # latent attention pooling, no class token, no head in timm's config
    "eva02_base_patch14_224": ["shapkern engine, fp8"],  # rope, SwiGLU, average pooling, no head
    "beit_base_patch16_224": ["shapkern engine, fp8", "pairs + dense mask, SDPA"],  # relative position bias
}
TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--embed-dim", "64", "--num-heads", "2"]
ONE_ROUND = ["--device", "cpu", "--images", "2", "--coalitions", "4", "--repeats", "1", "--warmup", "0"]


@pytest.mark.parametrize("model", list(FAMILY_SMOKE))
def test_throughput_runs_every_family_on_cpu(model):
    """Every row is correct against the family's own forward on the kept tokens (fp32, forward and
    gradients), or says why the method cannot run here; none is skipped silently."""
    from benchmarks import throughput

    result = throughput.measure(throughput.parse_args(["--model", model, *TINY, *ONE_ROUND]))
    assert result["config"]["players"] == 16 and result["config"]["model"] == model
    rows = {row["method"]: row for row in result["methods"]}
    assert list(rows) == list(throughput.baselines.METHODS)
    unavailable = {name: row["unavailable"] for name, row in rows.items() if "unavailable" in row}
    cuda_only = {name for name, method in throughput.baselines.METHODS.items() if method.cuda_only}
    assert {name for name, why in unavailable.items() if why == "needs CUDA"} == cuda_only
    family_reasons = {name: why for name, why in unavailable.items() if why != "needs CUDA"}
    assert list(family_reasons) == FAMILY_SMOKE[model]
    for name, row in rows.items():
        if name in unavailable:
            continue
        assert "failed" not in row and row["correct"], row
        assert row["forward"]["evals_per_s"] > 0
        if row["forward_only"]:  # fp8, against its own tolerance
            assert row["relative_error"] < row["tolerance"] and "forward+backward" not in row, row
            continue
        assert row["relative_error"] < 1e-5 and row["gradient_relative_error"] < 1e-5, row
        assert row["forward+backward"]["evals_per_s"] > 0
    assert result["packed_gflops_forward"] > 0 and "Linear" in result["flop_model"]


def test_throughput_reports_a_variant_the_methods_do_not_run_as_unavailable(monkeypatch):
    """A ViT pooling the engine and the masked alternatives do not compute ('avgmax') gets rows that
    say so (their NotImplementedError), while the oracle and zero-input still run."""
    import timm

    from benchmarks import cases, throughput

    monkeypatch.setattr(
        cases.timm, "create_model", functools.partial(timm.create_model, global_pool="avgmax")
    )
    result = throughput.measure(throughput.parse_args(["--model", "vit_tiny_patch16_224", *TINY, *ONE_ROUND]))
    rows = {row["method"]: row for row in result["methods"]}
    for name in ("shapkern engine", "key mask, SDPA", "pairs + dense mask, SDPA"):
        assert "avgmax" in rows[name]["unavailable"], rows[name]
    assert rows["zero-input full forward"]["correct"]


def test_throughput_refuses_a_model_of_no_known_family():
    from benchmarks import throughput

    with pytest.raises(SystemExit, match="--model resnet18: benchmarks know timm VisionTransformer"):
        throughput.measure(throughput.parse_args(["--model", "resnet18", *ONE_ROUND]))


def _gpu_session_commands(tmp_path) -> list[list[str]]:
    """The commands of benchmarks/gpu_session.sh's steps, from a dry run (DRY_RUN=1)."""
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy, for an imported module
def test_gpu_session_steps_parse(tmp_path, monkeypatch, capsys):
    """Every benchmark step of the GPU session parses its options (throughput fully, the others up
    to --help), and the model families each run in a step of their own."""
    from benchmarks import throughput

    assert subprocess.run(["bash", "-n", "benchmarks/gpu_session.sh"], cwd=ROOT).returncode == 0
    commands = [c[c.index("-m") + 1 :] for c in _gpu_session_commands(tmp_path) if "-m" in c]
    modules = [command[0] for command in commands]
    assert "pytest" in modules and modules.count("benchmarks.throughput") >= 5
    families = {}
    for module, *args in commands:
        if module == "benchmarks.throughput":
            parsed = throughput.parse_args(args)
            families[parsed.stem] = parsed
            continue
        if module.startswith("benchmarks."):
            path = BENCHMARKS.joinpath(*module.split(".")[1:])
            script = path / "__main__.py" if path.is_dir() else path.with_suffix(".py")
            monkeypatch.setattr(sys, "argv", [str(script), *args, "--help"])
            with pytest.raises(SystemExit) as exited:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            assert exited.value.code == 0, (module, args, capsys.readouterr().err)
    for stem, model in {
        "throughput-eva02": "eva02_base_patch14_224",
        "throughput-siglip": "vit_base_patch16_siglip_224",
        "throughput-beit": "beit_base_patch16_224",
    }.items():
        args = families[stem]
        assert (args.model, args.images, args.coalitions, args.dtype, args.img_size) == (
            model,
            32,
            32,
            "bf16",
            None,
        )
        assert "key mask, SDPA" in args.methods and "shapkern engine, compiled" in args.methods


def test_train_step_benchmark_smoke_on_cpu(tmp_path):
    _run(
        "bench_train_step",
        "--images",
        "2",
        "--coalitions",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        out=tmp_path,
    )
    result = json.loads((tmp_path / "train_step.json").read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == [
        "shapkern ShapleyViT",
        "pairs + dense mask, SDPA",
        "zero-input masking, timm forward",
    ]
    loss = result["config"]["loss"]
    assert {key: loss[key] for key in ("lam", "mu", "mask_loss", "num_coalitions", "stop_grad")} == {
        "lam": 1.0,
        "mu": 1.0,
        "mask_loss": "kl",
        "num_coalitions": 2,
        "stop_grad": False,
    }
    for row in rows.values():
        assert "failed" not in row, row
        assert row["steps_per_s"] > 0 and row["images_per_s"] == pytest.approx(2 * row["steps_per_s"])
        assert row["vs_best_alternative"] > 0
    # The engine computes the loss and gradients of dense pairs (the fp32 reference on the CPU).
    engine, pairs = rows["shapkern ShapleyViT"], rows["pairs + dense mask, SDPA"]
    assert pairs["loss_error_fp32"] == 0 and pairs["gradient_error_fp32"] == 0
    assert 0 < engine["gradient_error_fp32"] < 1e-5 and engine["loss_error_fp32"] < 1e-6
    assert pairs["matches_shapkern"]
    assert pairs["gradient_error_shapkern"] == pytest.approx(engine["gradient_error_fp32"], rel=1e-3)
    assert result["config"]["tolerance"] == 1e-4
    assert "loss_error_fp32" not in rows["zero-input masking, timm forward"]
    assert (tmp_path / "train_step.md").read_text().startswith("# ShapleyViT training step")


@pytest.fixture
def train_sweeps():
    """The package benchmarks/experiments/train_sweeps/."""
    from benchmarks.experiments import train_sweeps

    return train_sweeps


def test_train_sweeps_smoke_on_cpu(train_sweeps, tmp_path, capsys):
    import torch

    runs = tmp_path / "runs"
    args = [
        "--epochs", "1", "--limit-train", "64", "--limit-test", "16", "--img-size", "16",
        "--exact-images", "1", "--seeds", "0", "--grad-coalitions", "8", "2", "--lams", "1",
        "--raw-lams", "1", "--gradient-lams", "1", "--variants", "player", "--variant-lams", "1",
        "--timing-steps", "1", "--timing-repeats", "1", "--runs", str(runs),
    ]  # fmt: skip
    threads = torch.get_num_threads()  # main() sets them (--threads); restored for the other tests
    try:
        train_sweeps.main(["--device", "cpu", *args, "--out", str(tmp_path / "out")])
        assert capsys.readouterr().out.count("shapkern train:") == 11  # fp8 reuses grad's G = 2 run
        # Every run is kept with its settings and reused by a later invocation with the same settings.
        train_sweeps.main(["--device", "cpu", "--parts", "lam", *args, "--out", str(tmp_path / "again")])
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.count("reusing") == 6
    assert len(list(runs.glob("*/result.json"))) == 11
    result = json.loads((tmp_path / "out" / "train_sweeps.json").read_text())
    assert result["config"]["epochs"] == 1 and result["environment"]["torch"]
    grad = {row["grad_coalitions"]: row for row in result["grad"]["rows"]}
    assert list(grad) == [8, 2]
    for row in grad.values():
        assert row["seeds"] == [0] and 0 <= row["test_acc"]["mean"] <= 1 and row["test_acc"]["std"] is None
        assert 0 < row["rel_err"]["mean"] < 10 and row["rel_err"]["n"] == 1
        assert 0 < row["rel_err_centred"]["mean"] < 10
    timing = {(row["grad_coalitions"], row["stop_grad"]): row for row in result["timing"]["rows"]}
    assert list(timing) == [(8, True), (2, True), (8, False)]  # the stop-gradient G, then the default
    assert timing[8, True]["ratio_median"] == 1.0 and timing[2, True]["ratio_median"] > 0
    assert timing[8, False]["ratio_median"] > 0 and timing[8, False]["lam"] == 1.0
    assert result["timing"]["clock"] == "process" and result["grad"]["decision"]["recommended"] == 8
    groups = [(row["lam"], row["mu"], row["sv_scale"], row["stop_grad"]) for row in result["lam"]["rows"]]
    assert groups == [
        (0.0, 0.0, "raw", True),  # classification only
        (1.0, 1.0, "relative", True),
        (1.0, 1.0, "player", True),
        (0.1, 1.0, "raw", True),  # the stop-gradient default before 0.2.0, shared with the grad sweep
        (1.0, 1.0, "raw", True),
        (1.0, 1.0, "raw", False),  # today's default
    ]
    for row in result["lam"]["rows"]:
        assert (row["rel_err"]["n"] == 1) == (row["lam"] > 0)
        assert 0 < row["test_logit_sq_centered"]["mean"] <= row["test_logit_sq"]["mean"] * (1 + 1e-6)
    assert [(t["sv_scale"], t["lam"], t["stop_grad"]) for t in result["lam"]["targets"]] == [
        ("relative", 1.0, True),
        ("player", 1.0, True),
        ("raw", 1.0, True),
        ("raw", 1.0, False),
    ]
    evidence = result["evidence"]["rows"]
    assert [(row["lam"], row["mu"], row["sv_scale"], row["stop_grad"]) for row in evidence] == [
        (0.0, 0.0, "raw", True),
        (1.0, 1.0, "relative", True),
        (1.0, 1.0, "raw", False),
    ]
    assert all(0 <= row["pointing"]["mean"] <= 1 and row["rel_err"]["n"] == 0 for row in evidence)
    fp8 = result["fp8"]["rows"]
    assert [(row["grad_coalitions"], row["target_precision"]) for row in fp8] == [(2, "auto"), (2, "fp8")]
    assert fp8[0]["test_acc"] == grad[2]["test_acc"]  # the same run
    assert fp8[1]["rel_err"]["n"] == 1 and fp8[1]["test_sv"]["mean"] != fp8[0]["test_sv"]["mean"]
    markdown = (tmp_path / "out" / "train_sweeps.md").read_text()
    assert "## fp8 ℓ_sv targets" in markdown and "gradient through v_x(S)" in markdown
    assert "The default step (λ = 1, ℓ_sv's gradient through its targets, all 8" in markdown
    assert markdown.startswith("# Training sweeps") and "| 2 of 8 | 1 |" in markdown
    again = json.loads((tmp_path / "again" / "train_sweeps.json").read_text())
    assert again["lam"] == result["lam"]


def test_image_text_benchmark_smoke_on_cpu(tmp_path, capsys):
    import torch

    from benchmarks.experiments import image_text

    args = [
        "--device", "cpu", "--epochs", "1", "--limit-train", "24", "--limit-test", "8", "--exact-images", "1",
        "--local-images", "4", "--kernel-budget", "64", "--seeds", "0", "--runs", str(tmp_path / "runs"),
    ]  # fmt: skip
    threads = torch.get_num_threads()  # main() sets them (--threads); restored for the other tests
    try:
        image_text.main([*args, "--out", str(tmp_path / "out")])
        image_text.main([*args, "--settings", "self", "--out", str(tmp_path / "again")])
        # Scoring settings alone changed: the run is scored again from its checkpoint, not retrained.
        image_text.main([*args, "--settings", "self", "--local-images", "3", "--out", str(tmp_path / "more")])
    finally:
        torch.set_num_threads(threads)
    log = capsys.readouterr().out
    assert log.count("reusing") == 1 and log.count("re-scoring") == 1  # every run is kept with its settings
    first, again = (
        json.loads((tmp_path / d / "image_text.json").read_text())["runs"][-1] for d in ("out", "more")
    )
    assert again["train_seconds"] == first["train_seconds"] and again["settings"]["local_images"] == 3
    assert again["localization"]["captions"] < first["localization"]["captions"]
    result = json.loads((tmp_path / "out" / "image_text.json").read_text())
    base, self_explaining = result["runs"]
    assert (base["setting"], self_explaining["setting"]) == ("contrastive", "self-explaining")
    assert base["exact"] is None and 0 < self_explaining["exact"]["rel_err_mean"] < 10
    assert 0 < self_explaining["exact"]["cosine_rel_err_mean"] < 10
    for run in result["runs"]:
        assert 0 <= run["test_r1_i2t"] <= run["test_r5_i2t"] <= 1 and 0 <= run["test_r1_t2i"] <= 1
        assert {"self", "kernel64"} <= set(run["localization"])
    markdown = (tmp_path / "out" / "image_text.md").read_text()
    assert markdown.startswith("# Image-text matching") and "self-explanation error" in markdown


def test_estimators_benchmark_smoke_on_cpu(tmp_path):
    cmd = [
        sys.executable, "-m", "benchmarks.estimators", "--games", "quadratic", "threshold",
        "--budgets", "128", "--images", "2", "--seeds", "2", "--cache", str(tmp_path / "cache"),
        "--out", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, cwd=ROOT)
    result = json.loads((tmp_path / "estimators.json").read_text())
    cells = {(c["library"], c["method"]): c for c in result["results"]["threshold"]}
    assert {"bayes", "leverage", "kernel", "permutation"} <= {m for lib, m in cells if lib == "shapkern"}
    for cell in cells.values():
        assert cell["budget"] == 128 and max(cell["evaluations"]) <= 128 and 0 <= cell["rel_l2"] < 1, cell
    # The quadratic game is 2-additive: every paired regression estimator recovers it exactly.
    quadratic = {c["method"]: c for c in result["results"]["quadratic"] if c["library"] == "shapkern"}
    assert quadratic["kernel"]["rel_l2"] < 1e-10 and quadratic["bayes"]["rel_l2"] < 1e-10
    assert (tmp_path / "estimators.md").read_text().startswith("# Shapley estimators")


def test_large_estimators_benchmark_smoke_on_cpu(tmp_path):
    run = tmp_path / "run"
    train = [
        sys.executable, "-m", "shapkern", "train", "--out", str(run), "--epochs", "1", "--limit-train", "64",
        "--limit-test", "16", "--no-progress", "--faith-images", "0", "--heatmap-images", "0",
    ]  # fmt: skip
    subprocess.run(train, check=True, capture_output=True, text=True, timeout=600)
    cmd = [
        sys.executable, "-m", "benchmarks.estimators_large", "--runs", str(run), "--budgets", "64",
        "--images", "2", "--seeds", "1", "--reference-budget", "4096", "--out", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, cwd=ROOT)
    result = json.loads((tmp_path / "estimators_large.json").read_text())
    assert result["players"] == 16 and 0 <= result["test_acc"] <= 1
    assert 0 < result["reference_rel_se"] < 0.05  # reported, and small at 4,096 evaluations
    methods = {(c["library"], c["method"]) for c in result["cells"]}
    assert {("shapkern", m) for m in ("bayes", "leverage", "kernel", "permutation")} <= methods
    assert all(0 <= c["rel_l2"] < 1 and 0 <= c["p_at_3"] <= 1 for c in result["cells"])
    assert "# Shapley estimators at N = 16" in (tmp_path / "estimators_large.md").read_text()


def test_recipe_epoch_reports_evaluation_seconds():
    """recipe_epoch's evaluation time is what its timed evaluators took, not the record's images_per_s."""
    from types import SimpleNamespace

    from benchmarks import recipe_epoch

    class HeldOutLoss:
        pass

    class Faithfulness:
        pass

    record = {
        "epoch": 1, "train_loss": 2.0, "test_acc": 0.5, "images_per_s": 132.2, "epoch_time_s": 0.06,
        "HeldOutLoss_s": 0.011, "Faithfulness_s": 0.5,
    }  # fmt: skip
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(img_size=32, model="vit", num_coalitions=32, batch_size=4),
        model=SimpleNamespace(num_players=4),
        train_set=[None] * 8,
        test_set=[None] * 4,
        evaluators=[recipe_epoch.Timed(HeldOutLoss()), recipe_epoch.Timed(Faithfulness())],
    )
    result = {
        "environment": {"cpu": "CPU", "cpu_threads": 1}, "epochs": [record], "peak_memory_gib": None,
        "gemm_tflops": None, "achieved_tflops": 0.1, "step_gflop_per_image": 1.0,
        "cifar10_epoch_one_gpu_s": {"train": 378.0, "evaluation": 28.0},
    }  # fmt: skip
    text = recipe_epoch.markdown(result, trainer)
    assert "| 1 | 0.1 | 132 | 0.5 | 2.000 | 0.500 |" in text
    assert "; evaluation 0.5 s;" in text
