import importlib.util
import json
import re
from pathlib import Path

import pytest

from shapkern.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def load_module(path: Path):
    """Another test file's module, by path."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def recipe():
    """benchmarks/recipe_epoch.py, where the README's GPU recipe is defined."""
    from benchmarks import recipe_epoch

    return recipe_epoch


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


TINY = [
    "--img-size",
    "16",
    "--patch-size",
    "4",
    "--depth",
    "1",
    "--embed-dim",
    "32",
    "--num-heads",
    "2",
    "--batch-size",
    "16",
    "--num-coalitions",
    "2",
    "--limit-train",
    "32",
    "--limit-test",
    "16",
    "--faith-images",
    "2",
    "--heatmap-images",
    "2",
    "--no-progress",
]


def test_train_command_runs_resumes_and_reports(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--epochs", "1", "--out", out, *TINY]) == 0
    first = capsys.readouterr().out
    assert "done in" in first and "test accuracy" in first and "checkpoint.pt, metrics.jsonl" in first
    assert "\r" not in first  # plain lines, not progress bars, when the output is not a terminal
    assert main(["train", "--epochs", "2", "--out", out, "--resume", *TINY]) == 0  # extends the run
    assert "epochs changed from 1 to 2" in capsys.readouterr().out
    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2]
    assert (tmp_path / "run" / "explanations.png").exists()


