"""Injected clocks: everything that judges time takes one of these."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class Clock(Protocol):
    """Two readings: monotonic seconds (liveness) and wall-clock seconds (diagnostics)."""

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    """The real clocks of this machine."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


@dataclass
class FakeClock:
    """A clock that only moves when told to; wall time can jump independently."""

    mono: float = 1000.0
    wall_offset: float = 1_700_000_000.0 - 1000.0
    history: list[float] = field(default_factory=list)

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.mono + self.wall_offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back ({seconds} s)")
        self.mono += seconds

    def jump_wall(self, seconds: float) -> None:
        """Step the wall clock (NTP step, operator error) without touching monotonic time."""
        self.wall_offset += seconds


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
