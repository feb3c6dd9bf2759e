"""``torch.compile`` in place, whole-model or regional, with an eager fallback and visible recompilations.

* :mod:`~lightning_accel.compile.core`: :func:`compile_`, :func:`uncompile_`, :func:`compile_optimizer_`,
  :class:`CompileWatch` (no Trainer needed);
* :mod:`~lightning_accel.compile.callbacks`: :class:`TorchCompile`.
"""

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

__all__ = [
    "CompileFallbackWarning",
    "CompileNoEffectWarning",
    "CompileWatch",
    "RecompilationWarning",
    "TorchCompile",
    "compile_",
    "compile_optimizer_",
    "uncompile_",
]
