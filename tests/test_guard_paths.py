"""The failover guard's refusals through the real execution path: webhook, journal, command.

tests/test_failover.py asks ``decide()``; here every case goes the way production goes.
A reader site (:class:`hbmon.site.Site`: poller, UDP listener, status table, guard, HTTP)
runs in this process on a FakeClock, and the test plays the other site around it with the
project's own parts: records written to the PVOL (:mod:`hbmon.volume`), the array's remote
copy PVOL -> SVOL (:func:`hbmon.mirror.copy_slots`, :func:`~hbmon.mirror.corrupt_slot`),
network beats through :class:`~hbmon.netbeat.NetSender` (its ``drop`` hook is what
``hbmon lab partition`` uses), ``hbmon volume init`` / ``hbmon volume retire`` for an
install and a retirement, and a real ``hbmon run`` writer stopped with SIGTERM for a
planned stop.  The Alertmanager notification is POSTed to ``/api/v1/alerts`` with the
bearer token; the failover command is a real process that appends to a marker file.

For every refusal: the marker never appears, the journal (``state_dir/failover.jsonl``)
holds one ``refused`` entry naming the verdict and no ``started`` one, and
``hbmon_failover_total{result="refused"}`` counts it.  The contrast, so that the harness
can fail: a ``host_down`` pair, and the same dying pair once its degraded window is over,
run the command, once.

The clock moves only when the test moves it, one interval (100 ms) per tick.  Each tick
waits, in real time (milliseconds), until the reader has read the SVOL and taken the
datagram at the new instant, so every verdict is reached at a known moment.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from conftest import require_root
from helpers import Site as Daemon
from helpers import metric_value, pread_file, start_site

from hbmon.clock import FakeClock
from hbmon.config import load_config
from hbmon.demo import free_port
from hbmon.errors import RecordError
from hbmon.failover import Journal
from hbmon.mirror import FileCache, Link, copy_slots, corrupt_slot
from hbmon.netbeat import BEAT, NetSender
from hbmon.record import SLOT_SIZE, Record, decode
from hbmon.row import PathRow
from hbmon.site import Site
from hbmon.volume import open_volume, write_slot

pytestmark = pytest.mark.timeout(60)

PAIR = "db1"
INTERVAL = 0.1  # seconds, reader and writer alike
THRESHOLD = 3  # stale after 0.3 s
# Off the poller's 50 ms bucket grid by half a bucket: each tick lands mid-bucket, so a
# read falls due at one tick exactly, whatever the rounding of the clock's sums.
START = 1000.025
JUMP = 10.0  # "long after": 100 intervals, 25 start-up grace periods
SETTLE = 0.5  # real seconds for a command that (wrongly) started to leave its marker
MARKER_SCRIPT = (
    "import sys, time; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n'); "
    "time.sleep(float(sys.argv[3]))"
)
SMALL_FS = "size=64k"  # a tmpfs this small is filled in a moment


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


async def until(predicate: Callable[[], object], what: str, within: float = 5.0) -> None:
    """Wait (real time) until ``predicate()`` is true; fail the test after ``within`` s."""
    with anyio.move_on_after(within):
        while not predicate():
            await anyio.sleep(0.002)
        return
    pytest.fail(f"timed out after {within:g} s waiting for {what}")


class Lab:
    """The reader site under test and the writer, remote copy and network around it."""

    def __init__(
        self, tmp_path: Path, *, state_dir: Path | None = None, command_sleep: float = 0.0
    ) -> None:
        self.tmp = tmp_path
        self.clock = FakeClock(mono=START, wall_offset=time.time() - START)
        self.pvol, self.svol = tmp_path / "pvol.lun", tmp_path / "svol.lun"
        for lun in (self.pvol, self.svol):
            lun.write_bytes(bytes(SLOT_SIZE))  # zeroed: no writer has claimed the slot yet
        key = secrets.token_hex(32)
        self.key_file = secret_file(tmp_path / "hb.key", key)
        self.token = secrets.token_hex(16)
        token_file = secret_file(tmp_path / "webhook.token", self.token)
        self.state_dir = state_dir or tmp_path / "state"
        self.journal_path = self.state_dir / "failover.jsonl"
        self.marker = tmp_path / "failover-ran.txt"
        self.udp = free_port()
        command = [sys.executable, "-c", MARKER_SCRIPT, str(self.marker), PAIR, str(command_sleep)]
        reader = f"""
