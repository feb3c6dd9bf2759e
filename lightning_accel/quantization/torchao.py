"""int8 Linear layers that run fast on CPUs: torchao's dynamic-activation int8 x int8-weight (or weight-only) kernels.

In eager mode torchao's int8 layers are slower than float on a CPU; compiled (``torch.compile``) or exported and
compiled ahead of time (:func:`lightning_accel.export`), inductor turns them into VNNI int8 matmuls. A layer
keeps its module type (``nn.Linear``) and its ``state_dict`` keys; its ``weight`` becomes a torchao int8 tensor
(one int8 per weight plus one scale per output row). :class:`TorchaoInt8Backend` is this module's entry in the
backend registry (:mod:`~lightning_accel.quantization.backends`, ``"torchao"``). The pure core:

    chosen = select_quantizable(model)                     # every nn.Linear except the output layer
    originals = quantize_int8_(model, chosen)              # in place; keep `originals` to undo
    restore_float_weights_(model, originals)               # undo

:func:`replay_int8_` re-quantizes a freshly built float model's layers so a checkpoint of a quantized model loads.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from lightning_accel._compat import register_state_dict_hooks
from lightning_accel._optional import quiet_import
from lightning_accel.quantization.backends import (
    QuantConfig,
    QuantizationBackend,
    is_attention_projection,
    recorded_layer,
    register_backend,
)

__all__ = [
    "CONFIGS",
    "SLOW_INT8_CPU",
    "int8_dot_product_cpu",
    "slow_int8_on",
    "int8_footprint",
    "int8_layers",
    "quantize_int8_",
    "replay_int8_",
    "require_torchao",
    "restore_float_weights_",
    "TORCHAO",
    "TorchaoInt8Backend",
    "is_int8_tensor",
]

_INSTALL_HINT = "pip install 'torchao>=0.18,<0.19'"

SLOW_INT8_CPU = (
    "this CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX), so torch's int8 matmuls run far "
    "slower than float32 here: on an AVX2-only CPU the exported int8 digits Transformer took 1.5x the float one's "
    "time at batch 1 and 10x at batch 256, and torch._int_mm 30x a float matmul. The int8 model is 3.4x smaller "
    "but not faster; keep float layers where speed matters on this machine, or deploy on a CPU with VNNI/AMX"
)


def int8_dot_product_cpu() -> bool:
    """Whether this CPU has the int8 dot-product instructions (AVX512-VNNI / AVX-VNNI, or AMX) that torch's int8
    CPU kernels need to beat float32."""
    cpu = torch.cpu
    return any(bool(getattr(cpu, probe, lambda: False)()) for probe in ("_is_vnni_supported", "_is_amx_tile_supported"))


def slow_int8_on(device: torch.device) -> bool:
    """Whether torchao's int8 matmuls are far slower than float32 on ``device``: a CPU without VNNI/AMX."""
    return device.type == "cpu" and not int8_dot_product_cpu()


def require_torchao() -> Any:
    """Import torchao (quietly: on a CPU build it prints harmless notices about CUDA-only extensions)."""
    try:
        quiet_import("torchao.quantization")
        return quiet_import("torchao")
    except ImportError as err:
        raise ImportError(f"Quantization(backend='torchao') needs torchao: {_INSTALL_HINT}") from err


def _config(activation: str) -> Any:
    require_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return {"dynamic": Int8DynamicActivationInt8WeightConfig, "weight_only": Int8WeightOnlyConfig}[activation]()


#: activation handling -> what it is, for logs and errors
CONFIGS: dict[str, str] = {
    "dynamic": "int8 activations quantized per token at run time x int8 weights (one scale per output row)",
    "weight_only": "int8 weights (one scale per output row), float activations",
}


def is_int8_tensor(t: Any) -> bool:
    """Whether ``t`` is a torchao quantized tensor subclass (what :func:`quantize_int8_` makes of a weight)."""
    return type(t).__module__.startswith("torchao")


def int8_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers of ``model`` whose weight is a torchao quantized tensor, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_int8_tensor(m.weight)}


@torch.no_grad()
def quantize_int8_(model: nn.Module, chosen: Mapping[str, nn.Module], activation: str = "dynamic") -> dict[str, nn.Parameter]:
    """Quantize exactly the ``chosen`` Linear layers (or, ``weight_only``, embedding tables) to int8 with torchao,
    in place.

    Args:
        model: the model (layers keep their names and types).
        chosen: ``{qualified name: nn.Linear}``, e.g. from :func:`~lightning_accel.quantization.select_quantizable`.
        activation: ``"dynamic"`` (int8 x int8 matmuls) or ``"weight_only"``, see :data:`CONFIGS`.

    Returns:
        ``{name: the float weight it replaced}``, for :func:`restore_float_weights_`.

    Raises:
        ValueError: an unknown ``activation``.
        ImportError: torchao is not installed.
    """
    if activation not in CONFIGS:
        raise ValueError(f"`activation` must be one of {', '.join(map(repr, CONFIGS))}; got {activation!r}")
    from torchao.quantization import quantize_

    config = _config(activation)
    todo = {id(m): n for n, m in chosen.items() if not is_int8_tensor(m.weight)}
    originals = {todo[id(m)]: cast(nn.Parameter, m.weight) for m in chosen.values() if id(m) in todo}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config, filter_fn=lambda module, fqn: id(module) in todo)
    for layer in chosen.values():
        _serialize_plain(layer)
    return originals


