"""Post-hoc explanations: the game a model defines, Shapley estimators, metrics and pictures.

- :mod:`~shapkern.explainers.game`: a model and images as a cooperative game over patches.
- :mod:`~shapkern.explainers.estimators`: exact, permutation and KernelSHAP estimators.
- :mod:`~shapkern.explainers.explain`: ``explain`` (a model) and ``estimate`` (any game).
- :mod:`~shapkern.explainers.metrics`: faithfulness, error against a reference, localisation.
- :mod:`~shapkern.explainers.viz`: heatmaps, grids and insertion/deletion curves.
"""

from shapkern.explainers.attribution import Attribution
from shapkern.explainers.explain import METHODS, estimate, explain, resolve_method
from shapkern.explainers.game import ValueFunction, value_function

__all__ = [
    "METHODS",
    "Attribution",
    "ValueFunction",
    "estimate",
    "explain",
    "resolve_method",
    "value_function",
]
