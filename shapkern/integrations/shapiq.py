"""shapiq on shapkern's value function: :class:`ShapkernGame`, a ``shapiq.Game`` for one image.

shapiq's approximators (KernelSHAP, kADD-SHAP, permutation sampling, the interaction indices
SII, k-SII, STII, FSII, ...) call a game with a bool matrix (n_coalitions, n_players) and expect
one float per coalition. :class:`ShapkernGame` answers those calls with shapkern's value function
(:func:`~shapkern.games.model_game`): a ShapleyViT's own ``coalition_values``, the
packed coalition engine for a timm ViT (absent patches dropped as tokens), pixel masking for any
other classifier; ``coalitions_per_call`` coalitions per engine call. Players are the patches in row-major
order of the patch grid, as everywhere in shapkern, so shapiq's values equal
:func:`shapkern.explain`'s on the same game.

Example::

    game = ShapkernGame(model, image)  # image (C, H, W); target: the predicted class
    sv = shapiq.KernelSHAP(game.n_players, pairing_trick=True).approximate(2048, game)

Run it under ``torch.autocast`` for bf16 on a GPU: the game is evaluated inside ``approximate``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

try:
    import shapiq
except ImportError as error:
    raise ImportError(
        "shapkern.integrations.shapiq needs the shapiq package: pip install shapiq "
        "(or pip install 'shapkern[shapiq]')"
    ) from error

from shapkern._deprecation import moved_names, renamed_arguments
from shapkern.engine import Baseline, Mode, Precision
from shapkern.games import model_game

__all__ = ["DEFAULT_COALITIONS_PER_CALL", "ShapkernGame"]

DEFAULT_COALITIONS_PER_CALL = 1024  # coalitions per call of the value function, as shapkern.estimate
# Deprecated name (removed in the next release).
__getattr__ = moved_names(
    __name__, {"DEFAULT_BATCH": "shapkern.integrations.shapiq.DEFAULT_COALITIONS_PER_CALL"}
)


class ShapkernGame(shapiq.Game):
    """One image's patches as a shapiq game: v(S) = a logit of ``model`` with only the patches in S.

    Args:
        model: a ShapleyViT, a timm ViT or any image classifier (see
            :func:`~shapkern.games.model_game`).
        image: (C, H, W) or (1, C, H, W), on the model's device, preprocessed as the model expects.
        target: ``"pred"`` (the argmax of v(N), the default) or a class index.
        normalize: center the game so that v(∅) = 0, shapiq's convention (``normalization_value``
            = the target's logit on the empty coalition); ``False`` returns raw logits. Shapley
            values and interactions of order ≥ 1 do not depend on it.
        coalitions_per_call: coalitions per call of the value function.
        mode, baseline, players, chunk_rows, precision: passed to
            :func:`~shapkern.games.model_game` (``mode="input"``: pixel masking).
        verbose: shapiq's progress bar over single coalitions (slow; for debugging).

    Attributes:
        target: the explained class (int).
        empty_value, full_value: the target's raw logit on the empty and on the full coalition.
        evaluations: coalitions evaluated by the model so far (v(∅) and v(N) included).
    """

    @renamed_arguments(batch_size="coalitions_per_call", chunk_size="chunk_rows")
    def __init__(
        self,
        model: nn.Module,
        image: torch.Tensor,
        *,
        target: Literal["pred"] | int = "pred",
        normalize: bool = True,
        coalitions_per_call: int = DEFAULT_COALITIONS_PER_CALL,
        mode: Mode | None = None,
        baseline: Baseline = "zeros",
        players: int | None = None,
        chunk_rows: int | None = None,
        precision: Precision = "auto",
        verbose: bool = False,
    ) -> None:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"image must be a (C, H, W) or (1, C, H, W) tensor, got {type(image).__name__}")
        if image.dim() not in (3, 4):
            raise ValueError(f"image must be one (C, H, W) or (1, C, H, W) tensor, got {tuple(image.shape)}")
        if image.dim() == 4 and image.shape[0] != 1:
            raise ValueError(
                f"image must hold one image, got a batch of {image.shape[0]}: build one game per image"
            )
        per_call = coalitions_per_call
        if isinstance(per_call, bool) or not isinstance(per_call, int) or per_call < 1:
            raise ValueError(f"coalitions_per_call must be a positive int, got {per_call!r}")
        images = image if image.dim() == 4 else image.unsqueeze(0)
        self._values = model_game(
            model,
            images,
            mode=mode,
            baseline=baseline,
            players=players,
            chunk_rows=chunk_rows,
            precision=precision,
        )
        self.coalitions_per_call = coalitions_per_call
        self.evaluations = 0
        ends = np.zeros((2, self._values.players), dtype=bool)
        ends[1] = True
        logits = self._logits(ends)  # (2, K)
        self.target = _resolve_target(target, logits[1])
        self.empty_value = float(logits[0, self.target])
        self.full_value = float(logits[1, self.target])
        super().__init__(
            self._values.players,
            normalize=normalize,
            normalization_value=self.empty_value if normalize else None,
            verbose=verbose,
        )

    def _logits(self, coalitions: np.ndarray, target: int | None = None) -> torch.Tensor:
        """Logits of the coalitions (M, N) in float64 on the CPU: (M, K), or (M,) of class ``target``
        (selected per call, so that M × K logits never sit in memory at once)."""
        z = torch.from_numpy(np.ascontiguousarray(coalitions, dtype=bool)).to(self._values.device)
        parts = []
        with torch.no_grad():
            for start in range(0, z.shape[0], self.coalitions_per_call):
                logits = self._values(z[start : start + self.coalitions_per_call].unsqueeze(0))[0]
                parts.append((logits if target is None else logits[:, target]).double().cpu())
        self.evaluations += z.shape[0]
        return torch.cat(parts)

    def value_function(self, coalitions: np.ndarray) -> np.ndarray:
        """The target's raw logit on each coalition (``Game.__call__`` then subtracts
        ``normalization_value``): bool (n_coalitions, n_players) -> float64 (n_coalitions,)."""
        if coalitions.shape[0] == 0:
            return np.zeros(0)
        return self._logits(coalitions, self.target).numpy()


def _resolve_target(target, full: torch.Tensor) -> int:
    """The class index of ``target`` (``"pred"`` or an int) given the full coalition's logits (K,)."""
    classes = full.shape[0]
    if isinstance(target, str):
        if target != "pred":
            raise ValueError(f"target must be 'pred' or a class index, got {target!r}")
        return int(full.argmax())
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise TypeError(f"target must be 'pred' or an int class index, got {type(target).__name__}")
    if not 0 <= target < classes:
        raise ValueError(f"target class {target} is out of range: the model has {classes} classes")
    return int(target)
