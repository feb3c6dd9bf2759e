"""lightning-accel: drop-in PyTorch Lightning callbacks for faster training and smaller, faster models.

Every technique is a pure function on a plain ``torch.nn.Module`` (``prune_``, ``quantize_``, ...)
under a thin :class:`lightning.pytorch.Callback` that decides when to apply it. Public names are
imported lazily, so ``import lightning_accel`` stays cheap and an optional dependency is only
needed by the technique that uses it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


def _quiet_torchao_cuda_notices() -> None:
    """torchao logs a warning for each CUDA-only extension it cannot load on a CPU build ("Failed to load
    .../_C_mxfp8..."), and torch's pytree logs that torchao 0.18 registers its ``KernelPreference`` enum the
    deprecated way: harmless, and not the user's concern. Only those records are filtered."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Failed to load") and "/torchao/_C" in msg)

    def keep_pytree(record: logging.LogRecord) -> bool:
        return not ("KernelPreference" in str(record.getMessage()) and "register_constant" in str(record.getMessage()))

    logging.getLogger("torchao").addFilter(keep)
    logging.getLogger("torch.utils._pytree").addFilter(keep_pytree)


_quiet_torchao_cuda_notices()

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # warnings and exceptions: one module, one base each
    "AccelError": "lightning_accel.errors",
    "AccelWarning": "lightning_accel.errors",
    "AutoCompressWarning": "lightning_accel.errors",
    "CompileFallbackWarning": "lightning_accel.errors",
    "CompileNoEffectWarning": "lightning_accel.errors",
    "CompositionError": "lightning_accel.errors",
    "DistillationNoEffectWarning": "lightning_accel.errors",
    "DistillationWarning": "lightning_accel.errors",
    "ExportError": "lightning_accel.errors",
    "ExportWarning": "lightning_accel.errors",
    "MetricDropWarning": "lightning_accel.errors",
    "NoEffectWarning": "lightning_accel.errors",
    "NoMatchError": "lightning_accel.errors",
    "OptimizerNotConvertedWarning": "lightning_accel.errors",
    "PrecisionNoEffectWarning": "lightning_accel.errors",
    "PrecisionWarning": "lightning_accel.errors",
    "PruningNoEffectWarning": "lightning_accel.errors",
    "QATWarning": "lightning_accel.errors",
    "QuantizationNoEffectWarning": "lightning_accel.errors",
    "QuantizationWarning": "lightning_accel.errors",
    "RecompilationWarning": "lightning_accel.errors",
    "ReportWarning": "lightning_accel.errors",
    "SensitivityWarning": "lightning_accel.errors",
    "SlowOnCPUWarning": "lightning_accel.errors",
    "StructuredPruningError": "lightning_accel.errors",
    "StructuredPruningWarning": "lightning_accel.errors",
    "UnsupportedOptimizerError": "lightning_accel.errors",
    # composition
    "AccelCallback": "lightning_accel._lifecycle",
    "notify_structure_changed": "lightning_accel._lifecycle",
    "ReplayCheckpoint": "lightning_accel._lifecycle",
    "BasePruning": "lightning_accel.pruning.base",
    # checkpoints
    "load_checkpoint": "lightning_accel.checkpoint",
    # deployable export
    "export": "lightning_accel.deploy",
    "load_exported": "lightning_accel.deploy",
    "replay_checkpoint": "lightning_accel.checkpoint",
    "register_replay": "lightning_accel.checkpoint",
    # schedules
    "sparsity_at": "lightning_accel.schedules",
    # mixed precision
    "MixedPrecision": "lightning_accel.precision",
    "PrecisionChoice": "lightning_accel.precision",
    "choose_precision": "lightning_accel.precision",
    "resolve_precision": "lightning_accel.precision",
    "fp32_islands_": "lightning_accel.precision",
    "remove_fp32_islands_": "lightning_accel.precision",
    # the planner
    "AutoCompress": "lightning_accel.auto",
    # torch.compile
    "TorchCompile": "lightning_accel.compile.callbacks",
    "compile_": "lightning_accel.compile.core",
    "uncompile_": "lightning_accel.compile.core",
    "compile_optimizer_": "lightning_accel.compile.core",
    "CompileWatch": "lightning_accel.compile.core",
    # unstructured pruning
    "ScheduledPruning": "lightning_accel.pruning.callbacks",
    "prune_": "lightning_accel.pruning.unstructured",
    "compute_masks": "lightning_accel.pruning.unstructured",
    "apply_masks_": "lightning_accel.pruning.unstructured",
    # structured pruning
    "StructuredPruning": "lightning_accel.pruning.callbacks",
    "load_pruned": "lightning_accel.pruning.callbacks",
    "prune_structured_": "lightning_accel.pruning.structured",
    "build_pruning_graph": "lightning_accel.pruning.graph",
    "plan_structured_pruning": "lightning_accel.pruning.plan",
    "apply_pruning_plan_": "lightning_accel.pruning.apply",
    "replay_pruning_": "lightning_accel.pruning.replay",
    "slice_optimizer_": "lightning_accel.pruning.optimizer_state",
    "build_group_regularizer": "lightning_accel.pruning.regularizer",
    "count_macs_params": "lightning_accel.pruning.macs",
    # quantization (one backend protocol: bitsandbytes, torchao, pt2e)
    "Quantization": "lightning_accel.quantization",
    "quantize_": "lightning_accel.quantization",
    "dequantize_": "lightning_accel.quantization",
    "add_adapters_": "lightning_accel.quantization",
    "merge_adapters_": "lightning_accel.quantization",
    # 8-bit optimizers (bitsandbytes)
    "EightBitOptimizer": "lightning_accel.optimizers",
    "to_8bit_optimizer": "lightning_accel.optimizers",
    # knowledge distillation
    "KnowledgeDistillation": "lightning_accel.distillation",
    "distillation_loss": "lightning_accel.distillation",
    "FeatureProjection": "lightning_accel.distillation",
    # quantization-aware training (torchao fake quantization, converted to real int8 / int4 layers)
    "QuantizationAwareTraining": "lightning_accel.qat.callbacks",
    "prepare_qat_": "lightning_accel.qat.core",
    "convert_qat_": "lightning_accel.qat.core",
    "strip_qat_": "lightning_accel.qat.core",
    # measurement
    "AccelerationReport": "lightning_accel.report",
    "measure_model": "lightning_accel.report",
    # sensitivity analysis
    "SensitivityAnalysis": "lightning_accel.sensitivity",
    "analyze_sensitivity": "lightning_accel.sensitivity",
    "recommend_allocation": "lightning_accel.sensitivity",
    # selection
    "select_modules": "lightning_accel._select",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_accel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - static names for type checkers and IDEs
    from lightning_accel._lifecycle import (
        AccelCallback,
        CompositionError,
        ReplayCheckpoint,
        notify_structure_changed,
    )
    from lightning_accel._select import NoMatchError, select_modules
    from lightning_accel.auto import AutoCompress
    from lightning_accel.checkpoint import load_checkpoint, register_replay, replay_checkpoint
    from lightning_accel.compile.callbacks import TorchCompile
    from lightning_accel.compile.core import (
        CompileFallbackWarning,
        CompileNoEffectWarning,
        CompileWatch,
        RecompilationWarning,
        compile_,
        compile_optimizer_,
        uncompile_,
    )
    from lightning_accel.deploy import ExportError, export, load_exported
    from lightning_accel.distillation import (
        DistillationNoEffectWarning,
        DistillationWarning,
        FeatureProjection,
        KnowledgeDistillation,
        distillation_loss,
    )
    from lightning_accel.errors import (
        AutoCompressWarning,
        PruningNoEffectWarning,
        StructuredPruningError,
        StructuredPruningWarning,
    )
    from lightning_accel.optimizers import (
        EightBitOptimizer,
        OptimizerNotConvertedWarning,
        UnsupportedOptimizerError,
        to_8bit_optimizer,
    )
    from lightning_accel.precision import (
        MixedPrecision,
        PrecisionChoice,
        PrecisionNoEffectWarning,
        PrecisionWarning,
        choose_precision,
        fp32_islands_,
        remove_fp32_islands_,
        resolve_precision,
    )
    from lightning_accel.pruning.apply import apply_pruning_plan_
    from lightning_accel.pruning.base import BasePruning
    from lightning_accel.pruning.callbacks import ScheduledPruning, StructuredPruning, load_pruned
    from lightning_accel.pruning.graph import build_pruning_graph
    from lightning_accel.pruning.macs import count_macs_params
    from lightning_accel.pruning.optimizer_state import slice_optimizer_
    from lightning_accel.pruning.plan import plan_structured_pruning
    from lightning_accel.pruning.regularizer import build_group_regularizer
    from lightning_accel.pruning.replay import replay_pruning_
    from lightning_accel.pruning.structured import prune_structured_
    from lightning_accel.pruning.unstructured import apply_masks_, compute_masks, prune_
    from lightning_accel.qat.callbacks import QuantizationAwareTraining
    from lightning_accel.qat.core import QATWarning, convert_qat_, prepare_qat_, strip_qat_
    from lightning_accel.quantization import (
        MetricDropWarning,
        Quantization,
        QuantizationNoEffectWarning,
        QuantizationWarning,
        SlowOnCPUWarning,
        add_adapters_,
        dequantize_,
        merge_adapters_,
        quantize_,
    )
    from lightning_accel.report import AccelerationReport, ReportWarning, measure_model
    from lightning_accel.schedules import sparsity_at
    from lightning_accel.sensitivity import (
        SensitivityAnalysis,
        SensitivityWarning,
        analyze_sensitivity,
        recommend_allocation,
    )
