"""8-bit optimizers with bitsandbytes.

* :mod:`~lightning_accel.optimizers.eight_bit`: converting a torch optimizer into its 8-bit counterpart
  (:func:`to_8bit_optimizer`, :func:`why_not_8bit`, :func:`optimizer_state_bytes`);
* :mod:`~lightning_accel.optimizers.callbacks`: :class:`EightBitOptimizer`, which converts the optimizers a Trainer
  built.

Importing this package does not import bitsandbytes; using it does (an ``ImportError`` names the extra to install).
"""

from lightning_accel.errors import OptimizerNotConvertedWarning, UnsupportedOptimizerError
from lightning_accel.optimizers.callbacks import EightBitOptimizer
from lightning_accel.optimizers.eight_bit import (
    has_paged_variant,
    is_8bit_optimizer,
    optimizer_state_bytes,
    to_8bit_optimizer,
    why_not_8bit,
)

__all__ = [
    "EightBitOptimizer",
    "OptimizerNotConvertedWarning",
    "UnsupportedOptimizerError",
    "has_paged_variant",
    "is_8bit_optimizer",
    "optimizer_state_bytes",
    "to_8bit_optimizer",
    "why_not_8bit",
]
