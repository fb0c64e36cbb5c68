"""explain_dataset (explainers/dataset.py), its dataset views (data/views.py) and models by name
(explainers/loading.py, explainers/hub_models.py): tiny models (32 px images in 8 px patches, N = 16),
the evidence set, nothing downloaded."""

import copy
import json

import pytest
import torch

from shapkern import explain
from shapkern.data import explain_split, load_dataset
from shapkern.explainers import dataset as dataset_module
from shapkern.explainers import explain_dataset, load_explanations, load_model, store
from shapkern.explainers.loading import as_named_model

SETTINGS = {"limit": 5, "shard_size": 2, "method": "kernel", "budget": 40, "progress": False}


@pytest.fixture(scope="module")
def vit():
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=4
    )
    return model.eval()


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def count_explain_calls(monkeypatch):
    calls = []

    def counted(model, images, **kw):
        calls.append((images.shape[0], torch.is_inference_mode_enabled()))
        return explain(model, images, **kw)

    monkeypatch.setattr(dataset_module, "explain", counted)
    return calls


def test_the_store_holds_explain_of_each_shard_and_the_dataset_metrics(vit, tmp_path):
    got = explain_dataset(vit, "evidence", out=tmp_path, **SETTINGS)
    test = load_dataset("evidence").test
    for start in (0, 2, 4):  # each shard is one explain() call on its images, same seed
        images = torch.stack([test[i][0] for i in range(start, min(start + 2, 5))])
        want = explain(vit, images, method="kernel", budget=40, seed=0, progress=False)
        assert torch.equal(got.values[start : start + images.shape[0]], want.values)
        assert torch.equal(got.std_error[start : start + images.shape[0]], want.std_error)
    assert got.values.shape == (5, 16, 1) and got.image_ids.tolist() == [0, 1, 2, 3, 4]
    assert got.labels.tolist() == [int(test[i][1]) for i in range(5)]
    assert got.sources == [f"evidence:test[{i}]" for i in range(5)]
    assert got.evaluations.tolist() == [40] * 5 and got.insertion.shape == (5, 17)
    metrics = json.loads((tmp_path / store.METRICS).read_text())
    assert set(metrics["localization"]) == {"pointing", "auroc", "miou", "miou_threshold"}  # evidence masks
    assert metrics["images"] == 5 and 0 <= metrics["deletion_auc"] <= 1
    assert (tmp_path / store.METRICS_PLOT).stat().st_size > 1000
    manifest = json.loads((tmp_path / store.MANIFEST).read_text())
    assert manifest["complete"] and manifest["num_shards"] == 3 and manifest["grid"] == [4, 4]
    assert manifest["settings"]["explain"]["method"] == "kernel" and manifest["versions"]["torch"]
    assert manifest["settings"]["model"]["preprocessing"]["crop_pct"] == 0.9  # timm's data config


def test_a_resumed_run_computes_only_missing_and_damaged_shards(vit, tmp_path, monkeypatch):
    explain_dataset(vit, "evidence", out=tmp_path, **SETTINGS)
    before = shard_bytes(tmp_path)
    (tmp_path / store.shard_name(1)).unlink()  # never written
    second = tmp_path / store.shard_name(2)
    second.write_bytes(second.read_bytes()[:100])  # half written by a copy
    (tmp_path / ".shard-00001.safetensors.tmp-4242").write_bytes(b"killed while writing")
    manifest = json.loads((tmp_path / store.MANIFEST).read_text())
    store.write_json(tmp_path / store.MANIFEST, manifest | {"complete": False})
    calls = count_explain_calls(monkeypatch)
    explain_dataset(vit, "evidence", out=tmp_path, **SETTINGS)
    assert calls == [(2, True), (1, True)]  # shards 1 and 2, under torch.inference_mode
    assert shard_bytes(tmp_path) == before
    assert not list(tmp_path.glob(".*tmp-*"))
    calls.clear()
    assert load_explanations(tmp_path).values.shape[0] == 5
    got = explain_dataset(vit, "evidence", out=tmp_path, **SETTINGS)  # finished: nothing recomputed
    assert calls == [] and got.values.shape[0] == 5


