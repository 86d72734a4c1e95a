"""The failover hold-down is judged on the monotonic clock, in a running guard and across
restarts: a step of the wall clock neither shortens nor stretches it (issue 13)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import need
from helpers import Feeder, Site, post_host_down, running_site, wait_for

from hbmon.clock import BootStamp, FakeClock, boot_stamp
from hbmon.config import Timing
from hbmon.failover import FailoverGuard, Journal, journaled_age
from hbmon.record import Record
from hbmon.status import StatusTable

TIMING = Timing(interval=1.0, miss_threshold=3, recover_beats=2)
HOLD_DOWN = 600.0


class Boot:
    """A boot whose CLOCK_BOOTTIME moves with the fake monotonic clock."""

    def __init__(self, clock: FakeClock, boot_id: str = "boot-a", uptime: float = 3600.0) -> None:
        self.clock = clock
        self.boot_id = boot_id
        self.offset = uptime - clock.monotonic()

    def __call__(self) -> BootStamp:
        return BootStamp(self.boot_id, self.clock.monotonic() + self.offset)

    def reboot(self, uptime: float) -> None:
        """A new boot id, and ``uptime`` seconds since that boot now."""
        self.boot_id += "'"
        self.offset = uptime - self.clock.monotonic()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def dead_pair(clock: FakeClock, marker: Path) -> StatusTable:
    """A pair that beat twice on both paths and went silent long enough to be host_down."""
    table = StatusTable(clock, site="tokyo")
    command = (sys.executable, "-c", f"open({str(marker)!r}, 'a').write('ran\\n')")
    table.add_pair("db1", "both", TIMING, failover=command, failover_without_arbiter=True)
    for row in table.pairs["db1"].rows.values():
        for serial in (1, 2):
            row.observe_record(Record("db1", 9, serial, clock.wall(), 1.0), clock.monotonic(), 0.0)
    clock.advance(5)
    return table


def guard(table: StatusTable, tmp_path: Path, boot: Boot) -> FailoverGuard:
    journal = Journal(tmp_path / "failover.jsonl")
    return FailoverGuard(table, table.clock, journal, hold_down=HOLD_DOWN, boot=boot)


async def fail_over(g: FailoverGuard) -> None:
    async with anyio.create_task_group() as tg:
        decision = await g.on_alert("db1", tg)
    assert decision.code == "host_down", decision.reason


def runs(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


# -- in one running guard ---------------------------------------------------------------


@pytest.mark.parametrize("step", [700.0, 86_400.0])
async def test_a_forward_wall_step_does_not_end_the_hold_down(
    clock: FakeClock, tmp_path: Path, step: float
) -> None:
    marker = tmp_path / "ran"
    g = guard(dead_pair(clock, marker), tmp_path, Boot(clock))
    await fail_over(g)
    clock.jump_wall(step)  # the wall clock says the hold-down is long over
    clock.advance(10)
    assert g.decide("db1").code == "hold_down"
    clock.advance(HOLD_DOWN - 20)
    assert g.decide("db1").code == "hold_down"
    assert runs(marker) == 1
    clock.advance(11)
    assert g.decide("db1").code == "host_down"


async def test_a_backward_wall_step_does_not_stretch_the_hold_down(
    clock: FakeClock, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    g = guard(dead_pair(clock, marker), tmp_path, Boot(clock))
    await fail_over(g)
    clock.jump_wall(-7200)  # two hours back: on the wall clock the failover lies ahead
    clock.advance(HOLD_DOWN - 1)
    assert g.decide("db1").code == "hold_down"
    clock.advance(2)
    assert g.decide("db1").code == "host_down"
    await fail_over(g)
    assert runs(marker) == 2


# -- across a restart of the daemon ---------------------------------------------------


@pytest.mark.parametrize("step", [700.0, -7200.0])
async def test_a_restart_on_the_same_boot_keeps_the_hold_down_exactly(
    clock: FakeClock, tmp_path: Path, step: float
) -> None:
    marker = tmp_path / "ran"
    table, boot = dead_pair(clock, marker), Boot(clock)
    await fail_over(guard(table, tmp_path, boot))
    clock.advance(100)
    clock.jump_wall(step)
    restarted = guard(table, tmp_path, boot)  # a new process reads the journal
    assert restarted.decide("db1").code == "hold_down"
    assert "started 100 s ago" in restarted.decide("db1").reason
    clock.advance(HOLD_DOWN - 101)
    assert restarted.decide("db1").code == "hold_down"
    clock.advance(2)
    assert restarted.decide("db1").code == "host_down"


@pytest.mark.parametrize("step", [0.0, 1e6, -1e6])
async def test_after_a_reboot_a_start_counts_as_no_older_than_the_boot(
    clock: FakeClock, tmp_path: Path, step: float
) -> None:
    marker = tmp_path / "ran"
    table, boot = dead_pair(clock, marker), Boot(clock)
    await fail_over(guard(table, tmp_path, boot))
    clock.advance(5000)  # the failover was long ago...
    boot.reboot(uptime=30)  # ...but on another boot: its stamps cannot be compared
    clock.jump_wall(step)  # and the wall clock may say anything
    restarted = guard(table, tmp_path, boot)
    assert restarted.decide("db1").code == "hold_down"
    clock.advance(HOLD_DOWN - 31)
    assert restarted.decide("db1").code == "hold_down"
    clock.advance(2)
    assert restarted.decide("db1").code == "host_down"


def test_the_started_entry_carries_the_boot_stamp(clock: FakeClock, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    table = dead_pair(clock, marker)
    anyio.run(fail_over, guard(table, tmp_path, Boot(clock, uptime=1234.5)))
    started = [e for e in Journal(tmp_path / "failover.jsonl").entries() if e["event"] == "started"]
    assert len(started) == 1
    assert started[0]["boot_id"] == "boot-a"
    assert started[0]["since_boot"] == pytest.approx(1234.5)
    assert started[0]["code"] == "host_down"


# -- journal entries that cannot be placed exactly ------------------------------------


NOW_BOOT = BootStamp("b", 5000.0)
WALL = 1_800_000_000.0


@pytest.mark.parametrize(
    ("entry", "age"),
    [
        ({"boot_id": "b", "since_boot": 4900.0, "time": WALL - 1e6}, 100.0),  # exact
        ({"boot_id": "old", "since_boot": 10.0, "time": WALL - 1e6}, 5000.0),  # earlier boot
        ({"boot_id": "b", "since_boot": 6000.0, "time": WALL}, 0.0),  # "future": legacy rule
        ({"time": WALL - 100.0}, 100.0),  # written before boot stamps: its wall age...
        ({"time": WALL - 1e7}, 5000.0),  # ...but never older than this boot
        ({"time": WALL + 3600.0}, 0.0),  # a start "in the future": now
        ({"boot_id": "b", "since_boot": True, "time": WALL - 50.0}, 50.0),  # not a number
        ({}, 0.0),  # no time at all: now
    ],
)
def test_journaled_age(entry: dict[str, Any], age: float) -> None:
    assert journaled_age(entry, WALL, NOW_BOOT) == pytest.approx(age)


def test_an_unknown_boot_id_compares_with_nothing() -> None:
    assert BootStamp("", 100.0).elapsed_since("", 50.0) is None
    assert BootStamp("b", 100.0).elapsed_since("b", 50.0) == 50.0
    assert BootStamp("b", 100.0).elapsed_since("c", 50.0) is None


def test_boot_stamp_reads_this_machine() -> None:
    first, second = boot_stamp(), boot_stamp()
    assert len(first.boot_id) == 36  # a UUID
    assert first.boot_id == second.boot_id
    assert 0 < first.since_boot <= second.since_boot


def test_a_torn_or_foreign_journal_line_is_skipped(clock: FakeClock, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    table, boot = dead_pair(clock, marker), Boot(clock)
    path = tmp_path / "failover.jsonl"
    lines = [
        json.dumps({"event": "started", "pair": 7, "time": clock.wall()}),  # not a pair name
        json.dumps({"event": "started", "pair": "db1", "boot_id": "boot-a"})[:20],  # torn
    ]
    path.write_text("\n".join(lines) + "\n")
    assert guard(table, tmp_path, boot).decide("db1").code == "host_down"


# -- end to end: the real daemon under libfaketime ------------------------------------

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
TOKEN = "hold-down-test-token-0123456789ab"
MARKER_SCRIPT = "import sys; open(sys.argv[1], 'a').write('ran\\n')"


def faketime_env(offset_file: Path) -> dict[str, str]:
    """libfaketime steps only the wall clock, to whatever ``offset_file`` says right now."""
    offset_file.write_text("+0\n")
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def daemon_config(tmp_path: Path, hold_down: str) -> str:
    token = tmp_path / "webhook.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    command = [sys.executable, "-c", MARKER_SCRIPT, str(tmp_path / "ran")]
    return f"""
