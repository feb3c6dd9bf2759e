"""8/4-bit weights, LoRA adapters and 8-bit optimizers with bitsandbytes, on CPU and CUDA.

Pure functions on a plain ``nn.Module`` (:func:`quantize_`, :func:`add_adapters_`, :func:`merge_adapters_`,
:func:`to_8bit_optimizer`) under two callbacks (:class:`Quantization`, :class:`EightBitOptimizer`). Importing this
package does not import bitsandbytes; using it does (an ``ImportError`` names the extra to install).
"""

from lightning_accel.checkpoint import register_replay
from lightning_accel.quantization.adapters import (
    LoRAAdapter,
    LoRALinear,
    adapted_layers,
    add_adapters_,
    merge_adapters_,
)
from lightning_accel.quantization.bnb import (
    count_parameters,
    dequantize_,
    dequantize_weight,
    quantize_,
    quantized_footprint,
    quantized_layers,
    resolve_compute_dtype,
    restore_,
    select_quantizable,
    state_dict_bytes,
)
from lightning_accel.quantization.callback import (
    EightBitOptimizer,
    MetricDropWarning,
    OptimizerNotConvertedWarning,
    Quantization,
    QuantizationNoEffectWarning,
    QuantizationWarning,
    replay_quantization,
)
from lightning_accel.quantization.optimizers import (
    UnsupportedOptimizerError,
    is_8bit_optimizer,
    optimizer_state_bytes,
    to_8bit_optimizer,
    why_not_8bit,
)

register_replay("Quantization", Quantization.order, replay_quantization)

__all__ = [
    "EightBitOptimizer",
    "LoRAAdapter",
    "LoRALinear",
    "MetricDropWarning",
    "QuantizationNoEffectWarning",
    "OptimizerNotConvertedWarning",
    "Quantization",
    "QuantizationWarning",
    "UnsupportedOptimizerError",
    "adapted_layers",
    "count_parameters",
    "add_adapters_",
    "dequantize_",
    "dequantize_weight",
    "is_8bit_optimizer",
    "merge_adapters_",
    "optimizer_state_bytes",
    "quantize_",
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
