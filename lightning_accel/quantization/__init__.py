"""Low-bit weights and LoRA adapters, behind one backend protocol.

* :mod:`~lightning_accel.quantization.backends`: the protocol every backend implements and the registry that names
  them (``"bitsandbytes"``, ``"torchao"``, ``"pt2e"``); :mod:`~lightning_accel.quantization.api`: :func:`quantize_`,
  which dispatches to a registered backend;
* the backends: :mod:`~lightning_accel.quantization.bnb` (with ``_layers``: 8/4-bit Linear layers with bitsandbytes,
  CPU and CUDA), :mod:`~lightning_accel.quantization.torchao` (int8 Linear layers with torchao, fast on CPUs once
  compiled), :mod:`~lightning_accel.quantization.pt2e` (static int8 convolutions, PT2E's x86 recipe);
* :mod:`~lightning_accel.quantization.adapters`: LoRA adapters on quantized layers (:func:`add_adapters_`,
  :func:`merge_adapters_`);
* :mod:`~lightning_accel.quantization.callbacks`: :class:`Quantization`, whose two paths live in
  :mod:`~lightning_accel.quantization.qlora` (setup: a frozen quantized base to train on) and
  :mod:`~lightning_accel.quantization.ptq` (fit end: post-training quantization), with
  :mod:`~lightning_accel.quantization.plan` (shared) and :mod:`~lightning_accel.quantization.replay` (checkpoints).

8-bit optimizers are in :mod:`lightning_accel.optimizers`, quantization-aware training in :mod:`lightning_accel.qat`.
Importing this package registers the built-in backends but imports neither bitsandbytes nor torchao; using them does
(an ``ImportError`` names the extra to install).
"""

# the built-in backends register themselves as their modules are imported: bitsandbytes first, so that
# `quantize_(..., backend="auto")` picks it for every mode it has
from lightning_accel.quantization import bnb as _bnb  # noqa: F401
from lightning_accel.quantization import pt2e as _pt2e  # noqa: F401
from lightning_accel.quantization import torchao as _torchao  # noqa: F401
from lightning_accel.quantization.adapters import (
    LoRAAdapter,
    LoRALinear,
    adapted_layers,
    add_adapters_,
    freeze_except_adapters_,
    merge_adapters_,
)
from lightning_accel.quantization.api import quantize_
from lightning_accel.quantization.backends import (
    QuantConfig,
    QuantizationBackend,
    backends_of,
    get_backend,
    register_backend,
    registered_backends,
)
from lightning_accel.quantization.bnb import (
    count_parameters,
    dequantize_,
    dequantize_weight,
    quantize_layers_,
    quantized_footprint,
    quantized_layers,
    resolve_compute_dtype,
    restore_,
    select_quantizable,
    state_dict_bytes,
)
from lightning_accel.quantization.callbacks import (
    MetricDropWarning,
    Quantization,
    QuantizationNoEffectWarning,
    QuantizationWarning,
    SlowOnCPUWarning,
    replay_quantization,
)

__all__ = [
    "LoRAAdapter",
    "LoRALinear",
    "MetricDropWarning",
    "QuantConfig",
    "Quantization",
    "QuantizationBackend",
    "QuantizationNoEffectWarning",
    "QuantizationWarning",
    "SlowOnCPUWarning",
    "adapted_layers",
    "add_adapters_",
    "backends_of",
    "count_parameters",
    "dequantize_",
    "dequantize_weight",
    "freeze_except_adapters_",
    "get_backend",
    "merge_adapters_",
    "quantize_",
    "quantize_layers_",
    "quantized_footprint",
    "quantized_layers",
    "register_backend",
    "registered_backends",
    "replay_quantization",
    "resolve_compute_dtype",
    "restore_",
    "select_quantizable",
    "state_dict_bytes",
]
