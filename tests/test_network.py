"""Issue 3 end to end: two sites in two network namespaces, two heartbeat paths.

Site A (namespace A) beats onto its PVOL, a loop device, and over UDP to site B across a
veth pair; the "array remote copy" (:class:`netns.Mirror`) copies the PVOL slots into B's
SVOL image file underneath B's loop device every 50 ms.  Site B watches with method
``both``.  The test reaches each site's HTTP API over a management veth from the root
namespace.  Every daemon is the real ``hbmon run`` running on real time, so the tests
poll (every 50 ms, with deadlines) and record every verdict they see on the way.

Timing of the pairs: interval 200 ms, miss_threshold 3.  The issue's detection bound is
``interval x miss_threshold + one interval`` = 0.8 s; see :data:`ALLOWANCE` for the
scheduling allowance added to it.

Clock skew (issue 3, item 5) cannot be shown here: network namespaces share the clock.
The unit tests in test_netbeat.py and test_status.py cover it.
"""

from __future__ import annotations

import hashlib
import hmac
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import metric_value, wait_for
from netns import Trace, TwoSites, sample, site_config, two_sites

from hbmon.netbeat import ACTIVATE, BEAT, DATAGRAM_SIZE, MAGIC, encode_datagram
from hbmon.record import Record

pytestmark = pytest.mark.root

INTERVAL = 0.2
THRESHOLD = 3
BOUND = INTERVAL * THRESHOLD + INTERVAL  # the bound: 0.8 s
#: Scheduling allowance on top of BOUND, 0.5 s.  The bound counts from the writer's last
#: beat as seen by the reader; in this lab the reader sees the last *volume* beat up to
#: 50 ms (one mirror period) late, the poll loop and HTTP handler share one event loop on
#: a 2-CPU machine running two daemons, the mirror and the sampler, and this test only
#: notices the change at its next 50 ms sample plus one HTTP round trip.  Measured
#: detection times are printed (run with -s) and are well inside BOUND + ALLOWANCE.
ALLOWANCE = 0.5
WATCH_SECONDS = 5.0  # how long a fault is held while checking what must never appear
UDP_PORT = 9798


def _beat_a(pair: str, slot: int, pvol: str, interval: str = "200ms") -> str:
    return (
        f'\n[[beat]]\nid = "{pair}"\nvolume = "{pvol}"\nslot = {slot}\n'
        f'interval = "{interval}"\npeers = ["10.77.0.2:{UDP_PORT}"]\n'
    )


def _watch_b(pair: str, slot: int, svol: str, interval: str = "200ms", extra: str = "") -> str:
    return (
        f'\n[[watch]]\nid = "{pair}"\nvolume = "{svol}"\nslot = {slot}\nmethod = "both"\n'
        f'interval = "{interval}"\nmiss_threshold = 3\n{extra}'
    )


def _config_a(env: TwoSites, body: str) -> str:
    return site_config(
        "A",
        env.tmp,
        listen_http=f"{env.lab.mgmt_a}:9799",
        listen_udp=f"{env.lab.site_a_ip}:{UDP_PORT}",
        key_file=env.key_file,
        body=body,
    )


def _config_b(env: TwoSites, body: str) -> str:
    return site_config(
        "B",
        env.tmp,
        listen_http=f"{env.lab.mgmt_b}:9799",
        listen_udp=f"0.0.0.0:{UDP_PORT}",
        key_file=env.key_file,
        body=body,
    )


def _start_db1(env: TwoSites, interval: str = "200ms") -> None:
    """Site A beats db1 (PVOL slot 0), site B watches it (SVOL slot 0); both started."""
    a = env.site_a(_config_a(env, _beat_a("db1", 0, env.pvol)))
    b = env.site_b(_config_b(env, _watch_b("db1", 0, env.svol, interval)))
    env.start(a, b)


def _pair_alive(env: TwoSites, pair: str) -> dict[tuple[str, str], dict[str, Any]] | None:
    rows = env.sites["B"].rows(pair)
    ok = len(rows) == 2 and all(
        r["verdict"] == "alive" and r["state"] == "alive" for r in rows.values()
    )
    return rows if ok else None


def _wait_alive(env: TwoSites, pair: str = "db1", timeout: float = 10.0) -> None:
    """Wait until both paths of ``pair`` are alive at B, and stay so for one second."""
    wait_for(lambda: _pair_alive(env, pair), timeout, f"{pair} alive on both paths at B")
    steady = sample(env.sites["B"], pair, seconds=1.0)
    assert steady.seen() == {"alive"}, f"{pair} did not stay alive: {steady}"


