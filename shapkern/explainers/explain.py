"""``explain`` and ``estimate``: Shapley values of image patches for any model, or of any game.

Methods (docs/design.md, "The game"; one module each under ``explainers/estimators``):
    - ``exact``: all 2^N coalitions (N <= MAX_EXACT_PLAYERS).
    - ``permutation``: marginal contributions along random orderings, antithetic by default.
    - ``kernel``: KernelSHAP on distinct coalitions stratified by size, border sizes enumerated,
      paired by default, with standard errors and early stopping at ``tol``.
    - ``leverage``: ``kernel`` with sizes drawn uniformly (LeverageSHAP; better at large N).
    - ``bayes``: Bayesian quadrature on greedily chosen pairs (the most accurate per evaluation).
    - ``self``: a self-explaining model's own Φ, one forward pass.
    - ``auto``: see AUTO_RULE. An explicit budget is a limit.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Literal, cast, get_args

import torch
from torch import nn

from shapkern.coalitions import MAX_EXACT_PLAYERS
from shapkern.engine import Baseline, Mode, Precision
from shapkern.explainers.attribution import Attribution
from shapkern.explainers.estimators import (
    ACC_DTYPE,
    DEFAULT_COALITIONS_PER_CALL,
    ESTIMATORS,
    Estimate,
    EstimatorName,
    endpoints,
)
from shapkern.explainers.image_text import explain_image_text
from shapkern.games import Game, SelfExplaining, Texts, model_game, restrict

__all__ = [
    "AUTO_EXACT_PLAYERS",
    "AUTO_RULE",
    "DEFAULT_BUDGET",
    "GAME_METHODS",
    "METHODS",
    "TARGETS",
    "GameMethod",
    "Method",
    "Target",
    "TargetName",
    "estimate",
    "explain",
    "resolve_method",
]

# ``method`` of estimate (a game) and explain (a model, which may also explain itself).
GameMethod = Literal["auto", EstimatorName]
GAME_METHODS: tuple[GameMethod, ...] = get_args(GameMethod)
Method = Literal[GameMethod, "self"]
METHODS: tuple[Method, ...] = get_args(Method)
# ``target``: the predicted class (argmax of v(N)), every class, or class indices.
TargetName = Literal["pred", "all"]
TARGETS: tuple[TargetName, ...] = get_args(TargetName)
Target = TargetName | int | Sequence[int] | torch.Tensor
AUTO_EXACT_PLAYERS = 16  # "auto" enumerates up to 2^16 coalitions per image
DEFAULT_BUDGET = 2048
AUTO_RULE = (
    f"'self' for a self-explaining model; 'exact' up to {AUTO_EXACT_PLAYERS} patches without a budget, "
    "or when the budget covers all 2^N coalitions; else 'bayes' when the budget holds N complementary "
    "pairs (budget >= 2N + 2) and no tol is given; else 'leverage'"
)


def _resolve_target(target: Target | None, full: torch.Tensor) -> torch.Tensor:
    """(B, K_t) int64 class indices from ``"pred"``, ``"all"``/None, an int, or a (B,) / (B, K_t) tensor."""
    batch, classes = full.shape
    if target is None or (isinstance(target, str) and target == "all"):
        return torch.arange(classes, device=full.device).expand(batch, -1).clone()
    if isinstance(target, str):
        if target != "pred":
            raise ValueError(
                f"target must be 'pred', 'all', an int or a tensor of class indices, got {target!r}"
            )
        return full.argmax(-1, keepdim=True)
    index = torch.as_tensor(target, device=full.device)
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {index.dtype}")
    index = index.long()
    if index.dim() == 0:
        index = index.expand(batch)
    if index.dim() == 1:
        if index.shape[0] != batch:
            raise ValueError(f"target has {index.shape[0]} entries but there are {batch} images")
        index = index.unsqueeze(1)
    if index.dim() != 2 or index.shape[0] != batch:
        raise ValueError(f"target must be an int, (B,) or (B, K_t); got shape {tuple(index.shape)}")
    bad = (index < 0) | (index >= classes)
    if bad.any():
        raise ValueError(
            f"target class {int(index[bad][0])} is out of range: the model has {classes} classes"
        )
    return index.expand(batch, -1).clone()


def _auto(players: int, budget: int | None, tol: float | None) -> EstimatorName:
    """The estimator of AUTO_RULE (the game's part: no 'self'). An explicit budget is a limit: it
    picks ``exact`` only when it covers 2^N coalitions."""
    covers_all = budget is not None and players <= MAX_EXACT_PLAYERS and budget >= 1 << players
    if covers_all or (budget is None and players <= AUTO_EXACT_PLAYERS):
        return "exact"
    budget = DEFAULT_BUDGET if budget is None else budget
    return "bayes" if budget >= 2 * players + 2 and tol is None else "leverage"


def check_budget_arg(budget) -> int | None:
    """None, or a positive int number of evaluations (a clear error for 0, negatives, floats, bools)."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int (evaluations per image) or None, got {budget!r}")
    return budget


