"""The named datasets (shapkern.data.catalog) on tiny fake copies in each dataset's on-disk format.

Every fake is written as torchvision reads the real one; torchvision's md5 checks of the real files
are replaced by an existence check (as torchvision's own tests do), nothing is downloaded.
"""

import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from shapkern.data import CATALOG, DATASETS, load_dataset, preprocess_image
from shapkern.data.catalog import catalog_dataset

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def skip_md5_checks(monkeypatch) -> None:
    """Fake files cannot match the real files' md5 sums: check that they exist instead."""
    import torchvision.datasets.cifar
    import torchvision.datasets.flowers102
    import torchvision.datasets.stl10

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    for module in (torchvision.datasets.cifar, torchvision.datasets.flowers102, torchvision.datasets.stl10):
        monkeypatch.setattr(module, "check_integrity", exists)


@pytest.fixture(autouse=True)
def no_md5(monkeypatch):
    skip_md5_checks(monkeypatch)


def _pixels(seed: int, count: int, size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *size, 3), dtype=np.uint8)


def _save_jpegs(folder, names, images) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, image in zip(names, images, strict=True):
        Image.fromarray(image).save(os.path.join(folder, name), quality=95)


def fake_cifar10(root):
    """cifar-10-batches-py/: five pickled training batches, a test batch, batches.meta."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    train, test = _pixels(0, 10, (32, 32)), _pixels(1, 4, (32, 32))
    train_labels, test_labels = [i % 10 for i in range(10)], [3, 1, 4, 1]
    for i in range(5):  # CHW rows of 3072 bytes, as in the real files
        part = train[2 * i : 2 * i + 2].transpose(0, 3, 1, 2).reshape(2, -1)
        batch = {"data": part, "labels": train_labels[2 * i : 2 * i + 2]}
        with open(os.path.join(folder, f"data_batch_{i + 1}"), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({"data": test.transpose(0, 3, 1, 2).reshape(4, -1), "labels": test_labels}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return {
        "train": (train, train_labels),
        "test": (test, test_labels),
        "classes": [f"c{i}" for i in range(10)],
    }


def fake_cifar100(root):
    """cifar-100-python/: pickled train and test with fine labels, meta."""
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    train, test = _pixels(2, 6, (32, 32)), _pixels(3, 3, (32, 32))
    train_labels, test_labels = [0, 99, 5, 7, 5, 0], [99, 7, 0]
    for name, images, labels in (("train", train, train_labels), ("test", test, test_labels)):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(
                {"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), "fine_labels": labels}, f
            )
    classes = [f"f{i}" for i in range(100)]
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": classes}, f)
    return {"train": (train, train_labels), "test": (test, test_labels), "classes": classes}


def fake_stl10(root):
    """stl10_binary/: uint8 images 3x96x96 stored column-major, 1-based uint8 labels."""
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder)
    train, test = _pixels(4, 3, (96, 96)), _pixels(5, 2, (96, 96))
    train_labels, test_labels = [0, 9, 4], [2, 3]
    for split, images, labels in (("train", train, train_labels), ("test", test, test_labels)):
        images.transpose(0, 3, 2, 1).tofile(os.path.join(folder, f"{split}_X.bin"))  # (n, C, W, H)
        (np.array(labels, dtype=np.uint8) + 1).tofile(os.path.join(folder, f"{split}_y.bin"))
    open(os.path.join(folder, "unlabeled_X.bin"), "wb").close()
    return {"train": (train, train_labels), "test": (test, test_labels), "classes": None}


def fake_flowers102(root):
    """flowers-102/: jpg/image_%05d.jpg, imagelabels.mat (1-based labels), setid.mat (1-based ids)."""
    from scipy.io import savemat

    folder = os.path.join(root, "flowers-102")
    images = _pixels(6, 8, (40, 48))
    _save_jpegs(os.path.join(folder, "jpg"), [f"image_{i:05d}.jpg" for i in range(1, 9)], images)
    labels = np.array([1, 2, 102, 5, 1, 7, 3, 102])
    savemat(os.path.join(folder, "imagelabels.mat"), {"labels": labels})
    savemat(os.path.join(folder, "setid.mat"), {"trnid": [1, 2], "valid": [3, 4, 5], "tstid": [6, 7, 8]})
    files = [os.path.join(folder, "jpg", f"image_{i:05d}.jpg") for i in range(1, 9)]
    return {
        "train": (files[:5], list(labels[:5] - 1)),
        "test": (files[5:], list(labels[5:] - 1)),
        "classes": None,
    }


def fake_pets(root):
    """oxford-iiit-pet/: images/*.jpg and annotations/{trainval,test}.txt ("name class species breed")."""
    folder = os.path.join(root, "oxford-iiit-pet")
    names = ["Abyssinian_1", "basset_hound_1", "Abyssinian_2", "basset_hound_2", "yorkshire_terrier_1"]
    labels = [0, 1, 0, 1, 2]
    _save_jpegs(os.path.join(folder, "images"), [n + ".jpg" for n in names], _pixels(7, 5, (50, 40)))
    os.makedirs(os.path.join(folder, "annotations"))
    for split, rows in (("trainval", [0, 1, 4]), ("test", [2, 3])):
        with open(os.path.join(folder, "annotations", f"{split}.txt"), "w") as f:
            f.writelines(f"{names[i]} {labels[i] + 1} {1 + (i % 2)} 1\n" for i in rows)
    files = [os.path.join(folder, "images", n + ".jpg") for n in names]
    return {
        "train": ([files[i] for i in (0, 1, 4)], [0, 1, 2]),
        "test": ([files[2], files[3]], [0, 1]),
        "classes": ["Abyssinian", "Basset Hound", "Yorkshire Terrier"],
    }


def fake_imagenette(root):
    """imagenette2-320/{train,val}/<wnid>/*.JPEG."""
    folder = os.path.join(root, "imagenette2-320")
    wnids = ["n01440764", "n02102040", "n03000684"]
    out = {"classes": ["tench", "English springer", "chain saw"]}
    for split, count, seed in (("train", 2, 8), ("val", 1, 9)):
        files, labels = [], []
        for label, wnid in enumerate(wnids):
            names = [f"{wnid}_{i}.JPEG" for i in range(count)]
            _save_jpegs(os.path.join(folder, split, wnid), names, _pixels(seed + label, count, (36, 54)))
            files += [os.path.join(folder, split, wnid, n) for n in names]
            labels += [label] * count
        out["train" if split == "train" else "test"] = (files, labels)
    return out


FAKES = {
    "cifar10": fake_cifar10,
    "cifar100": fake_cifar100,
    "stl10": fake_stl10,
    "flowers102": fake_flowers102,
    "pets": fake_pets,
    "imagenette": fake_imagenette,
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "flowers102": 102, "pets": 3, "imagenette": 3}


def _as_pil(sample) -> Image.Image:
    return Image.open(sample).convert("RGB") if isinstance(sample, str) else Image.fromarray(sample)


def test_every_catalog_name_has_a_fake():
    assert set(FAKES) == set(CATALOG) and set(CATALOG) <= set(DATASETS)


@pytest.mark.parametrize("name", sorted(FAKES))
def test_loads_standard_splits_labels_and_test_view(name, tmp_path):
    truth = FAKES[name](str(tmp_path))
    bundle = load_dataset(
        name, img_size=32, patch_size=8, root=str(tmp_path), mean=(0.5,) * 3, std=(0.25,) * 3
    )
    assert bundle.name == name and bundle.in_chans == 3 and bundle.img_size == 32
    assert bundle.num_classes == NUM_CLASSES[name] == len(bundle.classes)
    if truth["classes"] is not None:
        assert bundle.classes == truth["classes"]
    prep = bundle.preprocessing
    assert (prep.color, prep.mean, prep.std) == ("RGB", (0.5,) * 3, (0.25,) * 3)
    assert prep.crop_pct == (None if CATALOG[name].low_res else 0.875)
    for split, data in (("train", bundle.train), ("test", bundle.test)):
        samples, labels = truth[split]
        assert len(data) == len(labels)
        assert [data[i][1] for i in range(len(data))] == [int(y) for y in labels]
        assert [data[i][2] for i in range(len(data))] == list(range(len(data)))
        image = data[0][0]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    # The test view is what `shapkern explain` makes of the same image file with the recorded record.
    samples, _ = truth["test"]
    for i in range(len(samples)):
        want = preprocess_image(_as_pil(samples[i]), prep, (32, 32), resize=True)
        assert torch.equal(bundle.test[i][0], want)


def test_low_res_test_view_is_the_normalised_pixels(tmp_path):
    """CIFAR at its own size: the test view is exactly (pixels / 255 - mean) / std."""
    truth = fake_cifar10(str(tmp_path))
    bundle = load_dataset("cifar10", img_size=32, patch_size=8, root=str(tmp_path))
    pixels = torch.from_numpy(truth["test"][0][2]).permute(2, 0, 1).float() / 255
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET)
    torch.testing.assert_close(bundle.test[2][0], (pixels - mean) / std)
    assert bundle.preprocessing.mean == IMAGENET[0]  # ImageNet's by default


def test_training_augmentation_is_crop_and_flip_only(tmp_path):
    """Random-resized crops and flips move no colour: a one-colour image stays that colour, while
    the views of a textured image differ from draw to draw."""
    folder = os.path.join(tmp_path, "cifar-10-batches-py")
    fake_cifar10(str(tmp_path))
    flat = np.full((10, 3, 32, 32), 200, dtype=np.uint8)
    flat[1:] = np.random.default_rng(0).integers(0, 256, (9, 3, 32, 32))
    for i in range(5):
        with open(os.path.join(folder, f"data_batch_{i + 1}"), "wb") as f:
            pickle.dump({"data": flat[2 * i : 2 * i + 2].reshape(2, -1), "labels": [0, 1]}, f)
    bundle = load_dataset("cifar10", img_size=64, patch_size=16, root=str(tmp_path))
    torch.manual_seed(0)
    plain = bundle.train[0][0]
    assert plain.shape == (3, 64, 64)
    want = (200 / 255 - torch.tensor(IMAGENET[0])) / torch.tensor(IMAGENET[1])
    torch.testing.assert_close(plain, want.view(3, 1, 1).expand(3, 64, 64), atol=1e-5, rtol=0)
    views = [bundle.train[1][0] for _ in range(4)]
    assert not all(torch.equal(views[0], v) for v in views[1:])


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(
        ValueError, match=r"cifar10: not found in .*--download.*--data-root.*cifar-10-batches-py"
    ):
        load_dataset("cifar10", root=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"imagenette: not found in .*imagenette2-320"):
        load_dataset("imagenette", root=str(tmp_path / "empty"))


def test_download_uses_existing_files_and_reports_failures(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    fake_cifar10(str(tmp_path))  # present: download=True must not fetch anything
    bundle = catalog_dataset("cifar10", 32, root=str(tmp_path), download=True)
    assert len(bundle.train) == 10
    with pytest.raises(ValueError, match=r"cifar10: downloading into .*new.* failed: .*no network"):
        catalog_dataset("cifar10", 32, root=str(tmp_path / "new"), download=True)


def test_data_root_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    fake_cifar10(str(tmp_path / "data"))
    assert len(load_dataset("cifar10", root="~/data").test) == 4


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*cifar10"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="both mean and std"):
        catalog_dataset("cifar10", 32, root=str(tmp_path), mean=(0.5,) * 3)
    with pytest.raises(ValueError, match="3 values"):
        catalog_dataset("cifar10", 32, root=str(tmp_path), mean=(0.5,), std=(0.5,))