def _row(env: TwoSites, pair: str, path: str) -> dict[str, Any]:
    rows = env.sites["B"].rows(pair)
    assert (pair, path) in rows, f"B has no {path} row for {pair}: {sorted(rows)}"
    return rows[(pair, path)]


def _rejected(env: TwoSites) -> dict[str, float]:
    text = env.sites["B"].metrics()
    out = {}
    for reason in ("bad_mac", "replay", "malformed", "unknown_pair"):
        value = metric_value(text, "hbmon_network_rejected_total", reason=reason)
        assert value is not None, f"hbmon_network_rejected_total{{reason={reason!r}}} missing"
        out[reason] = value
    return out


def _report(name: str, seconds: float | None, trace: Trace) -> None:
    shown = "never" if seconds is None else f"{seconds:.3f} s"
    print(f"\n[{name}] detected after {shown} (bound {BOUND + ALLOWANCE:.1f} s)\n  {trace}")


# -- 1. host killed ------------------------------------------------------------------------------


def test_host_killed_is_host_down_within_the_bound(tmp_path: Path, loopdev_factory: Any) -> None:
    with two_sites(tmp_path, loopdev_factory) as env:
        _start_db1(env)
        _wait_alive(env)

        killed = time.monotonic()
        env.sites["A"].kill()  # SIGKILL: no stopping record; volume and network beats stop
        trace = sample(
            env.sites["B"],
            "db1",
            seconds=BOUND + ALLOWANCE + 2.0,
            until=lambda t: t.first("host_down") is not None,
            start=killed,
        )
        detected = trace.first("host_down")
        _report("host killed", detected, trace)
        assert detected is not None, f"host_down never reported: {trace}"
        assert detected <= BOUND + ALLOWANCE, f"host_down after {detected:.3f} s: {trace}"

        # and it stays host_down (no flapping through a partition or a broken link)
        sample(env.sites["B"], "db1", seconds=1.0, trace=trace)
        assert trace.verdicts[-1] == "host_down", str(trace)
        wrong = trace.seen() & {"network_partition", "link_down"}
        assert not wrong, f"a dying host was reported as {sorted(wrong)}: {trace}"
        assert set(trace.sequence()) <= {"alive", "degraded", "host_down"}, str(trace)
        assert trace.samples[-1][2] == {"volume": "stale", "network": "stale"}, str(trace)


# -- 2. network cut ------------------------------------------------------------------------------


def test_network_cut_is_a_partition_never_host_down(tmp_path: Path, loopdev_factory: Any) -> None:
    with two_sites(tmp_path, loopdev_factory) as env:
        _start_db1(env)
        _wait_alive(env)

        cut = time.monotonic()
        env.lab.cut()  # vethA down; the remote copy keeps running
        trace = sample(
            env.sites["B"],
            "db1",
            seconds=BOUND + ALLOWANCE + 2.0,
            until=lambda t: t.first("network_partition") is not None,
            start=cut,
        )
        detected = trace.first("network_partition")
        _report("network cut", detected, trace)
        assert detected is not None, f"network_partition never reported: {trace}"
        assert detected <= BOUND + ALLOWANCE, f"network_partition after {detected:.3f} s: {trace}"

        sample(env.sites["B"], "db1", seconds=WATCH_SECONDS, trace=trace)
        assert "host_down" not in trace.seen(), f"a network cut read as host_down: {trace}"
        after = trace.verdicts[trace.verdicts.index("network_partition") :]
        assert set(after) == {"network_partition"}, f"partition not held: {trace}"
        vol = _row(env, "db1", "volume")
        assert vol["state"] == "alive", vol  # the storage path proves the host is up


# -- 3. remote copy stopped ----------------------------------------------------------------------


def test_remote_copy_stopped_is_link_down_never_host_down(
    tmp_path: Path, loopdev_factory: Any
) -> None:
    with two_sites(tmp_path, loopdev_factory) as env:
        _start_db1(env)
        _wait_alive(env)

        stopped = time.monotonic()
        env.mirror.pause()  # the array stops copying; the network stays up
        trace = sample(
            env.sites["B"],
            "db1",
            seconds=BOUND + ALLOWANCE + 2.0,
            until=lambda t: t.first("link_down") is not None,
            start=stopped,
        )
        detected = trace.first("link_down")
        _report("remote copy stopped", detected, trace)
        assert detected is not None, f"link_down never reported: {trace}"
        assert detected <= BOUND + ALLOWANCE, f"link_down after {detected:.3f} s: {trace}"

        sample(env.sites["B"], "db1", seconds=WATCH_SECONDS, trace=trace)
        assert "host_down" not in trace.seen(), f"a stopped remote copy read as host_down: {trace}"
        after = trace.verdicts[trace.verdicts.index("link_down") :]
        assert set(after) == {"link_down"}, f"link_down not held: {trace}"
        net = _row(env, "db1", "network")
        assert net["state"] == "alive", net


