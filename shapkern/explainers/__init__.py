"""Post-hoc explanations: Shapley estimators over games, metrics and pictures.

- :mod:`~shapkern.explainers.estimators`: one module per estimator behind one interface.
- :mod:`~shapkern.explainers.explain`: ``explain`` (a model) and ``estimate`` (any game).
- :mod:`~shapkern.explainers.metrics`: faithfulness, error against a reference, localisation.
- :mod:`~shapkern.explainers.viz`: heatmaps, grids and insertion/deletion curves (matplotlib,
  imported on use).

The games themselves live in :mod:`shapkern.games`.
"""

import warnings

from shapkern.explainers.attribution import Attribution
from shapkern.explainers.estimators import ESTIMATORS, Estimate, Estimator
from shapkern.explainers.explain import AUTO_RULE, METHODS, estimate, explain, resolve_method
from shapkern.games import ValueFunction, model_game

__all__ = [
    "AUTO_RULE",
    "ESTIMATORS",
    "METHODS",
    "Attribution",
    "Estimate",
    "Estimator",
    "ValueFunction",
    "estimate",
    "explain",
    "resolve_method",
    "value_function",
]


def value_function(*args, **kwargs):
    """Deprecated name of :func:`shapkern.games.model_game` (removed in 0.4)."""
    warnings.warn("value_function is deprecated: use shapkern.model_game", DeprecationWarning, stacklevel=2)
    return model_game(*args, **kwargs)