def test_resume_keeps_the_runs_own_settings(tmp_path, capsys):
    from shapkern.checkpoint import load_checkpoint

    out = str(tmp_path / "run")
    argv = [a for a in TINY if a != "--no-progress"]
    assert main(["train", "--epochs", "2", "--lr", "0.002", "--max-steps", "3", "--out", out, *argv]) == 0
    # A bare --resume continues the 2-epoch run at its learning rate, not the defaults (30, 1e-3).
    assert main(["train", "--out", out, "--resume", "--no-progress"]) == 0
    assert "changed" not in capsys.readouterr().out
    config = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]
    assert (config["epochs"], config["lr"], config["img_size"]) == (2, 0.002, 16)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_help_reads_as_what_the_flags_do(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--stop-grad, --no-stop-grad" in text and "--progress, --no-progress" in text
    assert "{linear,block}" in text and "{ce,kl,none}" in text and "{auto,cuda,cpu}" in text
    assert "(default: 30)" in text


def test_an_unknown_mask_loss_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--mask-loss", "foo"])
    assert "invalid choice: 'foo' (choose from ce, kl, none)" in capsys.readouterr().err.replace(
        "'ce'", "ce"
    ).replace("'kl'", "kl").replace("'none'", "none")


def test_defaults_are_the_digits_quick_start():
    from shapkern.cli.train import config_from_args
    from shapkern.training import TrainConfig

    cfg, explicit = config_from_args(build_parser().parse_args(["train"]))
    assert cfg == TrainConfig() and not explicit
    assert (cfg.data, cfg.img_size, cfg.patch_size, cfg.lam) == ("digits", 32, 8, 1.0) and not cfg.resume
    assert not cfg.stop_grad and cfg.grad_coalitions is None  # ℓ_sv through its targets: all M graded
    cfg, explicit = config_from_args(build_parser().parse_args(["train", "--stop-grad"]))
    assert cfg.stop_grad and explicit == {"stop_grad"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "mnist"], "unknown dataset 'mnist'"),
        (["train", "--model", "vit_nonexistent_xyz"], "unknown model"),
        (["train", "--patch-size", "6"], "does not divide"),
        (["train", "--model", "resnet10t"], "cannot be built as a ViT"),
        (["train", "--data", "cifar10", "--data-root", "/nonexistent/shapkern-data"], "Pass --download"),
        (["train", "--model", "vit_small_patch16_224.bogus"], "unknown pretrained tag 'bogus'"),
    ],
)
def test_bad_inputs_fail_with_clear_messages(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def test_pretrained_and_weights_take_the_models_own_sizes():
    from shapkern.cli.train import config_from_args

    def parse(*flags):
        return config_from_args(build_parser().parse_args(["train", "--model", name, *flags]))

    name = "vit_small_patch16_224.augreg_in21k_ft_in1k"
    for flags in (["--pretrained"], ["--weights", "w.safetensors"]):
        cfg, explicit = parse(*flags)
        assert (cfg.depth, cfg.embed_dim, cfg.num_heads) == (None, None, None)
        assert (cfg.img_size, cfg.patch_size) == (224, 16)
        assert explicit == {"model", flags[0].lstrip("-")}  # a resumed run keeps its saved sizes
    cfg, _ = parse("--pretrained", "--img-size", "384", "--depth", "6")
    assert (cfg.img_size, cfg.patch_size, cfg.depth, cfg.embed_dim) == (384, 16, 6, None)
    cfg, _ = parse()
    assert (cfg.depth, cfg.img_size, cfg.pretrained, cfg.download) == (3, 32, False, False)  # no weights


def test_docs_show_the_tested_gpu_recipe(recipe):
    """The command in docs/cli.md is benchmarks/recipe_epoch.RECIPE, which the next test runs."""
    docs = " ".join((ROOT / "docs" / "cli.md").read_text().replace("\\\n", " ").split())
    assert " ".join(recipe.RECIPE.split()) in docs, (
        f"docs/cli.md must show the GPU recipe exactly as tested:\n{recipe.RECIPE}"
    )


def test_gpu_recipe_runs_on_tiny_fake_data(recipe, tmp_path, monkeypatch):
    """The recipe's flags, then a tiny model, image and data set on top: fake CIFAR-10 in its
    on-disk format, and a fake Hugging Face cache (offline) holding a tiny stand-in for the
    pretrained ViT-S; two steps (one epoch), then the checkpoint rebuilds with no cache at all."""
    import torch
    import torchvision.datasets.cifar

    from shapkern import ShapleyViT

    catalog = load_module(ROOT / "tests" / "test_data_catalog.py")
    backbones = load_module(ROOT / "tests" / "test_models_backbones.py")
    catalog.fake_cifar10(str(tmp_path / "data"))
    catalog.skip_md5_checks(monkeypatch)

    def no_network(*args, **kwargs):
        raise AssertionError("--download must not fetch a dataset that is present")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    name = "vit_small_patch16_224.augreg_in21k_ft_in1k"
    assert f"--model {name} --pretrained" in recipe.RECIPE
    source = backbones.timm.create_model(name, pretrained=False, **backbones.TINY)
    backbones.write_hub_cache(tmp_path / "hub", name, source)
    backbones.use_hub_cache(monkeypatch, tmp_path / "hub")
    tiny = ["--img-size", "64", "--depth", "1", "--embed-dim", "32", "--num-heads", "2"]
    small = [
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--limit-train",
        "8",
        "--limit-test",
        "4",
    ]
    local = ["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--num-workers", "0"]
    quick = ["--limit-test", "4", "--faith-images", "2", "--heatmap-images", "2", "--no-progress"]
    assert main(["train", *recipe.recipe_args(), *tiny, *small, *local, *quick]) == 0
    (record,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert record["epoch"] == 1 and record["step"] == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    cfg = ckpt["config"]
    assert cfg["pretrained"] and cfg["download"] and (cfg["num_coalitions"], cfg["patch_size"]) == (32, 16)
    assert ckpt["data"]["name"] == "cifar10" and ckpt["data"]["preprocessing"]["mean"] == [0.5] * 3
    assert ckpt["arch"] == {
        "backbone": name, "num_classes": 10, "head": "linear", "img_size": 64, "patch_size": 16,
        "depth": 1, "embed_dim": 32, "num_heads": 2, "in_chans": 3,
    }  # fmt: skip
    backbones.use_hub_cache(monkeypatch, tmp_path / "no-cache")  # a rebuild must not look for weights
    model = ShapleyViT.from_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert model.num_players == 16 and model.num_classes == 10


def test_recipe_epoch_benchmark_runs_on_the_cpu(recipe, tmp_path):
    """benchmarks/recipe_epoch.py (the GPU session's timing of the recipe) on a tiny model."""
    # One pair of 2 players, no prefix, D = depth = 1: ends 24·2 + 4·(2² + 0²), the pair 24·2 + 4·(1 + 1).
    assert recipe.step_flops(1, 1, 2, 0, 2, 2) == 3 * (64 + 56)
    assert recipe.step_flops(1, 1, 2, 0, 2, 0) == 3 * 64 + 56
    tiny = ["--img-size", "32", "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--num-workers", "0"]
    small = ["--limit-train", "8", "--limit-test", "4", "--faith-images", "0"]
    result = recipe.main(
        ["--device", "cpu", "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path), "--"] + tiny + small
    )
    cfg = result["config"]
    assert (cfg["data"], cfg["pretrained"], cfg["download"], cfg["num_coalitions"]) == (
        "evidence",
        False,
        False,
        32,
    )
    assert [r["epoch"] for r in result["epochs"]] == [1]
    assert result["cifar10_epoch_one_gpu_s"]["train"] > 0 and result["step_gflop_per_image"] > 0
    assert "Implied CIFAR-10 epoch" in (tmp_path / "recipe_epoch.md").read_text()


QUICK = [*TINY, "--faith-images", "0", "--heatmap-images", "0"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--clip-grad", "-1"], "--clip-grad must be at least 0, got -1.0"),
        (["--epochs", "-1"], "--epochs must be at least 1, got -1"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--max-steps", "0"], "--max-steps must be at least 1 (leave it out for no limit), got 0"),
        (["--max-steps", "-1"], "--max-steps must be at least 1"),
        (["--limit-train", "0"], "--limit-train must be at least 1 (leave it out to use every image)"),
        (["--num-heads", "3", "--embed-dim", "64"], "--num-heads 3 does not divide --embed-dim 64"),
        (["--depth", "-1"], "--depth must be at least 1 (0 keeps the model's own), got -1"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "0"], "--lr must be positive"),
        (["--weight-decay", "-0.1"], "--weight-decay must be at least 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--num-coalitions", "3"], "num_coalitions must be a positive int (even"),
        (["--skip-nonfinite", "-1"], "--skip-nonfinite must be at least 0"),
        (["--faith-images", "-2"], "--faith-images must be at least 0"),
        (["--seed", "-1"], "--seed must be at least 0"),
        (["--resume", "--overwrite"], "give --resume or --overwrite, not both"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_read_or_written(
    flags, message, tmp_path, capsys, monkeypatch
):
    def no_data(*args, **kwargs):
        raise AssertionError("the settings must be checked before any data is read")

    monkeypatch.setattr("shapkern.training.setup.load_dataset", no_data)
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or "--resume" in flags  # a resumed run takes the folder's lock first


def test_an_unknown_flag_is_reported_with_the_train_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--lamda", "1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage: shapkern train" in err
    assert "shapkern train: error: unrecognized arguments: --lamda 1" in err


def test_a_second_train_on_the_same_folder_is_refused_until_the_first_is_gone(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys

    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "shapkern", "train", *QUICK, "--epochs", "1000", "--out", out]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert first.stdout.readline().startswith("shapkern train: digits")  # it holds the folder now
        assert main(["train", *QUICK, "--epochs", "1", "--out", out]) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another shapkern process (pid {first.pid} on host" in err
        assert main(["train", *QUICK, "--resume", "--out", out]) == 2  # nor may it resume meanwhile
    finally:
        first.send_signal(signal.SIGKILL)  # killed: its lock goes with it
        first.wait()
    assert main(["train", *QUICK, "--epochs", "1", "--overwrite", "--out", out]) == 0
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_resume_over_unreadable_checkpoints_fails_and_names_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "2", "--out", str(out)]) == 0
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[:-1])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".shapkern.lock"}
    capsys.readouterr()
    assert main(["train", "--resume", "--no-progress", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "starting a new run" not in captured.out and "cannot resume" in captured.err
    assert f"{out}/checkpoint.pt:" in captured.err and f"{out}/checkpoint.prev.pt:" in captured.err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".shapkern.lock"} == before


def test_a_folder_with_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *QUICK, "--epochs", "1", "--out", out]) == 0
    assert main(["train", *QUICK, "--epochs", "1", "--out", out]) == 2
    assert "already holds a run (checkpoint.pt): pass --resume" in capsys.readouterr().err


