"""Every warning and exception lightning-accel raises, in one module with one base each.

Users filter one class: ``warnings.filterwarnings("ignore", category=lightning_accel.NoEffectWarning)`` silences
every "this option has no effect" warning of every technique; ``AccelWarning`` every warning of the package.

    AccelWarning (UserWarning)
        NoEffectWarning: PruningNoEffectWarning, QuantizationNoEffectWarning, CompileNoEffectWarning,
                         DistillationNoEffectWarning, PrecisionNoEffectWarning
        SlowOnCPUWarning
        DistillationWarning, PrecisionWarning, StructuredPruningWarning, ReportWarning, SensitivityWarning,
        QuantizationWarning (MetricDropWarning, OptimizerNotConvertedWarning), QATWarning,
        CompileFallbackWarning, RecompilationWarning, ExportWarning
    AccelError: CompositionError, NoMatchError, UnsupportedOptimizerError (ValueError);
                StructuredPruningError, ExportError (RuntimeError)

This module imports nothing of the package, so every module can use it.
"""

from __future__ import annotations

__all__ = [
    "AccelError",
    "AccelWarning",
    "AutoCompressWarning",
    "CompileFallbackWarning",
    "CompileNoEffectWarning",
    "CompositionError",
    "DistillationNoEffectWarning",
    "DistillationWarning",
    "ExportError",
    "ExportWarning",
    "MetricDropWarning",
    "NoEffectWarning",
    "NoMatchError",
    "OptimizerNotConvertedWarning",
    "PrecisionNoEffectWarning",
    "PrecisionWarning",
    "PruningNoEffectWarning",
    "QATWarning",
    "QuantizationNoEffectWarning",
    "QuantizationWarning",
    "RecompilationWarning",
    "ReportWarning",
    "SensitivityWarning",
    "SlowOnCPUWarning",
    "StructuredPruningError",
    "StructuredPruningWarning",
    "UnsupportedOptimizerError",
]


# ---------------------------------------------------------------------- warnings
class AccelWarning(UserWarning):
    """Base of every warning lightning-accel emits."""


class NoEffectWarning(AccelWarning):
    """An option or a whole callback has no effect in this configuration (Composer's ``NoEffectWarning``)."""


class SlowOnCPUWarning(AccelWarning):
    """A technique saves memory but costs time on this device (e.g. bitsandbytes' 8-bit optimizers on a CPU,
    int8 matmuls on a CPU without VNNI/AMX)."""


class DistillationWarning(AccelWarning):
    """Something about distillation needs attention (e.g. ``training_step`` called ``forward`` twice)."""


class DistillationNoEffectWarning(DistillationWarning, NoEffectWarning):
    """An option of :class:`KnowledgeDistillation` has no effect (``temperature`` with ``loss="mse"``, ...)."""


class PrecisionWarning(AccelWarning):
    """A precision was requested that the device only emulates (slow) or that needs care."""


class PrecisionNoEffectWarning(NoEffectWarning):
    """A precision option has no effect (e.g. ``fp32_modules`` while training runs in float32)."""


class PruningNoEffectWarning(NoEffectWarning):
    """A pruning setting has no effect (e.g. ``amount=0``, a regularization of strength 0, or a schedule
    that starts after training ends)."""


class StructuredPruningWarning(AccelWarning):
    """Structured pruning had less effect than asked (no prunable group, an importance that fell back)."""


class ReportWarning(AccelWarning):
    """Something the report could not measure or write (no example input, matplotlib missing, an export that
    failed, ...). The report goes on without it and says so in ``results["notes"]``."""


class AutoCompressWarning(AccelWarning):
    """Something about an AutoCompress plan that deserves attention (a reused plan made for another goal)."""


class SensitivityWarning(AccelWarning):
    """A sensitivity setting or result that deserves attention (e.g. a layer that cannot be quantized)."""


class QuantizationWarning(AccelWarning):
    """Base class of the warnings of :class:`Quantization` and :class:`EightBitOptimizer`."""


class MetricDropWarning(QuantizationWarning):
    """Post-training quantization cost more than ``max_metric_drop`` (or could not be checked): the float model
    was kept."""


class QuantizationNoEffectWarning(QuantizationWarning, NoEffectWarning):
    """An option has no effect in this configuration (e.g. ``paged=True`` on a CPU, ``block_size`` with int8)."""


class OptimizerNotConvertedWarning(QuantizationWarning):
    """``EightBitOptimizer(strict=False)`` left an optimizer it cannot convert as it was."""


class QATWarning(AccelWarning):
    """Quantization-aware training could not do something it was asked to (it says what it did instead)."""


class CompileFallbackWarning(AccelWarning):
    """Compilation failed; the module (or optimizer step) continues in eager mode."""


class CompileNoEffectWarning(NoEffectWarning):
    """Compilation was requested but compiled nothing (e.g. the compiled module is never called)."""


class RecompilationWarning(AccelWarning):
    """TorchDynamo keeps recompiling the same code (a changing shape, mode or Python value)."""


class ExportWarning(AccelWarning):
    """An export format could not be written or timed on this machine; the export goes on without it."""


# ---------------------------------------------------------------------- exceptions
class AccelError(Exception):
    """Base of every exception lightning-accel raises on purpose (besides plain ``ValueError`` / ``TypeError``
    for a bad argument)."""


class CompositionError(AccelError, ValueError):
    """Two callbacks of the pipeline cannot be combined; the message names both and says why."""


class NoMatchError(AccelError, ValueError):
    """A module pattern selected nothing; the message names the pattern and lists candidates."""


class UnsupportedOptimizerError(AccelError, ValueError):
    """An optimizer has no bitsandbytes 8-bit counterpart with the same update rule; the message says why."""


class StructuredPruningError(AccelError, RuntimeError):
    """The model cannot be traced or does not run after pruning; the message names the module and the
    ``exclude`` pattern that avoids it. The model is left as it was."""


class ExportError(AccelError, RuntimeError):
    """``torch.export`` could not capture the model; the message names the module and torch's reason."""
