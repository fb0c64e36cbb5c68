"""Post-hoc explanations: Shapley estimators over games, metrics and pictures.

- :mod:`~shapkern.explainers.estimators`: one module per estimator behind one interface.
- :mod:`~shapkern.explainers.explain`: ``explain`` (a model) and ``estimate`` (any game).
- :mod:`~shapkern.explainers.metrics`: faithfulness, error against a reference, localisation.
- :mod:`~shapkern.explainers.viz`: heatmaps, grids and insertion/deletion curves (matplotlib).
- :mod:`~shapkern.explainers.dataset`: ``explain_dataset``, a whole dataset split into a resumable
  store (:mod:`~shapkern.explainers.store`, read back by ``load_explanations``), by one process or
  many; :mod:`~shapkern.explainers.loading`: models by name with their preprocessing (``load_model``).

The games themselves live in :mod:`shapkern.games`.
"""

from shapkern._deprecation import renamed_function
from shapkern.explainers.attribution import Attribution
from shapkern.explainers.dataset import DEFAULT_SHARD_SIZE, explain_dataset
from shapkern.explainers.estimators import (
    DEFAULT_COALITIONS_PER_CALL,
    ESTIMATORS,
    Estimate,
    Estimator,
    EstimatorName,
)
from shapkern.explainers.explain import (
    AUTO_RULE,
    DEFAULT_BUDGET,
    GAME_METHODS,
    METHODS,
    TARGETS,
    GameMethod,
    Method,
    Target,
    TargetName,
    estimate,
    explain,
    resolve_method,
)
from shapkern.explainers.image_text import save_text_heatmaps
from shapkern.explainers.loading import NamedModel, load_model
from shapkern.explainers.metrics import (
    faithfulness_correlation,
    insertion_deletion,
    localization,
    relative_l2,
    sensitivity_n,
)
from shapkern.explainers.store import STORE_FILES, Explanations, load_explanations
from shapkern.games import ValueFunction, model_game

__all__ = [
    "AUTO_RULE",
    "DEFAULT_BUDGET",
    "DEFAULT_COALITIONS_PER_CALL",
    "DEFAULT_SHARD_SIZE",
    "ESTIMATORS",
    "GAME_METHODS",
    "METHODS",
    "STORE_FILES",
    "TARGETS",
    "Attribution",
    "Estimate",
    "Estimator",
    "EstimatorName",
    "Explanations",
    "GameMethod",
    "Method",
    "NamedModel",
    "Target",
    "TargetName",
    "ValueFunction",
    "estimate",
    "explain",
    "explain_dataset",
    "faithfulness_correlation",
    "insertion_deletion",
    "load_explanations",
    "load_model",
    "localization",
    "plot_curves",
    "plot_grid",
    "plot_heatmap",
    "relative_l2",
    "resolve_method",
    "save_text_heatmaps",
    "sensitivity_n",
]

# Deprecated name (removed in 0.4).
value_function = renamed_function("value_function", "shapkern.model_game", model_game)

# The plots need matplotlib, which `import shapkern` must not load: they are read on first use.
_PLOTS = ("plot_curves", "plot_grid", "plot_heatmap")


def __getattr__(name: str):
    if name in _PLOTS:
        from shapkern.explainers import viz

        return getattr(viz, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
