"""The image-text game (docs/design.md, "Image-text matching"): for an image x and K texts,
v_{x,t}(S) is the model's similarity between the embedding of x with only the patches in S present
and the embedding of text t, computed as the model computes it. The K axis of the game is the texts:
zero-shot classification is the case where they are class prompts.

- Dual encoders (open_clip CLIP and CustomTextCLIP, Hugging Face CLIPModel and SiglipModel): the
  image tower runs on the packed engine; similarity = exp(τ) cos(f(x_S), e_t) (+ b for SigLIP).
- A self-explaining image-text model (:class:`SelfExplainingImageText`, a ``ShapleyCLIP``): its own
  value function, f(x_S) = Σ_{n∈S} Φ(x_S)_n, scored as exp(τ) ⟨f(x_S), e_t⟩ / ‖f(x)‖ (+ b), the full
  image's norm a constant per image (models/image_text.py).
- Any image tower (a model whose output is an image embedding: the packed engine's families, or
  pixel masking) with a (K, D) text-embedding tensor: the cosine similarity.

Text embeddings are computed once per text, when the game is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from shapkern.engine import CoalitionForward, Mode, Precision, dual_encoder
from shapkern.games.base import Restrictable
from shapkern.games.models import model_game

__all__ = ["ImageTextGame", "SelfExplainingImageText", "Texts", "encode_texts", "image_text_game"]

# Texts: strings (tokenised by the model's tokenizer), token ids (K, L) int64, or embeddings (K, D).
Texts = str | Sequence[str] | torch.Tensor
Tokenizer = Callable[[list[str]], object]  # -> token ids (K, L), or a mapping holding "input_ids"


@runtime_checkable
class SelfExplainingImageText(Protocol):
    """A self-explaining image-text model (a :class:`shapkern.models.ShapleyCLIP`): Φ(x) (B, N, D) in
    the joint space, f(x) = Σ_n Φ(x)_n, similarity exp(τ) ⟨f(x), e_t⟩/‖f(x)‖ (+ b), unit text embeddings.

    ``model(images, texts)`` returns (phi, image, values, text, scale, bias); ``encode_text(texts)``
    gives (K, D); ``coalition_forward(images, ...)`` a function of coalitions (B, M, N) -> f(x_S)
    (B, M, D); ``scale`` and ``bias`` are exp(τ) and b (None for the softmax loss).
    """

    num_players: int
    bias: torch.Tensor | None

    @property
    def scale(self) -> torch.Tensor: ...

    def encode_text(self, texts) -> torch.Tensor: ...

    def coalition_forward(
        self,
        images: torch.Tensor,
        *,
        chunk_rows: int | None = None,
        precision: Precision = "auto",
        sync_checks: bool = False,
    ) -> Callable[..., torch.Tensor]: ...


class ImageTextGame(Restrictable):
    """v_{x,t}(S) = scale · sim(embed(x_S), e_t) + bias for K texts: coalitions (B, M, N) -> (B, M, K).

    Args:
        embed: coalitions bool (B, M, N) -> image embeddings (B, M, D).
        text: (K, D) text embeddings.
        batch, players, device: B, N and where coalitions live.
        scale, bias: the similarity's factor and bias (float or () tensors; bias None: 0).
        normalize: cosine similarity (both sides normalised, an all-zero image embedding scoring 0),
            or the inner product as given (a self-explaining model's).
        image_norm: (B,) a constant per image that every embedding is divided by (a self-explaining
            model's ‖f(x)‖), or None.
    """

    def __init__(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        text: torch.Tensor,
        *,
        batch: int,
        players: int,
        device: torch.device,
        scale: float | torch.Tensor = 1.0,
        bias: float | torch.Tensor | None = None,
        normalize: bool = True,
        image_norm: torch.Tensor | None = None,
    ):
        if text.dim() != 2 or not text.is_floating_point():
            raise ValueError(f"text embeddings must be float (K, D), got {text.dtype} {tuple(text.shape)}")
        self.embed, self.normalize = embed, normalize
        self.text = F.normalize(text.detach().float(), dim=-1) if normalize else text.detach().float()
        self.scale = torch.as_tensor(scale, dtype=torch.float32, device=text.device).detach()
        self.bias = (
            None if bias is None else torch.as_tensor(bias, dtype=torch.float32).detach().to(text.device)
        )
        self.batch, self.players, self.device = batch, players, device
        self.image_norm = None if image_norm is None else image_norm.detach().float().view(-1, 1, 1)

    def similarity(self, image: torch.Tensor) -> torch.Tensor:
        """The similarity of image embeddings (B, M, D) with the texts: (B, M, K)."""
        if image.shape[-1] != self.text.shape[-1]:
            raise ValueError(
                f"image embeddings have {image.shape[-1]} dimensions, the texts' {self.text.shape[-1]}: "
                "text embeddings must be in the image tower's output space"
            )
        image = F.normalize(image.float(), dim=-1) if self.normalize else image.float()
        if self.image_norm is not None:
            image = image / self.image_norm
        sims = self.scale * image @ self.text.T
        return sims if self.bias is None else sims + self.bias

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        return self.similarity(self.embed(coalitions))


def _token_ids(texts: Sequence[str], tokenize: Tokenizer | None, family: str) -> torch.Tensor:
    if tokenize is None:
        raise ValueError(
            f"texts as strings need the {family} model's tokenizer, which is not available offline: pass "
            "tokenizer= (a callable of a list of strings), token ids (K, L) int64 or embeddings (K, D)"
        )
    ids = tokenize(list(texts))
    ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            "the tokenizer must return a tensor of token ids (or a mapping with 'input_ids'), got "
            f"{type(ids).__name__}"
        )
    return ids


@torch.no_grad()
def encode_texts(
    texts: Texts,
    encode_tokens: Callable[[torch.Tensor], torch.Tensor] | None,
    tokenize: Tokenizer | None = None,
    *,
    family: str = "image-text",
    device: torch.device | None = None,
) -> torch.Tensor:
    """Text embeddings (K, D) of ``texts``: float embeddings as given; token ids (K, L) int64 through
    ``encode_tokens``; strings through ``tokenize`` first. Once per text, without autograd."""
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, torch.Tensor) and texts.is_floating_point():
        return texts.to(device) if device is not None else texts
    if encode_tokens is None:
        raise ValueError(
            "this model has no text encoder: pass text embeddings (K, D) as a float tensor in the image "
            "tower's output space"
        )
    if not isinstance(texts, torch.Tensor):
        texts = _token_ids(texts, tokenize, family)
    if texts.dim() != 2 or texts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token ids must be int (K, L), got {texts.dtype} {tuple(texts.shape)}")
    return encode_tokens(texts.long().to(device) if device is not None else texts.long()).float()


@torch.no_grad()
def _own_game(model: SelfExplainingImageText, forward, images: torch.Tensor, texts: Texts) -> ImageTextGame:
    """A self-explaining model's game: its f(x_S), scored with its texts' embeddings (strings and
    token ids through its own tokenizer and text encoder), temperature, bias and ‖f(x)‖."""
    batch, device = images.shape[0], images.device
    if isinstance(texts, torch.Tensor) and texts.is_floating_point():
        text = F.normalize(texts.to(device), dim=-1)
    else:
        text = model.encode_text(texts)
    full = forward(torch.ones(batch, 1, model.num_players, dtype=torch.bool, device=device))
    return ImageTextGame(
        forward,
        text,
        batch=batch,
        players=model.num_players,
        device=device,
        scale=model.scale,
        bias=model.bias,
        normalize=False,
        image_norm=full[:, 0].norm(dim=-1),
    )


def image_text_game(
    model: nn.Module,
    images: torch.Tensor,
    texts: Texts,
    *,
    tokenizer: Tokenizer | None = None,
    mode: Mode | None = None,
    chunk_rows: int | None = None,
    precision: Precision = "auto",
    sync_checks: bool = False,
) -> ImageTextGame:
    """The image-text game of ``model`` on ``images`` (B, C, H, W) and ``texts`` (K of them).

    Args:
        model: a self-explaining image-text model, an open_clip or Hugging Face dual encoder, or an
            image tower whose output is the image embedding (then ``texts`` are embeddings (K, D)).
        texts: strings, token ids (K, L) int64, or embeddings (K, D) float.
        tokenizer: strings -> token ids, for a model whose tokenizer shapkern cannot build offline.
        mode: an image tower's game: ``"packed"`` or ``"input"`` (pixel masking; see model_game).
        chunk_rows, precision, sync_checks: see :func:`~shapkern.games.model_game`.
    """
    batch, device = images.shape[0], images.device
    if isinstance(model, SelfExplainingImageText):
        if mode == "input":
            raise ValueError(
                "mode='input': a self-explaining image-text model is explained through its own game"
            )
        forward = model.coalition_forward(
            images, chunk_rows=chunk_rows, precision=precision, sync_checks=sync_checks
        )
        return _own_game(model, forward, images, texts)
    dual = dual_encoder(model)
    if dual is not None:
        tokenize = tokenizer or dual.tokenize
        text = encode_texts(texts, dual.encode_tokens, tokenize, family=dual.family, device=device)
        tower = CoalitionForward(
            dual.image, images, chunk_rows=chunk_rows, precision=precision, sync_checks=sync_checks
        )
        project = dual.project
        embed = tower if project is None else (lambda coalitions: project(tower(coalitions)))
        return ImageTextGame(
            embed,
            text,
            batch=batch,
            players=tower.num_players,
            device=device,
            scale=dual.logit_scale,
            bias=dual.logit_bias,
        )
    text = encode_texts(texts, None, device=device)
    game = model_game(
        model, images, mode=mode, chunk_rows=chunk_rows, precision=precision, sync_checks=sync_checks
    )
    return ImageTextGame(game, text, batch=batch, players=game.players, device=device)
