"""``torch.compile`` in place, whole-model or regional, with an eager fallback and visible recompilations.

* :mod:`~lightning_accel.compile.core`: :func:`compile_`, :func:`uncompile_`, :func:`compile_optimizer_`,
  :class:`CompileWatch`, :class:`CompileCache` (no Trainer needed);
* :mod:`~lightning_accel.compile.callbacks`: :class:`TorchCompile`.
"""

from lightning_accel.compile.callbacks import TorchCompile
from lightning_accel.compile.core import (
    CompileCache,
    CompileFallbackWarning,
    CompileNoEffectWarning,
    CompileWatch,
    RecompilationWarning,
    compile_,
    compile_optimizer_,
    default_cache_dir,
    uncompile_,
)

__all__ = [
    "CompileCache",
    "CompileFallbackWarning",
    "CompileNoEffectWarning",
    "CompileWatch",
    "RecompilationWarning",
    "TorchCompile",
    "compile_",
    "compile_optimizer_",
    "default_cache_dir",
    "uncompile_",
]
