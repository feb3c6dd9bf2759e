from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_accel.schedules import SCHEDULES, is_event, sparsity_at


def test_known_values():
    kw = dict(initial=0.0, final=0.8, start=10, end=20)
    assert sparsity_at(5, schedule="cubic", **kw) == 0.0
    assert sparsity_at(10, schedule="cubic", **kw) == pytest.approx(0.0)
    assert sparsity_at(15, schedule="cubic", **kw) == pytest.approx(0.8 - 0.8 * 0.125)
    assert sparsity_at(15, schedule="linear", **kw) == pytest.approx(0.4)
    assert sparsity_at(15, schedule="exponential", **kw) == pytest.approx(1 - 0.2**0.5)
    assert sparsity_at(10, schedule="one_shot", **kw) == 0.8
    for s in SCHEDULES:
        assert sparsity_at(20, schedule=s, **kw) == 0.8
        assert sparsity_at(99, schedule=s, **kw) == 0.8


def test_bad_schedule():
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        sparsity_at(0, schedule="quadratic", initial=0, final=0.5, start=0, end=1)


@given(
    schedule=st.sampled_from(SCHEDULES),
    initial=st.floats(0, 0.5),
    final=st.floats(0.5, 0.99),
    start=st.integers(0, 50),
    length=st.integers(1, 200),
)
def test_monotone_and_bounded(schedule, initial, final, start, length):
    end = start + length
    values = [sparsity_at(t, schedule=schedule, initial=initial, final=final, start=start, end=end) for t in range(start, end + 1)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    assert values[-1] == final
    assert all(initial - 1e-9 <= v <= final + 1e-9 for v in values)


def test_events():
    ev = [t for t in range(0, 30) if is_event(t, start=3, end=20, frequency=5)]
    assert ev == [3, 8, 13, 18, 20]
