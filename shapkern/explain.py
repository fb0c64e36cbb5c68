"""Post-hoc Shapley value estimators for any image classifier.

Every estimator sees the model through a :class:`ValueFunction`: a callable mapping coalitions
bool (B, M, N) to values (B, M, K), here v(S) = the model's logits with only the patches in S
present. :func:`value_function` builds one from a model and a batch of images (a ShapleyViT's own
``coalition_values``, the packed coalition engine for timm ViTs, pixel masking for anything
else); tests build them from synthetic games. Reductions over coalitions run in the bit-packed
``coalition_reduce`` op, in float64.

Methods (design.md §1):
    - ``exact``: all 2^N coalitions (N <= 20), φ_i = Σ_S |S|!(N-|S|-1)!/N! (v(S∪i) - v(S)).
    - ``permutation``: marginal contributions along random orderings, antithetic by default.
    - ``kernel``: KernelSHAP, constrained weighted least squares on Shapley-kernel coalitions,
      paired by default, with sandwich standard errors and early stopping at ``tol``.
    - ``self``: a self-explaining model's own Φ, one forward pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from shapkern.coalitions import all_coalitions, permutation_chain, sample_coalitions, sample_permutations
from shapkern.engine import check_images, check_packed_model, fused_coalition_forward
from shapkern.ops import coalition_reduce, pack_masks

__all__ = [
    "MAX_EXACT_PLAYERS",
    "METHODS",
    "Attribution",
    "ValueFunction",
    "estimate",
    "explain",
    "find_patch_embed",
    "value_function",
]

METHODS = ("exact", "permutation", "kernel", "self")
MAX_EXACT_PLAYERS = 20
DEFAULT_BUDGET = 2048
DEFAULT_BATCH = 1024
_ACC = torch.float64


@dataclass
class Attribution:
    """Shapley values of the patches of B images for K_t target classes.

    Attributes:
        values: (B, N, K_t) φ, in the dtype of the model's output (at least float32).
        base: (B, K_t) v(∅).
        full: (B, K_t) v(N). Efficiency: values.sum(1) == full - base.
        evaluations: model evaluations (coalitions) used per image.
        std_error: (B, N, K_t) standard error of each φ (``kernel``, ``permutation``), else None.
        target: (B, K_t) int64 class of each column.
        method: the estimator's name.
        seconds: wall time of the estimate.
    """

    values: torch.Tensor
    base: torch.Tensor
    full: torch.Tensor
    evaluations: int
    target: torch.Tensor
    method: str
    std_error: torch.Tensor | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def efficiency_gap(self) -> torch.Tensor:
        """(B, K_t) Σ_i φ_i - (v(N) - v(∅)), in float64."""
        return self.values.double().sum(1) - (self.full.double() - self.base.double())

    def to(self, device) -> Attribution:
        move = lambda t: None if t is None else t.to(device)
        return Attribution(
            values=move(self.values),
            base=move(self.base),
            full=move(self.full),
            evaluations=self.evaluations,
            target=move(self.target),
            method=self.method,
            std_error=move(self.std_error),
            seconds=self.seconds,
            extra=dict(self.extra),
        )


@dataclass
class ValueFunction:
    """A cooperative game per image: coalitions bool (B, M, N) -> values (B, M, K).

    Attributes:
        fn: the callable.
        batch: B.
        players: N.
        device: where coalitions must live.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    batch: int
    players: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        return self.fn(coalitions)

    def select(self, target: torch.Tensor) -> ValueFunction:
        """The game restricted to the classes ``target`` (B, K_t) int64: values (B, M, K_t)."""

        def fn(coalitions):
            values = self.fn(coalitions)
            return values.gather(-1, target.unsqueeze(1).expand(-1, values.shape[1], -1))

        return ValueFunction(fn, self.batch, self.players, self.device)


# -- value functions of models ------------------------------------------------------------------


def find_patch_embed(model: nn.Module) -> nn.Module | None:
    """The first timm ``PatchEmbed`` inside model (its grid, image size and N), or None."""
    from timm.layers import PatchEmbed

    return next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)


def _is_packed_vit(model: nn.Module) -> bool:
    try:
        check_packed_model(model)
    except NotImplementedError:
        return False
    return True


