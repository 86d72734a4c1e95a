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

The test or runner that injects faults adds site-wide marks (``pair`` null) with
:func:`mark`, each stamped on the side that errs towards an overlap:

* ``crash``: the site's host died (``kill -9``): every pair it was primary for stops
  being primary there (stamped after the processes were reaped);
* ``pause`` / ``resume``: the site's host froze (SIGSTOP, a VM freeze) and thawed; its
  service could not act in between (``pause`` stamped once the process is stopped,
  ``resume`` just before SIGCONT);
* ``restart``, ``note`` (e.g. a fault applied or undone): informational.

:func:`check` asserts the two safety properties of DESIGN.md "Arbiter":

* **no two primaries**: for each pair, no two sites are primary at the same instant; a
  site is primary from its promote until its next demote or crash (both instants
  included), the initial owner from ``-inf``.  The one exception, only with
  ``resume_grace``: the older primary was *frozen* when the newer one was promoted, and
  once thawed it demoted within ``resume_grace`` seconds, holding the lower token the
  whole time, so the storage fences it (DESIGN.md: a process paused past its lease
  demotes on resume, before any beat).  Such overlaps are listed in
  :attr:`Report.fenced`, never hidden;
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
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAIR_EVENTS = ("promote", "demote")  # written by the scripts
SITE_MARKS = ("crash", "pause", "resume", "restart", "note")  # by the fault injector
EVENTS = PAIR_EVENTS + SITE_MARKS

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
    for event in PAIR_EVENTS:
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
    """Append one line the way the scripts do (one ``write``, ``O_APPEND``)."""
    fd = os.open(history, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)


def mark(history: Path, site: str, event: str, **extra: Any) -> float:
    """Append a site-wide mark (see the module docstring) stamped now; returns the stamp."""
    if event not in SITE_MARKS:
        raise ValueError(f"{event!r} is not one of {SITE_MARKS}")
    t = time.clock_gettime(time.CLOCK_MONOTONIC)
    append(history, {"t": t, "site": site, "pair": None, "event": event, **extra})
    return t


@dataclass(frozen=True)
class Event:
    t: float
    site: str
    pair: str | None  # None for a site-wide mark
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
    ended_by: Event | None = None  # its demote or crash

    def describe(self) -> str:
        since = "the start" if self.promote is None else str(self.promote)
        until = "never demoted" if self.ended_by is None else f"until {self.ended_by}"
        return f"{self.site} primary (token {self.token}) since {since}, {until}"


@dataclass
class Report:
    """What :func:`analyze` found; :attr:`violations` empty means safe."""

    events: list[Event] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    fenced: list[str] = field(default_factory=list)  # excused overlaps (see module doc)
    intervals: dict[str, list[Interval]] = field(default_factory=dict)
    tokens: dict[str, list[int | None]] = field(default_factory=dict)  # promotes, in order
    frozen: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
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
        """Seconds from each primary's end to the next one's start (negative: overlap)."""
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
            f"{len(self.violations)} violations ({self.overlaps} overlaps), "
            f"{len(self.fenced)} fenced"
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
            events.append(_parse(text, n))
        except (ValueError, KeyError) as err:
            problems.append(f"malformed line {n}: {err}: {text[:200]}")
    return events, problems


def _parse(text: str, n: int) -> Event:
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    t, site, event = doc["t"], doc["site"], doc["event"]
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise ValueError(f"t is {t!r}")
    if not isinstance(site, str) or not site:
        raise ValueError("site must be a non-empty string")
    if event not in EVENTS:
        raise ValueError(f"event is {event!r}")
    pair = doc.get("pair")
    if event in PAIR_EVENTS:
        if not isinstance(pair, str) or not pair:
            raise ValueError("pair must be a non-empty string")
    elif pair is not None:
        raise ValueError(f"a {event} mark is site-wide: pair must be null")
    token = doc.get("token")
    if token is not None and (isinstance(token, bool) or not isinstance(token, int)):
        raise ValueError(f"token is {token!r}")
    return Event(float(t), site, pair, event, token, n, text)


def analyze(
    history: Path | Iterable[str],
    initial_owner: Mapping[str, str] | None = None,
    initial_token: Mapping[str, int] | None = None,
    *,
    resume_grace: float | None = None,
) -> Report:
    """Replay the history in monotonic order; collect every violation."""
    events, problems = read(history)
    report = Report(events=sorted(events, key=lambda e: (e.t, e.line)))
    report.violations.extend(problems)
    initial_owner = dict(initial_owner or {})
    initial_token = dict(initial_token or {})
    report.frozen = _freezes(report.events)
    pairs = {e.pair for e in report.events if e.pair is not None} | set(initial_owner)
    for pair in sorted(pairs):
        intervals = _replay(
            pair, report.events, initial_owner.get(pair), initial_token.get(pair), report
        )
        report.intervals[pair] = intervals
        _overlaps(pair, intervals, report, resume_grace)
    return report


