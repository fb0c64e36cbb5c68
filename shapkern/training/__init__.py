"""Training self-explaining ViTs: the loss, the trainer, its configuration and evaluation.

- :mod:`~shapkern.training.losses`: ``ShapleyLoss``, L = ℓ_cls + λ ℓ_sv + μ ℓ_mask, from the
  model's outputs (a pure loss: it calls no model).
- :mod:`~shapkern.training.step`: ``shapley_step``, the model's passes and the loss in one call.
- :mod:`~shapkern.training.config`: ``TrainConfig``, stored in every checkpoint.
- :mod:`~shapkern.training.trainer`: ``Trainer`` and ``train`` (resumable, DDP-ready), with
  :mod:`~shapkern.training.guard` (divergence) and :mod:`~shapkern.training.resume` (the run folder).
- :mod:`~shapkern.training.evaluation`: held-out metrics and heatmaps, as callbacks.
- :mod:`~shapkern.training.contrastive` and :mod:`~shapkern.training.retrieval`: image-text matching
  (``task="image-text"``): ``ContrastiveLoss``, L = ℓ_con + λ ℓ_sv + μ ℓ_mask, its step, and the
  retrieval and localisation evaluators.
"""

from shapkern.training.config import TASKS, Task, TrainConfig, resumed_config
from shapkern.training.contrastive import ContrastiveLoss, contrastive_loss, image_text_step
from shapkern.training.distributed import DEVICES, Distributed
from shapkern.training.evaluation import metric_labels
from shapkern.training.losses import MASK_LOSSES, SV_SCALES, LossOutput, ShapleyLoss, shapley_regression_loss
from shapkern.training.retrieval import recall_at_k
from shapkern.training.setup import build_model
from shapkern.training.step import shapley_step
from shapkern.training.trainer import HEATMAPS, METRICS, Trainer, train

__all__ = [
    "DEVICES",
    "HEATMAPS",
    "MASK_LOSSES",
    "METRICS",
    "SV_SCALES",
    "TASKS",
    "ContrastiveLoss",
    "Distributed",
    "LossOutput",
    "ShapleyLoss",
    "Task",
    "TrainConfig",
    "Trainer",
    "build_model",
    "contrastive_loss",
    "image_text_step",
    "metric_labels",
    "recall_at_k",
    "resumed_config",
    "shapley_regression_loss",
    "shapley_step",
    "train",
]