def _check_images(model: nn.Module, images: torch.Tensor) -> None:
    check_images(images)
    embed = find_patch_embed(model)
    if embed is None or embed.img_size is None or getattr(embed, "dynamic_img_size", False):
        return
    want, got = tuple(embed.img_size), tuple(images.shape[-2:])
    channels = embed.proj.in_channels
    if got != want or images.shape[1] != channels:
        raise ValueError(
            f"the model takes {channels}x{want[0]}x{want[1]} images (C x H x W), "
            f"got {images.shape[1]}x{got[0]}x{got[1]}"
        )


def value_function(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mode: str | None = None,
    baseline: str = "zeros",
    players: int | None = None,
    chunk_size: int | None = None,
) -> ValueFunction:
    """The game v_x(S) = logits of ``model`` on each image x with only the patches in S present.

    Args:
        model: a self-explaining model with ``coalition_values(images, coalitions)`` (used as is),
            a timm ViT (packed coalition engine: tokens dropped) or any classifier (pixel masking).
        images: (B, C, H, W) on the model's device.
        mode: force ``"packed"`` or ``"input"``; default picks as above.
        baseline: pixels of absent patches in input mode: ``"zeros"``, ``"mean"`` or ``"blur"``.
        players: N for models without a timm patch embedding (input mode, square grid).
        chunk_size: (image, coalition) rows per engine pass.

    Returns:
        A :class:`ValueFunction` with coalitions (B, M, N) -> logits (B, M, K).
    """
    _check_images(model, images)
    embed = find_patch_embed(model)
    num = embed.num_patches if embed is not None else getattr(model, "num_players", players)
    if num is None:
        raise ValueError("the model has no timm patch embedding: pass players=N (a square patch grid)")
    if players is not None and players != num:
        raise ValueError(f"players={players} but the model has {num} patches")
    if mode is None and hasattr(model, "coalition_values"):

        def fn(coalitions):
            return model.coalition_values(images, coalitions)

    else:
        if mode is None:
            mode = "packed" if _is_packed_vit(model) else "input"

        def fn(coalitions):
            return fused_coalition_forward(
                model, images, coalitions, mode=mode, baseline=baseline, chunk_size=chunk_size
            )

    return ValueFunction(fn, images.shape[0], num, images.device)


# -- helpers ------------------------------------------------------------------------------------


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _evaluate(game: ValueFunction, coalitions: torch.Tensor) -> torch.Tensor:
    """Values in float64 without autograd: bool (B, M, N) -> (B, M, K)."""
    with torch.no_grad():
        values = game(coalitions)
    if values.dim() != 3 or values.shape[:2] != coalitions.shape[:2]:
        raise ValueError(
            f"the value function returned shape {tuple(values.shape)} for coalitions "
            f"{tuple(coalitions.shape)}; expected (B, M, K)"
        )
    return values.to(_ACC)