site = "standby"
state_dir = {json.dumps(str(self.state_dir))}
interval = "{INTERVAL * 1000:.0f}ms"
miss_threshold = {THRESHOLD}
method = "both"

[network]
listen = "127.0.0.1:{self.udp}"
key_file = {json.dumps(str(self.key_file))}

[webhook]
token_file = {json.dumps(str(token_file))}
hold_down = "10m"
failover_timeout = "10s"

[[watch]]
id = "{PAIR}"
volume = {json.dumps(str(self.svol))}
failover = {json.dumps(command)}
failover_without_arbiter = true
"""
        # The other site's configuration: for `hbmon volume init/retire -c` (they announce
        # to its [[beat]]'s peers) and for the real writer of the planned stop.
        self.writer_text = f"""
site = "primary"
state_dir = {json.dumps(str(tmp_path / "writer-state"))}
interval = "{INTERVAL * 1000:.0f}ms"

[network]
listen = "127.0.0.1:{free_port()}"
key_file = {json.dumps(str(self.key_file))}

[[beat]]
id = "{PAIR}"
volume = {json.dumps(str(self.pvol))}
peers = ["127.0.0.1:{self.udp}"]
"""
        self.writer_config = tmp_path / "writer.toml"
        self.writer_config.write_text(self.writer_text)
        config_path = tmp_path / "reader.toml"
        config_path.write_text(reader)
        self.site = Site(load_config(config_path), clock=self.clock, listen="127.0.0.1:0")
        self.sender = NetSender(key.encode())
        self.files = FileCache()
        self.link = Link(PAIR, str(self.pvol), str(self.svol), 0)
        self.incarnation = 0x5EED0001
        self.serial = 0
        self.writer_alive = True  # the test's writer beats at every tick
        self.mirror_up = True
        self.partitioned = False
        self.daemon: Daemon | None = None  # a real `hbmon run` writer instead, if started
        self.copied = -1  # the daemon's last serial copied to the SVOL
        self.url = ""

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
        self.sender.close()
        self.files.close()

    # -- the other site ------------------------------------------------------------------

    def beat(self) -> None:
        """One heartbeat: the next record on the PVOL and over the network."""
        self.serial += 1
        record = Record(PAIR, self.incarnation, self.serial, self.clock.wall(), INTERVAL)
        vol = open_volume(str(self.pvol), write=True)
        try:
            write_slot(vol, 0, record.encode_block(vol.io_size))
        finally:
            vol.close()
        errors = self.sender.send(BEAT, record, [("127.0.0.1", self.udp)])
        assert not errors, errors

    def partition(self) -> None:
        """Network beats are lost on the way (the lab's `partition`)."""
        self.partitioned = True
        self.sender.drop = lambda record: True

    def pvol_serial(self) -> int:
        try:
            return decode(pread_file(self.pvol, 0, 512), PAIR).serial
        except RecordError:
            return -1  # not claimed yet

    async def hbmon(self, *args: str) -> str:
        """Run the `hbmon` CLI; returns its output (fails the test on an error)."""
        done = await anyio.run_process(
            [sys.executable, "-m", "hbmon.cli", *args], check=False, stderr=subprocess.STDOUT
        )
        out = done.stdout.decode(errors="replace")
        assert done.returncode == 0, f"hbmon {' '.join(args)}: exit {done.returncode}\n{out}"
        return out

    async def start_writer(self) -> None:
        """A real `hbmon run` writer beats the pair (PVOL and network) from now on."""
        self.writer_alive = False
        self.daemon = await anyio.to_thread.run_sync(
            start_site, self.writer_text, self.tmp, "writer"
        )

    async def stop_writer(self) -> None:
        """SIGTERM: the writer's planned stop writes and sends its stopping records."""
        assert self.daemon is not None
        code, _ = await anyio.to_thread.run_sync(self.daemon.stop)
        assert code == 0, self.daemon.stderr_tail()

    # -- the reader ----------------------------------------------------------------------

    def row(self, path: str) -> PathRow:
        row = self.site.table.row(PAIR, path)
        assert row is not None
        return row

    async def tick(self, seconds: float = INTERVAL, *, read: bool = True) -> None:
        """Move the clock on; the writer beats (if alive), the copy runs (if up); return
        once the reader has read the SVOL (unless ``read`` is false: a half tick, between
        two of the poller's reads) and taken the datagram at the new instant."""
        # A read on a thread when the clock jumps would be taken for a hung read.
        await until(
            lambda: not any(t.inflight for t in self.site.poller.targets.values()),
            "no SVOL read in flight",
        )
        self.clock.advance(seconds)
        now, net = self.clock.monotonic(), self.row("network")
        heard = net.serial if net.serial is not None else -1
        expect_datagram = False
        if self.writer_alive:
            self.beat()
            expect_datagram = True
        elif self.daemon is not None and self.daemon.running():
            await until(lambda: self.pvol_serial() > self.copied, "the writer's next beat")
            self.copied = self.pvol_serial()
            expect_datagram = True
        if self.mirror_up:
            copy_slots([self.link], self.files)
        if expect_datagram and not self.partitioned:
            await until(
                lambda: net.serial is not None and net.serial > heard and net.last_read == now,
                "the network beat",
            )
        if read:
            await until(lambda: self.row("volume").last_read == now, "the poller's read")

    async def tick_until(self, verdict: str, ticks: int = 30) -> None:
        seen = []
        for _ in range(ticks):
            await self.tick()
            seen.append(self.verdict())
            if seen[-1] == verdict:
                return
        pytest.fail(f"no {verdict} within {ticks} ticks; verdicts: {seen}")

    async def come_alive(self) -> None:
        for _ in range(3):  # a baseline, then beats on both paths
            await self.tick()
        assert self.verdict() == "alive"

    # -- HTTP, as Alertmanager, Prometheus and an operator see it ----------------------------

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.get(self.url + path) as resp:
            return resp.status, await resp.text()

    def states(self) -> dict[str, str]:
        """The pair's verdict and path states now: the rows of /status.json, taken from the
        table (the page itself is shared for 0.25 s, which is 2.5 ticks here)."""
        rows = [r for r in self.site.table.snapshot() if r["pair"] == PAIR]
        return {
            "verdict": str(rows[0]["verdict"]),
            **{str(r["path"]): str(r["state"]) for r in rows},
        }

    def verdict(self) -> str:
        return self.states()["verdict"]

    async def counted(self, result: str) -> float:
        status, body = await self.get("/metrics")
        assert status == 200, body
        value = metric_value(body, "hbmon_failover_total", pair=PAIR, result=result)
        return value or 0.0

    async def alert(self, labels: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """Alertmanager's notification (webhook version 4) of a firing HbmonHostDown."""
        labels = {"alertname": "HbmonHostDown", "pair": PAIR} if labels is None else labels
        body = {
            "version": "4",
            "status": "firing",
            "receiver": "hbmon-failover",
            "groupKey": '{}:{alertname="HbmonHostDown"}',
            "groupLabels": {k: v for k, v in labels.items() if k in ("alertname", "pair")},
            "commonLabels": labels,
            "alerts": [{"status": "firing", "labels": labels, "annotations": {}}],
        }
        headers = {"Authorization": f"Bearer {self.token}"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.url + "/api/v1/alerts", json=body, headers=headers) as resp,
        ):
            text = await resp.text()
            try:
                doc = json.loads(text)
            except ValueError:
                doc = {"text": text}
            return resp.status, doc

    def journal(self) -> list[dict[str, Any]]:
        try:
            text = self.journal_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines()]

    def runs(self) -> list[str]:
        try:
            return self.marker.read_text().splitlines()
        except FileNotFoundError:
            return []


