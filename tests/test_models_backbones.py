"""Backbones by timm name: timm's pretrained weights from a fake, offline Hugging Face cache (the code
path of ``--pretrained``), local weight files, and resampling to the requested image and patch size.
No test touches the network: every hub access runs with HF_HUB_OFFLINE=1 on a cache written here.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from shapkern.models import ShapleyViT, create_backbone
from shapkern.models.backbones import native_input, pretrained_normalization

NAME = "vit_small_patch16_224.augreg_in21k_ft_in1k"
TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2}  # stands in for the real ViT-S weights
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache: Path, name: str, model: torch.nn.Module) -> None:
    """What a download of the hub's ``timm/<name>`` leaves in a Hugging Face cache: ``refs/main``
    naming a snapshot that holds ``model.safetensors`` and ``config.json`` (timm's own writer)."""
    from timm.models._hub import save_for_hf

    repo = cache / f"models--timm--{name}"
    save_for_hf(model, repo / "snapshots" / COMMIT, safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def use_hub_cache(monkeypatch, cache: Path) -> None:
    """This process reads the hub from ``cache`` only: the environment, and huggingface_hub's
    constants (it reads the environment once, when imported)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> dict:
    """An offline cache holding tiny stand-in weights of NAME; returns their state dict."""
    source = timm.create_model(NAME, pretrained=False, **TINY)
    write_hub_cache(tmp_path / "hub", NAME, source)
    use_hub_cache(monkeypatch, tmp_path / "hub")
    return source.state_dict()


def test_pretrained_loads_the_cached_weights_without_their_classifier(hub):
    backbone = create_backbone(NAME, pretrained=True, **TINY)
    state = backbone.state_dict()
    assert backbone.num_classes == 0 and not any(k.startswith("head.") for k in state)
    assert set(state) == {k for k in hub if not k.startswith("head.")}
    for key, value in state.items():
        assert torch.equal(value, hub[key]), key


@pytest.mark.parametrize("img_size, patch_size", [(32, 8), (64, 16), (48, 8)])
def test_pretrained_follows_img_size_by_timms_resampling(hub, img_size, patch_size):
    backbone = create_backbone(NAME, pretrained=True, img_size=img_size, patch_size=patch_size, **TINY)
    grid = img_size // patch_size
    assert backbone.patch_embed.grid_size == (grid, grid) and backbone.pos_embed.shape == (1, 1 + grid**2, 32)
    want_pos = resample_abs_pos_embed(hub["pos_embed"], (grid, grid), num_prefix_tokens=1)
    torch.testing.assert_close(backbone.pos_embed.detach(), want_pos)
    want_patch = hub["patch_embed.proj.weight"]
    if patch_size != 16:
        want_patch = resample_patch_embed(want_patch, [patch_size, patch_size])
    torch.testing.assert_close(backbone.patch_embed.proj.weight.detach(), want_patch)
    assert torch.equal(backbone.blocks[0].mlp.fc1.weight, hub["blocks.0.mlp.fc1.weight"])


def test_a_missing_cache_entry_offline_names_the_model_and_hf_hub_offline(hub, tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(ValueError, match=rf"pretrained weights of '{NAME}'.*HF_HUB_OFFLINE=1 is set") as info:
        create_backbone(NAME, pretrained=True, **TINY)
    assert str(tmp_path / "empty") in str(info.value) and "--weights" in str(info.value)


def test_pretrained_weights_of_another_size_fail_clearly(hub):
    with pytest.raises(ValueError, match=r"cannot load the pretrained weights .*size overrides"):
        create_backbone(NAME, pretrained=True, depth=1, embed_dim=64, num_heads=2)


def test_a_tag_works_without_pretrained_and_a_wrong_tag_fails(tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "empty")  # nothing to read: a random init reads nothing
    backbone = create_backbone(NAME, img_size=32, patch_size=8, **TINY)
    assert backbone.pretrained_cfg["tag"] == "augreg_in21k_ft_in1k" and backbone.patch_embed.num_patches == 16
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'bogus'.*augreg_in21k_ft_in1k"):
        create_backbone("vit_small_patch16_224.bogus", **TINY)
    with pytest.raises(ValueError, match="unknown model"):
        create_backbone("vit_nonexistent_xyz.augreg", **TINY)
    with pytest.raises(ValueError, match="not both"):
        create_backbone(NAME, pretrained=True, checkpoint=tmp_path / "w.pth", **TINY)


def test_a_checkpoint_rebuilds_without_downloading(hub, tmp_path, monkeypatch):
    model = ShapleyViT(NAME, 3, pretrained=True, img_size=32, patch_size=8, **TINY).eval()
    assert "pretrained" not in model.arch and model.arch["backbone"] == NAME
    state = {"arch": model.arch, "model": model.state_dict()}
    use_hub_cache(monkeypatch, tmp_path / "empty")  # loading pretrained weights now would fail
    rebuilt = ShapleyViT.from_state(state)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(images).phi, model(images).phi)


@pytest.mark.parametrize("form", ["state_dict", "timm_checkpoint", "safetensors"])
def test_local_weights_resample_like_pretrained(hub, tmp_path, form):
    """--weights FILE in each format gives the backbone --pretrained gives from the same weights."""
    from safetensors.torch import save_file

    path = tmp_path / ("w.safetensors" if form == "safetensors" else "w.pth")
    if form == "safetensors":
        save_file(hub, str(path))
    else:
        torch.save(hub if form == "state_dict" else {"state_dict": hub, "epoch": 3}, path)
    from_file = create_backbone(NAME, checkpoint=path, img_size=32, patch_size=8, **TINY)
    from_hub = create_backbone(NAME, pretrained=True, img_size=32, patch_size=8, **TINY)
    for (key, got), want in zip(from_file.state_dict().items(), from_hub.state_dict().values(), strict=True):
        assert torch.equal(got, want), key


def test_native_input_and_normalisation():
    assert native_input(NAME) == (224, 16) and native_input("vit_base_patch32_384") == (384, 32)
    assert pretrained_normalization(NAME) == ((0.5,) * 3, (0.5,) * 3)  # AugReg weights
    mean, std = pretrained_normalization("deit_tiny_patch16_224")
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="not a ViT"):
        native_input("resnet10t")


def test_hf_environment_variables_are_honoured(tmp_path):
    """In a fresh process, HF_HOME locates the cache and HF_HUB_OFFLINE=1 keeps it offline."""
    source = timm.create_model(NAME, pretrained=False, **TINY)
    write_hub_cache(tmp_path / "home" / "hub", NAME, source)  # $HF_HOME/hub is the default cache
    script = textwrap.dedent(
        f"""
        from shapkern.models import create_backbone
        backbone = create_backbone({NAME!r}, pretrained=True, img_size=32, patch_size=8, **{TINY!r})
        print("fc1", float(backbone.blocks[0].mlp.fc1.weight.detach().sum()))
        try:
            create_backbone("vit_tiny_patch16_224.augreg_in21k", pretrained=True)
        except ValueError as exc:
            print(exc)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"fc1 {float(source.blocks[0].mlp.fc1.weight.detach().sum())}" in run.stdout
    assert "'vit_tiny_patch16_224.augreg_in21k': HF_HUB_OFFLINE=1 is set" in run.stdout
    assert str(tmp_path / "home" / "hub") in run.stdout


def test_damaged_or_non_finite_weights_files_are_clear_errors(tmp_path):
    from shapkern.checkpoint import CheckpointError

    state = timm.create_model(NAME, pretrained=False, **TINY).state_dict()
    state["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(
        ValueError, match=r"hold NaN or inf values, in 1 tensor\(s\): \['blocks.0.mlp.fc1.weight'\]"
    ):
        create_backbone(NAME, checkpoint=tmp_path / "nan.pth", **TINY)
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="not a shapkern checkpoint") as info:
        create_backbone(NAME, checkpoint=tmp_path / "random.pth", **TINY)
    assert "weights_only" not in str(info.value)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        create_backbone(NAME, checkpoint=tmp_path / "empty.safetensors", **TINY)
