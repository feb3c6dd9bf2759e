"""Choosing modules by qualified-name patterns, shared by every technique.

Patterns are shell-style globs (:mod:`fnmatch`) matched against a module's qualified name
(``"blocks.0.attn.qkv"``) or its class name (``"LayerNorm"``). ``"*"`` crosses dots, so
``"blocks.*.mlp.*"`` selects every MLP Linear of every block.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = ["NoMatchError", "select_modules", "output_layer_name", "matches", "DEFAULT_PRUNABLE"]

#: Module types whose ``weight`` the pruning and quantization techniques act on by default.
DEFAULT_PRUNABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class NoMatchError(ValueError):
    """A module pattern selected nothing; the message names the pattern and lists candidates."""


def matches(name: str, module: nn.Module, patterns: Iterable[str]) -> bool:
    """Whether ``name`` (qualified) or the module's class name matches any of ``patterns``."""
    cls = type(module).__name__
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(cls, p) for p in patterns)


def output_layer_name(model: nn.Module, types: tuple[type[nn.Module], ...] = DEFAULT_PRUNABLE) -> str | None:
    """Qualified name of the model's output layer: the last module of ``types`` in registration order.

    Models built the usual way register their head last (``self.head = nn.Linear(...)`` at the end of
    ``__init__``); techniques leave it alone by default because it is small and sensitive.
    """
    last = None
    for name, module in model.named_modules():
        if isinstance(module, types):
            last = name
    return last


def _describe(model: nn.Module, types: tuple[type[nn.Module], ...], limit: int = 12) -> str:
    names = [n for n, m in model.named_modules() if n and isinstance(m, types)]
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return shown + more if names else "(none)"


def select_modules(
    model: nn.Module,
    modules: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    types: tuple[type[nn.Module], ...] = DEFAULT_PRUNABLE,
    include_output: bool = False,
    what: str = "modules",
) -> dict[str, nn.Module]:
    """Select submodules of ``types`` by name patterns.

    Args:
        model: the model to search.
        modules: glob patterns on qualified or class names; ``None`` selects every module of ``types``.
        exclude: glob patterns removed from the selection.
        types: module types that may be selected.
        include_output: keep the output layer (see :func:`output_layer_name`) when ``modules`` is ``None``.
            An output layer named explicitly in ``modules`` is always kept.
        what: the argument name used in error messages (e.g. ``"modules"``).

    Returns:
        ``{qualified_name: module}`` in registration order.

    Raises:
        NoMatchError: a pattern in ``modules`` or ``exclude`` matches no module of ``types``, or the
            selection ends up empty.
    """
    candidates = {n: m for n, m in model.named_modules() if n and isinstance(m, types)}
    type_names = "/".join(t.__name__ for t in types)
    for arg, patterns in ((what, modules), ("exclude", exclude)):
        for p in patterns or ():
            if not any(matches(n, m, [p]) for n, m in candidates.items()):
                raise NoMatchError(
                    f"`{arg}` pattern {p!r} matches no {type_names} module of {type(model).__name__}; "
                    f"candidates: {_describe(model, types)}"
                )
    if modules is None:
        selected = dict(candidates)
        head = output_layer_name(model, types)
        if not include_output and head is not None:
            selected.pop(head, None)
    else:
        selected = {n: m for n, m in candidates.items() if matches(n, m, modules)}
    if exclude:
        selected = {n: m for n, m in selected.items() if not matches(n, m, exclude)}
    if not selected:
        raise NoMatchError(
            f"no {type_names} module of {type(model).__name__} is left to act on "
            f"({what}={list(modules) if modules else None}, exclude={list(exclude) if exclude else None}); "
            f"candidates: {_describe(model, types)}"
        )
    return selected