def _plain_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: an int8 weight is saved as plain tensors (``weight``: int8, ``weight_scale``), so the
    checkpoint loads with any ``map_location`` (Lightning's is a callable, which torch cannot apply to torchao's
    tensor subclasses) and with ``weights_only=True``."""
    w = state_dict.get(prefix + "weight")
    if w is not None and is_int8_tensor(w):
        state_dict[prefix + "weight"] = w.qdata.detach()
        state_dict[prefix + "weight_scale"] = w.scale.detach()


def _load_plain(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: plain int8 data and scales go into the layer's torchao weight in place."""
    scale = state_dict.pop(prefix + "weight_scale", None)
    if scale is None:
        return
    weight: Any = module.weight  # a torchao tensor subclass (optional dependency, no stubs)
    if not is_int8_tensor(weight):
        return
    qdata = state_dict[prefix + "weight"]
    with torch.no_grad():
        weight.qdata.copy_(qdata)
        weight.scale.copy_(scale)
    state_dict[prefix + "weight"] = weight.detach()


def _serialize_plain(layer: nn.Module) -> None:
    if not getattr(layer, "_accel_int8_hooks", False):
        register_state_dict_hooks(layer, _plain_state, _load_plain)
        # the quantized layer's own serialization: it lives as long as the layer (torch types setattr as Tensor | Module)
        layer._accel_int8_hooks = True  # type: ignore[assignment]


def restore_float_weights_(model: nn.Module, originals: dict[str, nn.Parameter]) -> None:
    """Put back the float weights :func:`quantize_int8_` replaced."""
    for name, weight in originals.items():
        model.get_submodule(name).weight = weight


def replay_int8_(model: nn.Module, names: list[str], activation: str = "dynamic") -> None:
    """Quantize the layers ``names`` of a freshly built float model as a recorded run did, so the checkpoint's
    int8 weights load into them; layers already int8 are left alone.

    Raises:
        ValueError: a recorded layer is missing or is not an ``nn.Linear`` in ``model``.
    """
    chosen = {}
    for name in names:
        layer = recorded_layer(model, name, "quantized with torchao the layer")
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"the checkpoint quantized {name!r}, which is a {type(layer).__name__} here, not an nn.Linear")
        chosen[name] = layer
    quantize_int8_(model, chosen, activation)


