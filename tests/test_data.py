import pytest
import torch
from image_folders import make_folder

from shapkern.data import load_dataset, make_evidence


def test_digits_split_and_items():
    bundle = load_dataset("digits")
    assert (len(bundle.train), len(bundle.test)) == (1437, 360) and bundle.num_classes == 10
    image, label, index = bundle.train[7]
    assert (
        image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int) and index == 7
    )
    assert abs(float(bundle.train.images.mean())) < 1e-3
    assert set(bundle.test.labels.tolist()) == set(range(10))


def test_evidence_is_seeded_and_evidence_cells_decide_the_class():
    a = make_evidence(64, seed=3, noise=0.0)
    b = make_evidence(64, seed=3, noise=0.0)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert a.masks.shape == (64, 4, 4) and (a.masks.flatten(1).sum(1) == 2).all()
    cells = a.images.view(64, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(64, 16, -1)
    for i in range(64):
        evidence = cells[i][a.masks[i].flatten()]
        others = cells[i][~a.masks[i].flatten()]
        assert torch.equal(evidence[0], evidence[1])  # both evidence cells show the class pattern
        class_of = {tuple(cells[j][a.masks[j].flatten()][0].tolist()): int(a.labels[j]) for j in range(64)}
        assert class_of[tuple(evidence[0].tolist())] == int(a.labels[i])
        assert not any(torch.equal(o, evidence[0]) for o in others)  # no distractor is a class pattern
    assert a.patch_masks((4, 4)).shape == (64, 16)
    assert torch.equal(a.patch_masks((8, 8)).view(64, 8, 8)[:, ::2, ::2].bool(), a.masks)
    assert torch.allclose(a.patch_masks((2, 2)).sum(1) * 4, torch.full((64,), 2.0))


def test_evidence_bundle():
    bundle = load_dataset("evidence", img_size=32, patch_size=8)
    assert bundle.num_classes == 4 and bundle.train[0][0].shape == (3, 32, 32)
    assert bundle.test.masks.shape[0] == len(bundle.test)


def test_imagefolder(tmp_path):
    make_folder(tmp_path)
    bundle = load_dataset(f"imagefolder:{tmp_path}", img_size=32, patch_size=8)
    assert bundle.classes == ["cat", "dog"] and len(bundle.train) + len(bundle.test) == 10
    image, label, index = bundle.test[0]
    assert image.shape == (3, 32, 32) and label in (0, 1) and index == 0
    # The backbone's normalisation (the trainer passes it), recorded for `shapkern explain`.
    half = load_dataset(f"imagefolder:{tmp_path}", img_size=32, patch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert half.preprocessing.mean == (0.5,) * 3 and half.preprocessing.std == (0.5,) * 3
    assert bundle.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))  # ImageNet's by default
    raw = image * torch.tensor(bundle.preprocessing.std)[:, None, None]
    raw = raw + torch.tensor(bundle.preprocessing.mean)[:, None, None]  # the same pixels in [0, 1]
    torch.testing.assert_close(half.test[0][0], (raw - 0.5) / 0.5, atol=1e-5, rtol=1e-5)


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="does not divide"):
        load_dataset("digits", img_size=32, patch_size=6)
    with pytest.raises(ValueError, match="not a directory"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")


def test_imagefolder_names_unreadable_files_or_skips_them(tmp_path, capsys):
    make_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = (tmp_path / "cat" / "0.png").read_bytes()
    (tmp_path / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(
        ValueError, match=r"2 of 12 files .* cannot be read as images: .*(broken|truncated)\.png"
    ):
        load_dataset(f"imagefolder:{tmp_path}", img_size=32, patch_size=8)
    bundle = load_dataset(f"imagefolder:{tmp_path}", img_size=32, patch_size=8, skip_bad_images=True)
    assert len(bundle.train) + len(bundle.test) == 10
    assert "skipped 2 unreadable file(s)" in capsys.readouterr().out
    for i in range(len(bundle.train)):
        assert bundle.train[i][0].shape == (3, 32, 32)  # every kept file decodes


def test_imagefolder_needs_two_classes(tmp_path):
    make_folder(tmp_path, classes=("only",))
    with pytest.raises(ValueError, match="1 class folder"):
        load_dataset(f"imagefolder:{tmp_path}", img_size=32, patch_size=8)


def test_preprocessing_scales_16_bit_images_by_their_depth():
    import numpy as np
    from PIL import Image

    from shapkern.data import Preprocessing, preprocess_image

    prep = Preprocessing(color="L", mean=(0.0,), std=(1.0,), channels=3)
    ramp = np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32)
    wide = Image.fromarray(ramp)  # a 16-bit greyscale image, as a 16-bit PNG opens
    x = preprocess_image(wide, prep, (32, 32))
    assert x.shape == (3, 32, 32) and float(x.max()) == pytest.approx(1.0) and float(x.min()) == 0.0
    assert float((x[0] >= 0.999).float().mean()) < 0.01  # not clipped at 255
    narrow = preprocess_image(Image.fromarray((ramp // 257).astype(np.uint8)), prep, (32, 32))
    torch.testing.assert_close(x, narrow, atol=1 / 255, rtol=0)


def test_preprocessing_matches_the_digits_training_images():
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from shapkern.data import Preprocessing, preprocess_image

    bundle = load_dataset("digits", img_size=8, patch_size=4)
    raw = load_digits().images[0] / 16.0
    image = Image.fromarray((raw * 255).round().astype(np.uint8))
    x = preprocess_image(image, bundle.preprocessing, (8, 8))
    mean, std = bundle.preprocessing.mean[0], bundle.preprocessing.std[0]
    torch.testing.assert_close(x[0], ((torch.tensor(raw) - mean) / std).float(), atol=1 / 255 / std, rtol=0)
    assert Preprocessing.from_dict(bundle.preprocessing.to_dict()) == bundle.preprocessing


def _samples(split) -> list[tuple[str, int]]:
    """(path, label) of every item of a bundle's split, in item order."""
    from torch.utils.data import Subset

    data = split.dataset  # the IndexedDataset's
    if isinstance(data, Subset):
        return [data.dataset.samples[i] for i in data.indices]
    return list(data.samples)


def _save_grey(path, pixels, bits: int) -> None:
    """A greyscale PNG of ``pixels`` (0-255) in 8 bits, or the same picture in 16 bits."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = pixels.astype(np.uint8) if bits == 8 else pixels.astype(np.uint16) * 257
    Image.fromarray(array).save(path)


def test_imagefolder_reads_every_file_once_whatever_its_symlinks(tmp_path):
    """Loops, second routes to a folder or file of the tree, and links out of the tree: each image
    file is one item, with the class of the folder it really lives in."""
    import os

    root, outside = tmp_path / "data", tmp_path / "outside"
    make_folder(root, count=10)
    make_folder(outside, classes=("extra",), count=2)
    (outside / "extra" / "0.png").rename(outside / "lone.png")
    (root / "cat" / "loop").symlink_to(root, target_is_directory=True)  # to the tree's root
    (root / "cat" / "self").symlink_to(root / "cat", target_is_directory=True)  # to its own folder
    (root / "dog" / "cats").symlink_to(root / "cat", target_is_directory=True)  # another class's folder
    (root / "cat" / "stolen.png").symlink_to(root / "dog" / "1.png")  # another class's file
    (root / "dog" / "again.png").symlink_to(root / "dog" / "0.png")  # a second name of a file
    (root / "cat" / "more").symlink_to(outside / "extra", target_is_directory=True)  # out of the tree
    (root / "dog" / "lone.png").symlink_to(outside / "lone.png")  # a file out of the tree
    bundle = load_dataset(f"imagefolder:{root}", img_size=32, patch_size=8)
    train, test = _samples(bundle.train), _samples(bundle.test)
    real = [os.path.realpath(path) for path, _ in train + test]
    assert len(real) == len(set(real)) == 10 + 1 + 10 + 1  # cat + extra/1.png, dog + lone.png
    owner = {"cat": 0, "extra": 0, "dog": 1, "outside": 1}  # the folder a file really lives in
    for (_, label), path in zip(train + test, real, strict=True):
        assert label == owner[os.path.basename(os.path.dirname(path))], path
    assert len(test) == 2 and not {p for p, _ in train} & {p for p, _ in test}


def test_imagefolder_split_folders_share_no_file_through_symlinks(tmp_path):
    import os

    make_folder(tmp_path / "train")
    make_folder(tmp_path / "val", count=2)
    (tmp_path / "val" / "cat" / "leak.png").symlink_to(tmp_path / "train" / "cat" / "0.png")
    (tmp_path / "val" / "dog" / "leak").symlink_to(tmp_path / "train" / "dog", target_is_directory=True)
    bundle = load_dataset(f"imagefolder:{tmp_path}", img_size=32, patch_size=8)
    train, test = ({os.path.realpath(p) for p, _ in _samples(split)} for split in (bundle.train, bundle.test))
    assert (len(train), len(test)) == (10, 4) and not train & test


def test_imagefolder_refuses_a_file_linked_from_two_classes(tmp_path):
    make_folder(tmp_path / "data")
    make_folder(tmp_path / "outside", classes=("x",), count=1)
    for cls in ("cat", "dog"):
        (tmp_path / "data" / cls / "shared.png").symlink_to(tmp_path / "outside" / "x" / "0.png")
    with pytest.raises(ValueError, match=r"0\.png is linked from .*cat.*shared\.png and .*dog.*shared\.png"):
        load_dataset(f"imagefolder:{tmp_path / 'data'}", img_size=32, patch_size=8)


def test_imagefolder_training_decodes_16_bit_pngs_like_explain(tmp_path):
    """The same pictures as 8-bit and 16-bit PNGs give the same training and test tensors: every
    file is decoded by bit depth (not clipped to 255 by an 8-bit conversion)."""
    import random

    import numpy as np

    rng = np.random.default_rng(0)
    pictures = {f"{c}/{i}.png": rng.integers(0, 256, (36, 44)) for c in ("a", "b") for i in range(3)}
    for bits in (8, 16):
        for name, pixels in pictures.items():
            _save_grey(tmp_path / str(bits) / name, pixels, bits)
    eight, sixteen = (
        load_dataset(f"imagefolder:{tmp_path / b}", img_size=32, patch_size=8) for b in "8 16".split()
    )
    for split in ("train", "test"):
        for i in range(len(getattr(eight, split))):
            views = []
            for bundle in (eight, sixteen):
                random.seed(i)  # timm's random crop draws from `random`, the flip from torch
                torch.manual_seed(i)
                views.append(getattr(bundle, split)[i][0])
            torch.testing.assert_close(views[1], views[0], atol=1e-5, rtol=0)
            assert float(views[1].std()) > 0.5  # the picture's contrast, not a white image


def test_imagefolder_training_augmentation_is_crop_and_flip_only(tmp_path):
    """One-colour images keep their exact colour through training's crops and flips (no colour jitter)."""
    from PIL import Image

    make_folder(tmp_path)
    bundle = load_dataset(f"imagefolder:{tmp_path}", img_size=32, patch_size=8)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (bundle.preprocessing.mean, bundle.preprocessing.std))
    torch.manual_seed(0)
    for i, (path, _) in enumerate(_samples(bundle.train)):
        colour = torch.tensor(Image.open(path).getpixel((0, 0)), dtype=torch.float32).view(3, 1, 1) / 255
        want = ((colour - mean) / std).expand(3, 32, 32)
        torch.testing.assert_close(bundle.train[i][0], want, atol=1e-5, rtol=0)


def test_imagefolder_test_view_is_timms_eval_transform(tmp_path):
    """The test split is preprocess_image with the recorded Preprocessing (what `shapkern explain`
    applies), and that is timm's eval transform (resize the shorter side to floor(size / 0.875),
    bilinear, centre crop) up to the rounding of PIL's 8-bit resize; on odd sizes too."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    from shapkern.data import open_image, preprocess_image

    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 3)):
        for c, cls in enumerate(("a", "b")):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                size = (45 + 2 * i + c, 37 + 4 * c)  # odd sizes, wide and tall
                pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    bundle = load_dataset(f"imagefolder:{tmp_path}", img_size=32, patch_size=8)
    prep = bundle.preprocessing
    timm_view = create_transform(
        input_size=32, is_training=False, crop_pct=0.875, mean=prep.mean, std=prep.std
    )
    for i, (path, _) in enumerate(_samples(bundle.test)):
        x = bundle.test[i][0]
        assert torch.equal(x, preprocess_image(open_image(path), prep, (32, 32)))
        level = 1 / 255 / min(prep.std)  # one 8-bit grey level, normalised
        assert float((x - timm_view(Image.open(path).convert("RGB"))).abs().max()) <= level + 1e-5


def test_imagefolder_names_images_over_pils_pixel_limit(tmp_path, monkeypatch):
    """A possible decompression bomb is an error naming the file and its pixel count (or skipped)."""
    from PIL import Image

    make_folder(tmp_path, size=20)  # 400 pixels each
    Image.new("RGB", (40, 30)).save(tmp_path / "cat" / "wide.png")  # over the limit: PIL only warns
    Image.new("RGB", (50, 50)).save(tmp_path / "dog" / "huge.png")  # over twice the limit: PIL raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError) as error:
        load_dataset(f"imagefolder:{tmp_path}", img_size=32, patch_size=8)
    for name, pixels in (("wide", "1,200"), ("huge", "2,500")):
        assert f"{name}.png has {pixels} pixels" in str(error.value)
    assert "MAX_IMAGE_PIXELS" in str(error.value) and "downscale" in str(error.value)
    bundle = load_dataset(f"imagefolder:{tmp_path}", img_size=32, patch_size=8, skip_bad_images=True)
    assert len(bundle.train) + len(bundle.test) == 10


def test_preprocessing_records_load_old_and_refuse_unknown_keys():
    from shapkern.data import Preprocessing

    old = {"color": "RGB", "mean": [0.5] * 3, "std": [0.25] * 3, "channels": 3, "crop_pct": 0.875}
    prep = Preprocessing.from_dict(old)  # written before the record had `interpolation`
    assert prep.interpolation == "bilinear" and prep.crop_pct == 0.875  # what imagefolder's test view used
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    with pytest.raises(ValueError, match=r"run/checkpoint\.pt: .*unknown key 'gamma'.*knows .*interpolation"):
        Preprocessing.from_dict({**old, "gamma": 2.2}, source="run/checkpoint.pt")
    with pytest.raises(ValueError, match=r"missing key 'std'"):
        Preprocessing.from_dict({k: v for k, v in old.items() if k != "std"})
    with pytest.raises(ValueError, match=r"interpolation must be one of .*bilinear.*got 'lanczos'"):
        Preprocessing.from_dict({**old, "interpolation": "lanczos"})
