"""One protocol for every quantization backend, and the registry that names them.

In the spirit of torchao's ``quantize_(model, config, filter_fn)`` with a handler per config type: each backend is
one object that implements the same small set of operations, registered under a name, and everything that
quantizes, replays, restores or measures goes through it (the :class:`~lightning_accel.Quantization` callback, the
replay of a checkpoint, :func:`lightning_accel.quantize_`, the report's sizes, sensitivity analysis):

* which layers it takes: :attr:`~QuantizationBackend.layer_types`, :meth:`~QuantizationBackend.can_quantize`,
  :meth:`~QuantizationBackend.pick` (of candidates chosen by name patterns) and :func:`select_layers`;
* :meth:`~QuantizationBackend.quantize_` (in place, returns what it replaced) and
  :meth:`~QuantizationBackend.restore_` (puts that back);
* :meth:`~QuantizationBackend.record` / :meth:`~QuantizationBackend.replay_`: what a checkpoint needs to rebuild the
  quantized layers of a freshly built float model before its weights load;
* :meth:`~QuantizationBackend.restore_float_`: every layer it quantized back to float (dequantized);
* :meth:`~QuantizationBackend.footprint`: the stored bytes of its layers' weights.

The built-in backends, each registered by its own module (imported by the package, so the registry is filled
whenever anything of :mod:`lightning_accel.quantization` is imported):

============== ======================================= ==========================================================
name           module                                  what it quantizes
============== ======================================= ==========================================================
bitsandbytes   :mod:`~lightning_accel.quantization.bnb`  ``nn.Linear`` to int8 / nf4 / fp4 (CPU and CUDA, trainable
                                                       base for adapters)
torchao        :mod:`~lightning_accel.quantization.torchao`  ``nn.Linear`` to int8 (dynamic int8 activations, fast on a
                                                       CPU once compiled or exported)
pt2e           :mod:`~lightning_accel.quantization.pt2e`  ``nn.Conv1d`` / ``nn.Conv2d`` to static int8 (calibrated)
torchao_emb    :mod:`~lightning_accel.quantization.torchao`  ``nn.Embedding`` tables to int8 weight-only (one scale
                                                       per row; with ``Quantization(embeddings=True)``)
============== ======================================= ==========================================================

A backend also names its **family**: the value of the user-facing ``backend`` argument it serves
(``Quantization(backend="torchao")`` quantizes Linear layers with ``torchao`` and convolutions with ``pt2e``).
Adding a backend is one subclass of :class:`QuantizationBackend` and one :func:`register_backend` call::

    class MyBackend(QuantizationBackend):
        name = family = "mine"
        ...
    register_backend(MyBackend())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn

from lightning_accel._select import NoMatchError, select_modules, set_submodule
from lightning_accel._validate import check_patterns

__all__ = [
    "QuantConfig",
    "QuantizationBackend",
    "backends_of",
    "footprint_of",
    "get_backend",
    "parameter_counts",
    "is_attention_projection",
    "quantized_layers_by_backend",
    "recorded_layer",
    "register_backend",
    "registered_backends",
    "select_layers",
    "unregister_backend",
]


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize: one config for every backend, each reading the fields that concern it.

    Args:
        mode: the weight format, e.g. ``"nf4"``; each backend lists the ones it accepts in ``modes``.
        double_quant: bitsandbytes 4-bit: quantize the per-block absmax too.
        block_size: bitsandbytes 4-bit: weights per absmax block.
        compute_dtype: bitsandbytes: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` or a resolved ``torch.dtype``.
        device: bitsandbytes: where to quantize and keep the layers (``None``: each layer's device).
        layer_modes: ``{layer name: mode}`` overriding ``mode`` per layer (backends with ``per_layer_modes``).
        activation: torchao: ``"dynamic"`` (int8 x int8) or ``"weight_only"``.
        calibration: backends that ``need_calibration``: the batches their input observers see.
        run: runs the model on one calibration batch (default: ``model(batch)``, or ``model(batch[0])`` for a tuple).
    """

    mode: str = "int8"
    double_quant: bool = True
    block_size: int = 64
    compute_dtype: str | torch.dtype = "auto"
    device: torch.device | str | None = None
    layer_modes: Mapping[str, str] | None = None
    activation: str = "dynamic"
    calibration: Iterable[Any] | None = None
    run: Callable[[Any], Any] | None = None

    def mode_of(self, name: str) -> str:
        """The format of the layer ``name``: its ``layer_modes`` entry, else ``mode``."""
        return (self.layer_modes or {}).get(name, self.mode)


