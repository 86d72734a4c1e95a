"""Injected clocks: everything that judges time takes one of these."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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
