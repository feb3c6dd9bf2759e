"""``torch.export`` programs and AOTInductor packages (``.pt2``).

AOTInductor compiles with inductor's weight **freezing** (``inductor_configs={"freezing": True}``, under
``no_grad``): weights become constants, so inductor prepacks them for oneDNN, folds batch norms into convolutions
and fuses the int8 patterns (torchao's dynamic int8 Linear, the PT2E ``quantize -> dequantize -> conv`` of
``Int8Conv``) into oneDNN quantized kernels (``qlinear_pointwise`` / ``qconv_pointwise``). On torch 2.13 the x86
int8 fusion passes live in torchao and are registered when
``torchao.quantization.pt2e.quantizer.x86_inductor_quantizer`` is imported (:func:`register_x86_int8_passes`); they
fire only with freezing. The options are passed to this one compilation (inductor's global config is not changed).
"""

from __future__ import annotations

import functools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_accel._optional import quiet_import

__all__ = ["DEFAULT_INDUCTOR_CONFIGS", "is_aoti_package", "load_aoti", "load_program", "register_x86_int8_passes", "save_aoti", "save_program"]

#: what :func:`save_aoti` compiles with unless ``inductor_configs`` says otherwise
DEFAULT_INDUCTOR_CONFIGS: dict[str, Any] = {"freezing": True}


@functools.cache
def register_x86_int8_passes() -> bool:
    """Import torchao's x86 inductor quantizer, which registers inductor's int8 fusion passes (oneDNN ``qlinear`` /
    ``qconv``); ``False`` when torchao is missing."""
    try:
        quiet_import("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
    except ImportError:
        return False
    return True


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    torch.export.save(program, str(path))


def save_aoti(program: torch.export.ExportedProgram, path: Path, inductor_configs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile ``program`` ahead of time into the package ``path``; returns the inductor options used."""
    register_x86_int8_passes()
    configs = {**DEFAULT_INDUCTOR_CONFIGS, **(inductor_configs or {})}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    return configs


def is_aoti_package(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith(("data/aotinductor/", ".so")) or "/aotinductor/" in name for name in zf.namelist())


def load_aoti(path: Path, num_threads: int | None = None) -> Any:
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    return torch._inductor.aoti_load_package(str(path))


def load_program(path: Path, num_threads: int | None = None) -> Any:
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    register_x86_int8_passes()
    return torch.export.load(str(path)).module()
