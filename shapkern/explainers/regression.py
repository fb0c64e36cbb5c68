"""KernelSHAP's regression on a stratified sample: Shapley-kernel weighted least squares of
y(S) = v(S) - v(∅) on the memberships z, subject to efficiency 1ᵀφ = v(N) - v(∅).

With weights w_j = μ(|S_j|) e_j (μ the Shapley kernel, e_j the design's expansion),
A = Σ_j w_j z_j z_jᵀ and b = Σ_j w_j z_j y_j estimate the population's A and b without bias, and
φ = A⁺(b - 1 (1ᵀA⁺b - δ) / 1ᵀA⁺1) solves the constraint exactly (no big-M weight on ∅ and N), so a
sample holding every coalition gives the exact Shapley values. A comes from the bit-packed
``coalition_gram`` op and b from ``coalition_reduce`` (exact popcount / sparse updates on the CPU,
Triton and CUDA kernels on a GPU), once for all images: the sample is shared.
"""

from __future__ import annotations

import math

import torch

from shapkern.explainers.sampling import Sample
from shapkern.ops import coalition_gram, coalition_reduce, pack_coalitions

__all__ = ["constrained_solve", "fit", "shapley_kernel_weight"]

_ACC = torch.float64
# Elements of the largest intermediate of the standard errors (float64: 32 MiB).
_CHUNK_ELEMENTS = 1 << 22


def shapley_kernel_weight(players: int, sizes: torch.Tensor) -> torch.Tensor:
    """The Shapley kernel weight (N-1) / (C(N, s) s (N-s)), normalised to mass 1 over 0 < s < N, of each
    coalition: sizes int64 (...) -> float64 (...)."""
    s = sizes.to(_ACC)
    log_comb = math.lgamma(players + 1) - torch.lgamma(s + 1) - torch.lgamma(players - s + 1)
    total = sum(1 / (t * (players - t)) for t in range(1, players))
    return torch.exp(-log_comb) / (s * (players - s) * total)


def constrained_solve(a: torch.Tensor, b: torch.Tensor, delta: torch.Tensor):
    """min φᵀAφ - 2bᵀφ subject to 1ᵀφ = δ, for every image and output.

    Args:
        a: (N, N), b: (B, N, K), delta: (B, K).

    Returns:
        φ (B, N, K), and C (N, N) with dφ = C (db - dA φ): C = A⁺ - A⁺11ᵀA⁺ / 1ᵀA⁺1.
    """
    inv = torch.linalg.pinv(a, hermitian=True)
    inv_1 = inv.sum(1)
    denom = inv_1.sum()
    inv_b = torch.einsum("pq,bqk->bpk", inv, b)
    gap = inv_b.sum(1) - delta
    phi = inv_b - inv_1[None, :, None] * (gap / denom).unsqueeze(1)
    return phi, inv - torch.outer(inv_1, inv_1) / denom


def _std_error(sample: Sample, z, weight, y, phi, projection) -> torch.Tensor:
    """Stratified sandwich standard errors, (B, N, K).

    Unit u's influence on φ is t_u = C Σ_{j in u} w_j z_j r_j, r_j = y_j - z_jᵀφ (linearising the
    constrained normal equations); Var φ ≈ Σ_g factor_g Σ_{u in g} (t_u - mean_g t)², over the
    variance strata g of the sample. Row chunks keep (B, rows, N, K) under _CHUNK_ELEMENTS.
    """
    batch, players, outputs = phi.shape
    groups = sample.factor.shape[0]
    total = phi.new_zeros(batch, groups, players, outputs)
    square = torch.zeros_like(total)
    group = sample.group.to(phi.device)
    per_unit = sample.per_unit
    step = max(per_unit, _CHUNK_ELEMENTS // max(batch * players * outputs, 1) // per_unit * per_unit)
    for start in range(0, z.shape[0], step):
        zc = z[start : start + step]
        lever = (zc @ projection) * weight[start : start + step].unsqueeze(1)  # (m, N): w_j C z_j
        resid = y[:, start : start + step] - torch.einsum("mn,bnk->bmk", zc, phi)
        terms = torch.einsum("mn,bmk->bmnk", lever, resid).unflatten(1, (-1, per_unit)).sum(2)
        index = group[start // per_unit : start // per_unit + terms.shape[1]]
        total.index_add_(1, index, terms)
        square.index_add_(1, index, terms.square())
    view = (1, groups, 1, 1)
    count = torch.bincount(group, minlength=groups).to(_ACC).clamp_min(1).view(view)
    spread = (square - total.square() / count).clamp_min(0)
    return (spread * sample.factor.to(phi.device).view(view)).sum(1).sqrt()


def fit(sample: Sample, y: torch.Tensor, delta: torch.Tensor, *, std_error: bool = True):
    """The constrained Shapley-kernel regression on a sample.

    Args:
        sample: coalitions (M, N) with their expansions and variance strata.
        y: (B, M, K) float64, v(S) - v(∅) on the sample's rows, on the game's device.
        delta: (B, K) float64, v(N) - v(∅).
        std_error: also return the design-based sandwich standard errors.

    Returns:
        φ (B, N, K) float64 and its standard errors (B, N, K) or None.
    """
    batch, rows, outputs = y.shape
    players = sample.coalitions.shape[1]
    device = y.device
    z = sample.coalitions.to(device)
    weight = (shapley_kernel_weight(players, sample.coalitions.sum(-1)) * sample.expansion).to(device)
    packed = pack_coalitions(z).unsqueeze(0)  # (1, M, W): one shared sample for all images
    a = coalition_gram(packed, weight.unsqueeze(0), players)[0]
    stacked = y.permute(1, 0, 2).reshape(1, rows, batch * outputs)
    b = coalition_reduce(packed, stacked, weight.unsqueeze(0), num_players=players)[0][0]
    phi, projection = constrained_solve(a, b.view(players, batch, outputs).permute(1, 0, 2), delta)
    if not std_error:
        return phi, None
    return phi, _std_error(sample, z.to(_ACC), weight, y, phi, projection)
