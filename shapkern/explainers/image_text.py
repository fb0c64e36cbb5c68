"""``explain(model, images, texts=...)``: Shapley values of the patches of images for a model's
image-text similarity with each text (the K axis of the game is the texts; see
:mod:`shapkern.games.image_text`). A self-explaining image-text model answers in one pass,
exp(τ) ⟨Φ(x)_n, e_t⟩; any other model through an estimator on its image-text game."""

from __future__ import annotations

import time
from typing import cast

import torch
from torch import nn

from shapkern.explainers.attribution import Attribution
from shapkern.games import SelfExplainingImageText, Texts, image_text_game

__all__ = ["explain_image_text", "save_text_heatmaps", "self_explain_image_text"]

TEXT_COLOURS = (
    "red: the patch raises the image's similarity with the text, blue: lowers it; one scale for all texts"
)


def self_explain_image_text(
    model: SelfExplainingImageText, images: torch.Tensor, texts: Texts, target
) -> Attribution:
    """A self-explaining image-text model's own Shapley values of its similarities: values
    exp(τ) ⟨Φ(x)_n, e_t⟩ / ‖f(x)‖ (B, N, K_t), base b (or 0), full s(x, t), in one forward pass."""
    from shapkern.explainers.explain import _resolve_target  # explain.py dispatches to this module

    start = time.perf_counter()
    with torch.no_grad():
        game = image_text_game(cast(nn.Module, model), images, texts)  # the texts' embeddings, once
        phi = cast(nn.Module, model)(images).phi.float()  # (B, N, D)
        values = game.similarity(phi) - (0 if game.bias is None else game.bias)  # (B, N, K)
        base = torch.zeros_like(values[:, 0]) if game.bias is None else game.bias.expand_as(values[:, 0])
        full = values.sum(1) + base
    index = _resolve_target(target, full.double())
    return Attribution(
        values=values.gather(-1, index.unsqueeze(1).expand(-1, values.shape[1], -1)),
        base=base.gather(-1, index),
        full=full.gather(-1, index),
        evaluations=1,
        target=index,
        method="self",
        seconds=time.perf_counter() - start,
    )


def explain_image_text(
    model: nn.Module, images: torch.Tensor, texts: Texts, *, method, tokenizer=None, **options
):
    """See :func:`~shapkern.explainers.explain` (with ``texts``): ``method`` ``"auto"`` or ``"self"``
    is the model's own Φ for a self-explaining image-text model; else an estimator on the game of
    :func:`~shapkern.games.image_text_game`. ``options``: explain's estimator and game options."""
    from shapkern.explainers.explain import estimate, resolve_method

    mode, precision = options.pop("mode"), options.pop("precision")
    baseline, players = options.pop("baseline"), options.pop("players")
    if isinstance(model, SelfExplainingImageText) and (
        method == "self" or (method == "auto" and mode is None)
    ):
        if mode is not None:
            raise ValueError("method='self' explains a self-explaining model through its own game: mode=None")
        return self_explain_image_text(model, images, texts, options["target"])
    if method == "self":
        raise ValueError(
            f"method='self' needs a self-explaining image-text model (a ShapleyCLIP); {type(model).__name__} "
            "is not one"
        )
    if baseline != "zeros" or players is not None:
        raise ValueError("baseline= and players= apply to pixel masking of classifiers, not to texts=")
    game = image_text_game(
        model, images, texts, tokenizer=tokenizer, mode=mode, precision=precision, sync_checks=True
    )
    method = resolve_method(method, model, game.players, options["budget"], options["tol"], mode=mode)
    return estimate(game, method=method, **options)


def save_text_heatmaps(
    images: torch.Tensor,
    att: Attribution,
    texts: list[str],
    paths: list,
    *,
    grid: tuple[int, int] | None = None,
) -> None:
    """One PNG per image: a heatmap of each text's Shapley values side by side, on one shared scale
    (the similarities' units), titled by the text and its similarity. ``att`` from
    ``explain(model, images, texts=texts, target="all")``: values (B, N, K); ``paths``: B files."""
    from shapkern.explainers.viz import plot_grid  # matplotlib: imported where a figure is drawn

    if att.values.shape[-1] != len(texts) or len(paths) != images.shape[0]:
        raise ValueError(
            "save_text_heatmaps needs target='all' values (B, N, K) of K texts and a path per image"
        )
    for b, path in enumerate(paths):
        titles = [f"{text} ({float(s):.2f})" for text, s in zip(texts, att.full[b], strict=True)]
        stacked = images[b].float().cpu().expand(len(texts), -1, -1, -1)
        plot_grid(
            stacked, att.values[b].T.cpu(), path, titles=titles, grid=grid, shared_scale=True, cell=2.0,
            caption=TEXT_COLOURS,
        )  # fmt: skip
