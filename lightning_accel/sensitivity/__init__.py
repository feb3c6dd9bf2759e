"""Per-layer sensitivity analysis: :func:`analyze_sensitivity` and :func:`recommend_allocation` (the core, no
Trainer needed) and the :class:`SensitivityAnalysis` callback."""

from lightning_accel.sensitivity.callbacks import SensitivityAnalysis
from lightning_accel.sensitivity.core import (
    BITS,
    SensitivityWarning,
    analyze_sensitivity,
    load_layer_amounts,
    recommend_allocation,
)

__all__ = [
    "BITS",
    "SensitivityAnalysis",
    "SensitivityWarning",
    "analyze_sensitivity",
    "load_layer_amounts",
    "recommend_allocation",
]