# -- 4. forged, replayed and garbage datagrams ---------------------------------------------------


def test_forged_replayed_and_garbage_datagrams_are_rejected_and_counted(
    tmp_path: Path, loopdev_factory: Any
) -> None:
    with two_sites(tmp_path, loopdev_factory) as env:
        _start_db1(env)
        _wait_alive(env)
        before = _rejected(env)
        net = _row(env, "db1", "network")
        incarnation, serial = int(net["incarnation"], 16), int(net["serial"])
        now = time.time()

        other_key = b"0123456789abcdef" * 4
        assert other_key != env.key
        forged = [  # right format, a newer serial, but signed with another key
            encode_datagram(other_key, BEAT, Record("db1", incarnation, serial + 100 + i, now, 0.2))
            for i in range(3)
        ] + [encode_datagram(other_key, ACTIVATE, Record("db1", 0, 0, now, 0.2))]
        old = encode_datagram(env.key, BEAT, Record("db1", incarnation, serial - 3, now, 0.2))
        replayed = [  # correctly signed, but a serial B has seen already: the same one twice
            old,
            old,
            encode_datagram(env.key, BEAT, Record("db1", incarnation, serial - 1, now, 0.2)),
        ]
        good = encode_datagram(env.key, BEAT, Record("db1", incarnation, serial + 500, now, 0.2))
        body = good[:-32]

        def signed(data: bytes) -> bytes:
            return data + hmac.new(env.key, data, hashlib.sha256).digest()

        garbage = [
            b"",
            b"x",
            b"GET / HTTP/1.0\r\n\r\n",
            bytes(range(256)) * 2,
            bytes(DATAGRAM_SIZE),  # the right size, no magic
            MAGIC + bytes(DATAGRAM_SIZE),  # too long
            good[:-1],  # one byte short
            signed(body[:4] + bytes([9]) + body[5:]),  # authentic, but an unknown kind
            signed(body[:5] + b"NOTAREC!" + body[13:]),  # authentic, record has a bad magic
            signed(body[:-1] + bytes([body[-1] ^ 0xFF])),  # authentic, record CRC wrong
        ]

        sent_at = time.monotonic()
        sender = env.lab.send_from_a([*forged, *replayed, *garbage], (env.lab.site_b_ip, UDP_PORT))
        trace = sample(
            env.sites["B"], "db1", seconds=10.0, start=sent_at, until=lambda t: sender.done()
        )
        sender.wait()
        expected = {
            "bad_mac": before["bad_mac"] + len(forged),
            "replay": before["replay"] + len(replayed),
            "malformed": before["malformed"] + len(garbage),
        }

        def counted() -> dict[str, float] | None:
            now_counts = _rejected(env)
            done = all(now_counts[k] >= v for k, v in expected.items())
            return now_counts if done else None

        wait_for(counted, 5.0, f"B to count the rejected datagrams {expected}")
        sample(env.sites["B"], "db1", seconds=2 * BOUND, trace=trace)  # past a stale limit
        after = _rejected(env)
        print(f"\n[datagrams] rejected before {before}, after {after}\n  {trace}")
        for reason, value in expected.items():
            assert after[reason] == value, f"{reason}: expected {value}, counted {after[reason]}"
        assert after["unknown_pair"] == before["unknown_pair"]
        assert env.sites["B"].running(), env.sites["B"].stderr_tail()
        assert trace.seen() == {"alive"}, f"rejected datagrams changed the verdict: {trace}"
        net = _row(env, "db1", "network")
        assert net["incarnation"] == f"{incarnation:016x}"
        assert serial < int(net["serial"]) < serial + 100, net  # the forgeries were not taken
        assert net["state"] == "alive"


# -- 5. install and de-install -------------------------------------------------------------------