def _reduce(masks: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_m w_m z_{m,n} v_{m,k} through the bit-packed op: (B, M, N), (B, M, K), (B, M) -> (B, N, K)."""
    sums, _ = coalition_reduce(
        pack_masks(masks), values, weights.to(values.dtype), num_players=masks.shape[-1]
    )
    return sums


def _endpoints(game: ValueFunction) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """v(∅) and v(N), (B, K) float64 each, from one call of two coalitions, and the output dtype
    of the attribution (the game's, at least float32)."""
    ends = torch.zeros(game.batch, 2, game.players, dtype=torch.bool, device=game.device)
    ends[:, 1] = True
    with torch.no_grad():
        values = game(ends)
    dtype = torch.promote_types(values.dtype, torch.float32)
    values = values.to(_ACC)
    return values[:, 0], values[:, 1], dtype


def _check_exact(players: int) -> None:
    if players > MAX_EXACT_PLAYERS:
        raise ValueError(
            f"method='exact' enumerates 2^N coalitions and is limited to N <= {MAX_EXACT_PLAYERS} players; "
            f"this model has N = {players}. Use method='kernel' or 'permutation' with a budget."
        )


def _check_budget(budget: int, minimum: int, method: str, what: str) -> None:
    if budget < minimum:
        raise ValueError(
            f"budget={budget} is too small for method={method!r}: it needs at least {minimum} ({what})"
        )


# -- estimators on a game -------------------------------------------------------------------------


def _exact(game, base, full, *, batch_size, progress):
    """Full enumeration. Coefficient of v(S) in φ_i: w+(|S|) if i ∈ S, else -w-(|S|), with
    w+(s) = (s-1)!(N-s)!/N! and w-(s) = s!(N-s-1)!/N!. As one reduction:
    φ_i = Σ_S (w+ + w-)(|S|) z_i v(S) - Σ_S w-(|S|) v(S); ∅ and N contribute (v(N) - v(∅))/N.
    """
    n = game.players
    _check_exact(n)
    s = torch.arange(n + 1, dtype=_ACC, device=game.device)
    log_fact = torch.lgamma(torch.arange(n + 2, dtype=_ACC, device=game.device) + 1)
    w_in = torch.exp(log_fact[(s - 1).clamp(min=0).long()] + log_fact[(n - s).long()] - log_fact[n])
    w_out = torch.exp(log_fact[s.long()] + log_fact[(n - s - 1).clamp(min=0).long()] - log_fact[n])
    phi = ((full - base) / n).unsqueeze(1).expand(-1, n, -1).clone()
    total = 1 << n
    if n == 1:
        return phi, total
    bar = tqdm(total=total - 2, desc="exact", unit="coalition", disable=not progress)
    start = 0
    for chunk in all_coalitions(n, chunk_size=batch_size, device=game.device):
        lo, hi = int(start == 0), chunk.shape[0] - int(start + chunk.shape[0] == total)
        start += chunk.shape[0]
        chunk = chunk[lo:hi].unsqueeze(0).expand(game.batch, -1, -1)
        if chunk.shape[1] == 0:
            continue
        values = _evaluate(game, chunk)
        size = chunk[0].sum(-1)
        weights = (w_in[size] + w_out[size]).expand(game.batch, -1)
        phi += _reduce(chunk, values, weights)
        phi -= torch.einsum("m,bmk->bk", w_out[size], values).unsqueeze(1)
        bar.update(chunk.shape[1])
    bar.close()
    return phi, total


def _permutation(game, base, full, *, budget, paired, tol, batch_size, generator, progress):
    """Mean marginal contribution along random orderings. Along one chain S_0 = ∅ ⊂ ... ⊂ S_N, the
    step d_j = v(S_j) - v(S_{j-1}) belongs to the player in S_j \\ S_{j-1}, so the contributions of
    all players are one reduction: masks S_j with weight +1 and masks S_{j-1} with weight -1,
    values d_j. Units (a permutation, or an antithetic pair) are i.i.d.; the standard error is
    their standard deviation / sqrt(units).
    """
    n, batch = game.players, game.batch
    per_unit = 2 if paired else 1
    cost = per_unit * max(n - 1, 0)  # ∅ and N are evaluated once, shared by all orderings
    if n < 2:
        return (full - base).unsqueeze(1), None, 2
    _check_budget(budget, 2 + 2 * cost, "permutation", f"∅, N and 2 units of {cost} coalitions")
    max_units = (budget - 2) // cost
    step = max(1, batch_size // cost)
    unit_sums = []
    units = 0
    bar = tqdm(total=max_units, desc="permutation", unit="unit", disable=not progress)
    while units < max_units:
        num = min(step, max_units - units)
        perms = sample_permutations(batch, num * per_unit, n, antithetic=paired, generator=generator)
        chain = permutation_chain(perms.to(game.device))  # (B, P, N+1, N)
        interior = _evaluate(game, chain[:, :, 1:-1].flatten(1, 2)).unflatten(1, (num * per_unit, n - 1))
        ends = [
            base.unsqueeze(1).expand(-1, num * per_unit, -1),
            full.unsqueeze(1).expand(-1, num * per_unit, -1),
        ]
        values = torch.cat([ends[0].unsqueeze(2), interior, ends[1].unsqueeze(2)], dim=2)  # (B, P, N+1, K)
        steps = values[:, :, 1:] - values[:, :, :-1]  # (B, P, N, K)
        # One reduction per unit: rows (B * units, per_unit * 2N).
        masks = torch.cat([chain[:, :, 1:], chain[:, :, :-1]], dim=2).reshape(batch * num, -1, n)
        vals = torch.cat([steps, steps], dim=2).reshape(batch * num, -1, steps.shape[-1])
        sign = torch.cat([torch.ones(n), -torch.ones(n)]).to(device=game.device, dtype=_ACC)
        weights = sign.repeat(per_unit).expand(batch * num, -1) / per_unit
        unit_sums.append(_reduce(masks, vals, weights).view(batch, num, n, -1))
        units += num
        bar.update(num)
        if tol is not None and units >= 2 and _mean_se(torch.cat(unit_sums, 1))[1].max() < tol:
            break
    bar.close()
    phi, se = _mean_se(torch.cat(unit_sums, 1))
    return phi, se, 2 + units * cost


def _mean_se(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over dim 1 of i.i.d. samples (B, U, N, K)."""
    units = samples.shape[1]
    mean = samples.mean(1)
    if units < 2:
        return mean, torch.full_like(mean, float("inf"))
    return mean, samples.std(1) / math.sqrt(units)


def _kernel_solve(a, b, delta):
    """Constrained least squares: min φᵀAφ - 2bᵀφ s.t. 1ᵀφ = delta.

    a (B, N, N), b (B, N, K), delta (B, K) -> φ (B, N, K) and the projection C (B, N, N) with
    dφ = C (db - dA φ): C = A⁺ - A⁺11ᵀA⁺ / 1ᵀA⁺1.
    """
    a_inv = torch.linalg.pinv(a, hermitian=True)
    ones = torch.ones(a.shape[-1], 1, dtype=a.dtype, device=a.device)
    a_inv_1 = a_inv @ ones  # (B, N, 1)
    denom = (ones.mT @ a_inv_1).squeeze(-1)  # (B, 1)
    a_inv_b = a_inv @ b
    phi = a_inv_b - a_inv_1 * ((a_inv_b.sum(1) - delta) / denom).unsqueeze(1)
    projection = a_inv - a_inv_1 @ a_inv_1.mT / denom.unsqueeze(-1)
    return phi, projection


def _kernel_se(masks, values, base, phi, projection, per_unit):
    """Sandwich standard errors of KernelSHAP, (B, N, K).

    Linearising the KKT system gives dφ = C (db - dA φ), so unit u has influence C z_u r_u with
    the residual r_u = v(z_u) - v(∅) - z_uᵀφ (paired units average their two coalitions).
    """
    z = masks.to(_ACC)
    resid = values - base.unsqueeze(1) - z @ phi  # (B, M, K)
    g = (z.unsqueeze(-1) * resid.unsqueeze(2)).unflatten(1, (-1, per_unit)).mean(2)  # (B, U, N, K)
    units = g.shape[1]
    if units < 2:
        return torch.full_like(phi, float("inf"))
    g = g - g.mean(1, keepdim=True)
    influence = torch.einsum("bij,bujk->buik", projection, g)
    return (influence.square().sum(1) / (units * (units - 1))).sqrt()


def _kernel(game, base, full, *, budget, paired, tol, batch_size, generator, progress):
    """KernelSHAP (design.md §1): A = E[z zᵀ], b = E[z (v(z) - v(∅))] over Shapley-kernel samples,
    φ = A⁻¹(b - 1 (1ᵀA⁻¹b - v(N) + v(∅)) / 1ᵀA⁻¹1). b comes from the bit-packed reduction.
    """
    n, batch = game.players, game.batch
    if n < 2:
        return (full - base).unsqueeze(1), None, 2
    per_unit = 2 if paired else 1
    _check_budget(budget, 2 + 2 * per_unit, "kernel", "∅, N and two sampled units")
    max_samples = (budget - 2) // per_unit * per_unit
    step = max(per_unit, batch_size // per_unit * per_unit)
    masks, values = [], []
    a = torch.zeros(batch, n, n, dtype=_ACC, device=game.device)
    b = None
    delta = full - base
    taken = 0
    bar = tqdm(total=max_samples, desc="kernel", unit="coalition", disable=not progress)
    while taken < max_samples:
        num = min(step, max_samples - taken)
        z = sample_coalitions(batch, num, n, method="shapley", paired=paired, generator=generator)
        z = z.to(game.device)
        v = _evaluate(game, z)
        a += z.to(_ACC).mT @ z.to(_ACC)
        part = _reduce(z, v - base.unsqueeze(1), torch.ones(batch, num, dtype=_ACC, device=game.device))
        b = part if b is None else b + part
        masks.append(z)
        values.append(v)
        taken += num
        bar.update(num)
        if tol is not None and taken // per_unit >= max(n, 2):
            phi, proj = _kernel_solve(a / taken, b / taken, delta)
            se = _kernel_se(torch.cat(masks, 1), torch.cat(values, 1), base, phi, proj, per_unit)
            if se.max() < tol:
                bar.close()
                return phi, se, 2 + taken
    bar.close()
    phi, proj = _kernel_solve(a / taken, b / taken, delta)
    se = _kernel_se(torch.cat(masks, 1), torch.cat(values, 1), base, phi, proj, per_unit)
    return phi, se, 2 + taken


def _resolve_target(target, full: torch.Tensor) -> torch.Tensor:
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


def estimate(
    game: ValueFunction,
    *,
    method: str = "kernel",
    budget: int | None = None,
    target="all",
    paired: bool = True,
    tol: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> Attribution:
    """Shapley values of a game's N players.

    Args:
        game: coalitions bool (B, M, N) -> values (B, M, K).
        method: ``"exact"`` (N <= 20), ``"permutation"`` or ``"kernel"``.
        budget: coalition evaluations per image for the sampling methods (default 2048),
            counting v(∅) and v(N).
        target: ``"all"`` classes (default), ``"pred"`` (argmax of v(N)), a class index, or
            (B,) / (B, K_t) class indices.
        paired: antithetic permutations / complementary kernel coalitions.
        tol: stop sampling once the largest standard error falls under tol.
        batch_size: coalitions per image per call of the game (default 1024).
        seed: seeds the sampler; None draws a fresh seed.
        progress: show tqdm bars.

    Returns:
        An :class:`Attribution`; values (B, N, K_t).
    """
    if method not in METHODS[:3]:
        raise ValueError(f"method must be one of {METHODS[:3]} for a game, got {method!r}")
    budget = DEFAULT_BUDGET if budget is None else int(budget)
    batch_size = DEFAULT_BATCH if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if method == "exact":
        _check_exact(game.players)
    start = time.perf_counter()
    base, full, dtype = _endpoints(game)
    index = _resolve_target(target, full)
    game = game.select(index)
    base, full = base.gather(-1, index), full.gather(-1, index)
    se = None
    if method == "exact":
        phi, evals = _exact(game, base, full, batch_size=batch_size, progress=progress)
    else:
        gen = _generator(seed, game.device)
        run = _permutation if method == "permutation" else _kernel
        phi, se, evals = run(
            game,
            base,
            full,
            budget=budget,
            paired=paired,
            tol=tol,
            batch_size=batch_size,
            generator=gen,
            progress=progress,
        )
    return Attribution(
        values=phi.to(dtype),
        base=base.to(dtype),
        full=full.to(dtype),
        evaluations=evals,
        target=index,
        method=method,
        std_error=None if se is None else se.to(dtype),
        seconds=time.perf_counter() - start,
    )


def _self_explain(model: nn.Module, images: torch.Tensor, target) -> Attribution:
    if not hasattr(model, "coalition_values"):
        raise ValueError(
            f"method='self' needs a self-explaining model (a ShapleyViT) returning (phi, logits); "
            f"{type(model).__name__} is not one. Use method='exact', 'kernel' or 'permutation'."
        )
    start = time.perf_counter()
    with torch.no_grad():
        phi, logits = model(images)
    index = _resolve_target(target, logits.to(_ACC))
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
    method: str = "exact",
    budget: int | None = None,
    target="pred",
    paired: bool = True,
    tol: float | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    seed: int | None = None,
    mode: str | None = None,
    baseline: str = "zeros",
    players: int | None = None,
) -> Attribution:
    """Shapley values of the patches of ``images`` for ``model``'s logits.

    Args:
        model: a ShapleyViT (value: its ``coalition_values``), a timm ViT (packed engine) or any
            classifier (pixel masking, ``mode="input"``; pass ``players`` without a timm patch grid).
        images: (B, C, H, W) on the model's device, preprocessed as in training.
        method: ``"exact"`` (N <= 20), ``"permutation"``, ``"kernel"`` or ``"self"`` (ShapleyViT only).
        budget: evaluations per image for ``permutation`` and ``kernel`` (default 2048).
        target: ``"pred"`` (default), ``"all"``, a class index or (B,) / (B, K_t) indices.
        paired, tol, batch_size, seed, progress: see :func:`estimate`.
        mode, baseline, players: see :func:`value_function`.

    Returns:
        An :class:`Attribution` with values (B, N, K_t).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_images(model, images)
    if method == "self":
        return _self_explain(model, images, target)
    game = value_function(model, images, mode=mode, baseline=baseline, players=players)
    return estimate(
        game,
        method=method,
        budget=budget,
        target=target,
        paired=paired,
        tol=tol,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
