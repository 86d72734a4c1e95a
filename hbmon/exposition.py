"""The ``/metrics`` body, rendered fast enough for 10,000 pairs.

prometheus-client renders a sample in about 6 us; at 10,000 pairs with both paths the
per-pair families have ~400,000 samples, so the page would take seconds.  Their labels
are static identity, so this module keeps each row's label text and each possible block
of 0/1 state lines ready-made, and only formats the values that move (age, serial,
counters).  The site-wide families (a few hundred samples) still come from
prometheus-client through :func:`hbmon.metrics.site_registry`.  The output is the
Prometheus text format; tests check it parses to exactly what
:class:`hbmon.metrics.PairCollector` produces, and ``promtool check metrics`` accepts it.

:meth:`Renderer.stream` only reads the table; it formats on the event loop in slices of
``CHUNK`` pairs so the poll loop runs between them (the loop's timers keep every state
current), and hands the page over in pieces of at most ``PIECE`` lines, so a 16 MB page
never exists as one string, one bytes object and a copy at once.  After a large page
the C heap is trimmed, so a render every second does not leave its high-water mark in
the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import AsyncIterator, Callable, Generator

import anyio
import anyio.lowlevel
from prometheus_client import CollectorRegistry, generate_latest

from hbmon.metrics import PAIR_FAMILIES
from hbmon.status import STATES, Pair, PathRow, StatusTable
from hbmon.verdict import FRESH, VERDICTS


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _head(key: str) -> str:
    _, kind, text = PAIR_FAMILIES[key]
    name = _sample(key)  # as prometheus-client writes it: counters are named *_total
    return f"# HELP {name} {text}\n# TYPE {name} {kind}\n"


def _sample(key: str) -> str:
    name, kind, _ = PAIR_FAMILIES[key]
    return name + "_total" if kind == "counter" else name


class _RowText:
    """Ready-made text of one row: its labels, its state blocks, its last lines."""

    __slots__ = ("labels", "missed", "states")

    def __init__(self, pair: str, path: str) -> None:
        self.labels = f'pair="{_escape(pair)}",path="{path}"'
        self.states: dict[str, tuple[str, str, str, str]] = {}
        self.missed: tuple[int, str] = (-1, "")  # changes rarely: kept with its value

    def state_lines(self, state: str) -> tuple[str, str, str, str]:
        """The nine 0/1 lines of ``hbmon_heartbeat_state``, the ``up`` line, and the two
        possible ``undead`` lines."""
        lines = self.states.get(state)
        if lines is None:
            name = _sample("state")
            block = "".join(
                f'{name}{{{self.labels},state="{s}"}} {"1.0" if s == state else "0.0"}\n'
                for s in STATES
            )
            up = f"{{{self.labels}}} {'1.0' if state in FRESH else '0.0'}\n"
            no, yes = f"{{{self.labels}}} 0.0\n", f"{{{self.labels}}} 1.0\n"
            lines = self.states[state] = (block, up, no, yes)
        return lines


class _PairText:
    __slots__ = ("label", "verdicts")

    def __init__(self, pair: str) -> None:
        self.label = f'pair="{_escape(pair)}"'
        self.verdicts: dict[str, str] = {}

    def verdict_block(self, verdict: str) -> str:
        block = self.verdicts.get(verdict)
        if block is None:
            name = _sample("verdict")
            block = self.verdicts[verdict] = "".join(
                f'{name}{{{self.label},verdict="{v}"}} {"1.0" if v == verdict else "0.0"}\n'
                for v in VERDICTS
            )
        return block


CHUNK = 500  # pairs formatted between two pauses of render_async (a few milliseconds)
PIECE = 2000  # lines per piece handed to the HTTP response
TRIM_ABOVE = 4 << 20  # bytes of body after which the C heap is given back to the system


def _malloc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        return lambda: None

    def trim_now() -> None:
        trim(0)

    return trim_now


trim_heap = _malloc_trim()
Inputs = list[tuple[Pair, list[tuple[PathRow, "_RowText"]]]]


class Renderer:
    """Renders ``/metrics`` for one table; keeps the ready-made text between scrapes."""

    def __init__(self, table: StatusTable, site: CollectorRegistry) -> None:
        self.table = table
        self.site = site
        self._rows: dict[tuple[str, str], _RowText] = {}
        self._pairs: dict[str, _PairText] = {}

    def inputs(self) -> Inputs:
        """A consistent list of what to render (call on the event loop: cheap)."""
        out = []
        rows, pairs = self._rows, self._pairs
        for pair in self.table.pairs.values():
            items = []
            for path, row in pair.rows.items():
                text = rows.get((pair.id, path))
                if text is None:
                    text = rows[(pair.id, path)] = _RowText(pair.id, path)
                items.append((row, text))
            if pair.id not in pairs:
                pairs[pair.id] = _PairText(pair.id)
            out.append((pair, items))
        if len(rows) > 2 * len(out) + 64:  # pairs were removed: forget their text
            live = {(p.id, r.path) for p, items in out for r, _ in items}
            self._rows = {k: v for k, v in rows.items() if k in live}
            self._pairs = {k: v for k, v in pairs.items() if k in {p.id for p, _ in out}}
        return out

    def render(self, inputs: Inputs) -> bytes:
        """The whole page at once (it only reads the table)."""
        return b"".join(piece for piece in self.steps(inputs) if piece is not None)

    async def stream(self, inputs: Inputs) -> AsyncIterator[bytes]:
        """The page in pieces, formatted on the event loop, letting other tasks run
        every ``CHUNK`` pairs.

        Formatting holds the GIL whichever thread does it; done here in slices of a few
        milliseconds, the poll loop waits at most one slice instead of a whole render.
        """
        size = 0
        for piece in self.steps(inputs):
            if piece is None:
                await anyio.lowlevel.checkpoint()
            else:
                size += len(piece)
                yield piece
        if size > TRIM_ABOVE:
            trim_heap()

    async def render_async(self, inputs: Inputs) -> bytes:
        """The whole page from :meth:`stream`, as one bytes object."""
        return b"".join([piece async for piece in self.stream(inputs)])

    def steps(self, inputs: Inputs) -> Generator[bytes | None, None, None]:
        """Render: yields None to pause (every ``CHUNK`` pairs), then the page in pieces."""
        now = self.table.clock.monotonic()
        pairs_text = self._pairs
        age: list[str] = []
        last: list[str] = []
        serial: list[str] = []
        missed: list[str] = []
        up: list[str] = []
        state: list[str] = []
        undead: list[str] = []
        warning: list[str] = []
        skew: list[str] = []
        errors: list[str] = []
        verdict: list[str] = []
        for count, (pair, items) in enumerate(inputs, 1):
            if not count % CHUNK:
                yield None
            ptext = pairs_text.get(pair.id) or _PairText(pair.id)
            verdict.append(ptext.verdict_block(pair.verdict))
            skew_value: float | None = None
            for row, text in items:
                lb = text.labels
                lc = row.last_change
                if lc is not None:
                    age.append(f"{{{lb}}} {now - lc if now > lc else 0.0:.6f}\n")
                wt = row.writer_time
                if wt is not None:
                    last.append(f"{{{lb}}} {wt!r}\n")
                sn = row.serial
                if sn is not None:
                    serial.append(f"{{{lb}}} {sn}.0\n")
                mt = row.missed_total
                if text.missed[0] != mt:
                    text.missed = (mt, f"{{{lb}}} {mt}.0\n")
                missed.append(text.missed[1])
                fixed = text.states.get(row.state) or text.state_lines(row.state)
                state.append(fixed[0])
                up.append(fixed[1])
                undead.append(fixed[3] if row.undead else fixed[2])
                t = row.timing
                if row.slowest_read >= (
                    t.miss_threshold - 1
                ) * t.interval or row.declared_interval not in (None, t.interval):
                    for w in row.timing_warnings():
                        warning.append(f'{{{lb},warning="{w}"}} 1.0\n')
                if row.skew is not None and (skew_value is None or row.path == "volume"):
                    skew_value = row.skew
                if row.errors and row.path == "volume":
                    for reason, count in sorted(list(row.errors.items())):
                        errors.append(f'{{{ptext.label},reason="{reason}"}} {count}.0\n')
            if skew_value is not None:
                skew.append(f"{{{ptext.label}}} {skew_value!r}\n")
        for key, lines, prefixed in (
            ("age", age, True),
            ("last", last, True),
            ("serial", serial, True),
            ("missed", missed, True),
            ("up", up, True),
            ("state", state, False),
            ("skew", skew, True),
            ("errors", errors, True),
            ("verdict", verdict, False),
            ("warning", warning, True),
            ("undead", undead, True),
        ):
            yield _head(key).encode()
            name = _sample(key) if prefixed else ""
            for i in range(0, len(lines), PIECE):
                yield (name + name.join(lines[i : i + PIECE])).encode()
            lines.clear()  # given back as the page goes out
        yield generate_latest(self.site)
