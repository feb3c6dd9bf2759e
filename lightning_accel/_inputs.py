"""Example inputs for tracing and measuring a LightningModule, without user code.

In order of preference: the module's ``example_input_array``; the arguments of the first real call of its
``forward`` (positional and keyword, tensors or dicts, as a Hugging Face module receives them), recorded by a
:class:`ForwardRecorder`; the first sample of a tensor or tuple training batch. Every tensor keeps one sample of
its batch dimension.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import nn

__all__ = ["ForwardRecorder", "example_from_batch", "first_sample"]


def first_sample(value: Any) -> Any:
    """``value`` with every tensor cut to its first sample (``t[:1]``), through tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return value[:1].detach() if value.dim() > 0 else value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(first_sample(v) for v in value)
    if isinstance(value, dict):
        return {k: first_sample(v) for k, v in value.items()}
    return value


class ForwardRecorder:
    """Records the inputs of the first call of a module's ``forward`` (a forward pre-hook that removes itself).

    ``example`` is then a tensor (one positional argument), a tuple (several) or a dict of keyword arguments
    (when any argument was passed by keyword: positional ones are bound to their parameter names).
    """

    def __init__(self) -> None:
        self.example: Any = None
        self._handle: Any = None

    def attach(self, module: nn.Module) -> None:
        if self._handle is None and self.example is None:
            self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs:
            try:
                signature = inspect.signature(module.forward)
                bound = dict(signature.bind(*args, **kwargs).arguments)
            except (TypeError, ValueError):
                signature, bound = None, dict(kwargs)
            if signature is not None:  # ``forward(self, **inputs)``: the keywords themselves, not ``{"inputs": {...}}``
                for name, param in signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD and isinstance(bound.get(name), dict):
                        bound.update(bound.pop(name))
            self.example = first_sample(bound)
        elif len(args) == 1:
            self.example = first_sample(args[0])
        else:
            self.example = first_sample(tuple(args))
        self.detach()


def example_from_batch(module: nn.Module, batch: Any, who: str, error: type[Exception] = ValueError, *, strict: bool = True) -> Any:
    """``module.example_input_array`` if set, else the first sample of ``batch`` (a tensor, or the first tensor
    of a tuple/list batch).

    Raises:
        error: neither gives a tensor and ``strict``; the message, starting with ``who``, says what to do.
            With ``strict=False`` it returns ``None`` instead (wait for a recorded forward call).
    """
    example = getattr(module, "example_input_array", None)
    if example is not None:
        return example
    x = batch
    if isinstance(x, (list, tuple)) and x:
        x = x[0]
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return x[:1]
    if not strict:
        return None
    raise error(
        f"{who} needs an example input to trace {type(module).__name__}; the first batch's first element is a "
        f"{type(x).__name__}, not a tensor, and no call of its forward was recorded. Set `self.example_input_array` "
        "in the LightningModule, or call `self(...)` in training_step."
    )


@contextlib.contextmanager
def recorded_forward_inputs(module: nn.Module) -> Iterator[list[Any]]:
    """Collect the inputs of every ``module.forward`` call inside the block, as :func:`lightning_accel.export` takes
    examples (a tensor, a tuple of positional inputs, or a dict of keyword inputs), detached on the CPU."""
    seen: list[Any] = []

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        args, kwargs = apply_to_collection((args, kwargs), torch.Tensor, lambda t: t.detach().cpu())
        seen.append(kwargs if kwargs and not args else (args[0] if len(args) == 1 and not kwargs else args))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()

