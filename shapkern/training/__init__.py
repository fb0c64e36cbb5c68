"""Training self-explaining ViTs: the loss, the trainer, its configuration and evaluation.

- :mod:`~shapkern.training.losses`: ``ShapleyLoss``, L = ℓ_cls + λ ℓ_sv + μ ℓ_mask, from the
  model's outputs (a pure loss: it calls no model).
- :mod:`~shapkern.training.step`: ``shapley_step``, the model's passes and the loss in one call.
- :mod:`~shapkern.training.config`: ``TrainConfig``, stored in every checkpoint.
- :mod:`~shapkern.training.trainer`: ``Trainer`` and ``train`` (resumable, DDP-ready), with
  :mod:`~shapkern.training.guard` (divergence) and :mod:`~shapkern.training.resume` (the run folder).
- :mod:`~shapkern.training.evaluation`: held-out metrics and heatmaps, as callbacks.
"""

from shapkern.training.config import TrainConfig, resumed_config
from shapkern.training.distributed import DEVICES, Distributed
from shapkern.training.evaluation import metric_labels
from shapkern.training.losses import MASK_LOSSES, SV_SCALES, LossOutput, ShapleyLoss, shapley_regression_loss
from shapkern.training.setup import build_model
from shapkern.training.step import shapley_step
from shapkern.training.trainer import HEATMAPS, METRICS, Trainer, train

__all__ = [
    "DEVICES",
    "HEATMAPS",
    "MASK_LOSSES",
    "METRICS",
    "SV_SCALES",
    "Distributed",
    "LossOutput",
    "ShapleyLoss",
    "TrainConfig",
    "Trainer",
    "build_model",
    "metric_labels",
    "resumed_config",
    "shapley_regression_loss",
    "shapley_step",
    "train",
]
