"""The timer wheel shared by the poller and the status table."""

from __future__ import annotations

import random

import pytest

from hbmon.wheel import Wheel


def test_buckets_come_out_in_time_order_once_begun() -> None:
    wheel: Wheel[str] = Wheel(0.05)
    wheel.push(1.26, "c")
    wheel.push(1.01, "a")
    wheel.push(1.02, "b")
    assert len(wheel) == 3
    assert wheel.first() == pytest.approx(1.0)
    assert wheel.take(0.99) is None  # nothing has begun
    taken = wheel.take(1.0)
    assert taken is not None
    assert taken[0] == wheel.key(1.01)
    assert sorted(taken[1]) == ["a", "b"]
    assert wheel.take(1.2) is None
    taken = wheel.take(1.3)
    assert taken is not None
    assert taken[1] == ["c"]
    assert wheel.first() is None
    assert len(wheel) == 0


def test_every_item_comes_out_exactly_once_and_never_before_its_bucket() -> None:
    rng = random.Random(7)
    wheel: Wheel[int] = Wheel(0.01)
    due = {i: rng.uniform(0, 5) for i in range(2000)}
    for i, when in due.items():
        wheel.push(when, i)
    out: list[int] = []
    now = 0.0
    while now < 6:
        while (taken := wheel.take(now)) is not None:
            key, items = taken
            for i in items:
                assert wheel.key(due[i]) == key
                assert due[i] < now + 0.01  # at most one grain early
            out += items
        now += 0.003
    assert sorted(out) == sorted(due)


def test_a_grain_must_be_positive() -> None:
    with pytest.raises(ValueError, match="grain"):
        Wheel(0.0)
