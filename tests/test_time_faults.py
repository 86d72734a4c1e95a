"""Time faults: wall-clock steps change no verdict; a frozen writer that resumes is undead.

tests/test_status.py already checks one volume row on a FakeClock (a step of the reader's
wall clock changes only the skew).  Here:

* twin runs of a whole site's status table (both paths: volume rows fed as the poller
  feeds them, network rows through the real :class:`NetListener`) on a FakeClock, one
  with a wall-clock step of the reader, of every writer or of both, one without: every
  state, verdict, missed count and undead flag is the same at every 0.1 s, for pairs that
  are alive, late, stale on one path, down, frozen and resumed, or restarted;
* live, in one process: a real reader site and a real writer site (beater, poller, UDP
  listener, HTTP) on a clock whose wall time the test steps by an hour, forward and back,
  on either side: the pair stays alive on both paths;
* live, two ``hbmon run`` processes: the writer is SIGSTOPped until the watcher says
  ``host_down``, then SIGCONTed: both rows flag an undead writer (status, metric, note),
  the incarnation is unchanged, and the verdict returns to ``alive`` only after
  ``recover_beats`` good beats (hysteresis), never flapping on the way.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import metric_value, running_site, start_site, wait_for

from hbmon.clock import FakeClock, SystemClock
from hbmon.config import Timing, load_config
from hbmon.netbeat import BEAT, NetListener, Rejected, encode_datagram
from hbmon.record import Record
from hbmon.site import Site
from hbmon.status import StatusTable

KEY = b"time-fault-test-key-0123456789"
TIMING = Timing(interval=1.0, miss_threshold=3, recover_beats=2)
STEP = 0.1  # seconds between judgements in the twin runs
NET_DELAY = 0.005  # a datagram arrives this long after it was sent
POLL_OFFSET = 0.3  # the poller reads a volume this long after the writer wrote it
HOUR = 3600.0

# -- twin runs on a FakeClock ---------------------------------------------------------------


@dataclass
class Writer:
    """One pair's writer: which paths it beats on and when (seconds of the run)."""

    pair: str
    incarnation: int
    volume_until: float = float("inf")  # last volume beat at or before this
    network_until: float = float("inf")
    resume_at: float | None = None  # beats again on both paths from here ...
    new_incarnation: int | None = None  # ... as a new writer (else the same one)
    serial: int = 0
    slot: Record | None = None  # what its PVOL (and the mirrored SVOL) holds
    wall_offset: float = 0.0  # the writer host's wall clock minus the reader's, at start

    def active(self, t: float, until: float) -> bool:
        return t <= until or (self.resume_at is not None and t >= self.resume_at)


def writers() -> list[Writer]:
    return [
        Writer("alive", 0xA1),
        Writer("late", 0xA2, volume_until=9.0, network_until=9.0),  # late at the step
        Writer("down", 0xA3, volume_until=4.0, network_until=4.0),  # host_down at the step
        Writer("link", 0xA4, volume_until=3.0),  # volume stale: link_down
        Writer("partition", 0xA5, network_until=3.0),  # network stale: network_partition
        Writer("frozen", 0xA6, volume_until=4.0, network_until=4.0, resume_at=13.0),
        Writer(
            "restart",
            0xA7,
            volume_until=4.0,
            network_until=4.0,
            resume_at=13.0,
            new_incarnation=0xB7,
        ),
        Writer("skewed", 0xA8, wall_offset=-1800.0),  # half an hour off all along
    ]


