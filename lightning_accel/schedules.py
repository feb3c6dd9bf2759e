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

from lightning_accel._validate import check_choice, check_int, check_number

__all__ = ["SCHEDULES", "Schedule", "check_schedule_args", "sparsity_at", "is_event"]

Schedule = Literal["one_shot", "linear", "cubic", "exponential"]
SCHEDULES: tuple[str, ...] = ("one_shot", "linear", "cubic", "exponential")


def check_schedule_args(
    *,
    amount: float,
    initial_amount: float,
    schedule: str,
    interval: str,
    start: int,
    end: int | None,
    frequency: int,
    intervals: tuple[str, ...] = ("step", "epoch"),
) -> None:
    """Validate the schedule arguments that every pruning callback shares; raises ``ValueError``."""
    check_number("amount", amount, low=0.0, high=1.0, high_inclusive=False)
    check_number("initial_amount", initial_amount, low=0.0, high=1.0, high_inclusive=False)
    if initial_amount > amount:
        raise ValueError(f"`initial_amount` must be <= `amount` ({amount}); got {initial_amount}")
    check_choice("schedule", schedule, SCHEDULES)
    check_choice("interval", interval, intervals)
    check_int("start", start, low=0)
    check_int("end", end, low=0, allow_none=True)
    if end is not None and end < start:
        raise ValueError(f"`end` must be None or >= `start` ({start}); got {end}")
    check_int("frequency", frequency, low=1)


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
