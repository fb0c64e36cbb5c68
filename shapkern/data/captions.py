"""Captioned images for image-text matching: the word tokeniser, the dataset container, and the
built-in procedural set ``captions`` (nothing to download).

``captions``: 32 px images (by default) on a 4×4 grid of cells. Each image holds 2 or 3 objects, each
a shape (square, circle, triangle, cross) in a colour (6) inside its own cell, on a noisy grey
background. Each image has several captions, each naming one or more of its objects, and the mask of
the cells each caption refers to:

- one per object, ``"red circle"``;
- one relation between two objects, ``"red circle left of blue square"`` (``left of``/``right of``
  when their columns differ, else ``above``/``below``);
- one naming every object with its quadrant, ``"red circle top left and blue square bottom right"``:
  the retrieval caption, which tells the images apart.

Items are one per caption: ``(image (C, H, W), caption tokens (L,) int64, caption index)``, so a
training epoch sees every caption once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from shapkern.data.datasets import DataBundle
from shapkern.data.preprocess import Preprocessing
from shapkern.models import PAD, UNK, WordTokenizer

__all__ = [
    "CAPTION_GRID",
    "CaptionBundle",
    "CaptionedImages",
    "captions",
    "make_captions",
]

CAPTION_GRID = 4
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.1),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.9, 0.1, 0.9),
    "cyan": (0.1, 0.9, 0.9),
}
SHAPES = ("square", "circle", "triangle", "cross")
WORDS = (*COLOURS, *SHAPES, "left", "right", "top", "bottom", "of", "above", "below", "and")
CONTEXT_LENGTH = 16  # the longest caption: 3 objects with quadrants, 14 words


class CaptionedImages(Dataset):
    """Images and their captions, one item per caption: (image (C, H, W), tokens (L,), index).

    Attributes:
        images: (n, C, H, W), or any sequence of (C, H, W) images (loaded on access).
        tokens: (P, L) int64 caption tokens. caption_image: (P,) int64 image of each caption.
        retrieval: (P,) bool, the captions retrieval is scored on.
        cell_masks: (P, g, g) bool cells each caption refers to, or None (no ground truth).
        texts: the P captions as text.
    """

    def __init__(self, images, tokens, caption_image, retrieval, texts, cell_masks=None):
        if not tokens.shape[0] == caption_image.shape[0] == retrieval.shape[0] == len(texts):
            raise ValueError("tokens, caption_image, retrieval and texts must hold one entry per caption")
        self.images, self.tokens, self.caption_image = images, tokens, caption_image
        self.retrieval, self.texts, self.cell_masks = retrieval, list(texts), cell_masks

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int):
        return self.images[int(self.caption_image[index])], self.tokens[index], index

    @property
    def num_images(self) -> int:
        return len(self.images)

    def first(self, count: int | None) -> CaptionedImages:
        """The first ``count`` images with their captions (all when None)."""
        if count is None or count >= self.num_images:
            return self
        keep = self.caption_image < count
        index = keep.nonzero()[:, 0].tolist()
        masks = None if self.cell_masks is None else self.cell_masks[keep]
        return CaptionedImages(
            self.images[:count],
            self.tokens[keep],
            self.caption_image[keep],
            self.retrieval[keep],
            [self.texts[i] for i in index],
            masks,
        )

    def patch_masks(self, grid: tuple[int, int]) -> torch.Tensor:
        """Each caption's cells on a model's patch grid: (P, gh * gw) float, the fraction of each
        patch's area inside them. ValueError when the set has no masks."""
        if self.cell_masks is None:
            raise ValueError("this caption set has no masks of what its captions refer to")
        cells = self.cell_masks.float().unsqueeze(1)
        fine = F.interpolate(cells, scale_factor=grid, mode="nearest")  # a multiple of both grids
        return F.adaptive_avg_pool2d(fine, grid).flatten(1)


@dataclass
class CaptionBundle(DataBundle):
    """A DataBundle of captioned images: ``train`` and ``test`` are :class:`CaptionedImages`, the
    captions tokenised by ``tokenizer`` (whose vocabulary a checkpoint records). No classes."""

    tokenizer: WordTokenizer

    def describe(self) -> dict:
        return {**super().describe(), "vocab": self.tokenizer.vocab}