@dataclass
class Twin:
    """A reader site's table, its network listener, and the writers that feed it."""

    clock: FakeClock = field(default_factory=FakeClock)
    writers: list[Writer] = field(default_factory=writers)

    def __post_init__(self) -> None:
        self.table = StatusTable(self.clock, site="reader")
        self.listener = NetListener(self.table, self.clock, KEY, "127.0.0.1:0")
        self.start = self.clock.monotonic()
        self.writer_epoch = self.clock.wall_offset
        self.rejected: list[str] = []
        for w in self.writers:
            self.table.add_pair(w.pair, "both", TIMING, volume=f"/srv/hb/{w.pair}.vol")

    def t(self) -> float:
        return round(self.clock.monotonic() - self.start, 6)

    def writer_wall(self, w: Writer) -> float:
        """The writer host's own wall clock: in step with ours until someone steps one."""
        return self.clock.monotonic() + self.writer_epoch + w.wall_offset

    def beat(self, w: Writer, t: float) -> bytes | None:
        """Write the next record; returns the datagram carrying it, if the network path
        works."""
        if w.resume_at is not None and t == w.resume_at and w.new_incarnation is not None:
            w.incarnation, w.serial = w.new_incarnation, 0
        w.serial += 1
        rec = Record(w.pair, w.incarnation, w.serial, self.writer_wall(w), TIMING.interval)
        if w.active(t, w.volume_until):
            w.slot = rec
        if w.active(t, w.network_until):
            return encode_datagram(KEY, BEAT, rec)
        return None

    def deliver(self, datagrams: list[bytes], t: float) -> None:
        self.clock.advance(NET_DELAY)
        for data in datagrams:
            try:
                self.listener.handle(data)
            except Rejected as rej:
                self.rejected.append(f"at {t} s: {rej}")

    def poll(self, w: Writer) -> None:
        """Read the slot as the poller does (hbmon/poller.py ``_deliver``)."""
        row = self.table.row(w.pair, "volume")
        assert row is not None
        if w.slot is None:
            return
        now, wall = self.clock.monotonic(), self.clock.wall()
        if not row.observe_next_beat(w.slot, now, wall):
            row.observe_record(w.slot, now, wall)
        self.table.touch(row, now)

    def view(self) -> tuple[tuple[object, ...], ...]:
        out = []
        for pair in self.table.pairs.values():
            rows = tuple(
                (p, r.state, r.missed_total, r.undead, r.serial, r.restarts)
                for p, r in sorted(pair.rows.items())
            )
            out.append((pair.id, pair.verdict, rows))
        return tuple(out)

    def run(
        self, seconds: float, jump: tuple[str, float, float] | None = None
    ) -> list[tuple[float, tuple[tuple[object, ...], ...]]]:
        """Every writer beats on whole seconds, the poller reads 0.3 s later; the table is
        judged every 0.1 s.  ``jump`` = (who, when, by): step the reader's wall clock, every
        writer's, or both."""
        trace = []
        steps = round(seconds / STEP)
        for i in range(1, steps + 1):
            target = self.start + i * STEP
            self.clock.advance(max(0.0, target - self.clock.monotonic()))
            t = round(i * STEP, 6)
            if jump is not None and t == jump[1]:
                who, _, by = jump
                if who in ("reader", "both"):
                    self.clock.jump_wall(by)
                if who in ("writers", "both"):
                    for w in self.writers:
                        w.wall_offset += by
            if t == int(t):
                sent = [
                    self.beat(w, t)
                    for w in self.writers
                    if w.active(t, max(w.volume_until, w.network_until))
                ]
                self.deliver([d for d in sent if d is not None], t)
            if round(t - POLL_OFFSET, 6) == int(t - POLL_OFFSET):
                for w in self.writers:
                    self.poll(w)
            self.table.run_due(self.clock.monotonic())
            for pair in self.table.pairs.values():
                pair.rejudge(self.clock.monotonic())
            trace.append((t, self.view()))
        return trace


def _verdicts(trace: list[tuple[float, Any]], at: float) -> dict[str, str]:
    view = dict(trace)[at]
    return {pair: verdict for pair, verdict, _ in view}