class QuantizationBackend:
    """What every quantization backend implements (subclass it, fill the class attributes, override the methods).

    Class attributes:
        name: the registry name, e.g. ``"torchao"``.
        family: the user-facing ``backend`` value it serves, e.g. ``"torchao"`` (``pt2e`` serves ``"torchao"`` too).
        modes: the formats it accepts (:attr:`QuantConfig.mode`).
        layer_types: the float module types it replaces (used to choose candidates by name patterns).
        layer_kind: how its layers are named in logs, e.g. ``"Linear layers"``.
        trainable_base: a model with its layers trains (frozen quantized base, adapters) at setup time.
        per_layer_modes: it honours :attr:`QuantConfig.layer_modes`.
        supports_ddp: its layers can be broadcast by DDP.
        needs_calibration: :meth:`quantize_` needs :attr:`QuantConfig.calibration` batches.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    modes: ClassVar[tuple[str, ...]] = ()
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    layer_kind: ClassVar[str] = "layers"
    trainable_base: ClassVar[bool] = False
    per_layer_modes: ClassVar[bool] = False
    supports_ddp: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    #: quantizes embedding tables: only taken when the user asks for them (``Quantization(embeddings=True)``)
    embeddings: ClassVar[bool] = False

    # ------------------------------------------------------------------ which layers
    def require(self) -> Any:
        """Import the library this backend needs, or raise an ``ImportError`` naming what to install."""
        return None

    def can_quantize(self, module: nn.Module) -> bool:
        """Whether ``module`` is a float layer of a type this backend replaces (the model-level rules, such as an
        attention's ``out_proj``, are :meth:`pick`'s)."""
        return type(module) in self.layer_types

    def is_quantized(self, module: nn.Module) -> bool:
        """Whether ``module`` is a layer this backend made."""
        raise NotImplementedError

    def quantized_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{qualified name: layer}`` of the layers of ``model`` this backend made, in registration order."""
        return {n: m for n, m in model.named_modules() if self.is_quantized(m)}

    def pick(self, model: nn.Module, candidates: Mapping[str, nn.Module], *, strict: bool) -> dict[str, nn.Module]:
        """The layers among ``candidates`` (chosen by name patterns) this backend quantizes; layers already
        quantized are skipped.

        Raises:
            ValueError: ``strict`` (the user named the layers) and a candidate of :attr:`layer_types` cannot be
                quantized; the message says why.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ change
    def quantize_(self, model: nn.Module, layers: Mapping[str, nn.Module], config: QuantConfig) -> dict[str, Any]:
        """Quantize exactly ``layers`` (as :meth:`pick` chose them), in place; returns what was replaced, for
        :meth:`restore_`."""
        raise NotImplementedError

    def restore_(self, model: nn.Module, originals: Mapping[str, Any]) -> None:
        """Undo a :meth:`quantize_` with what it returned (default: the returned modules are put back)."""
        for name, module in originals.items():
            set_submodule(model, name, module)

    def restore_float_(self, model: nn.Module) -> list[str]:
        """Replace every layer this backend made by a float layer holding its dequantized weight; returns their
        names (the quantization error stays in the weights)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints
    def record(self, model: nn.Module, config: QuantConfig) -> dict[str, Any]:
        """What a checkpoint records of this backend's layers in ``model`` (merged into the callback's state)."""
        raise NotImplementedError

    def replay_(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Recreate the layers a :meth:`record` describes in a freshly built float model, so the checkpoint's
        weights load; layers already quantized as recorded are left alone.

        Raises:
            ValueError: ``model`` does not match the record.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ measurement
    def footprint(self, model: nn.Module) -> dict[str, Any]:
        """Stored size of this backend's layers' weights: at least ``layers``, ``weights`` (quantized values),
        ``bytes`` (stored, with their scales) and ``bits_per_weight``."""
        raise NotImplementedError

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The float weight a layer this backend made computes with."""
        raise NotImplementedError

    def weight_count(self, layer: nn.Module) -> int:
        """How many weights a layer this backend made holds (its logical ``out x in`` values, however packed)."""
        weight = cast(torch.Tensor, layer.weight)
        return int(weight.numel())

    def slow_on(self, device: torch.device) -> str | None:
        """Why this backend's layers run far slower than float on ``device`` (warned before a fit spends its time),
        ``None`` when they do not."""
        return None

    def describe(self, config: QuantConfig) -> str:
        """One phrase for logs: what the layers become."""
        return f"{config.mode} ({self.name})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, family={self.family!r})"


def is_attention_projection(model: nn.Module, name: str) -> bool:
    """Whether the layer ``name`` is a projection owned by an ``nn.MultiheadAttention`` (its ``out_proj``): attention
    reads that weight directly (``F.multi_head_attention_forward``), so a swapped-in layer there would be bypassed."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return isinstance(parent, nn.MultiheadAttention)


def recorded_layer(model: nn.Module, name: str, what: str = "quantized") -> nn.Module:
    """The submodule ``name`` a checkpoint's record names (``what`` it did to it, for the message).

    Raises:
        ValueError: ``model`` has no such submodule.
    """
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"the checkpoint {what} {name!r}, which {type(model).__name__} does not have") from err


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, QuantizationBackend] = {}