def test_install_then_retire_never_host_down(tmp_path: Path, loopdev_factory: Any) -> None:
    """FIG. 4 and FIG. 5: init + activation -> awaiting; A starts -> alive; A stops ->
    stopped; retire + announcement -> retired.  No host_down at any point."""
    grace = 2.0  # B is set up before the pair is installed: its grace covers the gap
    with two_sites(tmp_path, loopdev_factory, slots=(1,)) as env:
        a = env.site_a(_config_a(env, _beat_a("db2", 1, env.pvol)))  # prepared, not started
        b = env.site_b(
            _config_b(env, _watch_b("db2", 1, env.svol, extra=f'grace = "{grace:g}s"\n'))
        )
        env.start(b)
        b_ready = time.monotonic()  # B's rows exist by now: their grace ends before b_ready + grace
        trace = Trace("db2", b_ready)

        init = env.cli_in(
            env.lab.ns_a,
            *("volume", "init", env.pvol, "--id", "db2", "--slot", "1"),
            *("--interval", "200ms", "-c", str(a.config)),
        )
        assert init.returncode == 0, init.stderr
        assert "announced activate" in init.stdout, init.stdout
        # Well past the grace period: the install record and the activation keep it awaiting.
        past_grace = b_ready + grace + 2 * BOUND
        sample(b, "db2", seconds=max(0.0, past_grace - time.monotonic()), trace=trace)
        assert set(trace.verdicts) == {"awaiting"}, f"before the first beat: {trace}"
        states = trace.samples[-1][2]
        assert states == {"volume": "awaiting", "network": "awaiting"}, str(trace)

        env.start(a)  # the writer starts: first beat
        sample(b, "db2", seconds=10.0, trace=trace, until=lambda t: _settled(t, "alive"))
        assert trace.verdicts[-1] == "alive", f"never alive after the first beat: {trace}"
        sample(b, "db2", seconds=1.0, trace=trace)  # hold

        assert a.stop() == 0, a.stderr_tail()  # planned stop: stopping record
        sample(b, "db2", seconds=5.0, trace=trace, until=lambda t: _settled(t, "stopped"))
        assert trace.verdicts[-1] == "stopped", f"planned stop not shown as stopped: {trace}"
        sample(b, "db2", seconds=2 * BOUND, trace=trace)  # never goes stale

        retire = env.cli_in(
            env.lab.ns_a,
            *("volume", "retire", env.pvol, "--id", "db2", "--slot", "1", "-c", str(a.config)),
        )
        assert retire.returncode == 0, retire.stderr
        assert "announced retire" in retire.stdout, retire.stdout
        sample(b, "db2", seconds=5.0, trace=trace, until=lambda t: _settled(t, "retired"))
        sample(b, "db2", seconds=2 * BOUND, trace=trace)  # stays retired, expects nothing
        print(f"\n[install/retire] {trace}")

        assert trace.samples[-1][2] == {"volume": "retired", "network": "retired"}, str(trace)
        wrong = trace.seen() & {"host_down", "unknown", "network_partition", "link_down"}
        assert not wrong, f"install/retire showed {sorted(wrong)}: {trace}"
        milestones = [
            v for v in trace.sequence() if v in ("awaiting", "alive", "stopped", "retired")
        ]
        assert milestones == ["awaiting", "alive", "stopped", "retired"], str(trace)


def _settled(trace: Trace, verdict: str) -> bool:
    """``verdict`` on both paths in the newest sample."""
    _, v, states = trace.samples[-1]
    return v == verdict and set(states.values()) == {verdict}


def test_install_record_alone_keeps_the_pair_awaiting(tmp_path: Path, loopdev_factory: Any) -> None:
    """The activation datagram is sent once; when it is lost (or B starts after it was
    sent) the install record on the mirrored volume must say the same: ``hbmon volume
    init``'s own comment promises it, and issue 3 says the watcher shows ``awaiting``
    until the first valid beat."""
    with two_sites(tmp_path, loopdev_factory, slots=(1,)) as env:
        init = env.cli_in(
            env.lab.ns_a, "volume", "init", env.pvol, "--id", "db2", "--slot", "1"
        )  # no -c: nothing announced, as if the datagram had been lost
        assert init.returncode == 0, init.stderr
        wait_for(
            lambda: env.svol_image.read_bytes()[4096 : 4096 + 8] == b"HBMONREC",
            2.0,
            "the install record on the SVOL",
        )
        b = env.site_b(_config_b(env, _watch_b("db2", 1, env.svol)))
        env.start(b)
        b_ready = time.monotonic()
        trace = Trace("db2", b_ready)
        startup_grace = (THRESHOLD + 1) * INTERVAL
        until = b_ready + startup_grace + 2 * BOUND
        sample(b, "db2", seconds=max(0.0, until - time.monotonic()), trace=trace)
        print(f"\n[install record, no activation] {trace}")
        assert set(trace.verdicts) == {"awaiting"}, (
            f"an installed pair whose activation datagram was lost left `awaiting`: {trace}"
        )