def resolve_method(
    method: Method,
    model: nn.Module,
    players: int,
    budget: int | None = None,
    tol: float | None = None,
    *,
    mode: Mode | None = None,
) -> Method:
    """The estimator ``method="auto"`` stands for with this budget and tol (AUTO_RULE): ``self`` for
    a self-explaining model (unless ``mode="input"`` asks for its pixel-masking game), else as in
    :func:`estimate`; any other method is returned as is."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    budget = check_budget_arg(budget)
    if method != "auto":
        return method
    if isinstance(model, SelfExplaining) and mode != "input":
        return "self"
    return _auto(players, budget, tol)


def _coalitions_per_call(coalitions_per_call: int | None, batch_size: int | None) -> int:
    if batch_size is not None:
        warnings.warn(
            "batch_size= is deprecated: pass coalitions_per_call=", DeprecationWarning, stacklevel=3
        )
        coalitions_per_call = batch_size if coalitions_per_call is None else coalitions_per_call
    return DEFAULT_COALITIONS_PER_CALL if coalitions_per_call is None else coalitions_per_call


def estimate(
    game: Game,
    *,
    method: GameMethod = "auto",
    budget: int | None = None,
    target: Target = "pred",
    paired: bool = True,
    tol: float | None = None,
    coalitions_per_call: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    batch_size: int | None = None,
) -> Attribution:
    """Shapley values of a game's N players.

    Args:
        game: a :class:`~shapkern.games.Game`, coalitions bool (B, M, N) -> values (B, M, K).
        method: ``"auto"`` (AUTO_RULE), or a name in ``ESTIMATORS``: ``"exact"`` (N <=
            MAX_EXACT_PLAYERS), ``"permutation"``, ``"kernel"``, ``"leverage"`` or ``"bayes"``.
        budget: a positive limit on the coalition evaluations per image, counting v(∅) and v(N)
            (default: 2048 for the sampling methods, 2^N for ``exact``, which refuses a smaller
            one); ``kernel``, ``leverage`` and ``bayes`` never evaluate a coalition twice, so they
            stop at 2^N. A budget below a method's minimum is an error.
        target: ``"pred"`` (default: argmax of v(N)), ``"all"`` classes, a class index, or
            (B,) / (B, K_t) class indices.
        paired: antithetic permutations / complementary coalitions (``bayes`` is paired only).
        tol: ``permutation``, ``kernel``, ``leverage``: stop sampling once the largest standard
            error falls under tol (``kernel`` and ``leverage`` draw their design in rounds).
        coalitions_per_call: coalitions per image per call of the game (default 1024).
        seed: seeds the sampler (the designs of ``kernel``, ``leverage`` and ``bayes`` are drawn
            on the CPU: the same coalitions on every device); None draws a fresh seed, except for
            ``bayes``'s greedy pairs, which need no randomness: they come from seed 0 then, and are
            computed once per (N, budget) and cached.
        progress: show progress bars.
        batch_size: deprecated spelling of ``coalitions_per_call``.

    Returns:
        An :class:`Attribution`; values (B, N, K_t). B = 0 gives empty tensors.
    """
    if method not in GAME_METHODS:
        raise ValueError(f"method must be one of {GAME_METHODS} for a game, got {method!r}")
    limit = check_budget_arg(budget)
    if method == "auto":
        method = _auto(game.players, limit, tol)
    per_call = _coalitions_per_call(coalitions_per_call, batch_size)
    estimator = ESTIMATORS[method](
        paired=paired, tol=tol, seed=seed, progress=progress, coalitions_per_call=per_call
    )
    budget = (1 << game.players if method == "exact" else DEFAULT_BUDGET) if limit is None else limit
    estimator.check_budget(budget, game.players)
    start = time.perf_counter()
    base, full, dtype = endpoints(game)
    index = _resolve_target(target, full)
    base, full = base.gather(-1, index), full.gather(-1, index)
    if game.batch == 0:
        result = Estimate(base.new_zeros(0, game.players, index.shape[1]), None, 0)
    else:
        result = estimator.approximate(restrict(game, index), budget, base, full)
    values, std_error, evaluations = result
    return Attribution(
        values=values.to(dtype),
        base=base.to(dtype),
        full=full.to(dtype),
        evaluations=evaluations,
        target=index,
        method=method,
        std_error=None if std_error is None else std_error.to(dtype),
        seconds=time.perf_counter() - start,
    )


def _self_explain(model: SelfExplaining, images: torch.Tensor, target: Target) -> Attribution:
    start = time.perf_counter()
    with torch.no_grad():
        phi, logits = model(images)[:2]  # (phi (B, N, K), logits (B, K), ...)
    index = _resolve_target(target, logits.to(ACC_DTYPE))
    values = phi.gather(-1, index.unsqueeze(1).expand(-1, phi.shape[1], -1))
    return Attribution(
        values=values.float(),
        base=torch.zeros_like(values[:, 0]).float(),
        full=logits.gather(-1, index).float(),
        evaluations=1,
        target=index,
        method="self",
        seconds=time.perf_counter() - start,
    )


def explain(
    model: nn.Module,
    images: torch.Tensor,
    *,
    method: Method = "auto",
    budget: int | None = None,
    target: Target = "pred",
    paired: bool = True,
    tol: float | None = None,
    coalitions_per_call: int | None = None,
    progress: bool = True,
    seed: int | None = None,
    mode: Mode | None = None,
    baseline: Baseline = "zeros",
    players: int | None = None,
    precision: Precision = "auto",
    batch_size: int | None = None,
    texts: Texts | None = None,
    tokenizer=None,
) -> Attribution:
    """Shapley values of the patches of ``images`` for ``model``'s logits, or with ``texts`` for its
    image-text similarity with each text.

    Args:
        model: a self-explaining model such as a ShapleyViT (value: its own value function), a
            model the packed engine runs (tokens dropped) or any classifier (pixel masking,
            ``mode="input"``; pass ``players`` without a timm patch grid).
        images: (B, C, H, W) on the model's device, preprocessed as in training.
        method: ``"auto"`` (default: AUTO_RULE), ``"exact"`` (N <= MAX_EXACT_PLAYERS),
            ``"permutation"``, ``"kernel"``, ``"leverage"``, ``"bayes"`` or ``"self"``
            (self-explaining models only).
        budget: a limit on the evaluations per image (default 2048 for the sampling methods).
        target: ``"pred"`` (default), ``"all"``, a class index or (B,) / (B, K_t) indices.
        paired, tol, coalitions_per_call, seed, progress: see :func:`estimate`.
        mode, baseline, players, precision: see :func:`~shapkern.games.model_game`
            (``precision="fp8"``: e4m3 GEMMs for every coalition evaluation; no effect on ``self``).
        batch_size: deprecated spelling of ``coalitions_per_call``.
        texts: K texts (strings, token ids (K, L) or embeddings (K, D)): the game's outputs are the
            model's similarities with them (:func:`~shapkern.games.image_text_game`); ``target``
            then picks texts ("pred": the best-matching one). None: the model's logits.
        tokenizer: with ``texts`` as strings, for a model whose tokenizer shapkern cannot build offline.

    Returns:
        An :class:`Attribution` with values (B, N, K_t).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if texts is not None:
        per_call = _coalitions_per_call(coalitions_per_call, batch_size)
        masking = dict(
            mode=mode, baseline=baseline, players=players, precision=precision, tokenizer=tokenizer
        )
        run = dict(budget=budget, target=target, paired=paired, tol=tol, seed=seed, progress=progress)
        return explain_image_text(
            model, images, texts, method=method, coalitions_per_call=per_call, **masking, **run
        )
    if method == "self" or (method == "auto" and isinstance(model, SelfExplaining) and mode != "input"):
        if not isinstance(model, SelfExplaining):
            raise ValueError(
                f"method='self' needs a self-explaining model (a ShapleyViT); {type(model).__name__} is not "
                "one. Use method='auto', 'exact', 'bayes', 'leverage', 'kernel' or 'permutation'."
            )
        check_budget_arg(budget)
        return _self_explain(model, images, target)
    game = model_game(
        model, images, mode=mode, baseline=baseline, players=players, precision=precision, sync_checks=True
    )
    return estimate(
        game,
        # Not "self": a self-explaining model with mode != "input" returned above.
        method=cast(GameMethod, resolve_method(method, model, game.players, budget, tol, mode=mode)),
        budget=budget,
        target=target,
        paired=paired,
        tol=tol,
        coalitions_per_call=_coalitions_per_call(coalitions_per_call, batch_size),
        seed=seed,
        progress=progress,
    )
