"""A deployable file of the compressed model: ``torch.export``, compiled ahead of time by AOTInductor.

    lightning_accel.export(model, torch.zeros(1, 1, 8, 8), "model.pt2")            # AOTInductor package
    lightning_accel.export(model, torch.zeros(1, 1, 8, 8), "model.pt2", compile=False)  # an ExportedProgram
    run = lightning_accel.load_exported("model.pt2")                               # a callable: run(x)

The file runs without the training code (no LightningModule class, no lightning-accel): pruned shapes, int8
weights (torchao) and the chosen precision are baked in. The batch dimension is dynamic by default, so one file
serves batch 1 and batch 256. ``compile=True`` (AOTInductor) is what makes int8 layers fast on a CPU: eager int8
is slower than float there.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_accel.errors import ExportError  # noqa: F401 (public here too)

__all__ = ["ExportError", "export", "load_exported"]


def _as_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def _at_least_two(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value]) if value.dim() > 0 and value.shape[0] == 1 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_at_least_two(v) for v in value)
    if isinstance(value, dict):
        return {k: _at_least_two(v) for k, v in value.items()}
    return value


def _dynamic_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return {0: batch}
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


def _failing_module(model: nn.Module, err: BaseException) -> str:
    """The qualified name of the module ``torch.export`` failed in, from the traceback, else the model's class."""
    names = {type(m).forward.__code__: n for n, m in model.named_modules() if hasattr(type(m).forward, "__code__")}
    tb = err.__traceback__
    found = None
    while tb is not None:
        name = names.get(tb.tb_frame.f_code)
        if name is not None:
            found = name  # the innermost frame that is a module's forward
        tb = tb.tb_next
    if found is None:
        return type(model).__name__
    return f"{found!r} ({type(model.get_submodule(found)).__name__})" if found else type(model).__name__


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    compile: bool = True,
    dynamic_batch: bool = True,
) -> Path:
    """Write ``model`` (in eval mode) as one file that runs without the training code.

    Args:
        model: the (compressed) model, e.g. a pruned LightningModule with torchao int8 layers.
        example_inputs: one forward's inputs: a tensor, a tuple (positional) or a dict (keyword), e.g.
            ``torch.zeros(1, 1, 8, 8)``.
        path: the file to write, e.g. ``"model.pt2"``.
        compile: ``True``: compile ahead of time with AOTInductor (a ``.pt2`` package of native code for this
            machine's CPU/GPU, the fast one); ``False``: the portable ``torch.export`` program.
        dynamic_batch: the first dimension of every input tensor may vary (one file for every batch size).

    Returns:
        The path written.

    Raises:
        ExportError: ``torch.export`` cannot capture the model; the message names the failing module and gives
            torch's reason.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, kwargs = _as_args(example_inputs)
    if dynamic_batch:  # torch.export specializes a dimension of size 1: trace on two samples
        args, kwargs = _at_least_two(args), _at_least_two(kwargs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():  # not inference_mode: torchao tensors cannot export there
            warnings.simplefilter("ignore")
            try:
                dynamic = _dynamic_batch(args, kwargs) if dynamic_batch else None
                program = torch.export.export(model, args, kwargs or None, dynamic_shapes=dynamic)
            except Exception as err:  # torch.export raises many types (UserError, Unsupported, ...)
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ExportError(
                    f"torch.export could not capture {type(model).__name__}: it failed in {_failing_module(model, err)}: "
                    f"{type(err).__name__}: {reason}"
                ) from err
            if compile:
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
            else:
                torch.export.save(program, str(path))
    finally:
        model.train(was_training)
    return path


def load_exported(path: str | Path) -> Callable[..., Any]:
    """Load a file written by :func:`export` (either kind) as a callable taking the example's inputs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {str(path)!r}")
    with zipfile.ZipFile(path) as zf:
        aoti = any(name.endswith(("data/aotinductor/", ".so")) or "/aotinductor/" in name for name in zf.namelist())
    if aoti:
        return torch._inductor.aoti_load_package(str(path))
    return torch.export.load(str(path)).module()
