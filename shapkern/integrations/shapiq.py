"""shapiq on shapkern's value function: :class:`ShapkernGame`, a ``shapiq.Game`` for one image.

shapiq's approximators (KernelSHAP, kADD-SHAP, permutation sampling, the interaction indices
SII, k-SII, STII, FSII, ...) call a game with a bool matrix (n_coalitions, n_players) and expect
one float per coalition. :class:`ShapkernGame` answers those calls with shapkern's value function
(:func:`~shapkern.games.model_game`): a ShapleyViT's own ``coalition_values``, the
packed coalition engine for a timm ViT (absent patches dropped as tokens), pixel masking for any
other classifier; ``batch_size`` coalitions per engine call. Players are the patches in row-major
order of the patch grid, as everywhere in shapkern, so shapiq's values equal
:func:`shapkern.explain`'s on the same game.

Example::

    game = ShapkernGame(model, image)  # image (C, H, W); target: the predicted class
    sv = shapiq.KernelSHAP(game.n_players, pairing_trick=True).approximate(2048, game)

Run it under ``torch.autocast`` for bf16 on a GPU: the game is evaluated inside ``approximate``.
"""

from __future__ import annotations

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

from shapkern.games import model_game

__all__ = ["DEFAULT_BATCH", "ShapkernGame"]

DEFAULT_BATCH = 1024  # coalitions per call of the value function, as shapkern.estimate


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
        batch_size: coalitions per call of the value function.
        mode, baseline, players, chunk_size, precision: passed to
            :func:`~shapkern.games.model_game` (``mode="input"``: pixel masking).
        verbose: shapiq's progress bar over single coalitions (slow; for debugging).

    Attributes:
        target: the explained class (int).
        empty_value, full_value: the target's raw logit on the empty and on the full coalition.
        evaluations: coalitions evaluated by the model so far (v(∅) and v(N) included).
    """

    def __init__(
        self,
        model: nn.Module,
        image: torch.Tensor,
        *,
        target: str | int = "pred",
        normalize: bool = True,
        batch_size: int = DEFAULT_BATCH,
        mode: str | None = None,
        baseline: str = "zeros",
        players: int | None = None,
        chunk_size: int | None = None,
        precision: str = "auto",
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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        images = image if image.dim() == 4 else image.unsqueeze(0)
        self._values = model_game(
            model,
            images,
            mode=mode,
            baseline=baseline,
            players=players,
            chunk_size=chunk_size,
            precision=precision,
        )
        self.batch_size = batch_size
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
        (selected per batch, so that M × K logits never sit in memory at once)."""
        z = torch.from_numpy(np.ascontiguousarray(coalitions, dtype=bool)).to(self._values.device)
        parts = []
        with torch.no_grad():
            for start in range(0, z.shape[0], self.batch_size):
                logits = self._values(z[start : start + self.batch_size].unsqueeze(0))[0]
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