def _stored_bytes(weight: Any) -> int:
    """The bytes a torchao quantized weight stores (its data tensors: int8 values, scales)."""
    total = 0
    for attr in getattr(weight, "tensor_data_names", ()) or ("qdata", "scale"):
        t = getattr(weight, attr, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def int8_footprint(model: nn.Module) -> dict[str, Any]:
    """Stored bytes of the torchao int8 layers' weights (int8 data + scales) and bits per weight."""
    layers = int8_layers(model)
    weights = sum(m.in_features * m.out_features for m in layers.values())
    stored = sum(_stored_bytes(m.weight) for m in layers.values())
    return {"layers": len(layers), "weights": weights, "bytes": stored, "bits_per_weight": 8.0 * stored / max(weights, 1)}


class TorchaoInt8Backend(QuantizationBackend):
    """torchao int8 ``nn.Linear`` weights (dynamic int8 activations, or weight-only): for inference, fast on a CPU
    with VNNI/AMX once compiled or exported. Convolutions of the same ``backend="torchao"`` go to ``"pt2e"``."""

    name = "torchao"
    family = "torchao"
    modes = ("int8",)
    layer_types = (nn.Linear,)
    layer_kind = "Linear layers"
    supports_ddp = False  # DDP cannot broadcast torchao's int8 tensor subclasses

    def require(self) -> Any:
        return require_torchao()

    def is_quantized(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and is_int8_tensor(module.weight)

    def pick(self, model: nn.Module, candidates: Any, *, strict: bool) -> dict[str, nn.Module]:
        linears: dict[str, nn.Module] = {}
        for name, layer in candidates.items():
            if not isinstance(layer, nn.Linear) or is_int8_tensor(layer.weight):
                continue
            why = None
            if is_attention_projection(model, name):
                why = "the output projection of an nn.MultiheadAttention (attention reads its weight directly)"
            elif not self.can_quantize(layer):
                why = f"a {type(layer).__name__} (only plain nn.Linear layers; a subclass may have its own forward)"
            if why is None:
                linears[name] = layer
            elif strict:
                raise ValueError(f"`modules` selects {name!r}, {why}: it cannot be quantized to int8; exclude it")
        return linears

    def quantize_(self, model: nn.Module, layers: Any, config: QuantConfig) -> dict[str, Any]:
        """Returns the float weights replaced."""
        return quantize_int8_(model, dict(layers), config.activation) if layers else {}

    def restore_(self, model: nn.Module, originals: Any) -> None:
        restore_float_weights_(model, dict(originals))

    @torch.no_grad()
    def restore_float_(self, model: nn.Module) -> list[str]:
        layers = int8_layers(model)
        for layer in layers.values():
            w = layer.weight
            layer.weight = nn.Parameter(w.dequantize().float(), requires_grad=w.requires_grad)
        return list(layers)

    def record(self, model: nn.Module, config: QuantConfig) -> dict[str, Any]:
        return {"mode": "int8", "activation": config.activation, "modules": list(int8_layers(model))}

    def replay_(self, model: nn.Module, state: Any) -> None:
        replay_int8_(model, list(state.get("modules") or []), state.get("activation", "dynamic"))

    def footprint(self, model: nn.Module) -> dict[str, Any]:
        return int8_footprint(model)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        return cast(torch.Tensor, layer.weight).dequantize().float()

    def slow_on(self, device: torch.device) -> str | None:
        return SLOW_INT8_CPU if slow_int8_on(device) else None

    def describe(self, config: QuantConfig) -> str:
        if config.activation == "weight_only":
            return "Linear: int8 weights, one scale per output row, float activations"
        return "Linear: dynamic int8 activations x int8 weights, one scale per output row"


#: The torchao int8 Linear backend, registered as ``"torchao"``.
TORCHAO = register_backend(TorchaoInt8Backend())


def int8_embeddings(model: nn.Module) -> dict[str, nn.Embedding]:
    """The embedding tables of ``model`` whose weight is a torchao int8 tensor, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding) and is_int8_tensor(m.weight)}


class TorchaoEmbeddingBackend(QuantizationBackend):
    """torchao int8 weight-only ``nn.Embedding`` tables (``Int8WeightOnlyConfig``: int8 rows, one scale per row;
    a lookup dequantizes the rows it reads). In the ``torchao`` family, taken only when the user asks for it
    (``Quantization(embeddings=True)``): a text model's word-embedding table is most of its bytes (MiniLM: 11.7M
    of 22.7M weights)."""

    name = "torchao_embedding"
    family = "torchao"
    modes = ("int8",)
    layer_types = (nn.Embedding,)
    layer_kind = "embedding tables"
    supports_ddp = False
    embeddings = True

    def require(self) -> Any:
        return require_torchao()

    def is_quantized(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding) and is_int8_tensor(module.weight)

    def can_quantize(self, module: nn.Module) -> bool:
        return type(module) is nn.Embedding and module.max_norm is None  # max_norm renormalizes the weight in place

    def pick(self, model: nn.Module, candidates: Any, *, strict: bool) -> dict[str, nn.Module]:
        chosen: dict[str, nn.Module] = {}
        for name, layer in candidates.items():
            if not isinstance(layer, nn.Embedding) or is_int8_tensor(layer.weight):
                continue
            if self.can_quantize(layer):
                chosen[name] = layer
            elif strict:
                raise ValueError(f"`modules` selects {name!r}, an embedding with max_norm or a subclass: it cannot be quantized to int8; exclude it")
        return chosen

    def quantize_(self, model: nn.Module, layers: Any, config: QuantConfig) -> dict[str, Any]:
        return quantize_int8_(model, dict(layers), "weight_only") if layers else {}

    def restore_(self, model: nn.Module, originals: Any) -> None:
        restore_float_weights_(model, dict(originals))

    @torch.no_grad()
    def restore_float_(self, model: nn.Module) -> list[str]:
        tables = int8_embeddings(model)
        for table in tables.values():
            w = table.weight
            table.weight = nn.Parameter(w.dequantize().float(), requires_grad=w.requires_grad)
        return list(tables)

    def record(self, model: nn.Module, config: QuantConfig) -> dict[str, Any]:
        return {"embeddings": list(int8_embeddings(model))}

    def replay_(self, model: nn.Module, state: Any) -> None:
        chosen = {}
        for name in state.get("embeddings") or []:
            table = recorded_layer(model, name, "quantized with torchao the embedding")
            if not isinstance(table, nn.Embedding):
                raise ValueError(f"the checkpoint quantized {name!r}, which is a {type(table).__name__} here, not an nn.Embedding")
            chosen[name] = table
        if chosen:
            quantize_int8_(model, chosen, "weight_only")

    def footprint(self, model: nn.Module) -> dict[str, Any]:
        tables = int8_embeddings(model)
        stored = sum(_stored_bytes(m.weight) for m in tables.values())
        weights = sum(m.num_embeddings * m.embedding_dim for m in tables.values())
        return {"layers": len(tables), "weights": weights, "bytes": stored, "bits_per_weight": 8.0 * stored / max(weights, 1)}

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        return cast(Any, layer.weight).dequantize().float()

    def describe(self, config: QuantConfig) -> str:
        return "Embedding: int8 weights, one scale per row"


#: The torchao int8 embedding backend, registered as ``"torchao_embedding"`` (family ``"torchao"``).
TORCHAO_EMBEDDING = register_backend(TorchaoEmbeddingBackend())
