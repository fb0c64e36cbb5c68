import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_drop_in_custom_vit_matches_key_masked_original():
    namespace = runpy.run_path(str(EXAMPLES / "drop_in_custom_vit.py"))
    assert namespace["main"]() < 1e-5


def test_drop_in_conversion_is_under_30_lines():
    text = (EXAMPLES / "drop_in_custom_vit.py").read_text()
    conversion = text.split("# --- the conversion")[1].split("# -----")[0]
    code = [line for line in conversion.splitlines()[1:] if line.strip()]
    assert len(code) < 30


def test_training_example_runs_with_its_flags(capsys):
    namespace = runpy.run_path(str(EXAMPLES / "train_self_explaining_vit.py"))
    result = namespace["main"](["--epochs", "1", "--train-images", "128", "--exact-images", "1"])
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["relative_error"] < 10.0
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.out
    # Progress in every phase: the run line's threads, a bar per epoch and one for the exact values.
    assert "threads: " in captured.out and "exact Shapley values of 1 test image(s)" in captured.out
    assert "epoch 1/1:" in captured.err and "exact:" in captured.err and "coalition/s" in captured.err
