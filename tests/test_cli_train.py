import json

import pytest

from shapkern.cli import build_parser, main


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


def test_train_command_runs_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    assert main(["train", "--epochs", "1", "--out", out, *TINY]) == 0
    assert main(["train", "--epochs", "2", "--out", out, "--resume", *TINY]) == 0  # extends the run
    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2]
    assert (tmp_path / "run" / "explanations.png").exists()


def test_defaults_are_the_digits_quick_start():
    from shapkern.cli.train import config_from_args
    from shapkern.training import TrainConfig

    cfg, explicit = config_from_args(build_parser().parse_args(["train"]))
    assert cfg == TrainConfig() and not explicit
    assert (cfg.data, cfg.img_size, cfg.patch_size) == ("digits", 32, 8) and cfg.stop_grad and not cfg.resume


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "mnist"], "unknown dataset 'mnist'"),
        (["train", "--model", "vit_nonexistent_xyz"], "unknown model"),
        (["train", "--patch-size", "6"], "does not divide"),
        (["train", "--model", "resnet10t"], "cannot be built as a ViT"),
    ],
)
def test_bad_inputs_fail_with_clear_messages(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out
