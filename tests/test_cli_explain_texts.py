"""``shapkern explain --texts`` (cli/explain_texts.py): a heatmap per text of an image-text model's
similarity, for a self-explaining checkpoint (its own Φ), an open_clip model and a Hugging Face CLIPModel
folder (random weights from small configs, nothing downloaded); the values are the model's own."""

import json
import re

import matplotlib.image
import numpy as np
import pytest
import torch

from shapkern.cli import main
from shapkern.explainers import load_model

TEXTS = ["red circle", "blue square left of green cross"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A ShapleyCLIP trained for one short epoch on the built-in captions (16 px, 4 px patches: N = 16)."""
    out = tmp_path_factory.mktemp("captions")
    argv = (
        "train --task image-text --epochs 1 --img-size 16 --patch-size 4 --depth 1 --embed-dim 32 "
        "--num-heads 2 --joint-dim 16 --batch-size 16 --num-coalitions 4 --limit-train 12 --limit-test 8 "
        "--faith-images 0 --heatmap-images 0 --no-progress"
    ).split()
    assert main([*argv, "--out", str(out)]) == 0
    return out / "checkpoint.pt"


def explain_texts(argv, capsys):
    assert main(["explain", *map(str, argv), "--no-progress"]) == 0
    return capsys.readouterr().out


def read(out):
    return json.loads((out / "explanations.json").read_text())


def test_a_self_explaining_checkpoint_draws_its_own_phi_per_text(checkpoint, tmp_path, capsys):
    from shapkern.data import load_caption_dataset

    out = tmp_path / "expl"
    log = explain_texts(["--checkpoint", checkpoint, "--data", "captions", "--num-images", 3,
                         "--texts", *TEXTS, "zebra", "--out", out], capsys)  # fmt: skip
    assert "3 image(s) x 3 text(s), method self, 1 evaluations/image" in log
    assert "outside checkpoint:" in log and "read as <unk>: zebra" in log
    result = read(out)
    assert result["texts"] == [*TEXTS, "zebra"] and result["num_players"] == 16 and result["grid"] == [4, 4]
    # The values are the model's own: exp(τ)⟨Φ(x)_n, e_t⟩/‖f(x)‖, the similarity their sum.
    model = load_model(checkpoint=checkpoint).model
    images = load_caption_dataset("captions", img_size=16).test.images[:3]
    with torch.no_grad():
        own = model(images, [*TEXTS, "zebra"])
        want = own.scale * own.phi @ own.text.T / own.norm.unsqueeze(-1)  # (B, N, K)
    for b, image in enumerate(result["images"]):
        np.testing.assert_allclose(image["values"], want[b].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.sum(image["values"], 0), image["similarity"], rtol=1e-5, atol=1e-5)
        assert image["best_text"] == result["texts"][int(np.argmax(image["similarity"]))]
        assert image["source"] == f"captions:test[{b}]"
        assert matplotlib.image.imread(out / image["heatmap"]).shape[1] > 300  # three panels side by side
    # An estimator on the same game: exact values over all 2^16 coalitions, efficient to the similarity.
    explain_texts(["--checkpoint", checkpoint, "--data", "captions", "--num-images", 1, "--texts", *TEXTS,
                   "--method", "exact", "--out", tmp_path / "exact"], capsys)  # fmt: skip
    exact = read(tmp_path / "exact")["images"][0]
    assert read(tmp_path / "exact")["evaluations_per_image"] == 2**16
    np.testing.assert_allclose(exact["similarity"], result["images"][0]["similarity"][:2], rtol=1e-5)
    np.testing.assert_allclose(
        np.sum(exact["values"], 0) + exact["base"], exact["similarity"], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "captions", "--num-images", 1], r"is an image-text model: .* --texts"),
        (["--data", "captions", "--texts", "a"], "--texts writes pictures"),
        (["--data", "captions", "--num-images", 1, "--texts", "a", "--target", 0], "with --texts every text"),
        (["--data", "captions", "--num-images", 1, "--texts", " "], "must not be empty strings"),
        (["--data", "captions", "--num-images", 0, "--texts", "a"], "--num-images must be positive"),
    ],
)
def test_bad_text_requests_fail_with_a_clear_message(checkpoint, tmp_path, capsys, extra, message):
    import re

    argv = ["explain", "--checkpoint", str(checkpoint), *map(str, extra), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_texts_for_a_model_without_a_text_tower_are_refused(tmp_path, capsys):
    argv = ["explain", "--model", "test_vit", "--data", "evidence", "--num-images", "1", "--texts", "a dog"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "--texts needs an image-text model" in capsys.readouterr().err


def photo(tmp_path, size=32):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    return tmp_path / "photo.png"


def test_an_open_clip_model_explains_its_own_logits(tmp_path, capsys):
    open_clip = pytest.importorskip("open_clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 12, "width": 16, "heads": 2, "layers": 1},  # open_clip's vocabulary
    }
    (tmp_path / "shapkern-text-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "shapkern-text-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("shapkern-text-clip").eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    texts = ["a photo of a dog", "a cat"]
    explain_texts(["--model", "open_clip:shapkern-text-clip", "--weights", tmp_path / "w.pt",
                   "--images", photo(tmp_path), "--texts", *texts, "--method", "exact",
                   "--out", tmp_path / "o"], capsys)  # fmt: skip
    image = read(tmp_path / "o")["images"][0]
    assert np.array(image["values"]).shape == (16, 2)
    named = load_model("open_clip:shapkern-text-clip", weights=tmp_path / "w.pt")
    from shapkern.cli.explain_inputs import load_images

    x = load_images([str(photo(tmp_path))], named.preprocessing, named.input_size, resize=False)
    with torch.no_grad():
        logits = model.get_logits(x, open_clip.tokenize(texts, context_length=12))[0][0]
    np.testing.assert_allclose(image["similarity"], logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.sum(image["values"], 0) + image["base"], image["similarity"], atol=1e-3)
    # A vocabulary of its own: open_clip's tokenizer does not fit it, and --texts says so.
    config["text_cfg"]["vocab_size"] = 64
    (tmp_path / "shapkern-small-vocab.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "shapkern-small-vocab.json")
    argv = ["explain", "--model", "open_clip:shapkern-small-vocab", "--images", str(photo(tmp_path))]
    assert main([*argv, "--texts", "a cat", "--out", str(tmp_path / "v")]) == 2
    assert (
        "has no tokenizer to read --texts with: its vocabulary is not open_clip's" in capsys.readouterr().err
    )


def hf_clip_folder(folder, transformers, *, tokenizer: bool):
    """A random-weight CLIPModel with its image processor and (optionally) a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.CLIPConfig(
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 64},
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 16,
                     "intermediate_size": 64, "max_position_embeddings": 8, "bos_token_id": 1,
                     "eos_token_id": 2, "pad_token_id": 0},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(folder)
    if tokenizer:
        vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", "a", "photo", "of", "dog", "cat"])}
        words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(
            tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]", model_max_length=8
        ).save_pretrained(folder)
    return model