def test_divergence_a_full_disk_and_an_unwritable_out_are_messages(tmp_path, capsys, monkeypatch):
    import torch

    assert main(["train", *QUICK, "--epochs", "2", "--lr", "1e9", "--out", str(tmp_path / "div")]) == 2
    assert "training diverged: the loss or the gradient norm is not finite" in capsys.readouterr().err
    assert not (tmp_path / "div" / "checkpoint.pt").exists()
    (tmp_path / "file").write_text("x")
    assert main(["train", *QUICK, "--out", str(tmp_path / "file" / "run")]) == 2
    assert "cannot write in the output folder" in capsys.readouterr().err

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7424 vs 7318")

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", *QUICK, "--epochs", "1", "--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'full' / 'checkpoint.pt'}: no space left on device" in err


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_a_damaged_safetensors_weights_file_is_a_message(tmp_path, capsys, damage):
    import os

    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"pos_embed": torch.zeros(1, 17, 32)}, path)
    data = {"empty": b"", "truncated": path.read_bytes()[:-10], "random": os.urandom(256)}[damage]
    path.write_bytes(data)
    argv = ["train", *QUICK, "--weights", str(path), "--depth", "1", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert f"cannot read weights from {path}: not a valid safetensors file" in capsys.readouterr().err


def test_the_sampler_flags_reach_the_run(tmp_path, capsys):
    from shapkern.checkpoint import load_checkpoint
    from shapkern.cli.train import config_from_args

    flags = ["--sampler", "uniform", "--no-paired", "--num-coalitions", "3"]
    cfg, explicit = config_from_args(build_parser().parse_args(["train", *flags]))
    assert (cfg.sampler, cfg.paired, cfg.num_coalitions) == ("uniform", False, 3)
    assert explicit == {"sampler", "paired", "num_coalitions"}
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sampler {shapley,uniform,bernoulli}" in text and "--paired, --no-paired" in text
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *TINY, *flags]) == 0  # the last flag wins
    config = load_checkpoint(out / "checkpoint.pt")["config"]
    assert (config["sampler"], config["paired"], config["num_coalitions"]) == ("uniform", False, 3)


