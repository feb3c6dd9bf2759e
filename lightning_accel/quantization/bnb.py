"""8-bit and 4-bit weights with bitsandbytes, on a plain ``torch.nn.Module`` (no Trainer needed).

:func:`lightning_accel.quantize_` (backend ``"bitsandbytes"``, the default for these modes) replaces selected
``nn.Linear`` layers, in place, by frozen quantized layers computed with bitsandbytes kernels, on CPU or CUDA;
:class:`BitsandbytesBackend` is this module's entry in the backend registry
(:mod:`~lightning_accel.quantization.backends`):

* ``"nf4"`` / ``"fp4"``: 4-bit weights in blocks of ``block_size`` with one absmax per block (QLoRA); with
  ``double_quant`` the absmax values are themselves quantized to 8 bits (about 4.13 stored bits per weight instead
  of 4.5).
* ``"int8"``: LLM.int8() row-wise int8 weights (8 bits plus one float32 scale per output row).

    from lightning_accel.quantization import quantize_
    quantize_(model, mode="nf4")                               # every Linear except the output layer
    quantize_(model, mode="int8", modules=["blocks.*.mlp.*"])  # or chosen by glob patterns

The quantized layers keep the model's own state-dict keys (plus bitsandbytes' quantization-state entries next to
each weight), load their own checkpoints back exactly, and accept float checkpoints (quantizing on load).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lightning_accel._compat import import_bitsandbytes
from lightning_accel._select import set_submodule
from lightning_accel._validate import check_choice
from lightning_accel.quantization.backends import (
    QuantConfig,
    QuantizationBackend,
    is_attention_projection,
    parameter_counts,
    recorded_layer,
    register_backend,
    select_layers,
)

if TYPE_CHECKING:  # the layers need bitsandbytes at run time: imported through _layers() there
    from lightning_accel.quantization._layers import QuantLinear4bit, QuantLinear8bit

__all__ = [
    "BITSANDBYTES",
    "BitsandbytesBackend",
    "quantize_layers_",
    "MODES",
    "COMPUTE_DTYPES",
    "BLOCK_SIZES",
    "select_quantizable",
    "restore_",
    "dequantize_",
    "dequantize_weight",
    "replace_by_float_linear_",
    "quantized_layers",
    "is_quantized_layer",
    "layer_config",
    "quantized_footprint",
    "state_dict_bytes",
    "count_parameters",
    "resolve_compute_dtype",
    "bf16_supported",
    "require_bitsandbytes",
]

MODES = ("int8", "nf4", "fp4")
COMPUTE_DTYPES = ("auto", "fp32", "bf16", "fp16")
#: block sizes bitsandbytes' 4-bit kernels accept on every backend
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES: dict[torch.dtype | None, str] = {v: k for k, v in _DTYPES.items()}

_INSTALL_HINT = "pip install 'lightning-accel[quantization]'  (or: pip install 'bitsandbytes>=0.50,<0.60')"


def require_bitsandbytes() -> Any:
    """Import bitsandbytes, or raise an ``ImportError`` naming the extra that installs it."""
    try:
        return import_bitsandbytes()  # offline: never fetches kernels from a model hub
    except ImportError as err:
        raise ImportError(f"Quantization and EightBitOptimizer need bitsandbytes >= 0.50: {_INSTALL_HINT}") from err


def _layers() -> Any:
    require_bitsandbytes()
    return importlib.import_module("lightning_accel.quantization._layers")


def __getattr__(name: str) -> Any:
    if name in ("QuantLinear4bit", "QuantLinear8bit"):
        return getattr(_layers(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized layer made by this backend (never imports bitsandbytes)."""
    return type(module).__module__ == "lightning_accel.quantization._layers" and hasattr(module, "adapter")


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: layer}`` of the quantized layers of ``model``, in registration order."""
    return {n: m for n, m in model.named_modules() if is_quantized_layer(m)}


def layer_config(layer: nn.Module) -> dict[str, Any]:
    """The settings a quantized layer was made with: ``mode``, ``double_quant``, ``block_size``, ``compute_dtype``."""
    quant = cast("QuantLinear4bit | QuantLinear8bit", layer)
    dtype = _DTYPE_NAMES.get(quant.compute_dtype, "input")
    if type(layer).__name__ == "QuantLinear8bit":
        return {"mode": "int8", "compute_dtype": dtype}
    four = cast("QuantLinear4bit", layer)
    return {"mode": four.quant_type, "double_quant": four.double_quant, "block_size": four.block_size, "compute_dtype": dtype}


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively (CUDA: compute capability; CPU: AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def resolve_compute_dtype(compute_dtype: str, device: torch.device | str) -> torch.dtype:
    """The dtype quantized layers compute in on ``device``.

    ``"auto"`` is bfloat16 where the device runs it natively (CUDA with bf16 support, a CPU with AVX512-BF16 or
    AMX), else float32.

    Raises:
        ValueError: an unknown name, ``"fp16"`` on a CPU, or ``"bf16"`` on a CUDA device without bf16 support.
    """
    check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    device = torch.device(device)
    if compute_dtype == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if compute_dtype == "fp16" and device.type == "cpu":
        raise ValueError(
            "`compute_dtype`='fp16' is not supported on CPU (no float16 matmul kernels); use 'auto', 'bf16' or 'fp32'"
        )
    if compute_dtype == "bf16" and device.type == "cuda" and not bf16_supported(device):
        raise ValueError(f"`compute_dtype`='bf16' is not supported by {torch.cuda.get_device_name(device)}; use 'fp16' or 'fp32'")
    return _DTYPES[compute_dtype]


def select_quantizable(
    model: nn.Module, modules: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> dict[str, nn.Linear]:
    """The float ``nn.Linear`` layers :func:`lightning_accel.quantize_` would replace with bitsandbytes (same
    arguments, same errors): every ``nn.Linear`` except the output layer and an attention's ``out_proj``, or those
    ``modules`` names, less ``exclude``.

    Raises:
        NoMatchError: the model has no ``nn.Linear``, or a pattern selects nothing.
        ValueError: ``modules`` names a layer that cannot be quantized (an attention ``out_proj``, a Linear subclass).
    """
    return cast("dict[str, nn.Linear]", select_layers(model, (BITSANDBYTES,), modules, exclude)[BITSANDBYTES.name])


def quantize_layers_(
    model: nn.Module,
    chosen: dict[str, nn.Linear],
    mode: str,
    double_quant: bool,
    block_size: int,
    compute_dtype: str | torch.dtype,
    device: torch.device | str | None,
) -> dict[str, nn.Linear]:
    """Quantize exactly the ``chosen`` layers (as selected by :func:`select_quantizable`), in place; a
    ``torch.dtype`` as ``compute_dtype`` is used as is (already resolved for the
    device the model will run on, which may differ from the one it is quantized on)."""
    layers = _layers()
    plan = []
    for name, linear in chosen.items():
        dev = torch.device(device) if device is not None else linear.weight.device
        if dev.type == "meta":
            raise ValueError(f"cannot quantize {name!r}: its weight is on the meta device; materialize the model first")
        dtype = compute_dtype if isinstance(compute_dtype, torch.dtype) else resolve_compute_dtype(compute_dtype, dev)
        plan.append((name, linear, dev, dtype))  # all checks before any change
    originals: dict[str, nn.Linear] = {}
    for name, linear, dev, dtype in plan:
        if mode == "int8":
            new = layers.QuantLinear8bit.from_linear(linear, compute_dtype=dtype, device=dev)
        else:
            new = layers.QuantLinear4bit.from_linear(
                linear, quant_type=mode, double_quant=double_quant, block_size=block_size, compute_dtype=dtype, device=dev
            )
        new.train(linear.training)
        set_submodule(model, name, new)
        originals[name] = linear
    return originals


def restore_(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put back the layers :func:`quantize_` returned (undo a quantization)."""
    for name, module in originals.items():
        set_submodule(model, name, module)


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 ``[out_features, in_features]`` weight a quantized layer computes with."""
    return _layers().dequantize_weight(layer)


@torch.no_grad()
def dequantize_(model: nn.Module) -> list[str]:
    """Replace every quantized layer without an adapter by a float32 ``nn.Linear`` holding its dequantized weight
    (see :func:`~lightning_accel.quantization.merge_adapters_` for layers with adapters). Returns their names."""
    names: list[str] = []
    for name, layer in quantized_layers(model).items():
        if layer.adapter is not None:
            continue
        replace_by_float_linear_(model, name, layer, dequantize_weight(layer))
        names.append(name)
    return names


@torch.no_grad()
def replace_by_float_linear_(model: nn.Module, name: str, layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """Put a float32 ``nn.Linear`` holding ``weight`` (and ``layer``'s bias) in place of ``layer``, in train mode as
    ``layer`` was; returns it."""
    layer = cast(nn.Linear, layer)  # a quantized layer is an ``nn.Linear`` subclass
    out = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device=weight.device)
    out.weight.copy_(weight)
    if layer.bias is not None:
        out.bias.copy_(layer.bias.float())
    out.train(layer.training)
    set_submodule(model, name, out)
    return out


def quantized_footprint(model: nn.Module) -> dict[str, Any]:
    """Stored size of the quantized layers' weights.

    Returns:
        ``layers``, ``weights`` (number of quantized weights), ``weight_bytes`` (packed weights), ``state_bytes``
        (per-block / per-row statistics: absmax, nested absmax and offset, or int8 row scales), ``table_bytes``
        (the format's fixed code tables: the 16-entry 4-bit map and the 256-entry nested map, the same in every
        layer), ``bits_per_weight`` = (weight bytes + state bytes) x 8 / weights, and
        ``bits_per_weight_with_tables`` counting the tables too.
    """
    n = weight_bytes = state_bytes = table_bytes = 0
    layers = quantized_layers(model)
    for module in layers.values():
        layer = cast("QuantLinear4bit | QuantLinear8bit", module)
        n += layer.in_features * layer.out_features
        weight_bytes += layer.weight.data.nbytes
        if type(layer).__name__ == "QuantLinear8bit":
            state_bytes += cast("QuantLinear8bit", layer).SCB.nbytes
            continue
        qs = cast("QuantLinear4bit", layer).weight.quant_state
        state_bytes += qs.absmax.nbytes
        table_bytes += qs.code.nbytes
        if qs.nested:
            state_bytes += qs.state2.absmax.nbytes + qs.offset.nbytes
            table_bytes += qs.state2.code.nbytes
    bits = (weight_bytes + state_bytes) * 8 / n if n else float("nan")
    with_tables = (weight_bytes + state_bytes + table_bytes) * 8 / n if n else float("nan")
    return {
        "layers": len(layers),
        "weights": n,
        "weight_bytes": weight_bytes,
        "state_bytes": state_bytes,
        "table_bytes": table_bytes,
        "bits_per_weight": bits,
        "bits_per_weight_with_tables": with_tables,
    }


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"trainable", "total"}`` numbers of parameters, a quantized weight counted as ``in x out`` values (its
    packed storage holds two 4-bit values per element); see
    :func:`~lightning_accel.quantization.backends.parameter_counts`."""
    return parameter_counts(model)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()``: what a checkpoint of the model's weights stores."""
    seen: set[int] = set()
    total = 0
    for t in model.state_dict().values():
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total




def replay_dtype(name: str | None, device: torch.device) -> str:
    """The compute dtype a checkpoint recorded, if ``device`` runs it; else ``"auto"``."""
    if name in ("fp32", "bf16", "fp16"):
        try:
            resolve_compute_dtype(name, device)
            return name
        except ValueError:
            pass
    return "auto"


class BitsandbytesBackend(QuantizationBackend):
    """bitsandbytes int8 / nf4 / fp4 ``nn.Linear`` layers (CPU and CUDA): frozen quantized bases that train with
    adapters, per-layer formats, DDP."""

    name = "bitsandbytes"
    family = "bitsandbytes"
    modes = MODES
    layer_types = (nn.Linear,)
    layer_kind = "Linear layers"
    trainable_base = True
    per_layer_modes = True

    def require(self) -> Any:
        return require_bitsandbytes()

    def is_quantized(self, module: nn.Module) -> bool:
        return is_quantized_layer(module)

    def quantized_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return quantized_layers(model)

    def pick(self, model: nn.Module, candidates: Any, *, strict: bool) -> dict[str, nn.Module]:
        chosen: dict[str, nn.Module] = {}
        for name, layer in candidates.items():
            if not isinstance(layer, nn.Linear) or is_quantized_layer(layer):
                continue  # not a Linear, or already quantized: quantize_ is idempotent
            if is_attention_projection(model, name):
                if strict:
                    raise ValueError(
                        f"`modules` selects {name!r}, the output projection of an nn.MultiheadAttention: attention reads "
                        "its weight directly (F.multi_head_attention_forward), so a quantized layer there would be "
                        "bypassed; exclude it, e.g. exclude=['*.out_proj']"
                    )
                continue  # left in float by the default selection
            if not self.can_quantize(layer):
                if strict:
                    raise ValueError(
                        f"`modules` selects {name!r}, a {type(layer).__name__}: only plain nn.Linear layers can be "
                        "replaced by quantized ones (a subclass may have its own forward)"
                    )
                continue
            chosen[name] = layer
        return chosen

    def quantize_(self, model: nn.Module, layers: Any, config: QuantConfig) -> dict[str, Any]:
        """Each layer to its :meth:`QuantConfig.mode_of` format; returns the float layers replaced."""
        by_mode: dict[str, dict[str, nn.Linear]] = {}
        for name, layer in layers.items():
            by_mode.setdefault(config.mode_of(name), {})[name] = layer
        originals: dict[str, Any] = {}
        for mode, chosen in by_mode.items():
            originals.update(
                quantize_layers_(model, chosen, mode, config.double_quant, config.block_size, config.compute_dtype, config.device)
            )
        return originals

    def restore_float_(self, model: nn.Module) -> list[str]:
        """Every quantized layer without an adapter to a float ``nn.Linear`` (see :func:`dequantize_`)."""
        return dequantize_(model)

    def record(self, model: nn.Module, config: QuantConfig) -> dict[str, Any]:
        layers = quantized_layers(model)
        if not layers:
            return {"modules": []}
        cfg = layer_config(next(iter(layers.values())))
        return {
            "mode": cfg["mode"],
            "double_quant": cfg.get("double_quant", config.double_quant),
            "block_size": cfg.get("block_size", config.block_size),
            "compute_dtype": cfg["compute_dtype"],
            "layer_modes": {n: layer_config(m)["mode"] for n, m in layers.items()},
            "modules": list(layers),
        }

    def replay_(self, model: nn.Module, state: Any) -> None:
        names = list(state.get("modules") or [])
        present = quantized_layers(model)
        extra = [n for n in present if n not in names]
        if extra:
            raise ValueError(
                f"the checkpoint was made with quantized layers {names}, but {type(model).__name__} also has quantized "
                f"layers {extra}: quantize the same layers (`modules` / `exclude`) as the checkpoint"
            )
        modes = dict(state.get("layer_modes") or {})  # per-layer formats (``layer_bits``); absent in 0.1.0 checkpoints
        for name in names:
            if name in present:
                cfg = layer_config(present[name])
                want = {k: state[k] for k in ("mode", "double_quant", "block_size") if k in cfg}
                if "mode" in want:
                    want["mode"] = modes.get(name, state["mode"])
                if {k: cfg[k] for k in want} != want:
                    raise ValueError(
                        f"the checkpoint quantized {name!r} with {want}, but the model's layer is {cfg}: use the "
                        "checkpoint's `mode`, `double_quant` and `block_size`"
                    )
        missing = {}
        for name in names:
            if name in present:
                continue
            layer = recorded_layer(model, name)
            if type(layer) is not nn.Linear:
                raise ValueError(f"the checkpoint quantized {name!r}, which is a {type(layer).__name__} in this model, not an nn.Linear")
            missing[name] = layer
        if missing:
            first = next(iter(missing.values()))
            config = QuantConfig(
                mode=state["mode"],
                double_quant=bool(state.get("double_quant", True)),
                block_size=int(state.get("block_size", 64)),
                compute_dtype=replay_dtype(state.get("compute_dtype"), first.weight.device),
                layer_modes=modes,
            )
            self.quantize_(model, missing, config)

    def footprint(self, model: nn.Module) -> dict[str, Any]:
        foot = quantized_footprint(model)
        return {**foot, "bytes": foot["weight_bytes"] + foot["state_bytes"]}

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        return dequantize_weight(layer)

    def weight_count(self, layer: nn.Module) -> int:
        linear = cast(nn.Linear, layer)
        return int(linear.in_features * linear.out_features)

    def describe(self, config: QuantConfig) -> str:
        dtype = config.compute_dtype
        compute = str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)
        if config.mode == "int8":
            return f"int8 (row-wise, compute {compute})"
        dq = ", double quant" if config.double_quant else ""
        return f"{config.mode} (block {config.block_size}{dq}, compute {compute})"


#: The bitsandbytes backend, registered as ``"bitsandbytes"``.
BITSANDBYTES = register_backend(BitsandbytesBackend())
