"""The clocks' sleep_until: FakeClock in virtual time, SystemClock in real time."""

from __future__ import annotations

import itertools
import time

import anyio
import pytest

from hbmon.clock import FakeClock, SystemClock


async def test_a_sleeper_wakes_at_its_deadline_not_before() -> None:
    clock = FakeClock()
    woke: list[float] = []

    async def sleeper() -> None:
        await clock.sleep_until(clock.monotonic() + 5.0)
        woke.append(clock.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        await clock.settle()
        assert clock.pending() == 1
        assert clock.next_deadline() == 1005.0
        clock.advance(4.999)
        await clock.settle()
        assert woke == []
        clock.advance(0.001)
        await clock.settle()
        assert woke == [1005.0]
    assert clock.pending() == 0
    assert clock.next_deadline() is None


async def test_the_wake_event_ends_the_sleep_early() -> None:
    clock = FakeClock()
    wake = anyio.Event()
    woke: list[float] = []

    async def sleeper() -> None:
        await clock.sleep_until(clock.monotonic() + 60.0, wake)
        woke.append(clock.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        await clock.settle()
        clock.advance(1.0)
        await clock.settle()
        assert woke == []
        wake.set()
        await clock.settle()
        assert woke == [1001.0]  # woken by the event, the clock still at 1001
    assert clock.pending() == 0  # its deadline is forgotten
    assert clock.next_deadline() is None
    clock.advance(100.0)  # passing the old deadline wakes nothing, breaks nothing


async def test_an_event_already_set_or_a_deadline_reached_returns_at_once() -> None:
    clock = FakeClock()
    wake = anyio.Event()
    wake.set()
    await clock.sleep_until(clock.monotonic() + 60.0, wake)
    await clock.sleep_until(clock.monotonic())
    await clock.sleep_until(clock.monotonic() - 10.0)
    assert clock.pending() == 0
    assert clock.monotonic() == 1000.0


async def test_a_deadline_in_the_past_is_still_a_checkpoint() -> None:
    """Returning at once still lets other tasks run (and can be cancelled)."""
    clock = FakeClock()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await clock.sleep_until(0.0)
        pytest.fail("a cancelled sleep_until returned")  # pragma: no cover
    assert scope.cancelled_caught


async def test_sleepers_wake_in_deadline_order_even_all_at_once() -> None:
    clock = FakeClock()
    order: list[tuple[str, float]] = []

    async def sleeper(name: str, delay: float) -> None:
        await clock.sleep_until(clock.monotonic() + delay)
        order.append((name, clock.monotonic()))

    async with anyio.create_task_group() as tg:
        for name, delay in [("c", 3.0), ("a", 1.0), ("d", 9.0), ("b", 2.0)]:
            tg.start_soon(sleeper, name, delay)
        await clock.settle()
        assert clock.pending() == 4
        clock.advance(5.0)  # past three deadlines in one jump
        await clock.settle()
        assert order == [("a", 1005.0), ("b", 1005.0), ("c", 1005.0)]
        assert clock.pending() == 1
        assert clock.next_deadline() == 1009.0
        tg.cancel_scope.cancel()


async def test_run_for_wakes_each_sleeper_at_its_own_moment() -> None:
    """run_for steps time from deadline to deadline: a loop sleeping 0.1 s at a time
    runs 100 times in 10 virtual seconds, each tick at its own time, and no real time
    passes."""
    clock = FakeClock()
    ticks: list[float] = []

    async def loop() -> None:
        while True:
            ticks.append(clock.monotonic())
            await clock.sleep_until(1000.0 + len(ticks) * 0.1)  # (no drift from summing)

    began = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(loop)
        await clock.run_for(10.0)
        assert clock.monotonic() == 1010.0
        tg.cancel_scope.cancel()
    assert time.monotonic() - began < 0.5
    assert len(ticks) == 101  # at 1000.0 and 100 more
    steps = [b - a for a, b in itertools.pairwise(ticks)]
    assert all(abs(step - 0.1) < 1e-9 for step in steps), steps


def test_the_fake_clock_needs_no_event_loop() -> None:
    clock = FakeClock(mono=5.0)
    clock.advance(2.5)
    clock.jump_wall(-100.0)
    assert clock.monotonic() == 7.5
    assert clock.pending() == 0
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-1.0)


async def test_the_system_clock_sleeps_until_the_deadline() -> None:
    clock = SystemClock()
    began = clock.monotonic()
    await clock.sleep_until(began + 0.05)
    took = clock.monotonic() - began
    assert 0.05 <= took < 0.5, took
    began = clock.monotonic()
    await clock.sleep_until(began - 1.0)  # in the past: at once
    assert clock.monotonic() - began < 0.05


async def test_the_system_clock_wakes_on_the_event_or_the_deadline() -> None:
    clock = SystemClock()
    wake = anyio.Event()
    began = clock.monotonic()
    await clock.sleep_until(began + 0.05, wake)  # not set: the deadline
    took = clock.monotonic() - began
    assert 0.05 <= took < 0.5, took

    async def set_soon() -> None:
        await anyio.sleep(0.05)
        wake.set()

    async with anyio.create_task_group() as tg:
        began = clock.monotonic()
        tg.start_soon(set_soon)
        await clock.sleep_until(began + 30.0, wake)
        took = clock.monotonic() - began
    assert 0.04 <= took < 0.5, took
