"""Argument checks shared by every callback: each raises with the argument's name, the bad value
and what is allowed, so a YAML typo fails before any model or checkpoint is touched."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["check_choice", "check_number", "check_patterns", "check_bool", "check_int", "check_str", "check_stem", "check_logged"]


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = tuple(allowed)
    if value not in allowed:
        listed = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {listed}; got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool (true/false); got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_none: bool = False,
) -> Any:
    """Check that ``value`` is a real number within the given bounds."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"`{name}` must be a number{_bounds(low, high, low_inclusive, high_inclusive)}; got {value!r}")
    too_low = low is not None and (value < low or (not low_inclusive and value == low))
    too_high = high is not None and (value > high or (not high_inclusive and value == high))
    if too_low or too_high:
        raise ValueError(f"`{name}` must be a number{_bounds(low, high, low_inclusive, high_inclusive)}; got {value!r}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer{_bounds(low, high, True, True)}; got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"`{name}` must be an integer{_bounds(low, high, True, True)}; got {value!r}")
    return value


def check_patterns(name: str, value: Any) -> list[str] | None:
    """``None`` or a non-empty list of non-empty glob strings (a bare string is a common YAML slip)."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"`{name}` must be None or a non-empty list of glob patterns like ['blocks.*.mlp.*']; got {value!r}")
    for p in value:
        if not isinstance(p, str) or not p:
            raise ValueError(f"`{name}` must contain non-empty strings; got {p!r} in {list(value)!r}")
    return list(value)


def check_str(name: str, value: Any, what: str, *, allow_none: bool = False) -> Any:
    """A non-empty string (or ``None`` with ``allow_none``); ``what`` describes it in the error, e.g.
    ``"a logged metric name like 'val_acc'"``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{name}` must be {'None or ' if allow_none else ''}{what}; got {value!r}")
    return value


def check_stem(name: str, value: Any, example: str) -> str:
    """A file stem: a non-empty string without directory or a ``.json`` / ``.png`` extension (``<stem>.json`` and
    ``<stem>.png`` are written), e.g. ``example``."""
    if not isinstance(value, str) or not value or "/" in value or "\\" in value or value.endswith((".json", ".png")):
        raise ValueError(f"`{name}` must be a file stem without directory or extension, like {example!r}; got {value!r}")
    return value


def check_logged(owner: object, monitor: str, logged: Iterable[str], module: object) -> None:
    """Raise when ``monitor`` (an argument of the callback ``owner``) is not among the metrics ``module`` logged."""
    logged = list(logged)
    if monitor not in logged:
        raise ValueError(
            f"{type(owner).__name__} `monitor`={monitor!r} is not logged by {type(module).__name__}; logged "
            f"metrics: {sorted(logged)}. Set `monitor` to one of them, or None."
        )


def _bounds(low: float | None, high: float | None, li: bool, hi: bool) -> str:
    if low is None and high is None:
        return ""
    if low is not None and high is not None:
        return f" in {'[' if li else '('}{low}, {high}{']' if hi else ')'}"
    if low is not None:
        return f" {'>=' if li else '>'} {low}"
    return f" {'<=' if hi else '<'} {high}"
