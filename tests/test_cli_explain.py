import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from shapkern.cli import main
from shapkern.runlock import LOCK_FILE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A ShapleyViT trained for one short epoch on digits (32x32, 16x16 patches: N = 4)."""
    from shapkern.training import train

    out = tmp_path_factory.mktemp("run")
    train(
        data="digits", patch_size=16, depth=1, embed_dim=16, num_heads=2, epochs=1, batch_size=32,
        limit_train=64, limit_test=16, num_coalitions=4, faith_images=0, heatmap_images=0, progress=False,
        out=str(out),
    )  # fmt: skip
    return out / "checkpoint.pt"


def run(argv, capsys):
    assert main(["explain", *map(str, argv)]) == 0
    return capsys.readouterr().out


def test_explain_builtin_data_end_to_end(checkpoint, tmp_path, capsys):
    out = tmp_path / "expl"
    log = run(["--checkpoint", checkpoint, "--data", "digits", "--num-images", 3, "--method", "exact",
               "--out", out, "--no-progress"], capsys)  # fmt: skip
    assert "3 image(s), method exact, 16 evaluations/image" in log
    result = json.loads((out / "explanations.json").read_text())
    assert result["num_players"] == 4 and len(result["images"]) == 3
    first = result["images"][0]
    assert np.array(first["values"]).shape == (4, 1)
    assert abs(np.sum(first["values"]) - (first["full"][0] - first["base"][0])) < 1e-4
    assert result["efficiency_gap_max"] < 1e-4
    for name in ("heatmap_000.png", "heatmap_002.png", "grid.png", "curves.png"):
        assert matplotlib.image.imread(out / name).shape[0] > 100
    # Evidence images carry ground-truth masks: localisation is scored too.
    run(["--checkpoint", checkpoint, "--data", "evidence", "--num-images", 4, "--method", "kernel",
         "--budget", 64, "--out", out / "ev", "--no-progress"], capsys)  # fmt: skip
    result = json.loads((out / "ev" / "explanations.json").read_text())
    assert set(result["localization"]) == {"pointing", "auroc", "miou", "miou_threshold"}
    # N = 4: the budget covers all 16 coalitions, and kernel evaluates none twice.
    assert result["evaluations_per_image"] == 16 and result["images"][0]["std_error"] is not None


def test_explain_the_users_own_png_files(checkpoint, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i, size in enumerate((32, 32, 48)):
        files.append(tmp_path / f"digit{i}.png")
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(files[-1])
    run(
        ["--checkpoint", checkpoint, "--images", *files[:2], "--out", tmp_path / "a", "--no-progress"], capsys
    )
    result = json.loads((tmp_path / "a" / "explanations.json").read_text())
    assert result["method"] == "self" and result["evaluations_per_image"] == 1
    assert result["images"][1]["source"].endswith("digit1.png")
    run(["--checkpoint", checkpoint, "--images", files[2], "--resize", "--method", "permutation",
         "--budget", 20, "--target", 3, "--out", tmp_path / "b", "--no-progress"], capsys)  # fmt: skip
    assert json.loads((tmp_path / "b" / "explanations.json").read_text())["images"][0]["target"] == [3]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--images", "{big}"], r"is 48x48 pixels but the model takes 32x32; resize it \(--resize\)"),
        (["--images", "{bad}"], "cannot read .*bad.png as an image"),
        (["--images", "{missing}"], "image file not found"),
        (["--data", "digits", "--target", "10"], "target class 10 is out of range: the model has 10 classes"),
        (["--data", "digits", "--target", "cat"], "--target must be 'pred', 'all' or a class index"),
    ],
)
def test_bad_input_fails_with_a_clear_message(checkpoint, tmp_path, capsys, extra, message):
    from PIL import Image

    Image.fromarray(np.zeros((48, 48), dtype=np.uint8)).save(tmp_path / "big.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths = {"big": tmp_path / "big.png", "bad": tmp_path / "bad.png", "missing": tmp_path / "none.png"}
    extra = [str(a).format(**paths) for a in extra]
    argv = ["explain", "--checkpoint", str(checkpoint), *extra, "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "shapkern explain: error:" in err
    import re

    assert re.search(message, err), err


def test_a_missing_or_foreign_checkpoint_fails_clearly(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"junk")
    for path, message in (
        (tmp_path / "none.pt", "no checkpoint at"),
        (tmp_path / "x.pt", "is truncated or corrupt"),
    ):
        assert main(["explain", "--checkpoint", str(path), "--data", "digits", "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err


def test_the_shapkern_command_line_runs_explain(checkpoint, tmp_path, capsys):
    from shapkern.cli import main as shapkern_main

    argv = ["explain", "--checkpoint", str(checkpoint), "--data", "digits", "--num-images", "2"]
    assert shapkern_main([*argv, "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    assert (tmp_path / "c" / "grid.png").stat().st_size > 1000
    assert shapkern_main([*argv, "--target", "11", "--out", str(tmp_path / "d")]) == 2
    assert "target class 11 is out of range" in capsys.readouterr().err


def test_16_bit_pngs_are_scaled_by_their_bit_depth(checkpoint, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (32, 32)).astype(np.uint16)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "eight.png")
    Image.fromarray(pixels * 257).save(tmp_path / "sixteen.png")  # the same picture in 16 bits
    for name in ("eight", "sixteen"):
        run(["--checkpoint", checkpoint, "--images", tmp_path / f"{name}.png", "--method", "exact",
             "--out", tmp_path / name, "--no-progress"], capsys)  # fmt: skip
    eight, sixteen = (
        json.loads((tmp_path / n / "explanations.json").read_text()) for n in ("eight", "sixteen")
    )
    np.testing.assert_allclose(
        sixteen["images"][0]["values"], eight["images"][0]["values"], rtol=1e-4, atol=1e-5
    )


def test_named_data_is_normalised_as_the_checkpoint_records(tmp_path):
    import torch
    from image_folders import make_folder

    from shapkern.cli.explain_inputs import builtin_images
    from shapkern.data import load_dataset

    make_folder(tmp_path)
    name = f"imagefolder:{tmp_path}"
    prep = {"color": "RGB", "mean": [0.5] * 3, "std": [0.25] * 3, "channels": 3, "crop_pct": 0.875}
    data = {"name": name, "preprocessing": prep}
    images, labels, _, classes = builtin_images(data, {"img_size": 32, "patch_size": 8}, name, 2, (4, 4))
    want = load_dataset(name, img_size=32, patch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3).test
    assert images.shape == (1, 3, 32, 32)  # the test split: 1 of 10 images
    torch.testing.assert_close(images[0], want[0][0])
    assert classes == ["cat", "dog"] and labels == [want[0][1]]


def test_explain_feeds_image_files_as_the_imagefolder_test_split_pixel_for_pixel(tmp_path):
    """With an imagefolder checkpoint's record, explain's input of a file is the test split's item
    of that file, exactly: odd sizes, RGB and grey, 8 and 16 bits."""
    import torch
    from PIL import Image

    from shapkern.cli.explain_inputs import load_images
    from shapkern.data import Preprocessing, load_dataset

    rng = np.random.default_rng(2)
    files = []
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i, (w, h) in enumerate(((45, 37), (39, 51), (33, 61))):
                path = tmp_path / split / cls / f"{i}.png"
                if i == 0:
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
                else:  # grey, 8 and 16 bits
                    grey = rng.integers(0, 256, (h, w))
                    Image.fromarray(grey.astype(np.uint8) if i == 1 else grey.astype(np.uint16) * 257).save(
                        path
                    )
                files += [path] if split == "val" else []
    bundle = load_dataset(f"imagefolder:{tmp_path}", img_size=32, patch_size=8)
    prep = Preprocessing.from_dict(bundle.describe()["preprocessing"])  # as the checkpoint records it
    images = load_images([str(f) for f in files], prep, (32, 32), resize=False)
    assert len(bundle.test) == len(files) == 6
    for i in range(len(files)):
        assert torch.equal(images[i], bundle.test[i][0]), files[i]


def test_explain_out_naming_a_file_fails_clearly(checkpoint, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    argv = ["explain", "--checkpoint", str(checkpoint), "--data", "digits", "--out", str(tmp_path / "taken")]
    assert main(argv) == 2
    assert "--out" in (err := capsys.readouterr().err) and "taken is a file, not a folder" in err


def test_explain_refuses_an_earlier_runs_outputs_unless_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "expl"
    argv = [
        "--checkpoint",
        checkpoint,
        "--data",
        "digits",
        "--method",
        "exact",
        "--no-progress",
        "--out",
        out,
    ]
    run([*argv, "--num-images", 3], capsys)
    (out / "notes.txt").write_text("the user's")
    (out / "heatmap_mine.png").write_bytes(b"the user's too")
    before = sorted(p.name for p in out.iterdir())
    assert main(["explain", *map(str, argv), "--num-images", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds the outputs of an earlier `shapkern explain`" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written or removed
    run([*argv, "--num-images", 1, "--overwrite"], capsys)
    kept = ["curves.png", "explanations.json", "grid.png", "heatmap_000.png", "heatmap_mine.png", "notes.txt"]
    written = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)  # the folder lock's file stays
    assert written == kept  # heatmap_001/002.png of the first run are gone
    assert len(json.loads((out / "explanations.json").read_text())["images"]) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    run([*argv[:-1], empty, "--num-images", 1], capsys)  # an empty folder is fine


def test_explain_help_comes_from_the_estimators(checkpoint):
    """--method, --budget and --tol describe what the estimators do, from their own tables."""
    import argparse
    import re

    from shapkern.cli.explain import add_parser
    from shapkern.cli.explain_inputs import load_model
    from shapkern.explainers import METHODS, ValueFunction, estimate, resolve_method
    from shapkern.explainers.explain import DEFAULT_BUDGET, GAME_METHODS

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    helps = {action.dest: action.help for action in parser._actions}
    for method in METHODS:
        assert re.search(rf"\b{method}\b", helps["method"]), method
    model, _ = load_model(str(checkpoint), "cpu")
    auto = resolve_method("auto", model, model.num_players)
    assert f"auto (= {auto} for these checkpoints)" in helps["method"]
    assert str(DEFAULT_BUDGET) in helps["budget"]
    game = ValueFunction(lambda z: z.double().sum(-1, keepdim=True), 1, 4)
    for method in set(GAME_METHODS) - {"auto", "exact"}:  # the estimators that sample
        assert re.search(rf"\b{method}\b", helps["budget"]), method
        try:
            estimate(game, method=method, budget=16, tol=0.5, target="all", progress=False)
            takes_tol = True
        except ValueError:
            takes_tol = False
        assert bool(re.search(rf"\b{method}\b", helps["tol"])) == takes_tol, method


@pytest.mark.parametrize("size, pixels", [((40, 40), "1,600"), ((32, 24), "768")])
def test_explain_names_an_image_over_pils_pixel_limit(
    checkpoint, tmp_path, capsys, monkeypatch, size, pixels
):
    """Over twice the limit PIL raises, over the limit it warns: both are a clear error naming the file."""
    from PIL import Image

    Image.new("L", size).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    argv = ["explain", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "big.png"), "--resize"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"big.png has {pixels} pixels" in err and "MAX_IMAGE_PIXELS" in err and "downscale" in err


def test_a_checkpoint_with_an_unknown_preprocessing_key_fails_clearly(checkpoint, tmp_path, capsys):
    from shapkern.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(str(checkpoint))
    state["data"]["preprocessing"]["gamma"] = 2.2  # as a newer shapkern might record
    path = save_checkpoint(state, str(tmp_path))
    assert main(["explain", "--checkpoint", path, "--data", "digits", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: the preprocessing record has unknown key 'gamma'" in err and "newer shapkern" in err


# -- a whole dataset into a store (--data without --num-images) ------------------------------------

ROOT = str(Path(__file__).resolve().parents[1])
STORE_ARGS = (
    "--data evidence --limit 10 --shard-size 2 --method kernel --budget 12 --seed 3 --no-progress".split()
)
# Kills its own process with SIGKILL while the third shard is half written (after two whole ones).
KILLED_MID_SHARD = """
import os, signal, sys
sys.path.insert(0, {root!r})
import safetensors.torch
from shapkern.cli import main

