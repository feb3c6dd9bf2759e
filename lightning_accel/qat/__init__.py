"""Quantization-aware training with torchao fake quantization, converted to real int8 / int4 layers.

* :mod:`~lightning_accel.qat.core`: the pure functions (:func:`prepare_qat_`, :func:`convert_qat_`,
  :func:`strip_qat_`, ...);
* :mod:`~lightning_accel.qat.callbacks`: :class:`QuantizationAwareTraining`.

Importing this package does not import torchao; using it does.
"""

from lightning_accel.errors import QATWarning
from lightning_accel.qat.callbacks import QuantizationAwareTraining
from lightning_accel.qat.core import convert_qat_, prepare_qat_, strip_qat_

__all__ = ["QATWarning", "QuantizationAwareTraining", "convert_qat_", "prepare_qat_", "strip_qat_"]