def test_the_run_line_names_the_threads_and_a_resume_on_other_threads_says_so(tmp_path, capsys):
    import torch

    from shapkern.checkpoint import load_checkpoint

    out = str(tmp_path / "run")
    before = torch.get_num_threads()
    try:
        assert main(["train", "--epochs", "1", "--threads", "1", "--out", out, *TINY]) == 0
        first = capsys.readouterr().out
        assert "process(es) on cpu, 1 thread (--threads), from epoch 0" in first
        assert re.search(r"\n  threads +1\n", first)  # the summary
        assert main(["train", "--epochs", "2", "--threads", "2", "--resume", "--out", out, *TINY]) == 0
        assert "resume: 2 threads (--threads) where the run had 1; results agree up to rounding" in (
            capsys.readouterr().out
        )
    finally:
        torch.set_num_threads(before)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["threads"] == 2
    assert [r["threads"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_the_summary_names_its_reference_and_shows_localisation_on_evidence(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", "evidence", "--epochs", "1", "--threads", "1", "--out", out, *TINY]) == 0
    text = capsys.readouterr().out
    assert "faithfulness)" not in text  # the word belongs to the faithfulness-correlation metric
    summary = text[text.index("shapkern train: done") :]
    for label in (
        "‖Φ − φ‖/‖φ‖ vs a 16-permutation estimate",
        "pointing game (evidence masks)",
        "AUROC of Φ on the evidence masks",
        "mIoU with the evidence masks",
    ):
        assert label in summary and label in text[: text.index("shapkern train: done")]  # the epoch line too
    record = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert 0.0 <= record["pointing"] <= 1.0 and 0.0 <= record["auroc"] <= 1.0 and 0.0 <= record["miou"] <= 1.0
    assert main(["train", "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "digits"), *TINY]) == 0
    assert "pointing game" not in capsys.readouterr().out  # digits has no masks
