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