save, written = safetensors.torch.save_file, []

def save_then_die(tensors, path, metadata=None):
    written.append(path)
    if len(written) == 3:
        with open(path, "wb") as f:
            f.write(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    save(tensors, path, metadata=metadata)

safetensors.torch.save_file = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def shapkern_process(args, *, launcher=("-m", "shapkern"), check=True):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    command = [sys.executable, *launcher, *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def store_contents(folder):
    """The shard files' bytes and the manifest without the record of the run (time, processes)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["run"]
    shards = {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}
    return shards, manifest, json.loads((folder / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one_process_store(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "one"
    result = shapkern_process(["explain", "--checkpoint", checkpoint, *STORE_ARGS, "--out", out])
    assert "10 images of evidence test (10 explained by 1 process(es)" in result.stdout
    return out


def test_a_store_of_a_dataset_reads_back(one_process_store):
    from shapkern.explainers import load_explanations

    got = load_explanations(one_process_store)
    assert got.values.shape == (10, 4, 1) and len(list(one_process_store.glob("shard-*"))) == 5
    assert got.sources[9] == "evidence:test[9]" and got.evaluations.tolist() == [12] * 10
    assert set(got.metrics["localization"]) == {"pointing", "auroc", "miou", "miou_threshold"}
    assert (one_process_store / "metrics.png").stat().st_size > 1000


def test_torchrun_two_gloo_processes_write_the_store_of_one(checkpoint, one_process_store, tmp_path):
    out = tmp_path / "two"
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "shapkern")
    result = shapkern_process(
        ["explain", "--checkpoint", checkpoint, *STORE_ARGS, "--out", out], launcher=launcher
    )
    assert "(10 explained by 2 process(es)" in result.stdout
    assert json.loads((out / "manifest.json").read_text())["run"]["processes"] == 2
    assert store_contents(out) == store_contents(one_process_store)  # bit for bit


def test_a_run_killed_mid_shard_resumes_to_the_uninterrupted_store(checkpoint, one_process_store, tmp_path):
    from shapkern.explainers import load_explanations

    out = tmp_path / "killed"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_SHARD.format(root=ROOT))
    argv = ["explain", "--checkpoint", checkpoint, *STORE_ARGS, "--out", out]
    killed = shapkern_process(argv, launcher=(str(script),), check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert list(out.glob(".shard-00002.safetensors.tmp-*"))  # the half-written shard never became one
    with pytest.raises(ValueError, match="has not finished"):
        load_explanations(out)
    resumed = shapkern_process(argv)
    assert "(6 explained by 1 process(es)" in resumed.stdout and "4 from an earlier run" in resumed.stdout
    assert store_contents(out) == store_contents(one_process_store)
    assert not list(out.glob(".*tmp-*"))
    # A damaged shard of a finished store is found and computed again; a sound store is left alone.
    shard = out / "shard-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-9])
    repaired = shapkern_process(argv)
    assert (
        "shard-00003.safetensors is truncated or corrupt" in repaired.stdout
        and "(2 explained" in repaired.stdout
    )
    assert store_contents(out) == store_contents(one_process_store)
    assert "nothing to do" in shapkern_process(argv).stdout


def test_a_store_with_other_settings_is_refused(checkpoint, one_process_store, capsys):
    argv = ["explain", "--checkpoint", str(checkpoint), *STORE_ARGS, "--out", str(one_process_store)]
    assert main([*argv, "--seed", "4"]) == 2
    err = capsys.readouterr().err
    assert (
        "holds explanations made with other settings (explain.seed: 3 -> 4)" in err and "--overwrite" in err
    )


def test_the_store_flags_are_refused_for_pictures(checkpoint, tmp_path, capsys):
    argv = ["explain", "--checkpoint", str(checkpoint), "--data", "digits", "--num-images", "2"]
    assert main([*argv, "--limit", "4", "--split", "train", "--out", str(tmp_path)]) == 2
    assert "--split, --limit go with --data without --num-images" in capsys.readouterr().err
    assert main([*argv, "--target", "label", "--no-progress", "--out", str(tmp_path / "l")]) == 0
    capsys.readouterr()
    image = tmp_path / "l" / "grid.png"  # any PNG file
    assert main(["explain", "--checkpoint", str(checkpoint), "--images", str(image), "--resize", "--target",
                 "label", "--out", str(tmp_path / "i")]) == 2  # fmt: skip
    assert "--target label needs --data" in capsys.readouterr().err


def test_a_timm_model_by_name_with_a_weights_file(tmp_path, capsys):
    import timm
    import torch
    from image_folders import make_folder
    from safetensors.torch import save_file

    from shapkern.explainers import load_explanations

    make_folder(tmp_path / "photos")
    torch.manual_seed(0)
    save_file(timm.create_model("test_vit", num_classes=2).state_dict(), tmp_path / "w.safetensors")
    model = [
        "--model",
        "test_vit",
        "--weights",
        tmp_path / "w.safetensors",
        "--method",
        "kernel",
        "--budget",
        8,
    ]
    run([*model, "--data", f"imagefolder:{tmp_path / 'photos'}", "--split", "train", "--limit", 2,
         "--out", tmp_path / "store", "--no-progress"], capsys)  # fmt: skip
    got = load_explanations(tmp_path / "store")
    assert got.values.shape == (2, 100, 1) and got.sources[0].split("/")[0] in ("cat", "dog")
    assert got.manifest["settings"]["model"]["preprocessing"]["crop_pct"] == 0.95  # timm's data config
    run([*model, "--images", tmp_path / "photos" / "cat" / "0.png", "--out", tmp_path / "pictures",
         "--no-progress"], capsys)  # fmt: skip
    result = json.loads((tmp_path / "pictures" / "explanations.json").read_text())
    assert result["model"] == "test_vit" and result["checkpoint"] is None and result["num_players"] == 100
    random = ["--model", "test_vit", "--data", "evidence", "--limit", 1, "--method", "kernel", "--budget", 8]
    assert "random weights" in run([*random, "--out", tmp_path / "r", "--no-progress"], capsys)


def test_the_help_describes_both_outputs_and_every_flag():
    import argparse

    from shapkern.cli.explain import add_parser
    from shapkern.data import DATASETS

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    helps = {action.dest: action.help or "" for action in parser._actions}
    assert all(name in helps["data"] for name in DATASETS) and "without --num-images" in helps["data"]
    for flag in ("model", "pretrained", "weights", "split", "limit", "shard_size", "data_root", "download"):
        assert helps[flag], flag
    assert "'label'" in helps["target"] and "a store" in helps["overwrite"]
    text = parser.format_help()
    assert "shard-NNNNN.safetensors" in text and "resumes" in text


def test_explain_applies_the_thread_policy_on_the_cpu(checkpoint, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        argv = ["--checkpoint", checkpoint, "--data", "digits", "--num-images", 1, "--method", "exact",
                "--device", "cpu", "--threads", 1, "--out", tmp_path / "one", "--no-progress"]  # fmt: skip
        log = run(argv, capsys)
        assert "shapkern explain: 1 thread (" in log and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    argv = ["explain", "--checkpoint", str(checkpoint), "--data", "digits", "--num-images", "1",
            "--threads", "0", "--out", str(tmp_path / "zero")]  # fmt: skip
    assert main(argv) == 2 and "--threads must be at least 1, got 0" in capsys.readouterr().err
