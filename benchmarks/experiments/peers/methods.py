"""The methods compared: each peer library as its users call it, and ``shapkern.explain``;
(case, budget, seed) -> values (N,), the evaluations counted in the case."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import shapkern
from benchmarks.experiments.peers.case import Case

PIXELS, TOKENS = "pixel", "token"

__all__ = ["PIXELS", "TOKENS", "Method", "explain", "measured", "methods"]


def captum(case: Case, budget: int, seed: int, algorithm: str):
    import captum.attr

    torch.manual_seed(seed)  # Captum samples from torch's global generator
    ids = torch.arange(case.players, device=case.image.device).view(1, *case.grid)
    samples = budget if algorithm == "KernelShap" else max(1, (budget - 1) // case.players)  # permutations
    attr = getattr(captum.attr, algorithm)(case.forward).attribute(
        case.image,
        baselines=0.0,
        target=case.target,
        feature_mask=case.upsample(ids),  # (1, 1, H, W): the patch index of every pixel
        n_samples=samples,
        perturbations_per_eval=case.batch_size,
    )
    return attr[0, 0, :: case.patch[0], :: case.patch[1]]  # one pixel per patch


def shap_partition(case: Case, budget: int, seed: int):
    """The patch grid as a (rows, cols, 1) image of ones; the masker sets absent patches to 0."""
    import shap

    np.random.seed(seed)
    masker = shap.maskers.Image(0.0, shape=(*case.grid, 1))
    explainer = shap.Explainer(lambda grid: case.pixel_values(torch.from_numpy(grid[..., 0] > 0.5)), masker)
    grid = np.ones((1, *case.grid, 1), dtype=np.float32)
    return explainer(grid, max_evals=budget, batch_size=case.batch_size, silent=True).values[0, ..., 0]


def shapiq_kernel(case: Case, budget: int, seed: int, game: str):
    import shapiq

    if game == TOKENS:
        from shapkern.integrations.shapiq import ShapkernGame

        played = ShapkernGame(
            case.model, case.image[0], target=case.target, coalitions_per_call=case.batch_size
        )
    else:

        class PixelGame(shapiq.Game):  # a batched image game, as shapiq's users write one
            def value_function(self, coalitions: np.ndarray) -> np.ndarray:
                return case.pixel_values(torch.from_numpy(coalitions.astype(bool)).view(-1, *case.grid))

        empty = PixelGame(case.players, normalize=False).value_function(np.zeros((1, case.players), bool))
        played = PixelGame(case.players, normalization_value=float(empty[0]))
    values = shapiq.KernelSHAP(case.players, pairing_trick=True, random_state=seed).approximate(
        budget, played
    )
    case.evaluations += getattr(played, "evaluations", 0)  # ShapkernGame counts its engine's rows
    return values.get_n_order_values(1)


def explain(case: Case, budget: int | None, seed: int, method: str, mode: str | None, **options):
    """``shapkern.explain`` on the case: an Attribution, its evaluations counted."""
    kw = {"method": method, "budget": budget, "target": case.target, "seed": seed, "mode": mode}
    att = shapkern.explain(case.model, case.image, **kw, progress=False, **options)
    case.evaluations += att.evaluations
    return att


@dataclass(frozen=True)
class Method:
    """``run`` (case, budget, seed) -> values; ``min_budget`` N -> its smallest budget; ``role``:
    ``peer`` (a library as its users call it), ``integration`` or ``shapkern``."""

    run: Callable
    library: str
    game: str
    role: str = "peer"
    min_budget: Callable[[int], int] = lambda n: 8
    estimand: str = "Shapley"


def methods() -> dict[str, Method]:
    def bind(fn, **kw):
        return lambda case, budget, seed: fn(case, budget, seed, **kw)

    def pairs(n):  # bayes: v(∅), v(N) and N complementary pairs
        return 2 * n + 2

    kernel_shap, sampling = (bind(captum, algorithm=a) for a in ("KernelShap", "ShapleyValueSampling"))
    iq_pixels, iq_tokens = (bind(shapiq_kernel, game=g) for g in (PIXELS, TOKENS))
    ours = {
        (m, g): bind(explain, method=m, mode=None if g == TOKENS else "input")
        for m in ("bayes", "kernel")
        for g in (PIXELS, TOKENS)
    }
    return {
        "Captum KernelShap": Method(kernel_shap, "captum", PIXELS),
        "Captum ShapleyValueSampling": Method(sampling, "captum", PIXELS, min_budget=lambda n: n + 1),
        "shap Explainer, Image masker": Method(shap_partition, "shap", PIXELS, estimand="Owen (split tree)"),
        "shapiq KernelSHAP, pixel game": Method(iq_pixels, "shapiq", PIXELS),
        "shapiq KernelSHAP on ShapkernGame": Method(iq_tokens, "shapiq", TOKENS, "integration"),
        "shapkern.explain bayes, packed": Method(
            ours["bayes", TOKENS], "shapkern", TOKENS, "shapkern", pairs
        ),
        "shapkern.explain kernel, packed": Method(ours["kernel", TOKENS], "shapkern", TOKENS, "shapkern"),
        "shapkern.explain bayes, mode='input'": Method(
            ours["bayes", PIXELS], "shapkern", PIXELS, "shapkern", pairs
        ),
    }


def measured(case: Case, method: Method, budget: int, seed: int) -> tuple[np.ndarray, int]:
    """values (N,) float64 and the evaluations of one run."""
    start = case.evaluations
    with torch.no_grad():
        values = method.run(case, budget, seed)
    if isinstance(values, shapkern.Attribution):
        values = values.values  # (1, N, 1)
    if torch.is_tensor(values):
        values = values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(case.players), case.evaluations - start
