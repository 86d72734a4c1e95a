"""Issue 8, item 5 (UDP half): a flood of forged datagrams from loopback.

Two real daemons on loopback: site A (``hbmon run``) beats 300 pairs into one PVOL file,
the first few of them over UDP to site B as well; site B (``hbmon run``) polls all 300
slots of that file (the file stands in for the mirrored SVOL) and receives the network
beats.  Once every pair is alive, one sender process (tests/flood.py) floods B's UDP port
from loopback (at nice 19: a real flood comes from another host and competes for the
port, not for hbmon's CPU) with forged datagrams, bounded in count and time: altered datagrams (bad
MAC), replays of a datagram captured from A, garbage, oversized and truncated datagrams,
correctly signed datagrams for a pair B does not watch and for a real pair with a writer
time far in the past (this test knows the key).

Checked: every datagram that reached the socket (sent minus the kernel's drops for that
socket, which hbmon exports as ``hbmon_network_receive_dropped_total``) was rejected with
its reason, and none counted as a beat: the real pairs' network serials and incarnations
are A's.  The volume path never notices the flood.  One flooding process outruns the
listener (Python costs it more per datagram than the sender), so the
kernel drops datagrams, A's real beats among them: the network path of the UDP pairs may
go late or stale meanwhile (``degraded`` / ``network_partition``, never ``host_down``), and
every pair must be alive again soon after.  The poll lag p99 over the flood window (from
the ``hbmon_poll_tick_lag_seconds`` histogram, bucket deltas) must stay at most 100 ms.
The figures are printed (run with -s).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from helpers import Site, parse_metrics, running_site, wait_for

from hbmon.clock import FakeClock
from hbmon.config import Timing
from hbmon.netbeat import (
    BATCH,
    BEAT,
    DATAGRAM_SIZE,
    MAC_SIZE,
    MAGIC,
    REJECT_LOG_EVERY,
    NetListener,
    encode_datagram,
    socket_drops,
)
from hbmon.record import SLOT_SIZE, Record, decode
from hbmon.status import StatusTable

PAIRS = 300  # volume pairs polled by B
NET_PAIRS = 6  # of which these also beat over UDP
FLOOD_COUNT = 200_000
FLOOD_SECONDS = 10.0
WINDOW = 8.0  # seconds of quiet measurement before the flood
LAG_BOUND = 0.1  # the bound on the poll lag p99
RECOVER_TIMEOUT = 15.0  # after the flood, until every pair is alive again
REASONS = ("bad_mac", "replay", "malformed", "unknown_pair", "out_of_window")
TICKS = os.sysconf("SC_CLK_TCK")
HERE = Path(__file__).parent


# -- the listener's receive path, on a real socket --------------------------------------

UNIT_KEY = b"u" * 32


def _listener(clock: FakeClock) -> tuple[NetListener, StatusTable]:
    table = StatusTable(clock, site="b")
    table.add_pair("db1", "both", Timing(interval=1.0, miss_threshold=3, recover_beats=2))
    return NetListener(table, clock, UNIT_KEY, "127.0.0.1:0"), table


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # as the listener does
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    return rx, tx


def _drain_all(listener: NetListener, rx: socket.socket, expected: int) -> list[int]:
    """Drain until ``expected`` datagrams were taken (loopback delivers at once, nearly);
    returns what each call took."""
    taken: list[int] = []
    deadline = time.monotonic() + 5
    while sum(taken) < expected:
        assert time.monotonic() < deadline, f"only {sum(taken)} of {expected} arrived"
        n = listener.drain(rx)
        if n:
            taken.append(n)
    assert listener.drain(rx) == 0
    return taken


def test_drain_takes_a_batch_and_counts_every_rejection(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    listener, table = _listener(clock)
    good = Record("db1", 7, 1, clock.wall(), 1.0)
    signed = encode_datagram(UNIT_KEY, BEAT, good)
    stranger = good._replace(pair_id="stranger")
    # a writer not seen before, two hours off the clocks (one already beating is never
    # judged by its time: tests/test_time_faults.py)
    old = good._replace(incarnation=8, serial=9, writer_time=clock.wall() - 7200)
    junk = {
        "malformed": [b"", b"x" * 40, b"\0" * 4000, b"XXXX" + signed[4:]],
        "bad_mac": [encode_datagram(b"k" * 32, BEAT, good)],
        "unknown_pair": [encode_datagram(UNIT_KEY, BEAT, stranger)],
        "out_of_window": [encode_datagram(UNIT_KEY, BEAT, old)],
    }
    rx, tx = _socket_pair()
    with rx, tx:
        tx.send(signed)
        sent = {reason: 0 for reason in junk}
        for i in range(300):
            reason = list(junk)[i % len(junk)]
            tx.send(junk[reason][i % len(junk[reason])])
            sent[reason] += 1
        tx.send(signed)  # the same beat again: a replay
        with caplog.at_level("WARNING", logger="hbmon.netbeat"):
            taken = _drain_all(listener, rx, 302)
    assert max(taken) == BATCH  # one batch per wake-up, no more
    assert sum(taken) == 302
    assert table.row("db1", "network").serial == 1  # type: ignore[union-attr]
    assert dict(listener.rejected) == {**sent, "replay": 1}
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1, logged  # one line, not one per datagram
    assert logged[0].startswith("network datagrams rejected: ")


def test_rejections_are_logged_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    listener, _ = _listener(clock)
    rx, tx = _socket_pair()
    with rx, tx, caplog.at_level("WARNING", logger="hbmon.netbeat"):

        def burst(n: int) -> None:
            for _ in range(n):
                tx.send(b"junk")
            _drain_all(listener, rx, n)

        burst(5)
        clock.advance(REJECT_LOG_EVERY / 2)
        burst(7)
        assert len(caplog.records) == 1
        clock.advance(REJECT_LOG_EVERY / 2)
        burst(3)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("network datagrams rejected: 5 malformed (last from 127.0.0.1:")
    assert lines[1].startswith("network datagrams rejected in the last 60 s: 10 malformed")


def test_kernel_drops_are_counted() -> None:
    rx, tx = _socket_pair()
    with rx, tx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel's minimum
        assert socket_drops(rx) == 0
        for _ in range(200):
            tx.send(bytes(DATAGRAM_SIZE))
        port = rx.getsockname()[1]
        dropped = socket_drops(rx)
        assert dropped > 0
        assert dropped == _udp_drops(port)


# -- the flood, end to end --------------------------------------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pair(i: int) -> str:
    return f"net-{i:03d}" if i < NET_PAIRS else f"vol-{i:03d}"


def _configs(
    tmp: Path, key: Path, pvol: Path, udp_a: int, udp_b: int, capture: int
) -> tuple[str, str]:
    head = f'state_dir = "{tmp}"\ninterval = "1s"\n[network]\nkey_file = "{key}"\n'
    a = [f'site = "A"\n{head}listen = "127.0.0.1:{udp_a}"\n']
    b = [f'site = "B"\n{head}listen = "127.0.0.1:{udp_b}"\n']
    for i in range(PAIRS):
        peers = ""
        if i < NET_PAIRS:
            extra = f', "127.0.0.1:{capture}"' if i == 0 else ""
            peers = f'peers = ["127.0.0.1:{udp_b}"{extra}]\n'
        a.append(f'[[beat]]\nid = "{_pair(i)}"\nvolume = "{pvol}"\nslot = {i}\n{peers}')
        method = "both" if i < NET_PAIRS else "volume"
        b.append(
            f'[[watch]]\nid = "{_pair(i)}"\nvolume = "{pvol}"\nslot = {i}\nmethod = "{method}"\n'
        )
    return "".join(a), "".join(b)


def _udp_drops(port: int) -> int:
    """The kernel's drop count of the UDP socket bound to ``port`` (/proc/net/udp)."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            return int(fields[-1])
    raise AssertionError(f"no UDP socket on port {port} in /proc/net/udp")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _runqueue_seconds(pid: int) -> float:
    """Seconds the threads of ``pid`` spent runnable but waiting for a CPU."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just ended
    return total / 1e9


class Sample:
    """What B's /metrics says at one moment, plus its CPU time and socket drops."""

    def __init__(self, site: Site, udp_port: int) -> None:
        self.at = time.monotonic()
        self.cpu = _cpu_seconds(site.proc.pid)
        self.waited = _runqueue_seconds(site.proc.pid)
        self.drops = _udp_drops(udp_port)
        self.rejected: dict[str, float] = {}
        self.lag_buckets: dict[float, float] = {}
        self.verdicts: dict[str, str] = {}
        self.serial: dict[str, float] = {}
        self.missed: dict[str, float] = {}
        self.dropped = 0.0
        for name, labels, value in parse_metrics(site.metrics()):
            if name == "hbmon_network_rejected_total":
                self.rejected[labels["reason"]] = value
            elif name == "hbmon_poll_tick_lag_seconds_bucket":
                self.lag_buckets[float(labels["le"])] = value
            elif name == "hbmon_pair_verdict" and value == 1.0:
                self.verdicts[labels["pair"]] = labels["verdict"]
            elif name == "hbmon_heartbeat_serial" and labels["path"] == "network":
                self.serial[labels["pair"]] = value
            elif name == "hbmon_heartbeat_missed_total" and labels["path"] == "network":
                self.missed[labels["pair"]] = value
            elif name == "hbmon_network_receive_dropped_total":
                self.dropped = value


