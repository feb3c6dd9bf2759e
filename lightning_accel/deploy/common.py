"""What every format shares: capturing the model with ``torch.export``, the sidecar file, the loaded callable."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lightning_accel.deploy.signature import CallSpec, as_call, load_outputs_spec, tensor_leaves
from lightning_accel.errors import ExportError

__all__ = [
    "Exported",
    "Traced",
    "calibration_list",
    "check_inputs",
    "capture",
    "failing_module",
    "read_sidecar",
    "sidecar_path",
    "trace_inputs",
    "write_sidecar",
]


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


@dataclass
class Traced:
    """One example call, normalized to the model's signature (:class:`CallSpec`), as ``torch.export`` takes it."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    spec: CallSpec | None
    dynamic: Any = None

    def normalize(self, example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = as_call(example)
        return self.spec.normalize(args, kwargs) if self.spec is not None else (args, kwargs)


def trace_inputs(model: nn.Module, example_inputs: Any, dynamic_batch: bool) -> Traced:
    """The example as the export traces it: bound to ``model.forward``'s signature, a batch of size 1 doubled (a
    dimension of size 1 would be specialized), with the batch dimension marked dynamic."""
    args, kwargs = as_call(example_inputs)
    spec = CallSpec.of(model, args, kwargs)
    if spec is not None:
        args, kwargs = spec.normalize(args, kwargs)
    if dynamic_batch:
        args, kwargs = _at_least_two(args), _at_least_two(kwargs)
    dynamic = None
    if dynamic_batch:
        if args and kwargs:  # positional-only and keyword parameters: torch.export takes the bound form
            dynamic = _dynamic_batch((), {**{p[0]: a for p, a in zip(spec.params, args)}, **kwargs})  # type: ignore[union-attr]
        else:
            dynamic = _dynamic_batch(args, kwargs)
    return Traced(args, kwargs, spec, dynamic)


def failing_module(model: nn.Module, err: BaseException) -> str:
    """The qualified name of the module ``torch.export`` failed in: the innermost frame of the traceback that runs
    a module's ``forward``, identified by its ``self`` (two modules of one class share one code object)."""
    names = {id(m): n for n, m in model.named_modules()}
    codes = {type(m).forward.__code__ for m in model.modules() if hasattr(type(m).forward, "__code__")}
    tb = err.__traceback__
    found = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code in codes:
            owner = frame.f_locals.get("self")
            if owner is not None and id(owner) in names:
                found = names[id(owner)]
        tb = tb.tb_next
    if not found:
        return type(model).__name__
    return f"{found!r} ({type(model.get_submodule(found)).__name__})"


def capture(model: nn.Module, traced: Traced) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (in eval mode, under ``no_grad``) on the traced example.

    Raises:
        ExportError: torch.export cannot capture the model; the message names the failing module.
    """
    with torch.no_grad(), warnings.catch_warnings():  # not inference_mode: torchao tensors cannot export there
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(model, traced.args, traced.kwargs or None, dynamic_shapes=traced.dynamic)
        except Exception as err:  # torch.export raises many types (UserError, Unsupported, ...)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(
                f"torch.export could not capture {type(model).__name__}: it failed in {failing_module(model, err)}: "
                f"{type(err).__name__}: {reason}"
            ) from err


# ---------------------------------------------------------------------- the sidecar and the loaded callable
def sidecar_path(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the signature, output structure, format and int8 layers of a file."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_sidecar(path: Path, meta: dict[str, Any]) -> None:
    sidecar_path(path).write_text(json.dumps(meta, indent=1))


def read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    return json.loads(side.read_text()) if side.is_file() else {}


@dataclass
class Exported:
    """A loaded exported file: call it with the model's own inputs (positional or keyword), get torch tensors.

    ``format``: the runtime (``"aoti"``, ``"program"``, ``"onnx"``, ``"openvino"``); ``meta``: the sidecar.
    """

    fn: Callable[..., Any]
    format: str
    meta: dict[str, Any] = field(default_factory=dict)
    flat: bool = False  # the runtime takes a flat list of input tensors and returns a flat list

    def __post_init__(self) -> None:
        self.spec = CallSpec.from_json(self.meta.get("signature"))
        self._out = load_outputs_spec(self.meta.get("outputs"))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.spec is not None:
            args, kwargs = self.spec.normalize(args, kwargs)
        if not self.flat:
            return self.fn(*args, **kwargs)
        leaves, _ = pytree.tree_flatten((args, kwargs))
        outs = self.fn([v for v in leaves if isinstance(v, torch.Tensor)])
        if self._out is not None and self._out.num_leaves == len(outs):
            return pytree.tree_unflatten(list(outs), self._out)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @property
    def int8_layers(self) -> list[str]:
        return list(self.meta.get("int8_layers", []))


def check_inputs(example_inputs: Any, calibration: list[Any] | None) -> list[Any]:
    """Inputs to compare a file's outputs with the model's on: the example, the first calibration batch, and the
    example with every float tensor replaced by random values (an all-zero example hides wrong kernels)."""
    g = torch.Generator().manual_seed(0)

    def noisy(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            scale = float(t.float().abs().max()) or 1.0
            return (torch.rand(t.shape, generator=g) * scale).to(t.dtype)
        return t

    out = [example_inputs]
    if calibration:
        out.append(calibration[0])
    out.append(pytree.tree_map(noisy, example_inputs))
    return out


def calibration_list(calibration: Iterable[Any] | None, example_inputs: Any, traced: Traced, limit: int) -> list[list[torch.Tensor]]:
    """The calibration batches as flat lists of input tensors in the graph's order (the example when none given)."""
    batches = list(calibration) if calibration is not None else [example_inputs]
    out = []
    for batch in batches[:limit]:
        args, kwargs = traced.normalize(batch)
        out.append([t.detach().cpu() for t in tensor_leaves(args, kwargs)])
    return out
