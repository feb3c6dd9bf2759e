"""Sparsity schedules as plain functions of training progress, shared by unstructured and
structured pruning.

Progress ``t`` counts optimizer steps or epochs (the callback's ``interval``). Between ``start`` and
``end`` the target moves from ``initial`` to ``final``:

* ``one_shot``:    ``final`` from ``start`` on.
* ``linear``:      ``s_i + (s_f - s_i) * p``.
* ``cubic``:       ``s_f + (s_i - s_f) * (1 - p) ** 3`` (Zhu & Gupta, 2017: fast early, gentle late).
* ``exponential``: density ``1 - s`` decays geometrically, ``d_i * (d_f / d_i) ** p``.

with ``p = (t - start) / (end - start)`` clipped to ``[0, 1]``. Before ``start`` nothing is pruned.
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["SCHEDULES", "Schedule", "sparsity_at", "is_event"]

Schedule = Literal["one_shot", "linear", "cubic", "exponential"]
SCHEDULES: tuple[str, ...] = ("one_shot", "linear", "cubic", "exponential")


def sparsity_at(t: int, *, schedule: str, initial: float, final: float, start: int, end: int) -> float:
    """Target sparsity at progress ``t`` (0.0 before ``start``).

    >>> sparsity_at(5, schedule="linear", initial=0.0, final=0.5, start=0, end=10)
    0.25
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {', '.join(map(repr, SCHEDULES))}; got {schedule!r}")
    if t < start:
        return 0.0
    if schedule == "one_shot" or end <= start or t >= end:
        return final
    p = (t - start) / (end - start)
    if schedule == "linear":
        return initial + (final - initial) * p
    if schedule == "cubic":
        return final + (initial - final) * (1.0 - p) ** 3
    d_i, d_f = 1.0 - initial, 1.0 - final
    return 1.0 - d_i * math.exp(p * math.log(d_f / d_i))


def is_event(t: int, *, start: int, end: int, frequency: int) -> bool:
    """Whether progress ``t`` is a pruning event: every ``frequency`` from ``start``, and always at ``end``."""
    if t < start or t > end:
        return False
    return (t - start) % frequency == 0 or t == end
