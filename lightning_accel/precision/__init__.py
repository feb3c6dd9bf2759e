"""Mixed precision chosen for the hardware, with float32 islands and visible loss scaling.

* :mod:`~lightning_accel.precision.core`: :func:`choose_precision`, :func:`resolve_precision`,
  :func:`fp32_islands_`, :func:`remove_fp32_islands_` (no Trainer needed);
* :mod:`~lightning_accel.precision.callbacks`: :class:`MixedPrecision`.
"""

from lightning_accel.precision.callbacks import MixedPrecision
from lightning_accel.precision.core import (
    CPU_BF16_MIN_WEIGHT,
    DTYPES,
    PrecisionChoice,
    PrecisionNoEffectWarning,
    PrecisionWarning,
    choose_precision,
    cpu_supports_bf16,
    fp32_islands_,
    largest_linear_weight,
    remove_fp32_islands_,
    resolve_precision,
)

__all__ = [
    "CPU_BF16_MIN_WEIGHT",
    "DTYPES",
    "MixedPrecision",
    "PrecisionChoice",
    "PrecisionNoEffectWarning",
    "PrecisionWarning",
    "choose_precision",
    "cpu_supports_bf16",
    "fp32_islands_",
    "largest_linear_weight",
    "remove_fp32_islands_",
    "resolve_precision",
]