def test_twin_run_covers_every_verdict() -> None:
    """The scenario itself: at the step (t = 10 s) the pairs are in the states named."""
    trace = Twin().run(20.0)
    at_step = _verdicts(trace, 10.0)
    assert at_step == {
        "alive": "alive",
        "late": "alive",  # its last beat was at 9 s: late (still fresh) from 10 s
        "down": "host_down",
        "link": "link_down",
        "partition": "network_partition",
        "frozen": "host_down",
        "restart": "host_down",
        "skewed": "alive",
    }
    assert _verdicts(trace, 12.0)["late"] == "degraded"  # network stale, volume late
    assert _verdicts(trace, 20.0) == {
        "alive": "alive",
        "late": "host_down",
        "down": "host_down",
        "link": "link_down",
        "partition": "network_partition",
        "frozen": "alive",
        "restart": "alive",
        "skewed": "alive",
    }
    final = {pair: rows for pair, _, rows in trace[-1][1]}
    assert all(undead for _, _, _, undead, _, _ in final["frozen"])
    assert not any(undead for _, _, _, undead, _, _ in final["restart"])
    assert all(restarts == 1 for *_, restarts in final["restart"])


STEPS = [
    (who, by)
    for who in ("reader", "writers", "both")
    for by in (HOUR, -HOUR, 24 * HOUR, -24 * HOUR)
    # A writer host whose clock was stepped by a day and that then restarts is a new
    # writer a day off every clock the reader knows: refused on the network by design
    # (see the next test), so the twins differ there.
    if who != "writers" or abs(by) == HOUR
]


@pytest.mark.parametrize(("who", "by"), STEPS, ids=[f"{w}{b:+.0f}s" for w, b in STEPS])
def test_a_wall_clock_step_changes_no_state_and_no_verdict(who: str, by: float) -> None:
    """Identical twins but for a step of the wall clock at t = 10 s: at every 0.1 s every
    row has the same state, missed count, serial, restarts and undead flag, every pair the
    same verdict; only the skew moves, and the listener rejects nothing."""
    plain, stepped = Twin(), Twin()
    expected = plain.run(20.0)
    got = stepped.run(20.0, jump=(who, 10.0, by))
    for (t, want), (_, have) in zip(expected, got, strict=True):
        assert have == want, f"t = {t} s after a {by:+.0f} s step of the {who}'s clock"
    assert stepped.rejected == plain.rejected == []
    row = stepped.table.row("alive", "network")
    assert row is not None
    assert row.skew is not None
    shift = {"reader": -by, "writers": by, "both": 0.0}[who]
    assert row.skew == pytest.approx(shift, abs=0.1)


def test_a_new_writer_far_off_the_clocks_is_refused_on_the_network() -> None:
    """The one place wall time counts: a writer the reader has not seen (first contact,
    or a new incarnation) must carry a time within an hour of the reader's clock or of the
    writer's own clock as last seen, or its datagrams are dropped as possible replays
    (``out_of_window``).  A writer already beating is never judged by its time."""
    clock = FakeClock()
    table = StatusTable(clock, site="reader")
    table.add_pair("db1", "both", TIMING)
    listener = NetListener(table, clock, KEY, "127.0.0.1:0")

    def send(inc: int, serial: int, skew: float) -> str:
        rec = Record("db1", inc, serial, clock.wall() + skew, 1.0)
        clock.advance(1.0)
        return listener.handle(encode_datagram(KEY, BEAT, rec))

    with pytest.raises(Rejected, match="out_of_window"):
        send(1, 1, -2 * HOUR)  # first contact, two hours behind
    assert send(1, 2, -HOUR + 60) == "beat"
    assert send(1, 3, -3 * HOUR) == "beat"  # the running writer's clock stepped back
    clock.jump_wall(5 * HOUR)  # ... and ours forward
    assert send(2, 1, -5 * HOUR - 3 * HOUR) == "restart"  # its restart: its own clock
    with pytest.raises(Rejected, match="out_of_window"):
        send(3, 1, -2 * HOUR - 5 * HOUR - 3 * HOUR)  # a time near neither clock


# -- live: one process, real sites, stepped wall clocks ---------------------------------------


class SteppedClock(SystemClock):
    """The machine's clocks, with a wall-clock offset the test can step."""

    def __init__(self) -> None:
        self.offset = 0.0

    def wall(self) -> float:
        return super().wall() + self.offset


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _site_config(tmp_path: Path, name: str, body: str, udp: int) -> Path:
    key = tmp_path / "hb.key"
    if not key.exists():
        key.write_bytes(KEY)
        key.chmod(0o600)
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'site = "{name}"\nstate_dir = "{tmp_path / name}"\ninterval = "200ms"\n'
        f'[network]\nlisten = "127.0.0.1:{udp}"\nkey_file = "{key}"\n' + body
    )
    return path


