"""The safety history of a partition test: who was primary when, with which fencing token.

Every promote (failover) and demote command the partition tests install is a script made
by :func:`write_scripts`.  It appends one JSON line to ONE history file shared by every
site::

    {"t": 1234.567890123, "site": "B", "pair": "db1", "event": "promote", "token": 7}

``t`` is ``CLOCK_MONOTONIC`` in seconds (``t_start``, also written, is when the command
started: the same as ``t`` for a promote): every network namespace shares the host's
monotonic clock, so lines written at different sites compare exactly.  ``token`` is
``HBMON_FENCING_TOKEN`` (null when the command did not get one).  The file is opened with
``O_APPEND`` and each line is one ``write``, so lines of concurrent commands never mix.

A promote stamps ``t`` when it starts (before it would start the service), a demote when
it has finished (after it would have stopped it; ``demote SITE PAIR SECONDS`` sleeps that
long first, a slow demote), so the checker errs on the side of seeing an overlap.

:func:`check` asserts the two safety properties of DESIGN.md "Arbiter":

* **no two primaries**: for each pair, no two sites are primary at the same instant; a
  site is primary from its promote until its next demote (both instants included), and
  the initial owner from ``-inf`` until its first demote;
* **fencing tokens strictly increase** per pair across promotes (and exceed the initial
  owner's term when it is given).

:func:`analyze` returns the same findings without raising (the randomized runner counts
them); a line that is not valid is itself a violation: a broken history never passes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import stat
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS = ("promote", "demote")

_SCRIPT = '''#!{python} -IS
"""{event} for the partition tests: append one line to {history}."""
import json, os, sys, time

def main():
    site = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("HBMON_SITE", "")
    pair = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("HBMON_PAIR", "")
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    token = os.environ.get("HBMON_FENCING_TOKEN")
    t_start = time.clock_gettime(time.CLOCK_MONOTONIC)
    {stamp_first}
    if delay > 0:
        time.sleep(delay)
    {stamp_last}
    line = json.dumps({{
        "t": t, "t_start": t_start, "site": site, "pair": pair, "event": "{event}",
        "token": int(token) if token and token.isdigit() else token,
        "pid": os.getpid(),
    }}) + "\\n"
    fd = os.open({history!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)

main()
'''
_STAMP = "t = time.clock_gettime(time.CLOCK_MONOTONIC)"  # promote: first; demote: last


def write_scripts(folder: Path, history: Path) -> tuple[Path, Path]:
    """Write the promote and demote scripts into ``folder``; (promote, demote) paths.

    Use them as ``failover = [promote, SITE, PAIR]`` and ``demote = [demote, SITE, PAIR]``
    (a third argument: seconds the command takes).  Without arguments they fall back on
    ``HBMON_SITE`` / ``HBMON_PAIR`` from the environment.
    """
    folder.mkdir(parents=True, exist_ok=True)
    history = history.absolute()
    paths = []
    for event in EVENTS:
        path = folder / f"{event}.py"
        first = _STAMP if event == "promote" else "pass"
        last = "pass" if event == "promote" else _STAMP
        text = _SCRIPT.format(
            python=sys.executable,
            event=event,
            history=str(history),
            stamp_first=first,
            stamp_last=last,
        )
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        paths.append(path)
    return paths[0], paths[1]


def append(history: Path, event: dict[str, Any]) -> None:
    """Append one event the way the scripts do (for the runner's own marks and tests)."""
    fd = os.open(history, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Event:
    t: float
    site: str
    pair: str
    event: str
    token: int | None
    line: int  # 1-based line number in the history file
    text: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.text}"


@dataclass
class Interval:
    """One site's time as primary for one pair."""

    site: str
    start: float  # -inf for the initial owner
    end: float  # +inf while still primary at the end of the history
    token: int | None
    promote: Event | None  # None for the initial owner
    demote: Event | None = None


@dataclass
class Report:
    """What :func:`analyze` found; :attr:`violations` empty means safe."""

    events: list[Event] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    intervals: dict[str, list[Interval]] = field(default_factory=dict)
    tokens: dict[str, list[int | None]] = field(default_factory=dict)  # promotes, in order
    idle_demotes: list[Event] = field(default_factory=list)  # demote of a non-primary site

    @property
    def overlaps(self) -> int:
        return sum(1 for v in self.violations if v.startswith("overlap"))

    def promotes(self, pair: str | None = None) -> list[Event]:
        return [e for e in self.events if e.event == "promote" and pair in (None, e.pair)]

    def demotes(self, pair: str | None = None) -> list[Event]:
        return [e for e in self.events if e.event == "demote" and pair in (None, e.pair)]

    def primary_at(self, pair: str, t: float) -> list[str]:
        """The sites primary for ``pair`` at instant ``t``."""
        return [iv.site for iv in self.intervals.get(pair, []) if iv.start <= t <= iv.end]

    def handovers(self, pair: str) -> list[float]:
        """Seconds from each primary's end to the next one's start (positive = a gap)."""
        ivs = sorted(self.intervals.get(pair, []), key=lambda iv: iv.start)
        return [b.start - a.end for a, b in itertools.pairwise(ivs) if a.end < math.inf]

    def summary(self) -> str:
        parts = []
        for pair in sorted(self.intervals):
            seq = " -> ".join(
                f"{iv.site}[{iv.token if iv.token is not None else '-'}]"
                for iv in self.intervals[pair]
            )
            parts.append(f"{pair}: {seq}")
        head = (
            f"{len(self.promotes())} promotes, {len(self.demotes())} demotes, "
            f"{len(self.violations)} violations ({self.overlaps} overlaps)"
        )
        return head + ("; " + "; ".join(parts) if parts else "")


def read(history: Path | Iterable[str]) -> tuple[list[Event], list[str]]:
    """Parse a history (a path or its lines): (events, problems with lines)."""
    if isinstance(history, Path):
        lines = history.read_text().splitlines() if history.exists() else []
    else:
        lines = list(history)
    events: list[Event] = []
    problems: list[str] = []
    for n, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text:
            continue
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            t = doc["t"]
            if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
                raise ValueError(f"t is {t!r}")
            site, pair, event = doc["site"], doc["pair"], doc["event"]
            if not isinstance(site, str) or not site or not isinstance(pair, str) or not pair:
                raise ValueError("site and pair must be non-empty strings")
            if event not in EVENTS:
                raise ValueError(f"event is {event!r}")
            token = doc.get("token")
            if token is not None and (isinstance(token, bool) or not isinstance(token, int)):
                raise ValueError(f"token is {token!r}")
        except (ValueError, KeyError) as err:
            problems.append(f"malformed line {n}: {err}: {text[:200]}")
            continue
        events.append(Event(float(t), site, pair, event, token, n, text))
    return events, problems


def analyze(
    history: Path | Iterable[str],
    initial_owner: Mapping[str, str] | None = None,
    initial_token: Mapping[str, int] | None = None,
) -> Report:
    """Replay the history in monotonic order; collect every violation."""
    events, problems = read(history)
    report = Report(events=sorted(events, key=lambda e: (e.t, e.line)))
    report.violations.extend(problems)
    initial_owner = dict(initial_owner or {})
    initial_token = dict(initial_token or {})
    by_pair: dict[str, list[Event]] = defaultdict(list)
    for e in report.events:
        by_pair[e.pair].append(e)
    for pair in sorted(set(by_pair) | set(initial_owner)):
        _replay(pair, by_pair[pair], initial_owner.get(pair), initial_token.get(pair), report)
    return report


def _replay(
    pair: str,
    events: list[Event],
    owner: str | None,
    owner_token: int | None,
    report: Report,
) -> None:
    intervals: list[Interval] = []
    open_: dict[str, Interval] = {}  # site -> its current primary interval
    if owner is not None:
        iv = Interval(owner, -math.inf, math.inf, owner_token, None)
        intervals.append(iv)
        open_[owner] = iv
    last_token = owner_token
    last_promote: Event | None = None
    tokens: list[int | None] = []
    overlaps: list[tuple[Event, Interval]] = []  # (promote, the other primary's interval)
    for e in events:
        if e.event == "promote":
            # still primary, or demoted at this very instant (both ends count)
            others = [iv for site, iv in open_.items() if site != e.site]
            others += [
                iv
                for iv in intervals
                if iv.site != e.site and iv.demote is not None and iv.end >= e.t
            ]
            overlaps.extend((e, iv) for iv in others)
            tokens.append(e.token)
            if e.token is None:
                report.violations.append(f"token missing on {pair}: {e}")
            elif last_token is not None and e.token <= last_token:
                before = "the initial term" if last_promote is None else str(last_promote)
                report.violations.append(
                    f"token not increasing on {pair}: {e.token} after {last_token} "
                    f"({before})\n  promote: {e}"
                )
            if e.token is not None:
                last_token, last_promote = e.token, e
            if e.site not in open_:
                iv = Interval(e.site, e.t, math.inf, e.token, e)
                intervals.append(iv)
                open_[e.site] = iv
        else:
            iv_or_none = open_.pop(e.site, None)
            if iv_or_none is None:
                report.idle_demotes.append(e)
            else:
                iv_or_none.end, iv_or_none.demote = e.t, e
    for e, iv in overlaps:  # worded once the other interval's demote (if any) is known
        since = "the start" if iv.promote is None else str(iv.promote)
        until = "never demoted" if iv.demote is None else f"demoted only at {iv.demote}"
        report.violations.append(
            f"overlap on {pair}: {e.site} promoted at t={e.t:.6f} while {iv.site} was still "
            f"primary\n  promote: {e}\n  {iv.site} primary since {since}\n  {until}"
        )
    report.intervals[pair] = intervals
    report.tokens[pair] = tokens


def check(
    history: Path | Iterable[str],
    initial_owner: Mapping[str, str] | None = None,
    initial_token: Mapping[str, int] | None = None,
) -> Report:
    """:func:`analyze`, raising AssertionError with the offending lines on any violation."""
    report = analyze(history, initial_owner, initial_token)
    if report.violations:
        raise AssertionError(
            f"safety history violated ({report.summary()}):\n" + "\n".join(report.violations)
        )
    return report