def _freezes(events: list[Event]) -> dict[str, list[tuple[float, float]]]:
    """Per site, its frozen intervals [pause, resume] (an unmatched pause: to +inf)."""
    frozen: dict[str, list[tuple[float, float]]] = defaultdict(list)
    since: dict[str, float] = {}
    for e in events:
        if e.event == "pause":
            since.setdefault(e.site, e.t)
        elif e.event in ("resume", "crash") and e.site in since:
            frozen[e.site].append((since.pop(e.site), e.t))
    for site, t in since.items():
        frozen[site].append((t, math.inf))
    return dict(frozen)


def _replay(
    pair: str,
    events: list[Event],
    owner: str | None,
    owner_token: int | None,
    report: Report,
) -> list[Interval]:
    intervals: list[Interval] = []
    open_: dict[str, Interval] = {}  # site -> its current primary interval
    if owner is not None:
        iv = Interval(owner, -math.inf, math.inf, owner_token, None)
        intervals.append(iv)
        open_[owner] = iv
    last_token = owner_token
    last_promote: Event | None = None
    tokens: list[int | None] = []
    for e in events:
        if e.event == "crash":  # the host died: all its primaries with it
            ended = open_.pop(e.site, None)
            if ended is not None:
                ended.end, ended.ended_by = e.t, e
            continue
        if e.pair != pair:
            continue
        if e.event == "promote":
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
        elif e.event == "demote":
            ended = open_.pop(e.site, None)
            if ended is None:
                report.idle_demotes.append(e)
            else:
                ended.end, ended.ended_by = e.t, e
    report.tokens[pair] = tokens
    return intervals


def _active(lo: float, hi: float, frozen: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of [lo, hi] outside the frozen intervals."""
    if lo == hi:
        return [] if any(p <= lo <= r for p, r in frozen) else [(lo, hi)]
    segments = [(lo, hi)]
    for p, r in frozen:
        rest = []
        for a, b in segments:
            if r <= a or p >= b:
                rest.append((a, b))
                continue
            if p > a:
                rest.append((a, p))
            if r < b:
                rest.append((r, b))
        segments = rest
    return segments


def _overlaps(
    pair: str, intervals: list[Interval], report: Report, resume_grace: float | None
) -> None:
    ordered = sorted(intervals, key=lambda iv: iv.start)
    for i, old in enumerate(ordered):
        for new in ordered[i + 1 :]:
            if new.site == old.site or new.start > old.end:
                continue
            lo, hi = new.start, min(old.end, new.end)
            frozen = report.frozen.get(old.site, [])
            active = _active(lo, hi, frozen)
            head = (
                f"overlap on {pair}: {new.site} promoted at t={new.start:.6f} while "
                f"{old.site} was still primary"
            )
            lines = f"\n  promote: {new.promote}\n  {old.describe()}"
            if not active:
                report.fenced.append(f"{head} but frozen throughout{lines}")
                continue
            excuse = _thawed_and_demoted(old, new, active, frozen, resume_grace)
            if excuse is not None:
                report.fenced.append(f"{head}: {excuse}{lines}")
            else:
                seconds = sum(b - a for a, b in active)
                report.violations.append(f"{head} ({seconds:.3f} s both active){lines}")


def _thawed_and_demoted(
    old: Interval,
    new: Interval,
    active: list[tuple[float, float]],
    frozen: list[tuple[float, float]],
    grace: float | None,
) -> str | None:
    """Why the overlap is fenced, or None: the old primary was active during it only
    between a thaw and its demote (or crash) at most ``grace`` later, and held the lower
    token."""
    if grace is None or len(active) != 1 or old.ended_by is None:
        return None
    a, b = active[0]
    resumes = [r for _, r in frozen if r <= a]
    if not resumes or b != old.end or b - max(resumes) > grace:
        return None
    if old.token is None or new.token is None or old.token >= new.token:
        return None
    thawed = max(resumes)
    return (
        f"it thawed at t={thawed:.6f} and {old.ended_by.event}d {b - thawed:.3f} s later "
        f"(grace {grace:g} s), token {old.token} < {new.token}"
    )


def check(
    history: Path | Iterable[str],
    initial_owner: Mapping[str, str] | None = None,
    initial_token: Mapping[str, int] | None = None,
    *,
    resume_grace: float | None = None,
) -> Report:
    """:func:`analyze`, raising AssertionError with the offending lines on any violation."""
    report = analyze(history, initial_owner, initial_token, resume_grace=resume_grace)
    if report.violations:
        raise AssertionError(
            f"safety history violated ({report.summary()}):\n" + "\n".join(report.violations)
        )
    return report