@pytest.mark.slow
async def test_live_sites_stay_alive_through_hour_steps(tmp_path: Path) -> None:
    """A writer site beats to a file PVOL and over UDP; the reader site watches the file
    (the SVOL of a synchronous mirror) and the beats.  Both run the real beater, poller
    and listener on the machine's monotonic clock; their wall clocks are stepped by an
    hour, each way, on each side, in turn."""
    pvol = tmp_path / "db1.vol"
    reader_udp, writer_udp = _udp_port(), _udp_port()
    writer_cfg = load_config(
        _site_config(
            tmp_path,
            "writer",
            f'[[beat]]\nid = "db1"\nvolume = "{pvol}"\npeers = ["127.0.0.1:{reader_udp}"]\n',
            writer_udp,
        )
    )
    reader_cfg = load_config(
        _site_config(tmp_path, "reader", f'[[watch]]\nid = "db1"\nvolume = "{pvol}"\n', reader_udp)
    )
    wclock, rclock = SteppedClock(), SteppedClock()
    writer = Site(writer_cfg, clock=wclock, listen="127.0.0.1:0")
    reader = Site(reader_cfg, clock=rclock, listen="127.0.0.1:0")
    pair = reader.table.pairs["db1"]
    seen: list[str] = []
    skews: list[float] = []

    async def watch(seconds: float) -> None:
        end = anyio.current_time() + seconds
        while anyio.current_time() < end:
            pair.judge(rclock.monotonic())
            if not seen or seen[-1] != pair.verdict:
                seen.append(pair.verdict)
            await anyio.sleep(0.02)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            await tg.start(reader.run)
            while pair.verdict != "alive":
                await anyio.sleep(0.05)
                pair.judge(rclock.monotonic())
            seen.append("alive")
            for clock, by in ((rclock, HOUR), (rclock, -HOUR), (wclock, HOUR), (wclock, -HOUR)):
                clock.offset += by
                await watch(1.5)  # 7 intervals: stale would come after 3
                row = reader.table.row("db1", "network")
                assert row is not None
                assert row.skew is not None
                skews.append(row.skew)
            tg.cancel_scope.cancel()
    print(f"\n[time] verdicts seen through four one-hour steps: {seen}; skews {skews}")
    assert seen == ["alive"]
    assert reader.listener is not None
    assert reader.listener.statistics().rejected == {}
    assert skews == pytest.approx([-HOUR, 0.0, HOUR, 0.0], abs=0.5)
    for path in ("volume", "network"):
        row = reader.table.row("db1", path)
        assert row is not None
        assert row.missed_total == 0, path
        assert row.restarts == 0


# -- live: SIGSTOP / SIGCONT of a real writer process ----------------------------------------


def _views(site: Any, pair: str) -> tuple[dict[str, Any], dict[str, Any]]:
    rows = site.rows()
    return rows[pair, "volume"], rows[pair, "network"]


