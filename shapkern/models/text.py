"""The text side of the image-text model: a word tokeniser and a small transformer text encoder."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PAD", "UNK", "TextEncoder", "WordTokenizer"]

PAD, UNK = "<pad>", "<unk>"


class WordTokenizer:
    """Lower-case words to ids: ``tokenizer(texts)`` -> int64 (K, L), 0-padded; words outside the
    vocabulary map to ``<unk>`` (id 1), words past ``context_length`` are dropped."""

    def __init__(self, vocab: Sequence[str], context_length: int):
        if list(vocab[:2]) != [PAD, UNK]:
            raise ValueError(f"a vocabulary starts with {PAD!r} and {UNK!r}, got {list(vocab[:2])}")
        self.vocab, self.context_length = list(vocab), context_length
        self.ids = {word: i for i, word in enumerate(self.vocab)}

    @classmethod
    def from_captions(
        cls, texts: Iterable[str], context_length: int, *, min_count: int = 2, max_words: int = 10000
    ) -> WordTokenizer:
        """The vocabulary of the words seen at least ``min_count`` times (at most ``max_words``, the
        most frequent first)."""
        counts = Counter(word for text in texts for word in cls.words(text))
        common = [w for w, c in counts.most_common(max_words) if c >= min_count]
        return cls([PAD, UNK, *common], context_length)

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.int64)
        for row, text in enumerate(texts):
            ids = [self.ids.get(w, 1) for w in self.words(text)][: self.context_length]
            if not ids:
                raise ValueError(f"caption {text!r} has no words: every text needs at least one")
            out[row, : len(ids)] = torch.tensor(ids)
        return out


class TextEncoder(nn.Module):
    """Token and position embeddings, ``depth`` pre-norm transformer layers, the mean over the caption's
    tokens, LayerNorm and a projection to the joint space: tokens (K, L) int64 (0 = padding) -> (K, D)
    unit vectors."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        context_length: int,
        *,
        width: int = 64,
        depth: int = 1,
        heads: int = 2,
    ):
        super().__init__()
        self.token = nn.Embedding(vocab_size, width, padding_idx=0)
        self.position = nn.Parameter(torch.randn(context_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype != torch.int64 or tokens.shape[1] > self.position.shape[0]:
            raise ValueError(
                f"tokens must be int64 (K, L) with L <= {self.position.shape[0]}, got {tokens.dtype} "
                f"{tuple(tokens.shape)}"
            )
        pad = tokens == 0
        message = "every text needs at least one token (a row of tokens is all padding)"
        if tokens.is_cuda:
            torch._assert_async(~pad.all(-1).any(), message)  # no host sync in training
        elif pad.all(-1).any():
            raise ValueError(message)
        x = self.layers(self.token(tokens) + self.position[: tokens.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1)
        return F.normalize(self.proj(self.norm(pooled)).float(), dim=-1)
