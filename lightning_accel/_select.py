"""Choosing modules by name patterns: the one rule every ``modules`` / ``exclude`` / ``fp32_modules`` style
argument of lightning-accel follows.

A pattern is a shell-style glob (:mod:`fnmatch`, case-sensitive; ``*`` crosses dots). It selects a module when
it matches

* the module's qualified name (``"blocks.0.attn.qkv"``), or any dotted suffix of it: a bare name matches that
  module at any depth, so ``"head"`` selects ``head`` and ``net.head`` alike, ``"blocks.*.mlp.*"`` selects the
  MLP layers of ``blocks`` wherever the model nests them, and ``"*"`` selects everything; or
* the module's class name (``"LayerNorm"``).

A pattern that matches nothing raises :class:`NoMatchError` listing every candidate name (or the first 40 and
how many more there are).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

from lightning_accel.errors import NoMatchError  # noqa: F401 (public here too)

__all__ = ["DEFAULT_PRUNABLE", "NoMatchError", "describe_candidates", "matches", "name_matches", "output_layer_name", "select_modules"]

#: Module types whose ``weight`` the pruning and quantization techniques act on by default.
DEFAULT_PRUNABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a qualified name, or one of its dotted suffixes, matches any of ``patterns``."""
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes)


def matches(name: str, module: nn.Module, patterns: Iterable[str]) -> bool:
    """Whether a module, by its qualified ``name`` (or a dotted suffix of it) or its class name, matches any of
    ``patterns`` (the module docstring's rule)."""
    patterns = list(patterns)
    cls = type(module).__name__
    return name_matches(name, patterns) or any(fnmatch.fnmatchcase(cls, p) for p in patterns)


def describe_candidates(names: Sequence[str], limit: int = 40) -> str:
    """``names`` quoted for an error message: all of them, or the first ``limit`` and how many more."""
    if not names:
        return "(none)"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


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


def _describe(model: nn.Module, types: tuple[type[nn.Module], ...]) -> str:
    return describe_candidates([n for n, m in model.named_modules() if n and isinstance(m, types)])


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
    kind = "module" if types == (nn.Module,) else "/".join(t.__name__ for t in types) + " module"
    for arg, patterns in ((what, modules), ("exclude", exclude)):
        for p in patterns or ():
            if not any(matches(n, m, [p]) for n, m in candidates.items()):
                raise NoMatchError(
                    f"`{arg}` pattern {p!r} matches no {kind} of {type(model).__name__}; "
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
            f"no {kind} of {type(model).__name__} is left to act on "
            f"({what}={list(modules) if modules else None}, exclude={list(exclude) if exclude else None}); "
            f"candidates: {_describe(model, types)}"
        )
    return selected


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace ``model``'s submodule at the qualified ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