@pytest.mark.slow
def test_a_frozen_writer_that_resumes_is_reported_undead(tmp_path: Path) -> None:
    """``hbmon run`` beating to a file PVOL and over UDP is frozen with SIGSTOP (a hung
    host, a VM paused, a stop-the-world GC) until the watcher says ``host_down``, then
    thawed with SIGCONT.  It resumes with its old incarnation: both rows flag an undead
    writer (``undead`` in /status.json, the note, ``hbmon_heartbeat_undead`` = 1,
    ``errors.undead_writer``), and the verdict goes back to ``alive`` only after
    ``recover_beats`` good beats."""
    pvol = tmp_path / "db1.vol"
    watcher_udp, writer_udp = _udp_port(), _udp_port()
    key = tmp_path / "hb.key"
    key.write_bytes(KEY)
    key.chmod(0o600)

    def config(name: str, udp: int, body: str) -> str:
        return (
            f'site = "{name}"\nstate_dir = "{tmp_path / name}"\ninterval = "200ms"\n'
            f"recover_beats = 3\n"
            f'[network]\nlisten = "127.0.0.1:{udp}"\nkey_file = "{key}"\n' + body
        )

    writer_cfg = config(
        "osaka",
        writer_udp,
        f'[[beat]]\nid = "db1"\nvolume = "{pvol}"\npeers = ["127.0.0.1:{watcher_udp}"]\n',
    )
    watcher_cfg = config("tokyo", watcher_udp, f'[[watch]]\nid = "db1"\nvolume = "{pvol}"\n')
    writer = start_site(writer_cfg, tmp_path, "osaka")
    try:
        with running_site(watcher_cfg, tmp_path, "tokyo") as watcher:
            wait_for(
                lambda: watcher.status() and _pair_verdict(watcher) == "alive",
                10.0,
                "db1 alive on the watcher",
            )
            before = _views(watcher, "db1")
            writer.proc.send_signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            wait_for(lambda: _pair_verdict(watcher) == "host_down", 5.0, "db1 host_down")
            down_after = time.monotonic() - frozen_at
            time.sleep(0.5)  # well past the threshold
            assert _pair_verdict(watcher) == "host_down"

            writer.proc.send_signal(signal.SIGCONT)
            thawed_at = time.monotonic()
            verdicts, flagged_after, alive_after = [], None, None
            while time.monotonic() - thawed_at < 5.0:
                vol, net = _views(watcher, "db1")
                verdict = vol["verdict"]
                if not verdicts or verdicts[-1] != verdict:
                    verdicts.append(verdict)
                if flagged_after is None and vol["undead"] and net["undead"]:
                    flagged_after = time.monotonic() - thawed_at
                if verdict == "alive":
                    alive_after = time.monotonic() - thawed_at
                    break
                time.sleep(0.02)
            print(
                f"\n[time] SIGSTOP: host_down after {down_after:.2f} s; SIGCONT: undead "
                f"after {flagged_after or -1:.2f} s, alive after {alive_after or -1:.2f} s; "
                f"verdicts {verdicts}"
            )
            assert alive_after is not None, f"never alive again after SIGCONT: {verdicts}"
            # No flapping on the way: the network path (beats arrive when sent) may
            # recover one poll before the volume path; never back to host_down, never
            # a partition or a broken link.
            assert verdicts[0] == "host_down", verdicts
            assert verdicts[-1] == "alive", verdicts
            assert set(verdicts[1:-1]) <= {"degraded"}, verdicts
            # recover_beats = 3 beats of 200 ms: held down past the first two beats
            assert alive_after >= 0.3
            vol, net = _views(watcher, "db1")
            metrics = watcher.metrics()
            for row, old in ((vol, before[0]), (net, before[1])):
                path = row["path"]
                assert row["undead"] is True, row
                assert row["incarnation"] == old["incarnation"], "a thawed writer keeps it"
                assert row["restarts"] == 0
                assert "frozen writer came back" in row["note"], row
                assert row["errors"].get("undead_writer", 0) >= 1, row
                assert metric_value(metrics, "hbmon_heartbeat_undead", pair="db1", path=path) == 1
                assert row["state"] == "alive"
            assert "a frozen host resumed?" in watcher.stderr()

            # The flag stays until a new incarnation: a restarted (or fenced and
            # rebooted) writer clears it.
            code, _ = writer.stop()
            assert code == 0
            writer = start_site(writer_cfg, tmp_path, "osaka")
            row = wait_for(
                lambda: (
                    (row := watcher.row("db1"))["incarnation"] != before[0]["incarnation"]
                    and row["verdict"] == "alive"
                    and row
                ),
                10.0,
                "db1 alive with a new incarnation",
            )
            assert row["undead"] is False, row
            metrics = watcher.metrics()
            for path in ("volume", "network"):
                assert metric_value(metrics, "hbmon_heartbeat_undead", pair="db1", path=path) == 0
    finally:
        if writer.running():
            os.kill(writer.proc.pid, signal.SIGCONT)
        writer.stop()


def _pair_verdict(site: Any) -> str:
    return str(site.row("db1", "volume")["verdict"])