# -- 6. SIGHUP reload ----------------------------------------------------------------------------


def test_sighup_adds_and_removes_pairs_and_keeps_the_others(
    tmp_path: Path, loopdev_factory: Any
) -> None:
    with two_sites(tmp_path, loopdev_factory, slots=(0, 2, 3)) as env:
        beats = "".join(_beat_a(p, s, env.pvol) for p, s in (("db1", 0), ("db3", 2), ("db4", 3)))
        a = env.site_a(_config_a(env, beats))
        db1, db3, db4 = (_watch_b(p, s, env.svol) for p, s in (("db1", 0), ("db3", 2), ("db4", 3)))
        b = env.site_b(_config_b(env, db1 + db3))
        env.start(a, b)
        _wait_alive(env, "db1")
        _wait_alive(env, "db3")
        assert b.pairs() == {"db1", "db3"}
        old = {path: _row(env, "db1", path) for path in ("volume", "network")}

        env.write_config("B", _config_b(env, db1 + db4))
        reloaded = time.monotonic()
        b.signal(signal.SIGHUP)
        # db1 is sampled from the signal on, until the pairs have changed and a second more
        trace = sample(
            b, "db1", seconds=5.0, start=reloaded, until=lambda t: b.pairs() == {"db1", "db4"}
        )
        changed = trace.samples[-1][0]
        assert b.pairs() == {"db1", "db4"}, f"pairs after SIGHUP: {sorted(b.pairs())}"
        print(f"\n[reload] pairs changed {changed:.3f} s after SIGHUP")
        sample(b, "db1", seconds=1.0, trace=trace)
        assert trace.seen() == {"alive"}, f"db1 disturbed by the reload: {trace}"
        for path, before in old.items():
            now = _row(env, "db1", path)
            assert now["incarnation"] == before["incarnation"], (path, before, now)
            assert now["serial"] > before["serial"], (path, before, now)  # kept counting
            assert now["restarts"] == before["restarts"] == 0, (path, now)
        _wait_alive(env, "db4")
        assert "configuration reloaded" in b.stderr()

        # A configuration that does not validate is rejected; the running one stays.
        bad = _config_b(env, db1 + db4).replace('interval = "200ms"', 'interval = "soon"', 1)
        env.write_config("B", bad)
        b.signal(signal.SIGHUP)
        wait_for(
            lambda: "new configuration rejected" in b.stderr(), 5.0, "the rejection in B's log"
        )
        rejected = [ln for ln in b.stderr().splitlines() if "new configuration rejected" in ln]
        assert "soon" in rejected[-1], rejected[-1]
        trace = sample(b, "db1", seconds=1.0)
        assert b.running(), b.stderr_tail()
        assert b.pairs() == {"db1", "db4"}
        assert trace.seen() == {"alive"}, str(trace)


# -- 7. timing agreement -------------------------------------------------------------------------


def test_interval_mismatch_is_reported(tmp_path: Path, loopdev_factory: Any) -> None:
    with two_sites(tmp_path, loopdev_factory) as env:
        _start_db1(env, interval="400ms")  # the writer declares 200 ms
        b = env.sites["B"]

        def warned() -> list[dict[str, Any]] | None:
            rows = list(b.rows("db1").values())
            ok = len(rows) == 2 and all("interval_mismatch" in r["warnings"] for r in rows)
            return rows if ok else None

        rows = wait_for(warned, 10.0, "interval_mismatch on both rows of db1")
        for row in rows:
            assert row["interval"] == pytest.approx(0.4), row
            assert row["declared_interval"] == pytest.approx(0.2), row
            assert "writer declares interval 0.2 s" in row["timing_note"], row
        text = b.metrics()
        for path in ("volume", "network"):
            value = metric_value(
                text, "hbmon_timing_warning", pair="db1", path=path, warning="interval_mismatch"
            )
            assert value == 1, f"hbmon_timing_warning for {path}: {value}"

        status = subprocess.run(  # from the root namespace, over B's management address
            [sys.executable, "-m", "hbmon.cli", "status", "--url", b.url],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        lines = [ln for ln in status.stdout.splitlines() if ln.startswith("db1")]
        assert len(lines) == 2, status.stdout
        for line in lines:
            assert "writer declares interval 0.2 s, this reader expects 0.4 s" in line, line