site = "tokyo"
state_dir = "{tmp_path / "state"}"
method = "volume"
interval = "200ms"

[webhook]
token_file = "{token}"
hold_down = "{hold_down}"

[[watch]]
id = "db1"
volume = "{tmp_path / "db1.vol"}"
failover = {json.dumps(command)}
failover_without_arbiter = true
failover_single_path = true
"""


def post_alert(site: Site) -> dict[str, Any]:
    return post_host_down(site, TOKEN)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "hold_down", "wait", "second"),
    [
        ("+700", "10m", 0.0, "hold_down"),  # the defect measured in issue 13: it ran twice
        ("-3600", "2s", 2.5, "host_down"),  # a backward step must not stretch the hold-down
    ],
)
def test_a_wall_clock_step_in_the_running_daemon(
    tmp_path: Path, step: str, hold_down: str, wait: float, second: str
) -> None:
    need(LIBFAKETIME.exists(), f"{LIBFAKETIME} missing (Debian package faketime)")
    vol = tmp_path / "db1.vol"
    vol.write_bytes(b"\0" * 4096)
    feeder = Feeder([("db1", vol, 0)], 0.1, declared=0.2).start()
    offset = tmp_path / "faketime"
    marker = tmp_path / "ran"
    journal = Journal(tmp_path / "state" / "failover.jsonl")
    try:
        config, env = daemon_config(tmp_path, hold_down), faketime_env(offset)
        with running_site(config, tmp_path, env=env) as site:
            wait_for(lambda: site.row("db1")["state"] == "alive", 10, "db1 alive")
            feeder.stop_feeding("db1")  # the host dies
            wait_for(lambda: site.row("db1")["verdict"] == "host_down", 10, "host_down")
            assert post_alert(site)["code"] == "host_down"
            wait_for(lambda: runs(marker) == 1, 10, "the failover command ran")
            last_event = lambda: journal.entries()[-1]["event"]  # noqa: E731
            wait_for(lambda: last_event() == "executed", 10, "journal")

            offset.write_text(step + "\n")  # the daemon's wall clock steps
            time.sleep(wait)
            decision = post_alert(site)
            assert decision["code"] == second, decision
            wait_for(lambda: len(journal.entries()) >= 3, 10, "the second decision journaled")
            time.sleep(0.5)  # a command that wrongly started has time to write its marker
            assert runs(marker) == (2 if second == "host_down" else 1)
    finally:
        feeder.close()
    entries = journal.entries()
    # the daemon really saw the step: its journal's wall times jumped by it
    assert entries[2]["time"] - entries[0]["time"] == pytest.approx(float(step) + wait, abs=2.0)
