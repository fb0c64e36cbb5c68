"""``shapkern explain --texts``: Shapley values of the patches of images for an image-text model's
similarity with each given text, a heatmap per text side by side.

    shapkern explain --checkpoint runs/captions/checkpoint.pt --data captions --num-images 4 \\
        --texts "red circle" "blue square" --out expl/
    shapkern explain --model open_clip:ViT-B-32:openai --pretrained --images dog.jpg \\
        --texts "a photo of a dog" "a photo of a cat" --out expl/

The model is a ``shapkern train --task image-text`` checkpoint (its own Φ, one forward pass), an
open_clip model or a Hugging Face CLIPModel/SiglipModel folder with its tokenizer (an estimator on
its image-text game). Outputs: a PNG per image (``heatmap_NNN.png``) with each text's heatmap on one
shared scale, titled by the text and its similarity, and ``explanations.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import cast

import torch

from shapkern.cli.explain_inputs import Inputs, read_inputs
from shapkern.cli.explain_outputs import heatmap_name, remove_earlier_outputs, run_record, write_record
from shapkern.data import CAPTION_DATASETS, CaptionedImages, Preprocessing, load_caption_dataset
from shapkern.engine import dual_encoder, patch_grid
from shapkern.explainers import NamedModel, explain, save_text_heatmaps
from shapkern.games import SelfExplainingImageText, image_text_game
from shapkern.models import ShapleyCLIP

__all__ = ["check_text_model", "explain_texts_to_dir", "text_inputs"]


def check_text_model(args: argparse.Namespace, named: NamedModel) -> None:
    """Raise ValueError where ``--texts`` and the model do not go together: texts for a model without
    a text tower, an image-text checkpoint without texts, strings for a model without a tokenizer."""
    if args.texts is None:
        if isinstance(named.model, SelfExplainingImageText):
            raise ValueError(
                f"{named.name} is an image-text model: it explains its similarity with texts, "
                '--texts "TEXT" ... (a heatmap per text)'
            )
        return
    if named.image_text is None:
        raise ValueError(
            f"--texts needs an image-text model (a `shapkern train --task image-text` checkpoint, "
            f"open_clip:ARCH or an hf: CLIPModel/SiglipModel folder); {named.name} has no text tower"
        )
    dual = dual_encoder(named.image_text)  # None for a self-explaining model: it tokenizes itself
    if dual is not None and dual.tokenize is None and named.tokenizer is None:
        fix = (
            "save the model's tokenizer in its folder (tokenizer.save_pretrained(folder))"
            if named.name.startswith("hf:")
            else "its vocabulary is not open_clip's default one; explain it in Python with "
            "shapkern.explain(model, images, texts=..., tokenizer=...)"
        )
        raise ValueError(f"{named.name} has no tokenizer to read --texts with: {fix}")
    if args.target != "pred":
        raise ValueError(f"--target {args.target} picks classes; with --texts every text is explained")
    if any(not text.strip() for text in args.texts):
        raise ValueError(f"--texts must not be empty strings, got {args.texts}")


def _unknown_words(named: NamedModel, texts: list[str]) -> list[str]:
    """The words of ``texts`` outside a self-explaining model's vocabulary (read as ``<unk>``)."""
    if not isinstance(named.image_text, ShapleyCLIP):
        return []  # open_clip's and Hugging Face's tokenizers split unknown words into known pieces
    tokenizer = named.image_text.tokenizer
    return sorted({word for text in texts for word in tokenizer.words(text)} - set(tokenizer.vocab))


def text_inputs(args: argparse.Namespace, named: NamedModel, grid: tuple[int, int]) -> Inputs:
    """The images of ``--images`` or ``--data``: a caption set's first ``--num-images`` test images
    (in the checkpoint's normalisation, else the set's own), or any other dataset's."""
    if args.data not in CAPTION_DATASETS:
        return read_inputs(args, named, grid)
    if args.num_images < 1:
        raise ValueError(f"--num-images must be positive, got {args.num_images}")
    prep = cast(Preprocessing, named.preprocessing)
    bundle = load_caption_dataset(
        args.data, img_size=named.input_size[0], root=args.data_root, mean=prep.mean, std=prep.std
    )
    test = cast(CaptionedImages, bundle.test)
    count = min(args.num_images, test.num_images)
    images = torch.stack([test.images[j] for j in range(count)])
    sources = [f"{args.data}:test[{j}]" for j in range(count)]
    return Inputs(images, [None] * count, None, sources, None)


def explain_texts_to_dir(
    args: argparse.Namespace, named: NamedModel, out: Path, device: torch.device
) -> dict:
    """Explain each image's similarity with each of ``args.texts``, write a heatmap PNG per image and
    explanations.json into ``out`` (checked by :func:`~shapkern.cli.explain_outputs.output_folder`);
    returns the JSON record."""
    model, texts = cast(torch.nn.Module, named.image_text), list(args.texts)
    unknown = _unknown_words(named, texts)
    if unknown:
        print(f"note: words outside {named.name}'s vocabulary, read as <unk>: {', '.join(unknown)}")
    channels = cast(Preprocessing, named.preprocessing).channels
    blank = torch.zeros(1, channels, *named.input_size, device=device)  # N, and the texts read, up front
    players = image_text_game(model, blank, texts, tokenizer=named.tokenizer).players
    grid = patch_grid(named.model, players)
    inputs = text_inputs(args, named, grid)
    images = inputs.images.to(device)
    att = explain(
        model,
        images,
        texts=texts,
        tokenizer=named.tokenizer,
        method=args.method,
        budget=args.budget,
        target="all",
        tol=args.tol,
        coalitions_per_call=args.coalitions_per_call,
        seed=args.seed,
        progress=args.progress,
    )
    remove_earlier_outputs(out)  # refused before unless --overwrite
    paths = [out / heatmap_name(b) for b in range(images.shape[0])]
    save_text_heatmaps(images.cpu(), att, texts, paths, grid=grid)
    result = {
        **run_record(named.name, att, att.method, args.budget, device, players, grid),
        "texts": texts,
        "values_layout": "values[image] is N x K: patch n (row-major on the grid), text k",
        "images": [_record(inputs.sources[b], att, b, texts, paths[b].name) for b in range(len(paths))],
    }
    write_record(out, result)
    print(
        f"shapkern explain: {len(paths)} image(s) x {len(texts)} text(s), method {att.method}, "
        f"{att.evaluations} evaluations/image, {att.seconds:.2f} s -> {out}"
    )
    return result


def _record(source: str, att, b: int, texts: list[str], heatmap: str) -> dict:
    """One image's entry of explanations.json: similarities, base values and Shapley values per text."""
    full = att.full[b]
    return {
        "source": source,
        "best_text": texts[int(full.argmax())],
        "similarity": full.tolist(),
        "base": att.base[b].tolist(),
        "values": att.values[b].tolist(),
        "std_error": None if att.std_error is None else att.std_error[b].tolist(),
        "heatmap": heatmap,
    }