@contextlib.asynccontextmanager
async def running(lab: Lab) -> AsyncIterator[Lab]:
    """The reader site serves for the duration of the block (in the caller's task)."""
    try:
        async with anyio.create_task_group() as tg:
            _, port = await tg.start(lab.site.run)
            lab.url = f"http://127.0.0.1:{port}"
            yield lab
            tg.cancel_scope.cancel()
    finally:
        lab.close()


@contextlib.contextmanager
def small_tmpfs(where: Path) -> Any:
    """A tiny tmpfs at ``where`` (root), unmounted afterwards."""
    require_root("a tmpfs to fill up")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", SMALL_FS, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> Path:
    """Write a file in ``folder`` until its file system is full; returns the file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


# -- the states, produced for real ------------------------------------------------------------


async def link_down(lab: Lab) -> str:
    await lab.come_alive()
    lab.mirror_up = False  # the array's remote copy stops; the writer beats on
    await lab.tick_until("link_down")
    return "link_down"


async def network_partition(lab: Lab) -> str:
    await lab.come_alive()
    lab.partition()  # the network loses the beats; the copy goes on
    await lab.tick_until("network_partition")
    return "network_partition"


async def unknown(lab: Lab) -> str:
    await lab.come_alive()
    lab.writer_alive = lab.mirror_up = False  # the host dies and its SVOL record rots
    corrupt_slot(lab.link, lab.files)
    await lab.tick_until("unknown")
    await lab.tick(JUMP)  # and stays so: an unreadable path is no evidence of a death
    assert lab.states() == {"verdict": "unknown", "volume": "invalid", "network": "stale"}
    return "unknown"


async def stopped(lab: Lab) -> str:
    await lab.start_writer()
    await lab.come_alive()
    await lab.stop_writer()  # systemctl stop: stopping records on both paths
    await lab.tick_until("stopped")
    await lab.tick(JUMP)  # a planned stop stays a planned stop, however long ago
    assert lab.states() == {"verdict": "stopped", "volume": "stopped", "network": "stopped"}
    return "stopped"


async def awaiting(lab: Lab) -> str:
    # Installed (an install record on the volume, an activation datagram) and never beaten:
    # without the install, silence past the start-up grace would be host_down.
    lab.writer_alive = False
    interval = f"{INTERVAL * 1000:.0f}ms"
    await lab.hbmon(
        "volume", "init", str(lab.pvol), "--id", PAIR, "--interval", interval,
        "-c", str(lab.writer_config),
    )  # fmt: skip
    await lab.tick()
    await until(lambda: lab.row("network").installed, "the activation datagram")
    await lab.tick(JUMP)
    assert lab.states() == {
        "verdict": "awaiting",
        "volume": "awaiting",
        "network": "awaiting",
    }
    return "awaiting"


async def retired(lab: Lab) -> str:
    await lab.come_alive()
    lab.writer_alive = False
    await lab.hbmon("volume", "retire", str(lab.pvol), "--id", PAIR, "-c", str(lab.writer_config))
    await lab.tick_until("retired")
    await lab.tick(JUMP)
    assert lab.states() == {"verdict": "retired", "volume": "retired", "network": "retired"}
    return "retired"


SCENARIOS: list[Callable[[Lab], Awaitable[str]]] = [
    link_down,
    network_partition,
    unknown,
    stopped,
    awaiting,
    retired,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
async def test_nothing_runs_unless_the_table_says_host_down(
    tmp_path: Path, scenario: Callable[[Lab], Awaitable[str]]
) -> None:
    lab = Lab(tmp_path)
    async with running(lab):
        verdict = await scenario(lab)
        assert await lab.counted("refused") == 0
        status, doc = await lab.alert()
        assert status == 200, doc
        [decision] = doc["decisions"]
        assert decision["action"] == "none", decision
        assert verdict in decision["reason"], decision
        await anyio.sleep(SETTLE)
        assert lab.runs() == []
        entries = lab.journal()
        assert [e["event"] for e in entries] == ["refused"], entries
        assert entries[0]["pair"] == PAIR
        assert verdict in entries[0]["reason"], entries[0]
        assert await lab.counted("refused") == 1
        assert await lab.counted("executed") == 0
        assert lab.verdict() == verdict  # refused for that reason, not another


async def test_degraded_while_a_dying_hosts_paths_go_stale_then_it_runs(tmp_path: Path) -> None:
    """A host dies: its network beats stop at once, the remote copy shows its last beat on
    the SVOL one interval later.  For the moment the network is stale and the volume is
    not yet, the pair is degraded and nothing runs; once both are stale, the command runs."""
    lab = Lab(tmp_path)
    async with running(lab):
        await lab.come_alive()
        lab.mirror_up = False
        await lab.tick()  # the last beat: on the network now, still in the copy for the SVOL
        lab.writer_alive, lab.mirror_up = False, True
        for _ in range(3):  # the copy lands (the reader sees the last beat), then silence
            await lab.tick()
        await lab.tick(INTERVAL / 2, read=False)  # network 0.35 s quiet, the SVOL 0.25 s
        assert lab.states() == {"verdict": "degraded", "network": "stale", "volume": "late"}
        status, doc = await lab.alert()
        assert status == 200, doc
        [decision] = doc["decisions"]
        assert decision["action"] == "none", decision
        assert "degraded" in decision["reason"], decision
        await anyio.sleep(SETTLE)
        assert lab.runs() == []
        assert [e["event"] for e in lab.journal()] == ["refused"]
        assert await lab.counted("refused") == 1

        await lab.tick(read=False)  # the SVOL is stale too: host_down
        assert lab.states() == {"verdict": "host_down", "network": "stale", "volume": "stale"}
        status, doc = await lab.alert()
        assert status == 200, doc
        assert doc["decisions"][0]["action"] == "failover", doc
        await until(lambda: [e["event"] for e in lab.journal()][-1:] == ["executed"], "its end")
        assert lab.runs() == [PAIR]
        assert [e["event"] for e in lab.journal()] == ["refused", "started", "executed"]
        assert await lab.counted("executed") == 1


async def test_host_down_runs_the_command_once(tmp_path: Path) -> None:
    """The contrast: the same harness with a dead host runs the command (and only once)."""
    lab = Lab(tmp_path)
    async with running(lab):
        await lab.come_alive()
        lab.writer_alive = False  # the host dies: no more beats on either path
        await lab.tick_until("host_down")
        status, doc = await lab.alert()
        assert status == 200, doc
        [decision] = doc["decisions"]
        assert decision["action"] == "failover", decision
        assert "host_down" in decision["reason"]
        await until(lambda: lab.runs() == [PAIR], "the failover command's marker")
        await until(lambda: [e["event"] for e in lab.journal()][-1:] == ["executed"], "its end")
        started, executed = lab.journal()
        assert (started["event"], started["pair"], executed["exit_code"]) == ("started", PAIR, 0)
        assert await lab.counted("executed") == 1
        status, doc = await lab.alert()  # Alertmanager repeats: held down
        assert doc["decisions"][0]["action"] == "none", doc
        await anyio.sleep(SETTLE)
        assert lab.runs() == [PAIR]
        assert await lab.counted("refused") == 1


@pytest.mark.parametrize(
    "labels",
    [
        {"alertname": "HbmonHostDown"},
        {"alertname": "HbmonHostDown", "pair": ""},
        {"alertname": "HbmonHostDown", "pair": None},
        {"alertname": "HbmonHostDown", "instance": PAIR, "host": PAIR},
    ],
    ids=["missing", "empty", "null", "elsewhere"],
)
async def test_an_alert_without_a_pair_label_runs_nothing(
    tmp_path: Path, labels: dict[str, Any]
) -> None:
    """The site's only pair is host_down: an alert that does not name it must still run
    nothing (no guessing the pair), and the pair itself remains ready to fail over."""
    lab = Lab(tmp_path)
    async with running(lab):
        await lab.come_alive()
        lab.writer_alive = False
        await lab.tick_until("host_down")
        status, doc = await lab.alert(labels)
        assert status == 200, doc
        [decision] = doc["decisions"]
        assert decision["action"] == "ignored", decision
        assert "pair" in decision.get("reason", ""), decision
        await anyio.sleep(SETTLE)
        assert lab.runs() == []
        assert not [e for e in lab.journal() if e["event"] != "refused"], lab.journal()
        assert await lab.counted("executed") == 0
        status, doc = await lab.alert()  # naming the pair: it runs (the harness can fail)
        assert doc["decisions"][0]["action"] == "failover", doc
        await until(lambda: lab.runs() == [PAIR], "the failover command's marker")


def journal_is_a_directory(lab: Lab) -> None:
    lab.journal_path.mkdir(parents=True)


def state_dir_is_full(lab: Lab) -> None:
    fill(lab.state_dir)


BREAKS: list[Callable[[Lab], None]] = [journal_is_a_directory, state_dir_is_full]


@pytest.mark.parametrize("break_journal", BREAKS, ids=[b.__name__ for b in BREAKS])
async def test_no_command_runs_when_its_start_cannot_be_journaled(
    tmp_path: Path, break_journal: Callable[[Lab], None]
) -> None:
    """The journal was writable at start (hbmon checks) and fails later: the command must
    not start without its ``started`` entry on disk."""
    state = tmp_path / "state"
    with contextlib.ExitStack() as stack:
        if break_journal is state_dir_is_full:
            stack.enter_context(small_tmpfs(state))
        lab = Lab(tmp_path, state_dir=state)
        async with running(lab):
            await lab.come_alive()
            lab.writer_alive = False
            await lab.tick_until("host_down")
            break_journal(lab)
            status, doc = await lab.alert()
            assert status >= 500, doc  # the decision failed: Alertmanager retries a 5xx
            await anyio.sleep(SETTLE)
            assert lab.runs() == []
            assert (await lab.get("/healthz"))[0] == 200  # the site serves on
            assert await lab.counted("executed") == 0
            if lab.journal_path.is_file():
                assert lab.journal() == []


async def test_a_start_journaled_in_part_runs_nothing(tmp_path: Path) -> None:
    require_root("a tmpfs to fill up")
    state = tmp_path / "state"
    with small_tmpfs(state):
        # An earlier entry leaves 100 bytes in the journal's last page: any started entry
        # is longer, so on a full file system only its first 100 bytes can be written.
        earlier = {"event": "refused", "pair": "db0", "reason": "", "time": time.time()}
        line = json.dumps(earlier, sort_keys=True) + "\n"
        earlier["reason"] = "x" * (4096 - 100 - len(line))
        (state / "failover.jsonl").write_text(json.dumps(earlier, sort_keys=True) + "\n")
        assert (state / "failover.jsonl").stat().st_size == 4096 - 100
        lab = Lab(tmp_path, state_dir=state, command_sleep=1.0)
        async with running(lab):
            await lab.come_alive()
            lab.writer_alive = False
            await lab.tick_until("host_down")
            filler = fill(state)
            status, doc = await lab.alert()
            filler.unlink()  # room again for the end of a (wrongly) started command
            await anyio.sleep(SETTLE)
            ran = lab.runs()
            with anyio.move_on_after(5):  # (let a started command end before the unmount)
                while lab.site.guard.running:
                    await anyio.sleep(0.01)
            readable = [e["event"] for e in Journal(lab.journal_path).entries()]
            tail = lab.journal_path.read_bytes()[-200:]
    assert ran == [], (
        f"the command ran: HTTP {status} {doc}; readable journal entries {readable}; "
        f"journal tail {tail!r}"
    )


async def test_a_start_that_could_not_be_journaled_holds_nothing_down(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    async with running(lab):
        await lab.come_alive()
        lab.writer_alive = False
        await lab.tick_until("host_down")
        lab.journal_path.mkdir(parents=True)
        failed, _ = await lab.alert()
        lab.journal_path.rmdir()  # the disk is back
        status, doc = await lab.alert()  # Alertmanager retries
        await anyio.sleep(SETTLE)
        ran = lab.runs()
    assert failed >= 500
    assert status == 200, doc
    assert doc["decisions"][0]["action"] == "failover", doc
    assert ran == [PAIR]


async def test_a_result_that_cannot_be_journaled_leaves_the_site_running(
    tmp_path: Path,
) -> None:
    """The command ran; its result entry cannot be written (the disk went away meanwhile):
    the site logs and counts it and serves on, rather than dying of the OSError."""
    lab = Lab(tmp_path, command_sleep=1.0)
    async with running(lab):
        await lab.come_alive()
        lab.writer_alive = False
        await lab.tick_until("host_down")
        status, doc = await lab.alert()
        assert status == 200, doc
        assert doc["decisions"][0]["action"] == "failover", doc
        lab.journal_path.rename(lab.journal_path.with_suffix(".moved"))
        lab.journal_path.mkdir()  # the result cannot be appended
        await until(lambda: not lab.site.guard.running, "the command's end", within=10)
        assert lab.runs() == [PAIR]
        assert (await lab.get("/healthz"))[0] == 200
        _, metrics = await lab.get("/metrics")
        assert "hbmon_failover_journal_errors_total 1.0" in metrics
        assert await lab.counted("executed") == 1
