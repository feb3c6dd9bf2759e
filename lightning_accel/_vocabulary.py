"""The pipeline's vocabulary as data: stages, capabilities, the rules between them, and the registry of
callback names written into checkpoints.

This module imports nothing of the package, so the lifecycle owner, the checkpoint code and every technique
can use it without an import cycle.

**Names that outlive files.** A checkpoint's manifest names each callback by its public name
(``lightning_accel.StructuredPruning``), never by the module that defines it, so moving a file breaks no
checkpoint. :class:`lightning_accel.AccelCallback` registers every subclass as it is defined
(:func:`register_callback`): the package's own callbacks under ``lightning_accel.<ClassName>``, a user's
subclass under its ``accel_name`` class attribute when it declares one, else under its module path.
:data:`ALIASES` maps the names earlier versions wrote to today's.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ALIASES",
    "CAPABILITIES",
    "EXCLUSIVE",
    "INCOMPATIBLE",
    "STAGES",
    "public_name",
    "register_callback",
    "resolve_callback",
]

#: The pipeline, in the order its stages apply.
STAGES: tuple[str, ...] = (
    "teacher", "structure", "quantization", "optimizer", "precision", "compile", "measurement", "orchestration",
)

#: What a callback may declare it does, with the words used in conflict messages.
CAPABILITIES: dict[str, str] = {
    "changes_shapes": "removes channels, neurons or heads, so parameter shapes change",
    "masks_weights": "keeps pruning masks on weights during training",
    "replaces_layers": "replaces layers by quantized ones",
    "freezes_weights": "freezes the weights it quantizes before training",
    "owns_optimizer": "replaces the optimizers",
    "owns_precision": "chooses the training precision",
    "compiles": "compiles the model",
    "wraps_training_step": "wraps the module's training step",
    "needs_teacher_copy": "keeps an uncompressed copy of the model",
    "measures": "measures the model",
}

#: Capabilities that one callback at most may hold, and what to do about two holders.
EXCLUSIVE: dict[str, str] = {
    "changes_shapes": "both remove channels, neurons or heads and would record interleaved histories; keep one",
    "replaces_layers": (
        "both replace layers by quantized ones and would quantize the same layers; keep one (choose layers with "
        "`modules` / `exclude`)"
    ),
    "owns_optimizer": "both replace the optimizers; keep one",
    "owns_precision": "both choose the training precision and would install a precision plugin each; keep one",
    "compiles": "both compile the model; keep one (regional compilation takes several `modules` patterns)",
    "wraps_training_step": "both wrap the training step; keep one",
}

#: Pairs of capabilities that cannot meet, and why.
INCOMPATIBLE: dict[frozenset[str], str] = {
    frozenset({"freezes_weights", "masks_weights"}): (
        "weights quantized at setup are frozen 8/4-bit integers that cannot be pruned; prune first and quantize "
        "at the end (when='fit_end'), or drop one of them"
    ),
    frozenset({"freezes_weights", "changes_shapes"}): (
        "layers quantized at setup hold frozen integer weights that torch-pruning cannot shrink; prune first and "
        "quantize at the end (when='fit_end')"
    ),
    frozenset({"changes_shapes", "masks_weights"}): (
        "structured pruning removes channels and changes the weight shapes that unstructured masks are kept for; "
        "use one pruning callback per model"
    ),
}


#: Callback classes by the name a checkpoint's manifest records (filled as classes are defined).
_REGISTRY: dict[str, type] = {}

#: Names written by earlier versions (module paths, before 2026-12) -> today's public names.
ALIASES: dict[str, str] = {
    "lightning_accel.pruning.callbacks.StructuredPruning": "lightning_accel.StructuredPruning",
    "lightning_accel.pruning.callbacks.ScheduledPruning": "lightning_accel.ScheduledPruning",
    "lightning_accel.quantization.callbacks.Quantization": "lightning_accel.Quantization",
    "lightning_accel.quantization.callbacks.EightBitOptimizer": "lightning_accel.EightBitOptimizer",
    "lightning_accel.quantization.qat_callback.QuantizationAwareTraining": "lightning_accel.QuantizationAwareTraining",
    "lightning_accel.distillation.callback.KnowledgeDistillation": "lightning_accel.KnowledgeDistillation",
    "lightning_accel.precision.callbacks.MixedPrecision": "lightning_accel.MixedPrecision",
    "lightning_accel.compile.callbacks.TorchCompile": "lightning_accel.TorchCompile",
    "lightning_accel.report.callback.AccelerationReport": "lightning_accel.AccelerationReport",
    "lightning_accel.sensitivity.callback.SensitivityAnalysis": "lightning_accel.SensitivityAnalysis",
}


def public_name(cls: type) -> str:
    """The name ``cls`` is recorded under: its declared ``accel_name``, ``lightning_accel.<ClassName>`` for the
    package's own classes, else its module path (a user's subclass that declares no name)."""
    declared = cls.__dict__.get("accel_name")
    if isinstance(declared, str) and declared:
        return declared
    if cls.__module__.split(".")[0] == "lightning_accel" and not cls.__name__.startswith("_"):
        return f"lightning_accel.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def register_callback(cls: type) -> str:
    """Record ``cls`` under its :func:`public_name`; returns the name. A second class under a name already
    taken by another class raises ``TypeError`` (declare ``accel_name`` on one of them)."""
    name = public_name(cls)
    known = _REGISTRY.get(name)
    if known is not None and known is not cls and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(
            f"two callback classes would be recorded in checkpoints as {name!r}: {known.__module__}.{known.__qualname__} "
            f"and {cls.__module__}.{cls.__qualname__}; give one of them a distinct `accel_name`"
        )
    _REGISTRY[name] = cls
    return name


def resolve_callback(name: str) -> type:
    """The callback class a manifest's ``name`` stands for: the registry, then :data:`ALIASES`, then an import of
    the name (``lightning_accel.X`` through the package's public names, anything else as ``module.Class``).

    Raises:
        ValueError: nothing of that name can be found or imported.
    """
    name = ALIASES.get(name, name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    module, _, attr = name.rpartition(".")
    try:
        found: Any = getattr(importlib.import_module(module), attr)  # defining the class registers it
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"the checkpoint records a lightning-accel callback {name!r} that cannot be found ({err}); install the "
            "version of lightning-accel (or of your code) that wrote it"
        ) from err
    if not isinstance(found, type):
        raise ValueError(f"the checkpoint records a callback {name!r}, but that name is a {type(found).__name__}, not a class")
    return _REGISTRY.get(name, found)
