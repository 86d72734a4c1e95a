"""Injected clocks: everything that judges time takes one of these, and sleeps on it.

The loops that wait for a *time* (the poller's ticks, the status table's timers, the
beater's beats, the simulated remote copy) sleep with :meth:`Clock.sleep_until`, so a
test on a :class:`FakeClock` runs them in virtual time (trio's clock abstraction is the
model).  Deadlines around I/O stay on real time: a thread blocked in a read does not care
what a fake clock says.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
import anyio.lowlevel


class Clock(Protocol):
    """Two readings: monotonic seconds (liveness) and wall-clock seconds (diagnostics)."""

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    async def sleep_until(self, deadline: float, wake: anyio.Event | None = None) -> None:
        """Return once :meth:`monotonic` has reached ``deadline`` or, sooner, once ``wake``
        is set (a checkpoint either way)."""
        ...


class SystemClock:
    """The real clocks of this machine."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float, wake: anyio.Event | None = None) -> None:
        delay = deadline - time.monotonic()
        if wake is None:
            await anyio.sleep(delay if delay > 0 else 0)
        else:
            with anyio.move_on_after(delay if delay > 0 else 0):
                await wake.wait()


@dataclass(eq=False, slots=True)
class _Sleeper:
    """One task in :meth:`FakeClock.sleep_until`; ``scope`` is cancelled to wake it."""

    scope: anyio.CancelScope
    done: bool = False  # it has returned from sleep_until (woken, or by its wake event)


@dataclass
class FakeClock:
    """A clock that only moves when told to; wall time can jump independently.

    Tasks sleeping on it (:meth:`sleep_until`) wake when :meth:`advance` moves time past
    their deadline.  :meth:`run_for` is the way a test lets virtual time pass: it steps
    from one sleeper's deadline to the next and lets the woken tasks run at each.
    Constructing it and calling :meth:`advance` needs no event loop.
    """

    mono: float = 1000.0
    wall_offset: float = 1_700_000_000.0 - 1000.0
    history: list[float] = field(default_factory=list)
    # (deadline, order of arrival, sleeper): a heap; entries of sleepers gone stay until popped
    _sleepers: list[tuple[float, int, _Sleeper]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )
    _seq: int = field(default=0, init=False, repr=False, compare=False)
    _woken: list[_Sleeper] = field(default_factory=list, init=False, repr=False, compare=False)

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.mono + self.wall_offset

    def advance(self, seconds: float) -> None:
        """Move time on by ``seconds`` at once and wake every sleeper whose deadline it
        reached (they run at the next checkpoint; :meth:`settle` waits for that)."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back ({seconds} s)")
        self._advance_to(self.mono + seconds)

    def _advance_to(self, when: float) -> None:
        self.mono = max(self.mono, when)
        sleepers = self._sleepers
        while sleepers and sleepers[0][0] <= self.mono:
            sleeper = heapq.heappop(sleepers)[2]
            if not sleeper.done:
                sleeper.scope.cancel()
                self._woken.append(sleeper)

    def jump_wall(self, seconds: float) -> None:
        """Step the wall clock (NTP step, operator error) without touching monotonic time."""
        self.wall_offset += seconds

    async def sleep_until(self, deadline: float, wake: anyio.Event | None = None) -> None:
        if deadline <= self.mono or (wake is not None and wake.is_set()):
            await anyio.lowlevel.checkpoint()
            return
        with anyio.CancelScope() as scope:
            sleeper = _Sleeper(scope)
            self._seq += 1
            heapq.heappush(self._sleepers, (deadline, self._seq, sleeper))
            try:
                if wake is None:
                    await anyio.sleep_forever()
                else:
                    await wake.wait()
            finally:
                sleeper.done = True

    def pending(self) -> int:
        """How many tasks are sleeping on this clock."""
        return sum(1 for entry in self._sleepers if not entry[2].done)

    def next_deadline(self) -> float | None:
        """The earliest deadline a task sleeps until, or None when none sleeps."""
        sleepers = self._sleepers
        while sleepers and sleepers[0][2].done:  # (woken by its event: gone)
            heapq.heappop(sleepers)
        return sleepers[0][0] if sleepers else None

    async def settle(self) -> None:
        """Let the tasks that :meth:`advance` woke run, each up to its next wait."""
        await anyio.lowlevel.checkpoint()
        rounds = 0
        while not all(s.done for s in self._woken):
            rounds += 1
            if rounds > 1000:  # (a cancelled wait returns in one round)
                raise RuntimeError("a task woken by the fake clock did not run")
            await anyio.lowlevel.checkpoint()
        self._woken.clear()
        await anyio.lowlevel.checkpoint()  # (and the tasks they started, one step)

    async def run_for(
        self, seconds: float, busy: Callable[[], bool] | None = None, io_timeout: float = 5.0
    ) -> None:
        """Let ``seconds`` of virtual time pass as they would: time moves to each
        sleeper's deadline in turn (trio's autojump, up to ``seconds``) and the tasks
        woken there run before it moves on.

        ``busy`` says whether real I/O is still out (reads or writes on worker threads,
        which virtual time does not wait for): before each step it is waited for, in real
        time, as if the disk took no time at all; TimeoutError after ``io_timeout`` s.
        """
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back ({seconds} s)")
        end = self.mono + seconds
        while True:
            await self.settle()
            if busy is not None and busy():
                with anyio.fail_after(io_timeout):
                    while busy():  # (threads' state: no event to wait on)  # noqa: ASYNC110
                        await anyio.sleep(0.001)
                await self.settle()
            first = self.next_deadline()
            if first is None or first > end:
                break
            self._advance_to(first)
        self._advance_to(end)
        await self.settle()


BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True, slots=True)
class BootStamp:
    """A moment on the clock that survives a process restart but not a reboot.

    ``since_boot`` is CLOCK_BOOTTIME (monotonic, counting suspend, never stepped);
    ``boot_id`` names the boot it counts from ("" when unknown: then nothing compares).
    """

    boot_id: str
    since_boot: float

    def elapsed_since(self, earlier_boot_id: object, earlier_since_boot: object) -> float | None:
        """Seconds from an earlier stamp to this one, or None when they cannot be compared
        (another boot, an unknown boot, a stamp from the future, or not a stamp at all)."""
        if not self.boot_id or earlier_boot_id != self.boot_id:
            return None
        if not isinstance(earlier_since_boot, int | float) or isinstance(earlier_since_boot, bool):
            return None
        elapsed = self.since_boot - float(earlier_since_boot)
        return elapsed if elapsed >= 0 else None


def boot_stamp() -> BootStamp:
    """This machine's boot id and CLOCK_BOOTTIME now."""
    try:
        boot_id = BOOT_ID_FILE.read_text().strip()
    except OSError:
        boot_id = ""
    return BootStamp(boot_id, time.clock_gettime(time.CLOCK_BOOTTIME))
