"""What :class:`~lightning_accel.Quantization` quantizes, shared by its two paths (:mod:`.qlora` at setup,
:mod:`.ptq` at fit end): the layers a backend family takes, the per-layer formats, the record a checkpoint keeps, and
how it is described in logs. Every backend-specific answer comes from the backend protocol
(:mod:`~lightning_accel.quantization.backends`), never from a test of a backend's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from torch import nn

from lightning_accel.quantization.adapters import LoRAAdapter, adapted_layers
from lightning_accel.quantization.backends import (
    QuantConfig,
    QuantizationBackend,
    backends_of,
    quantized_layers_by_backend,
    registered_backends,
    select_layers,
)

__all__ = [
    "FOUR_BIT_MODES",
    "Family",
    "adapter_record",
    "check_backend_args",
    "choose_layers",
    "describe",
    "family_record",
    "is_quantized",
    "keep_quantized_layers",
    "layer_counts",
    "other_backend_hint",
    "quantization_record",
    "select_for",
    "training_family",
]

#: The registered backends serving one user-facing ``backend`` value, in registration order.
Family = Sequence[QuantizationBackend]


def is_quantized(model: nn.Module) -> bool:
    """Whether any registered backend has quantized a layer of ``model`` (quantized already: by the user, or the same
    model set up again)."""
    return bool(quantized_layers_by_backend(model))


#: the 4-bit weight formats (bitsandbytes NF4 / FP4 blocks): Linear layers only
FOUR_BIT_MODES: tuple[str, ...] = ("nf4", "fp4")


def select_for(
    model: nn.Module,
    family: Family,
    modules: Sequence[str] | None,
    exclude: Sequence[str] | None,
    mode: str | None = None,
) -> dict[str, dict[str, nn.Module]]:
    """:func:`~lightning_accel.quantization.backends.select_layers` for ``family``; an error on a model whose layers
    only another family takes says which ``backend`` would take them (and, for a 4-bit ``mode``, that 4-bit needs
    the layers ``family`` takes)."""
    try:
        return select_layers(model, family, modules, exclude)
    except ValueError as err:
        hint = other_backend_hint(model, family, mode)
        if hint is None:
            raise
        raise type(err)(f"{err}. {hint}") from err


def other_backend_hint(model: nn.Module, family: Family, mode: str | None = None, functional: bool = False) -> str | None:
    """Which backend takes the layers of ``model`` that ``family`` does not (``None`` when there are none): in the
    words of ``Quantization(...)``, or of ``quantize_(...)`` with ``functional``."""
    own = {t for b in family for t in b.layer_types}
    for other in registered_backends().values():
        extra = tuple(t for t in other.layer_types if t not in own)
        if other in family or other.embeddings or not extra or not any(isinstance(m, extra) for m in model.modules()):
            continue
        kinds = " and ".join(dict.fromkeys(b.layer_kind for b in family))
        first = (
            f"4-bit formats (mode={mode!r}) need {kinds}"
            if mode in FOUR_BIT_MODES
            else f"{family[0].name if functional else family[0].family} quantizes {kinds} only"
        )
        other_mode = other.modes[0] if other.modes else "int8"
        if functional:
            data = ", calibration=<input batches>" if other.needs_calibration else ""
            return f"{first}; {other_mode} {other.layer_kind} are quantize_(model, mode={other_mode!r}, backend={other.name!r}{data})"
        when = "" if other.trainable_base else " with when='fit_end'"
        return (
            f"{first}; {other_mode} {other.layer_kind} are mode={other_mode!r}, backend={other.family!r}{when} "
            "(or backend='auto' on a CPU)"
        )
    return None


def keep_quantized_layers(
    model: nn.Module, chosen: Mapping[str, nn.Module], layer_modes: Mapping[str, str] | None, mode: str, given: Any
) -> dict[str, nn.Module]:
    """``chosen`` without the layers ``layer_modes`` keeps in ``"float"``; names ``layer_modes`` gives that are not
    among ``chosen`` raise (``given`` is the user's ``layer_bits``, for the message)."""
    if layer_modes is None:
        return dict(chosen)
    unknown = sorted(set(layer_modes) - set(chosen))
    if unknown:
        raise ValueError(
            f"Quantization `layer_bits` names {unknown[:5]}, which are not selected Linear layers of "
            f"{type(model).__name__}; selected: {sorted(chosen)[:40]} (change `modules` / `exclude`, or the names)"
        )
    kept = {n: m for n, m in chosen.items() if layer_modes.get(n, mode) != "float"}
    if not kept:
        raise ValueError(f"Quantization `layer_bits` keeps every selected layer in float ({given!r}): nothing to quantize")
    return kept


def choose_layers(
    model: nn.Module,
    family: Family,
    config: QuantConfig,
    modules: Sequence[str] | None,
    exclude: Sequence[str] | None,
    layer_bits: Any,
) -> dict[str, dict[str, nn.Module]]:
    """The layers each backend of ``family`` quantizes, ``{backend name: {qualified name: layer}}``: the selection
    (:func:`select_for`) less what :attr:`QuantConfig.layer_modes` keeps in float (backends with per-layer formats)."""
    picked = select_for(model, family, modules, exclude, config.mode)
    return {
        b.name: keep_quantized_layers(model, picked[b.name], config.layer_modes, config.mode, layer_bits)
        if b.per_layer_modes
        else picked[b.name]
        for b in family
    }


def family_record(model: nn.Module, family: Family, config: QuantConfig) -> dict[str, Any]:
    """What a checkpoint records of the layers ``family`` quantized in ``model``: ``applied``, ``backend`` and each
    backend's :meth:`~lightning_accel.quantization.backends.QuantizationBackend.record`."""
    record: dict[str, Any] = {"applied": True, "backend": family[0].family}
    for backend in family:
        record.update(backend.record(model, config))
    return record


def quantization_record(model: nn.Module, family: Family, config: QuantConfig, alpha: float, dropout: float) -> dict[str, Any]:
    """The record a :class:`~lightning_accel.Quantization` checkpoint keeps of ``model``: :func:`family_record` and
    :func:`adapter_record` of the layers ``family`` quantized."""
    quantized = [n for b in family for n in b.quantized_layers(model)]
    return {**family_record(model, family, config), **adapter_record(model, quantized, alpha, dropout)}


def adapter_record(model: nn.Module, quantized: Sequence[str], alpha: float, dropout: float) -> dict[str, Any]:
    """The adapters on the ``quantized`` layers, as a checkpoint records them (``alpha`` / ``dropout`` when there
    are none)."""
    adapters = {n: cast(LoRAAdapter, m.adapter) for n, m in adapted_layers(model).items() if n in quantized}
    first = next(iter(adapters.values()), None)
    return {
        "adapters": list(adapters),
        "adapter_rank": first.rank if first is not None else 0,
        "adapter_alpha": first.alpha if first is not None else alpha,
        "adapter_dropout": _dropout_p(first) if first is not None else dropout,
    }


def _dropout_p(adapter: LoRAAdapter) -> float:
    return float(adapter.dropout.p) if isinstance(adapter.dropout, nn.Dropout) else 0.0


def describe(family: Family, config: QuantConfig) -> str:
    """What the layers become, for logs: the backend's phrase, or ``"int8 (torchao: Linear: ...; convolutions:
    ...)"`` for a family of several backends."""
    if len(family) == 1:
        return family[0].describe(config)
    return f"{config.mode} ({family[0].family}: " + "; ".join(b.describe(config) for b in family) + ")"


def layer_counts(footprint: Mapping[str, Any], family: Family) -> str:
    """``"12 Linear layers"`` / ``"3 Linear layers and 2 convolutions"`` from a
    :func:`~lightning_accel.quantization.backends.footprint_of`."""
    parts = footprint["by_backend"]
    return " and ".join(f"{parts[b.name]['layers']} {b.layer_kind}" for b in family)


def training_family(backend: str) -> str:
    """The user-facing backend a setup-time quantization uses: ``backend``, or for ``"auto"`` the first registered
    family whose layers train (bitsandbytes)."""
    if backend != "auto":
        return backend
    return next(b.family for b in registered_backends().values() if b.trainable_base)


def check_backend_args(backend: str, mode: str, when: str, adapter_rank: int, per_layer: bool) -> None:
    """The rules an explicit ``backend`` sets on the other arguments, from what its backends declare.

    Raises:
        ValueError: a format the backend does not have, training or adapters on a backend whose layers do not
            train, or per-layer formats on a backend without them.
    """
    if backend == "auto":
        return
    family = backends_of(backend)
    modes = tuple(dict.fromkeys(m for b in family for m in b.modes))
    trains = all(b.trainable_base for b in family)
    if not trains and (mode not in modes or when != "fit_end" or adapter_rank):
        trainer = training_family("auto")
        raise ValueError(
            f"`backend`={backend!r} runs {'/'.join(modes)} post-training quantization for inference: it needs "
            f"`mode`={' or '.join(map(repr, modes))}, `when`='fit_end' and no adapters; got mode={mode!r}, when={when!r}, "
            f"adapter_rank={adapter_rank}. 4-bit storage, training on a quantized base and adapters use backend={trainer!r}"
        )
    if mode not in modes:
        raise ValueError(f"`mode`={mode!r} is not a format of `backend`={backend!r}; it has {', '.join(map(repr, modes))}")
    if per_layer and not all(b.per_layer_modes for b in family):
        owner = next(b.family for b in backends_of(training_family("auto")) if b.per_layer_modes)
        raise ValueError(
            f"`layer_bits` chooses {owner} formats per layer; it needs `backend`={owner!r} or 'auto'; got backend={backend!r}"
        )