def test_other_settings_are_refused_unless_overwrite(vit, tmp_path, capsys):
    explain_dataset(vit, "evidence", out=tmp_path, **SETTINGS)
    (tmp_path / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match=r"other settings \(explain.budget: 40 -> 48.*--overwrite"):
        explain_dataset(vit, "evidence", out=tmp_path, **SETTINGS | {"budget": 48})
    with pytest.raises(ValueError, match=r"data.images: 5 -> 4"):
        explain_dataset(vit, "evidence", out=tmp_path, **SETTINGS | {"limit": 4})
    got = explain_dataset(vit, "evidence", out=tmp_path, **SETTINGS | {"limit": 3, "overwrite": True})
    assert got.values.shape[0] == 3 and (tmp_path / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]


def test_a_store_runs_inside_inference_mode_and_equals_one_outside(vit, tmp_path):
    with torch.inference_mode():
        inside = explain_dataset(vit, "evidence", out=tmp_path / "a", **SETTINGS)
    outside = explain_dataset(vit, "evidence", out=tmp_path / "b", **SETTINGS)
    assert torch.equal(inside.values, outside.values)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_targets_label_all_and_a_class(vit, tmp_path):
    settings = SETTINGS | {"limit": 3}
    label = explain_dataset(vit, "evidence", out=tmp_path / "label", target="label", **settings)
    assert torch.equal(label.targets[:, 0], label.labels)
    every = explain_dataset(vit, "evidence", out=tmp_path / "all", target="all", **settings)
    assert every.values.shape == (3, 16, 4) and every.targets[0].tolist() == [0, 1, 2, 3]
    predicted = every.full.argmax(-1)  # the metrics score the predicted class's column
    pred = explain_dataset(vit, "evidence", out=tmp_path / "pred", **settings)
    assert torch.equal(pred.targets[:, 0], predicted)
    torch.testing.assert_close(every.insertion, pred.insertion)
    two = explain_dataset(vit, "evidence", out=tmp_path / "two", target=2, **settings)
    assert two.targets[:, 0].tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="target must be one of"):
        explain_dataset(vit, "evidence", out=tmp_path / "bad", target="best", **settings)


def test_a_torch_dataset_of_preprocessed_items_is_explained_as_given(vit, tmp_path):
    test = load_dataset("evidence").test
    got = explain_dataset(vit, test, out=tmp_path, **SETTINGS | {"limit": 2})
    assert got.sources == ["EvidenceDataset[0]", "EvidenceDataset[1]"]
    images = torch.stack([test[i][0] for i in range(2)])
    assert torch.equal(
        got.values, explain(vit, images, method="kernel", budget=40, seed=0, progress=False).values
    )


def test_explain_split_gives_the_training_split_the_test_view(tmp_path):
    from image_folders import make_folder

    from shapkern.data import Preprocessing

    make_folder(tmp_path)
    prep = Preprocessing("RGB", (0.5,) * 3, (0.25,) * 3, crop_pct=0.9, interpolation="bicubic")
    spec = f"imagefolder:{tmp_path}"
    first, second = (explain_split(spec, split="train", prep=prep, size=(32, 32), limit=3) for _ in range(2))
    assert len(first) == 3 and first.classes == ["cat", "dog"]
    assert all(name.split("/")[0] in ("cat", "dog") for name in first.sources)  # relative to the folder
    for i in range(3):  # no random crops or flips: the same input every time
        assert torch.equal(first.dataset[i][0], second.dataset[i][0])
    with pytest.raises(ValueError, match="split must be one of"):
        explain_split(spec, split="val", prep=prep, size=(32, 32))
    with pytest.raises(ValueError, match="limit must be a positive"):
        explain_split(spec, prep=prep, size=(32, 32), limit=0)


