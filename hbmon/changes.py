"""The log of state changes, bounded: a mass event at 10,000 pairs is a few lines.

Every change of a row's state and of a pair's verdict is worth a log line when a few
happen -- and a log storm when a whole site changes at once (start-up, a storage array
or a network going away): 20,000 lines in a second cost the event loop about half a
second, which delays reads, which makes more rows late, which logs more.  So at most
``burst`` changes are logged one by one per ``window`` seconds; the rest are counted by
kind ("volume alive -> late", "verdict alive -> host_down") and summed up in one line
when the window ends.  Nothing is lost that an operator needs: the status table, the
metrics and the status page show every row.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

#: Structured fields of a change (see hbmon.logs): given, or made only when logged.
Extra = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None

BURST = 50  # changes logged one by one per window
WINDOW = 1.0  # seconds
SUMMARY_KINDS = 6  # kinds named in a summary line, most frequent first


class ChangeLog:
    """Logs changes at most ``burst`` per ``window`` (0: no limit); counts and sums up
    the rest.

    Time is the caller's monotonic ``now`` (the table's clock), so tests on a fake
    clock see the same behaviour as a running daemon.
    """

    def __init__(
        self, logger: logging.Logger, *, burst: int = BURST, window: float = WINDOW
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self.started = -float("inf")  # start of the current window
        self.logged = 0  # changes logged one by one in it
        self.held: Counter[str] = Counter()  # changes only counted, by kind
        self.suppressed_total = 0

    def change(
        self, now: float, kind: str, message: str, *args: object, extra: Extra = None
    ) -> None:
        """Log one change (``message % args``, with the structured fields ``extra``: a
        mapping, or a function that makes one, called only if the line is logged) or
        count it under ``kind``."""
        if now - self.started >= self.window:
            self.flush(now)
            self.started, self.logged = now, 0
        if self.logged < self.burst or not self.burst:  # burst 0: every change
            self.logged += 1
            fields = extra() if callable(extra) else extra
            self.logger.info(message, *args, extra=fields)
        else:
            self.held[kind] += 1

    def flush(self, now: float) -> None:
        """Sum up what was only counted, once its window is over (or at ``now``)."""
        if not self.held or now - self.started < self.window:
            return
        total = sum(self.held.values())
        self.suppressed_total += total
        kinds = self.held.most_common()
        named = ", ".join(f"{kind}: {count}" for kind, count in kinds[:SUMMARY_KINDS])
        more = len(kinds) - SUMMARY_KINDS
        self.logger.info(
            "... and %d more state change(s) in %.1f s, not logged one by one (%s%s); "
            "see /status or `hbmon status` for every pair",
            total,
            now - self.started,
            named,
            f", and {more} other kind(s)" if more > 0 else "",
            extra={"event": "changes_not_logged", "count": total, "kinds": dict(kinds)},
        )
        self.held.clear()
