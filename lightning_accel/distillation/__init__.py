"""Knowledge distillation: the uncompressed model teaches its compressed self.

Compression (structured pruning, 4-bit weights) costs accuracy; training the compressed model against the
outputs of the uncompressed one wins much of it back. Two layers, as for every technique:

* :mod:`lightning_accel.distillation.core`, pure functions on tensors and modules: :func:`distillation_loss`
  (KL with ``temperature**2`` scaling, or MSE), :func:`extract_logits` (tensor, dict, Hugging Face output,
  tuple), :class:`FeatureProjection` (learned width bridge for intermediate matching after pruning),
  :func:`frozen_copy` and :func:`fingerprint`;
* :class:`KnowledgeDistillation`, the callback: builds the teacher before any other callback compresses the
  model, wraps ``training_step`` during ``fit`` so the returned loss gains the distillation term (no change
  to the LightningModule), trains the projections, and leaves nothing on the model afterwards.

    from lightning_accel import KnowledgeDistillation, StructuredPruning
    trainer = Trainer(callbacks=[KnowledgeDistillation(), StructuredPruning(amount=0.75, start=0, end=4)])
"""

from lightning_accel.distillation.callbacks import (
    DistillationNoEffectWarning,
    DistillationWarning,
    KnowledgeDistillation,
)
from lightning_accel.distillation.core import (
    FeatureProjection,
    distillation_loss,
    extract_logits,
    feature_loss,
    fingerprint,
    freeze_,
    frozen_copy,
    kl_distillation_loss,
    mse_distillation_loss,
    projection_dim,
)

__all__ = [
    "DistillationNoEffectWarning",
    "DistillationWarning",
    "FeatureProjection",
    "KnowledgeDistillation",
    "distillation_loss",
    "extract_logits",
    "feature_loss",
    "fingerprint",
    "freeze_",
    "frozen_copy",
    "kl_distillation_loss",
    "mse_distillation_loss",
    "projection_dim",
]
