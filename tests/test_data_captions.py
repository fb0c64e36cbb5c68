"""Captioned images (data/captions.py, data/caption_sets.py): the built-in procedural set, its captions
and masks, the word tokeniser, and COCO Captions and Flickr30k read from tiny fake folders."""

import json

import pytest
import torch
from PIL import Image

from shapkern.data import CaptionedImages, load_caption_dataset, make_captions
from shapkern.data.captions import COLOURS, _captions_of, _shape_masks
from shapkern.models import PAD, UNK, WordTokenizer


def test_a_hand_checked_image_has_its_captions_and_masks():
    """Three objects in cells (row, col) (0, 1), (2, 0), (3, 3): the captions name them, the relation
    between the drawn pair and the full caption in reading order with quadrants."""
    objects = [("red", "circle", (3, 3)), ("blue", "square", (0, 1)), ("green", "cross", (2, 0))]
    gen = torch.Generator().manual_seed(0)
    pair = torch.randperm(3, generator=torch.Generator().manual_seed(0))[:2].tolist()
    out = _captions_of(objects, gen)
    assert out[:3] == [("red circle", [0], False), ("blue square", [1], False), ("green cross", [2], False)]
    relation = {(0, 1): "right of", (1, 0): "left of", (0, 2): "right of", (2, 0): "left of"}
    relation |= {(1, 2): "right of", (2, 1): "left of"}
    a, b = pair
    names = ["red circle", "blue square", "green cross"]
    assert out[3] == (f"{names[a]} {relation[(a, b)]} {names[b]}", [a, b], False)
    assert out[4] == (
        "blue square top left and green cross bottom left and red circle bottom right",
        [1, 2, 0],
        True,
    )


def test_above_and_below_when_the_columns_agree():
    objects = [("red", "circle", (0, 2)), ("blue", "square", (3, 2))]
    texts = {text for text, _, _ in _captions_of(objects, torch.Generator().manual_seed(0))}
    assert texts & {"red circle above blue square", "blue square below red circle"}


def test_generated_images_hold_the_named_objects_where_the_masks_say():
    data, counts = make_captions(20, seed=3, noise=0.0)
    shapes = _shape_masks(6)
    assert data.num_images == 20 and counts.min() >= 2 and counts.max() <= 3
    for index in range(len(data)):
        if data.retrieval[index] or len(data.texts[index].split()) != 2:
            continue  # single-object captions: "<colour> <shape>"
        colour, shape = data.texts[index].split()
        ((row, col),) = data.cell_masks[index].nonzero().tolist()
        cell = data.images[int(data.caption_image[index]), :, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8]
        painted = (cell - torch.tensor(COLOURS[colour]).view(3, 1, 1)).abs().amax(0) < 1e-6
        assert painted.sum() == shapes[["square", "circle", "triangle", "cross"].index(shape)].sum()
    assert (data.tokens > 0).sum(1).min() >= 2


def test_generation_is_deterministic_and_the_seed_changes_it():
    a, _ = make_captions(8, seed=1)
    b, _ = make_captions(8, seed=1)
    c, _ = make_captions(8, seed=2)
    assert torch.equal(a.images, b.images) and a.texts == b.texts
    assert not torch.equal(a.images, c.images)


def test_first_keeps_the_first_images_and_their_captions():
    data, _ = make_captions(10, seed=0)
    part = data.first(3)
    assert part.num_images == 3 and set(part.caption_image.tolist()) == {0, 1, 2}
    keep = data.caption_image < 3
    assert torch.equal(part.tokens, data.tokens[keep]) and part.texts == [
        t for t, k in zip(data.texts, keep, strict=True) if k
    ]
    image, tokens, index = part[len(part) - 1]
    assert torch.equal(image, data.images[2]) and index == len(part) - 1


def test_patch_masks_on_finer_and_coarser_grids():
    data, _ = make_captions(4, seed=0)
    cells = data.cell_masks.flatten(1).float()
    assert torch.equal(data.patch_masks((4, 4)), cells)
    fine = data.patch_masks((8, 8)).view(-1, 8, 8)
    assert torch.equal(fine[:, ::2, ::2], data.cell_masks.float())
    coarse = data.patch_masks((2, 2))
    assert torch.allclose(coarse.sum(1) * 4, cells.sum(1))


def test_tokenizer_pads_marks_unknown_words_and_refuses_empty_text():
    tok = WordTokenizer([PAD, UNK, "red", "circle"], 4)
    assert tok(["Red circle!", "red dog red circle red"]).tolist() == [[2, 3, 0, 0], [2, 1, 2, 3]]
    with pytest.raises(ValueError, match="no words"):
        tok(["..."])
    with pytest.raises(ValueError, match="starts with"):
        WordTokenizer(["red"], 4)
    built = WordTokenizer.from_captions(["a dog", "a cat", "a dog"], 8)
    assert built.vocab == [PAD, UNK, "a", "dog"]


def test_unknown_caption_set_names_the_choices():
    with pytest.raises(ValueError, match="coco-captions"):
        load_caption_dataset("digits")


def _image(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


def test_coco_captions_from_a_fake_folder(tmp_path):
    for split, ids in (("train2017", [3, 1]), ("val2017", [7])):
        images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
        notes = [{"image_id": i, "caption": f"A dog number {i} ."} for i in ids] + [
            {"image_id": ids[0], "caption": "a dog on grass"}
        ]
        for i in ids:
            _image(tmp_path / "coco" / split / f"{i:012d}.jpg", (10 * i, 0, 0))
        path = tmp_path / "coco" / "annotations" / f"captions_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": images, "annotations": notes}))
    bundle = load_caption_dataset("coco-captions", img_size=16, root=str(tmp_path))
    train = bundle.train
    assert isinstance(train, CaptionedImages) and train.num_images == 2 and len(train) == 3
    assert train.texts == ["A dog number 1 .", "A dog number 3 .", "a dog on grass"]  # images by id
    assert train.caption_image.tolist() == [0, 1, 1] and bool(train.retrieval.all())
    assert bundle.tokenizer.vocab == [PAD, UNK, "a", "dog", "number"]  # words seen twice or more
    image, tokens, _ = train[2]
    assert image.shape == (3, 16, 16) and tokens[:2].tolist() == [2, 3]
    assert bundle.test.num_images == 1 and bundle.describe()["vocab"] == bundle.tokenizer.vocab
    with pytest.raises(ValueError, match="not found"):
        load_caption_dataset("coco-captions", root=str(tmp_path / "nowhere"))


def test_flickr30k_from_a_fake_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("shapkern.data.caption_sets.FLICKR_TEST_IMAGES", 1)
    lines = []
    for k, name in enumerate(["10.jpg", "20.jpg", "30.jpg"]):
        _image(tmp_path / "flickr30k" / "flickr30k-images" / name, (0, 50 * k, 0))
        lines += [f"{name}#0\ta man riding a bike", f"{name}#1\ta person outside number {k}"]
    (tmp_path / "flickr30k" / "results_20130124.token").write_text("\n".join(lines) + "\n")
    bundle = load_caption_dataset("flickr30k", img_size=16, root=str(tmp_path))
    assert bundle.train.num_images == 2 and bundle.test.num_images == 1 and len(bundle.test) == 2
    assert bundle.test.texts == ["a man riding a bike", "a person outside number 2"]
    assert bundle.test[0][0].shape == (3, 16, 16)