def _lag_quantile(before: Sample, after: Sample, q: float) -> tuple[float, int, float]:
    """(p-quantile estimate, ticks, fraction of ticks <= LAG_BOUND) between two samples."""
    bounds = sorted(after.lag_buckets)
    counts = [after.lag_buckets[b] - before.lag_buckets.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return 0.0, 0, 1.0
    within = counts[bounds.index(LAG_BOUND)] / total
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:  # linear inside the bucket, as histogram_quantile() does
            if bound == float("inf"):
                return lower, int(total), within
            return (
                lower + (bound - lower) * (rank - below) / max(count - below, 1e-9),
                int(total),
                within,
            )
        lower, below = bound, count
    return bounds[-2], int(total), within


def _forgeries(key: bytes, captured: bytes) -> dict[str, list[str]]:
    """The flood's datagrams by the reason each must be rejected with."""
    body = captured[:-MAC_SIZE]
    record = decode(body[len(MAGIC) + 1 :])
    far_future = record._replace(serial=10**9, writer_time=time.time())
    bad_mac = [
        (body[: len(MAGIC) + 1] + far_future.encode() + captured[-MAC_SIZE:]).hex(),
        (body + os.urandom(MAC_SIZE)).hex(),
        (body[: len(MAGIC) + 1] + far_future.encode() + os.urandom(MAC_SIZE)).hex(),
    ]
    malformed = [
        os.urandom(n).hex() for n in (1, 17, DATAGRAM_SIZE - 1, DATAGRAM_SIZE + 1, 512, 1400)
    ]
    malformed += [
        (b"\0" * 4000).hex(),  # oversized
        (b"XXXX" + captured[4:]).hex(),  # right size, wrong magic
        captured[: DATAGRAM_SIZE // 2].hex(),  # truncated
        encode_datagram(key, 9, far_future).hex(),  # signed, unknown kind
        b"".hex(),  # empty
    ]
    stranger = Record("intruder", 0xBAD, 10**9, time.time(), 1.0)
    unknown = [
        encode_datagram(key, BEAT, stranger._replace(pair_id=f"intruder-{i}")).hex()
        for i in range(8)
    ]
    # a new incarnation two hours off the clocks (a running one is not judged by its time)
    old = far_future._replace(incarnation=record.incarnation ^ 1, writer_time=time.time() - 7200)
    out_of_window = [encode_datagram(key, BEAT, old).hex()]
    return {
        "bad_mac": bad_mac,
        "replay": [captured.hex()],
        "malformed": malformed,
        "unknown_pair": unknown,
        "out_of_window": out_of_window,
    }


@pytest.mark.slow
def test_udp_flood_is_rejected_and_does_not_delay_polling(tmp_path: Path) -> None:
    key_file = tmp_path / "hb.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    key_file.chmod(0o600)
    key = key_file.read_bytes().strip()
    pvol = tmp_path / "pvol.lun"
    with pvol.open("wb") as f:
        f.truncate(PAIRS * SLOT_SIZE)
    udp_a, udp_b = _free_udp_port(), _free_udp_port()
    capture = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    capture.bind(("127.0.0.1", 0))
    capture.settimeout(10)
    config_a, config_b = _configs(tmp_path, key_file, pvol, udp_a, udp_b, capture.getsockname()[1])
    with (
        capture,
        running_site(config_b, tmp_path, "b") as b,
        running_site(config_a, tmp_path, "a") as a,
    ):
        wait_for(
            lambda: (
                (s := Sample(b, udp_b)).verdicts
                and len(s.verdicts) == PAIRS
                and set(s.verdicts.values()) == {"alive"}
            ),
            30,
            f"all {PAIRS} pairs alive at B",
        )
        # A datagram as A sent it, and B has taken it: replaying it must be a "replay".
        captured, _ = capture.recvfrom(4096)
        serial = decode(captured[len(MAGIC) + 1 : -MAC_SIZE]).serial
        wait_for(lambda: Sample(b, udp_b).serial.get(_pair(0), 0) >= serial, 5, "B saw the capture")
        plan = tmp_path / "flood.json"
        plan.write_text(json.dumps(_forgeries(key, captured)))

        quiet = Sample(b, udp_b)
        time.sleep(WINDOW)
        start = Sample(b, udp_b)
        # The sender runs at the lowest priority: a flood arrives from another host, so
        # it competes with hbmon for the UDP port, not for hbmon's CPU.
        sender = subprocess.Popen(
            ["nice", "-n", "19", sys.executable, str(HERE / "flood.py"), str(plan), str(udp_b),
             "--count", str(FLOOD_COUNT), "--seconds", str(FLOOD_SECONDS)],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        during: list[Sample] = []
        while sender.poll() is None:
            time.sleep(1.0)  # scraped once a second, like Prometheus
            during.append(Sample(b, udp_b))
        out, _ = sender.communicate(timeout=30)
        assert sender.returncode == 0
        report: dict[str, Any] = json.loads(out)
        end = Sample(b, udp_b)  # the flood window: start .. end
        # Let B drain its socket buffer: the rejections stop growing.
        settled = end
        for _ in range(50):
            time.sleep(0.2)
            now = Sample(b, udp_b)
            if sum(now.rejected.values()) == sum(settled.rejected.values()):
                break
            settled = now
        final = Sample(b, udp_b)
        rows = b.rows()  # before A's serials: B's can only be behind them
        writers = {w["pair"]: w for w in a.status()["writers"]}
        # Afterwards every pair is alive again (network beats lost in the kernel while the
        # flood filled the socket buffer make the network path late or stale meanwhile).
        flood_end = time.monotonic()
        wait_for(
            lambda: set(Sample(b, udp_b).verdicts.values()) == {"alive"},
            RECOVER_TIMEOUT,
            "every pair alive again after the flood",
        )
        recovered = time.monotonic() - flood_end

    sent: dict[str, int] = report["sent"]
    total_sent = sum(sent.values())
    drops = final.drops - start.drops
    rejected = {r: final.rejected.get(r, 0.0) - start.rejected.get(r, 0.0) for r in REASONS}
    total_rejected = sum(rejected.values())
    p99_quiet, ticks_quiet, _ = _lag_quantile(quiet, start, 0.99)
    p99_flood, ticks_flood, within = _lag_quantile(start, end, 0.99)
    cpu_quiet = 100 * (start.cpu - quiet.cpu) / (start.at - quiet.at)
    cpu_flood = 100 * (end.cpu - start.cpu) / (end.at - start.at)
    wait_quiet = 100 * (start.waited - quiet.waited) / (start.at - quiet.at)
    wait_flood = 100 * (end.waited - start.waited) / (end.at - start.at)
    lost = {p: final.missed.get(p, 0) - start.missed.get(p, 0) for p in final.missed}
    down = Counter(
        (p, v) for sample in [*during, final] for p, v in sample.verdicts.items() if v != "alive"
    )
    print(
        f"\n[flood] sent {total_sent} datagrams in {report['seconds']:.1f} s "
        f"({total_sent / report['seconds']:.0f}/s, {report['errors']} send errors) {sent}"
        f"\n[flood] kernel drops at B's socket {drops} (hbmon_network_receive_dropped_total "
        f"+{final.dropped - start.dropped:.0f}); received {total_sent - drops}; "
        f"rejected {int(total_rejected)} {rejected}"
        f"\n[flood] poll lag p99 quiet {p99_quiet * 1000:.1f} ms ({ticks_quiet} ticks), "
        f"flood {p99_flood * 1000:.1f} ms ({ticks_flood} ticks, {within:.2%} <= 100 ms)"
        f"\n[flood] B's CPU quiet {cpu_quiet:.0f} %, flood {cpu_flood:.0f} % of one core; "
        f"runnable but waiting for a CPU: quiet {wait_quiet:.0f} %, flood {wait_flood:.0f} %"
        f"\n[flood] network beats missed during the flood {lost}; verdicts other than alive "
        f"(pair, verdict: scrapes) {dict(down)}; all alive {recovered:.1f} s after the flood"
    )
    # Every forged datagram that reached the socket was rejected, for its reason.
    assert total_sent > 0
    for reason in REASONS:
        assert sent[reason] - drops <= rejected[reason] <= sent[reason], (reason, rejected, sent)
    assert total_sent - drops <= total_rejected <= total_sent
    # None counted as a beat: B's network rows hold A's incarnation and serials.
    for i in range(NET_PAIRS):
        pair = _pair(i)
        row, writer = rows[(pair, "network")], writers[pair]
        assert row["incarnation"] == writer["incarnation"], (row, writer)
        assert row["serial"] <= writer["serial"], (row, writer)
        assert all(s.serial.get(pair, 0) < 10**9 for s in [*during, final]), pair
    # The kernel's drops are exported as they are.
    assert final.dropped - start.dropped == drops
    # The volume path never noticed the flood; the network path can only have lost beats
    # to the kernel's drops (never "host_down": the volumes were fresh all along).
    for sample in [*during, final]:
        assert len(sample.verdicts) == PAIRS
        for pair, verdict in sample.verdicts.items():
            if pair.startswith("vol-") or not drops:
                assert verdict == "alive", (pair, verdict)
            else:
                assert verdict in ("alive", "degraded", "network_partition"), (pair, verdict)
    # The poller kept its cadence: p99 of the tick lags in the flood window <= 100 ms.
    need(
        p99_quiet <= LAG_BOUND,
        f"the machine is too loaded to judge: poll lag p99 {p99_quiet * 1000:.0f} ms "
        "before any flood",
    )
    assert ticks_flood > 0
    assert within >= 0.99, f"poll lag p99 over the flood {p99_flood * 1000:.0f} ms > 100 ms"