def register_backend(backend: QuantizationBackend) -> QuantizationBackend:
    """Register ``backend`` under its ``name`` (its ``family`` defaults to the name); returns it.

    Raises:
        TypeError: ``backend`` is not a :class:`QuantizationBackend` instance.
        ValueError: it has no name, or another backend is registered under that name.
    """
    if not isinstance(backend, QuantizationBackend):
        raise TypeError(f"`backend` must be a QuantizationBackend instance; got {backend!r}")
    if not isinstance(backend.name, str) or not backend.name:
        raise ValueError(f"`backend` {backend!r} has no `name` to register it under")
    known = _REGISTRY.get(backend.name)
    if known is not None and type(known) is not type(backend):
        raise ValueError(f"a quantization backend is already registered as {backend.name!r}: {known!r}")
    if not backend.family:
        backend.family = backend.name  # type: ignore[misc]
    _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove the backend registered as ``name`` (a no-op for an unknown name)."""
    _REGISTRY.pop(name, None)


def registered_backends() -> dict[str, QuantizationBackend]:
    """``{name: backend}`` of every registered backend, in registration order."""
    return dict(_REGISTRY)


def get_backend(name: str, argument: str = "backend") -> QuantizationBackend:
    """The backend registered as ``name``.

    Raises:
        ValueError: no backend of that name; the message names ``argument`` and lists the registered ones.
    """
    backend = _REGISTRY.get(name) if isinstance(name, str) else None
    if backend is None:
        raise ValueError(f"`{argument}` must be one of {', '.join(map(repr, _REGISTRY))}; got {name!r}")
    return backend


def backends_of(family: str, argument: str = "backend") -> tuple[QuantizationBackend, ...]:
    """The backends serving the user-facing ``backend`` value ``family``, in registration order (``"torchao"``:
    the torchao Linear backend and the PT2E convolution backend).

    Raises:
        ValueError: no backend serves ``family``; the message lists the families there are.
    """
    found = tuple(b for b in _REGISTRY.values() if b.family == family)
    if not found:
        families = dict.fromkeys(b.family for b in _REGISTRY.values())
        raise ValueError(f"`{argument}` must be one of {', '.join(map(repr, families))}; got {family!r}")
    return found


def quantized_layers_by_backend(model: nn.Module) -> dict[str, tuple[QuantizationBackend, nn.Module]]:
    """``{qualified name: (backend, layer)}`` of every quantized layer of ``model``, whichever backend made it."""
    found: dict[str, tuple[QuantizationBackend, nn.Module]] = {}
    for name, module in model.named_modules():
        for backend in _REGISTRY.values():
            if backend.is_quantized(module):
                found[name] = (backend, module)
                break
    return found


def select_layers(
    model: nn.Module,
    backends: Sequence[QuantizationBackend],
    modules: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, dict[str, nn.Module]]:
    """The float layers each of ``backends`` would quantize, ``{backend name: {qualified name: layer}}``: the
    modules of their :attr:`~QuantizationBackend.layer_types` chosen by ``modules`` / ``exclude`` patterns (the
    output layer left out by default, see :func:`lightning_accel.select_modules`), then each backend's
    :meth:`~QuantizationBackend.pick`.

    Raises:
        NoMatchError: ``model`` has no layer of those types, a pattern matches none, or nothing is left.
        ValueError: ``modules`` names a layer a backend cannot quantize (the message says why).
    """
    modules = check_patterns("modules", modules)
    exclude = check_patterns("exclude", exclude)
    types = tuple(dict.fromkeys(t for b in backends for t in b.layer_types))
    if not any(isinstance(m, types) for m in model.modules()):
        kinds = " or ".join(f"nn.{t.__name__}" for t in types)
        raise NoMatchError(f"{type(model).__name__} has no {kinds} layer to quantize")
    candidates = select_modules(model, modules, exclude, types=types, what="modules")
    strict = modules is not None
    return {b.name: b.pick(model, candidates, strict=strict) for b in backends}


def footprint_of(model: nn.Module, backends: Iterable[QuantizationBackend]) -> dict[str, Any]:
    """The stored size of the layers ``backends`` made, together: ``layers``, ``weights``, ``bytes``,
    ``bits_per_weight``, and ``by_backend`` (each backend's own :meth:`~QuantizationBackend.footprint`)."""
    parts = {b.name: b.footprint(model) for b in backends}
    weights = sum(int(p["weights"]) for p in parts.values())
    stored = sum(int(p["bytes"]) for p in parts.values())
    return {
        "layers": sum(int(p["layers"]) for p in parts.values()),
        "weights": weights,
        "bytes": stored,
        "bits_per_weight": 8.0 * stored / weights if weights else float("nan"),
        "by_backend": parts,
    }


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"trainable", "total"}`` numbers of parameters of ``model``, a quantized weight counted as its logical
    values (:meth:`~QuantizationBackend.weight_count`: a packed 4-bit weight holds two values per element)."""
    packed = {id(layer.weight): backend.weight_count(layer) for backend, layer in quantized_layers_by_backend(model).values()}
    trainable = total = 0
    for p in model.parameters():
        n = packed.get(id(p), p.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable": trainable, "total": total}
