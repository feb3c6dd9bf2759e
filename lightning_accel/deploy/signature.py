"""How an exported file is called: the model's own ``forward`` signature, recorded at export, both ways.

``torch.export`` (and every runtime after it) fixes one calling convention: the one of the example it traced. The
export normalizes the example to the model's signature (its leading parameters by position, any after one left out by
keyword) and records the signature in the file's sidecar (``<file>.json``); :class:`CallSpec` binds a later call,
positional or keyword, to the same normalized form, so ``run(ids, mask)`` and ``run(input_ids=ids,
attention_mask=mask)`` both work whatever form the example had.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["CallSpec", "as_call", "dump_outputs_spec", "load_outputs_spec", "tensor_leaves"]

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional_only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional_or_keyword",
    inspect.Parameter.KEYWORD_ONLY: "keyword_only",
}


def as_call(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One forward's inputs as ``(args, kwargs)``: a dict is keyword arguments, a tuple positional ones, anything
    else the one positional argument."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


@dataclass
class CallSpec:
    """The parameters of the model's ``forward`` (name, kind, whether it has a default) and which of them the file
    was traced with (``traced``, in signature order)."""

    params: list[tuple[str, str, bool]]
    traced: list[str]

    @classmethod
    def of(cls, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallSpec | None:
        """The spec of ``model.forward`` bound to an example call; ``None`` where the signature cannot name every
        input (``*args`` / ``**kwargs``, or the example does not bind)."""
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            return None
        if any(p.kind not in _KINDS for p in sig.parameters.values()):
            return None
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return None
        params = [(p.name, _KINDS[p.kind], p.default is not inspect.Parameter.empty) for p in sig.parameters.values()]  # type: ignore[index]
        return cls(params=params, traced=list(bound.arguments))

    def normalize(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A call, positional or keyword, as the file takes it: exactly the traced parameters, in the signature's
        order, by position while they are its leading parameters and by keyword after the first one left out (so a
        plain ``torch`` loader calls a file of ``forward(x)`` as ``run(x)``).

        Raises:
            TypeError: the call does not bind to the model's signature, misses a traced input, or passes one the file
                was not traced with (its value is baked into the file).
        """
        sig = inspect.Signature(
            [
                inspect.Parameter(
                    name,
                    {v: k for k, v in _KINDS.items()}[kind],
                    default=None if has_default else inspect.Parameter.empty,
                )
                for name, kind, has_default in self.params
            ]
        )
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"the exported model takes forward{self.describe()}: {err}") from None
        given = set(bound.arguments)
        missing = [n for n in self.traced if n not in given]
        extra = [n for n in given if n not in self.traced]
        if missing:
            raise TypeError(f"the exported model takes forward{self.describe()}: missing {missing}")
        if extra:
            raise TypeError(
                f"the exported model was traced without {extra} (their values at export are part of the file); "
                f"it takes forward{self.describe()}"
            )
        pos: list[Any] = []
        kw: dict[str, Any] = {}
        gap = False  # positional while the traced parameters are a prefix of the signature, keywords after that
        for name, kind, _ in self.params:
            if name not in self.traced:
                gap = True
            elif kind != "keyword_only" and not gap:
                pos.append(bound.arguments[name])
            else:
                kw[name] = bound.arguments[name]
        return tuple(pos), kw

    def describe(self) -> str:
        return "(" + ", ".join(self.traced) + ")"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> CallSpec | None:
        if not data:
            return None
        return cls(params=[tuple(p) for p in data["params"]], traced=list(data["traced"]))  # type: ignore[misc]


def tensor_leaves(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The input tensors of a normalized call in the order ``torch.export`` flattens them (what ONNX and OpenVINO
    take as the graph's inputs)."""
    leaves, _ = pytree.tree_flatten((args, kwargs))
    return [v for v in leaves if isinstance(v, torch.Tensor)]


def dump_outputs_spec(outputs: Any) -> str | None:
    """The structure of the model's outputs (a tensor, a tuple, a dict, ...) as text, for runtimes that return a flat
    list; ``None`` where pytree cannot write it."""
    _, spec = pytree.tree_flatten(outputs)
    try:
        return pytree.treespec_dumps(spec)
    except Exception:  # a node type pytree cannot serialize: the flat list is returned
        return None


def load_outputs_spec(text: str | None) -> Any:
    return None if text is None else pytree.treespec_loads(text)