def _shape_masks(size: int) -> torch.Tensor:
    """The four shapes as bool (4, size, size) masks, in SHAPES order."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    r, c = y / size - 0.5, x / size - 0.5
    square = torch.ones(size, size, dtype=torch.bool)
    circle = r.square() + c.square() <= 0.25
    triangle = (c.abs() <= (r + 0.5) / 2) & (r > -0.5)
    cross = (r.abs() <= 1 / 6) | (c.abs() <= 1 / 6)
    return torch.stack([square, circle, triangle, cross])


def _relation(a: tuple[int, int], b: tuple[int, int]) -> str:
    """Where cell a lies relative to cell b: left of / right of where the columns differ, else above/below."""
    if a[1] != b[1]:
        return "left of" if a[1] < b[1] else "right of"
    return "above" if a[0] < b[0] else "below"


def _quadrant(cell: tuple[int, int]) -> str:
    half = CAPTION_GRID // 2
    return f"{'top' if cell[0] < half else 'bottom'} {'left' if cell[1] < half else 'right'}"


def _captions_of(objects: list[tuple[str, str, tuple[int, int]]], gen: torch.Generator):
    """The captions of one image's objects [(colour, shape, cell)]: [(text, object indices, retrieval)]."""
    names = [f"{colour} {shape}" for colour, shape, _ in objects]
    out = [(name, [i], False) for i, name in enumerate(names)]
    a, b = torch.randperm(len(objects), generator=gen)[:2].tolist()
    out.append((f"{names[a]} {_relation(objects[a][2], objects[b][2])} {names[b]}", [a, b], False))
    order = sorted(range(len(objects)), key=lambda i: objects[i][2])  # reading order
    full = " and ".join(f"{names[i]} {_quadrant(objects[i][2])}" for i in order)
    out.append((full, order, True))
    return out


def _draw(image: torch.Tensor, cell: tuple[int, int], mask: torch.Tensor, colour, gen, cell_px: int):
    """Paint ``mask`` (s, s) in ``colour`` at a random offset inside ``cell`` of ``image`` (3, S, S)."""
    size = mask.shape[0]
    dy, dx = torch.randint(0, cell_px - size + 1, (2,), generator=gen).tolist()
    top, left = cell[0] * cell_px + dy, cell[1] * cell_px + dx
    patch = image[:, top : top + size, left : left + size]
    patch[:, mask] = torch.tensor(colour).view(3, 1)


def make_captions(
    num: int, *, img_size: int = 32, noise: float = 0.05, seed: int = 0
) -> tuple[CaptionedImages, torch.Tensor]:
    """Generate ``num`` captioned images (deterministic in ``seed``): the CaptionedImages (pixels in
    [0, 1], before normalisation) and each image's object count (num,)."""
    if img_size % CAPTION_GRID or img_size < 4 * CAPTION_GRID:
        raise ValueError(
            f"caption images need an img_size divisible by {CAPTION_GRID}, at least 16; got {img_size}"
        )
    cell_px = img_size // CAPTION_GRID
    shapes = _shape_masks(cell_px - max(1, cell_px // 4))
    gen = torch.Generator().manual_seed(seed)
    images = torch.full((num, 3, img_size, img_size), 0.35)
    kinds = [(c, s) for c in COLOURS for s in range(len(SHAPES))]
    texts, owners, flags, masks, counts = [], [], [], [], []
    for j in range(num):
        count = 2 + int(torch.randint(0, 2, (), generator=gen))
        cells = torch.randperm(CAPTION_GRID**2, generator=gen)[:count].tolist()
        picks = torch.randperm(len(kinds), generator=gen)[:count].tolist()
        objects = []
        for cell_index, pick in zip(cells, picks, strict=True):
            colour, shape = kinds[pick]
            cell = divmod(cell_index, CAPTION_GRID)
            _draw(images[j], cell, shapes[shape], COLOURS[colour], gen, cell_px)
            objects.append((colour, SHAPES[shape], cell))
        for text, named, retrieval in _captions_of(objects, gen):
            mask = torch.zeros(CAPTION_GRID, CAPTION_GRID, dtype=torch.bool)
            for i in named:
                mask[objects[i][2]] = True
            texts.append(text)
            owners.append(j)
            flags.append(retrieval)
            masks.append(mask)
        counts.append(count)
    images += noise * torch.randn(images.shape, generator=gen)
    tokens = WordTokenizer([PAD, UNK, *WORDS], CONTEXT_LENGTH)(texts)
    data = CaptionedImages(
        images.clamp(0, 1), tokens, torch.tensor(owners), torch.tensor(flags), texts, torch.stack(masks)
    )
    return data, torch.tensor(counts)


def captions(
    img_size: int = 32, *, num_train: int = 2000, num_test: int = 500, seed: int = 0
) -> CaptionBundle:
    """The built-in captioned set: train and test images from different seeds, standardised to ±1."""
    train, _ = make_captions(num_train, img_size=img_size, seed=2 * seed + 1)
    test, _ = make_captions(num_test, img_size=img_size, seed=2 * seed + 2)
    for split in (train, test):
        split.images = (split.images - 0.5) / 0.5
    return CaptionBundle(
        name="captions",
        train=train,
        test=test,
        num_classes=0,
        in_chans=3,
        img_size=img_size,
        classes=[],
        preprocessing=Preprocessing(color="RGB", mean=(0.5,) * 3, std=(0.5,) * 3),
        tokenizer=WordTokenizer([PAD, UNK, *WORDS], CONTEXT_LENGTH),
    )