def test_a_hugging_face_clip_folder_explains_with_its_tokenizer(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    hf_clip_folder(tmp_path / "bare", transformers, tokenizer=False)
    argv = ["--images", photo(tmp_path), "--texts", "a dog", "--method", "kernel", "--budget", 64]
    assert (
        main(["explain", "--model", f"hf:{tmp_path / 'bare'}", *map(str, argv), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "has no tokenizer to read --texts with" in capsys.readouterr().err
    # Tokenizer files it cannot read (SigLIP's sentencepiece model, without the package or broken): the
    # model still loads (the tokenizer loads at its first use), and --texts names the problem.
    hf_clip_folder(tmp_path / "broken", transformers, tokenizer=False)
    (tmp_path / "broken" / "tokenizer_config.json").write_text('{"tokenizer_class": "SiglipTokenizer"}')
    (tmp_path / "broken" / "spiece.model").write_bytes(b"not a sentencepiece model")
    assert load_model(f"hf:{tmp_path / 'broken'}").tokenizer is not None
    assert (
        main(
            ["explain", "--model", f"hf:{tmp_path / 'broken'}", *map(str, argv), "--out", str(tmp_path / "b")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert re.search(r"hf:.*broken: (its tokenizer needs the package|cannot load its tokenizer)", err), err
    model = hf_clip_folder(tmp_path / "clip", transformers, tokenizer=True)
    texts = ["a photo of a dog", "a cat"]
    explain_texts(["--model", f"hf:{tmp_path / 'clip'}", "--images", photo(tmp_path), "--texts", *texts,
                   "--method", "kernel", "--budget", 64, "--out", tmp_path / "k"], capsys)  # fmt: skip
    result = read(tmp_path / "k")
    image = result["images"][0]
    assert result["method"] == "kernel" and np.array(image["values"]).shape == (16, 2)
    named = load_model(f"hf:{tmp_path / 'clip'}")
    ids = named.tokenizer(texts)
    assert ids.shape == (2, 8)  # padded to the tokenizer's length
    from shapkern.cli.explain_inputs import load_images

    x = load_images([str(photo(tmp_path))], named.preprocessing, named.input_size, resize=False)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=x).logits_per_image[0]
    np.testing.assert_allclose(image["similarity"], logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.sum(image["values"], 0) + image["base"], image["similarity"], atol=1e-3)