def test_a_timm_name_loads_a_local_weights_file_with_its_classifier(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("test_vit", num_classes=3)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    named = load_model("test_vit", weights=tmp_path / "w.safetensors")
    assert named.model.num_classes == 3 and not named.model.training
    for key, value in source.state_dict().items():
        assert torch.equal(named.model.state_dict()[key], value), key
    assert named.input_size == (160, 160) and named.preprocessing.crop_pct == 0.95
    assert named.preprocessing.interpolation == "bicubic" and named.preprocessing.mean == (0.5,) * 3
    assert (
        named.record()["weights_sha256"]
        != as_named_model(timm.create_model("test_vit")).record()["weights_sha256"]
    )
    with pytest.raises(ValueError, match="unknown model 'no_such_vit'"):
        load_model("no_such_vit")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_model("test_vit", weights=tmp_path / "none.pt")
    with pytest.raises(ValueError, match="do not fit test_vit"):
        load_model("test_vit2", weights=tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="exactly one"):
        load_model()


def test_a_size_override_keeps_the_models_own_input_size(vit):
    named = as_named_model(vit)
    assert named.input_size == (32, 32) and named.preprocessing.mean == (0.5,) * 3


def test_a_hugging_face_folder_loads_with_its_image_processor(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="without an image processor"):
        load_model(f"hf:{tmp_path / 'vit'}")
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 36}, crop_size=32, resample=2)
    processor.save_pretrained(tmp_path / "vit")
    named = load_model(f"hf:{tmp_path / 'vit'}")
    assert type(named.model).__name__ == "ViTForImageClassification" and named.classes == ["cat", "dog"]
    assert named.input_size == (32, 32) and named.preprocessing.interpolation == "bilinear"
    assert int(32 / named.preprocessing.crop_pct) == 36  # resize the short side to 36, crop 32
    got = explain_dataset(named, "evidence", out=tmp_path / "store", **SETTINGS | {"limit": 2})
    assert got.values.shape == (2, 16, 1)
    with pytest.raises(ValueError, match="pass --pretrained to download it"):
        load_model("hf:nobody-has/this-model")


def test_an_open_clip_tower_loads_from_a_config_and_a_local_weights_file(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / "shapkern-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "shapkern-tiny-clip.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("shapkern-tiny-clip").state_dict(), tmp_path / "w.pt")
    named = load_model("open_clip:shapkern-tiny-clip", weights=tmp_path / "w.pt")
    assert type(named.model).__name__ == "VisionTransformer" and named.input_size == (32, 32)
    assert named.preprocessing.crop_pct == 1.0 and named.preprocessing.interpolation == "bicubic"
    got = explain_dataset(named, "evidence", out=tmp_path / "store", **SETTINGS | {"limit": 2})
    assert got.values.shape == (2, 16, 1)  # the embedding's predicted dimension
    with pytest.raises(ValueError, match="names pretrained weights: pass --pretrained"):
        load_model("open_clip:shapkern-tiny-clip:some_tag")
    with pytest.raises(ValueError, match="cannot load open_clip:no-such-arch"):
        load_model("open_clip:no-such-arch")


def test_a_name_without_trained_weights_gets_the_same_random_ones_everywhere():
    """Every process of a torchrun group, and a resumed run, must explain the same model."""
    state = torch.random.get_rng_state()
    first, second = load_model("test_vit"), load_model("test_vit")
    assert first.record()["weights_sha256"] == second.record()["weights_sha256"]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone


def test_a_process_whose_settings_differ_from_rank_zeros_is_refused(vit, tmp_path, monkeypatch):
    explain_dataset(vit, "evidence", out=tmp_path, **SETTINGS)  # the store rank 0 prepared
    monkeypatch.setattr(dataset_module, "_world", lambda: (1, 2))  # then rank 1 of 2, with another model
    monkeypatch.setattr(dataset_module, "_barrier", lambda world: None)
    other = copy.deepcopy(vit)
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with pytest.raises(ValueError, match="rank 1: its settings .* are not rank 0's"):
        explain_dataset(other, "evidence", out=tmp_path, **SETTINGS)
    assert explain_dataset(vit, "evidence", out=tmp_path, **SETTINGS) is None  # the same settings: its shards


def test_a_shapley_vit_module_is_explained_by_its_own_phi_in_the_datasets_own_view(tmp_path, capsys):
    from shapkern import ShapleyViT

    torch.manual_seed(0)
    model = ShapleyViT(
        "vit_tiny_patch16_224", 10, img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2
    )
    got = explain_dataset(model.eval(), "digits", out=tmp_path, limit=3, progress=False)
    assert "no preprocessing given for ShapleyViT: digits's own test view" in capsys.readouterr().out
    images = torch.stack([load_dataset("digits").test[i][0] for i in range(3)])
    with torch.no_grad():
        phi, logits = model(images)[:2]
    assert got.manifest["settings"]["explain"]["method"] == "self" and got.evaluations.tolist() == [1] * 3
    assert torch.equal(got.targets[:, 0], logits.argmax(-1))
    torch.testing.assert_close(
        got.values[..., 0], phi.gather(-1, got.targets[:, None].expand(-1, 16, 1))[..., 0]
    )
