"""Low-bit weights, LoRA adapters and 8-bit optimizers.

* :mod:`~lightning_accel.quantization.bnb` (with ``_layers``): 8/4-bit Linear layers with bitsandbytes, CPU and
  CUDA (:func:`quantize_`, :func:`dequantize_`, :func:`quantize_layers_`);
* :mod:`~lightning_accel.quantization.adapters`: LoRA adapters on quantized layers (:func:`add_adapters_`,
  :func:`merge_adapters_`);
* :mod:`~lightning_accel.quantization.optimizers`: bitsandbytes 8-bit optimizers (:func:`to_8bit_optimizer`);
* :mod:`~lightning_accel.quantization.callbacks`: :class:`Quantization` and :class:`EightBitOptimizer`;
* :mod:`~lightning_accel.quantization.qat` (core) and :mod:`~lightning_accel.quantization.qat_callback`
  (``QuantizationAwareTraining``): quantization-aware training with torchao, converted to real int8 / int4 layers
  (imported from there, or from ``lightning_accel``, so that this package does not import torchao).

Importing this package does not import bitsandbytes; using it does (an ``ImportError`` names the extra to install).
"""

from lightning_accel.quantization.adapters import (
    LoRAAdapter,
    LoRALinear,
    adapted_layers,
    add_adapters_,
    freeze_except_adapters_,
    merge_adapters_,
)
from lightning_accel.quantization.bnb import (
    count_parameters,
    dequantize_,
    dequantize_weight,
    quantize_,
    quantize_layers_,
    quantized_footprint,
    quantized_layers,
    resolve_compute_dtype,
    restore_,
    select_quantizable,
    state_dict_bytes,
)
from lightning_accel.quantization.callbacks import (
    EightBitOptimizer,
    MetricDropWarning,
    OptimizerNotConvertedWarning,
    Quantization,
    QuantizationNoEffectWarning,
    QuantizationWarning,
    SlowOnCPUWarning,
    replay_quantization,
)
from lightning_accel.quantization.optimizers import (
    UnsupportedOptimizerError,
    is_8bit_optimizer,
    optimizer_state_bytes,
    to_8bit_optimizer,
    why_not_8bit,
)

__all__ = [
    "EightBitOptimizer",
    "LoRAAdapter",
    "LoRALinear",
    "MetricDropWarning",
    "QuantizationNoEffectWarning",
    "OptimizerNotConvertedWarning",
    "SlowOnCPUWarning",
    "Quantization",
    "QuantizationWarning",
    "UnsupportedOptimizerError",
    "adapted_layers",
    "count_parameters",
    "add_adapters_",
    "dequantize_",
    "dequantize_weight",
    "freeze_except_adapters_",
    "is_8bit_optimizer",
    "merge_adapters_",
    "optimizer_state_bytes",
    "quantize_",
    "quantize_layers_",
    "quantized_footprint",
    "quantized_layers",
    "replay_quantization",
    "resolve_compute_dtype",
    "restore_",
    "select_quantizable",
    "state_dict_bytes",
    "to_8bit_optimizer",
    "why_not_8bit",
]
