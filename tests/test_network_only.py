"""Issue 15 (3): a pair on the network path only needs no volume, on either side.

A ``[[beat]]`` with ``peers`` and no ``volume`` sends UDP beats only; a ``[[watch]]`` with
``method = "network"`` and no ``volume`` reads none.  Checked from the configuration
(``hbmon config check``) through the beater (real UDP datagrams on loopback, virtual
time) to two real ``hbmon run`` daemons beating to each other over loopback UDP: the
status table, the metrics and the failover guard's verdicts for such a pair.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import metric_value, post_host_down, running_site, start_site, wait_for
from netns import NsSite, site_config, two_namespaces

from hbmon.beater import Beater
from hbmon.clock import FakeClock
from hbmon.config import BeatConfig, parse_config, warnings
from hbmon.errors import ConfigError
from hbmon.netbeat import BEAT, NetSender, decode_datagram
from hbmon.record import State
from hbmon.status import StatusTable

KEY = os.urandom(32).hex().encode()
HEAD = 'site = "s"\n[network]\nkey_file = "/k"\n'


def _parse(text: str) -> Any:
    return parse_config(tomllib.loads(text), "site.toml", Path("/etc/hbmon"))


# -- configuration -----------------------------------------------------------------------


def test_network_only_pairs_need_no_volume() -> None:
    config = _parse(
        HEAD
        + '[[beat]]\nid = "db1"\npeers = ["192.0.2.20:9798"]\n'
        + '[[beat]]\nid = "db2"\npeers = ["192.0.2.20:9798"]\n'
        + '[[watch]]\nid = "db1"\nmethod = "network"\n'
        + '[[watch]]\nid = "db2"\nmethod = "network"\n'
    )
    assert [b.volume for b in config.beats] == [None, None]
    assert [(w.volume, w.method) for w in config.watches] == [(None, "network")] * 2
    assert warnings(config) == []
    # The top-level method is inherited: a site that watches the network only.
    config = _parse('method = "network"\n' + HEAD + '[[watch]]\nid = "db1"\n')
    assert config.watches[0].volume is None


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ('[[beat]]\nid = "db1"\n', "beat[0].volume", "peers"),
        ('[[beat]]\nid = "db1"\npeers = []\n', "beat[0].volume", "peers"),
        (
            '[[beat]]\nid = "db1"\nslot = 3\npeers = ["192.0.2.20:9798"]\n',
            "beat[0].slot",
            "no volume",
        ),
        ('[[watch]]\nid = "db1"\n', "watch[0].volume", 'method = "network"'),
        ('[[watch]]\nid = "db1"\nmethod = "volume"\n', "watch[0].volume", "'volume'"),
    ],
    ids=["beat-nothing", "beat-no-peers", "beat-slot-alone", "watch-both", "watch-volume"],
)
def test_a_pair_with_nothing_to_carry_its_beats_is_refused(body: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse(HEAD + body)
    assert err.value.key == key
    assert words in str(err.value)


def test_a_volume_on_a_network_only_watch_is_a_warning_not_an_error() -> None:
    """Configurations written when the volume was required keep loading; `config check`
    says the volume is not read.  Two such watches may name the same volume."""
    config = _parse(
        HEAD
        + '[[watch]]\nid = "db1"\nmethod = "network"\nvolume = "/srv/hb.vol"\n'
        + '[[watch]]\nid = "db2"\nmethod = "network"\nvolume = "/srv/hb.vol"\n'
    )
    found = warnings(config)
    assert len(found) == 2
    assert "watch[0] ('db1'): method = \"network\" never reads volume /srv/hb.vol" in found[0]


def test_config_check_accepts_a_network_only_site(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        HEAD.replace("/k", str(tmp_path / "k"))
        + '[[beat]]\nid = "db1"\npeers = ["192.0.2.20:9798"]\n'
        + '[[watch]]\nid = "db2"\nmethod = "network"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "hbmon.cli", "config", "check", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "1 beat(s), 1 watch(es)" in done.stdout
    assert done.stderr == ""


# -- the beater: UDP only ----------------------------------------------------------------


async def test_a_beat_without_a_volume_sends_udp_beats_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Virtual time, real datagrams: one beat an interval to the peer, the stopping
    record at the end, nothing written anywhere (not even a file named "None" in the
    current directory), no write errors."""
    monkeypatch.chdir(tmp_path)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2.0)
    port = rx.getsockname()[1]
    clock = FakeClock()
    table = StatusTable(clock)
    sender = NetSender(KEY)
    beats = (BeatConfig("db1", None, interval=0.1, peers=(f"127.0.0.1:{port}",)),)
    beater = Beater(table, clock, beats, sender=sender, on_written=lambda pair: pytest.fail(pair))
    before = set(os.listdir(tmp_path))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(beater.run)
            await clock.run_for(1.0)
            await beater.stop()
            tg.cancel_scope.cancel()
    finally:
        beater.close()
        sender.close()
    stats = table.writers["db1"]
    assert stats.volume is None
    assert (stats.written, dict(stats.errors), stats.last_error) == (0, {}, "")
    assert stats.sent == stats.serial == 11  # ten beats in one second, then the stop
    got = []
    with rx:
        for _ in range(stats.sent):
            kind, record = decode_datagram(KEY, rx.recv(2048))
            got.append((kind, record.pair_id, record.serial, record.state))
    assert got[:-1] == [(BEAT, "db1", n, State.ACTIVE) for n in range(1, 11)]
    assert got[-1] == (BEAT, "db1", 11, State.STOPPING)
    assert set(os.listdir(tmp_path)) == before


# -- two daemons over loopback UDP -------------------------------------------------------


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.timeout(90)
def test_network_only_pairs_end_to_end(tmp_path: Path) -> None:
    """Writer ``osaka`` beats db1 and db2 over UDP only; watcher ``tokyo`` watches both on
    the network path only.  Both are alive with one (network) row each, and the metrics
    say so; the guard refuses while they are alive.  The writer is killed (SIGKILL: no
    stopping beat): both turn ``host_down``, db1 (``failover_single_path = true``) is
    failed over, db2 (no opt-in) is refused as ``single_path``."""
    key = _secret(tmp_path / "hb.key", KEY.decode())
    token = "t0ken-" + os.urandom(8).hex()
    token_file = _secret(tmp_path / "webhook.token", token)
    marker = tmp_path / "failed-over"
    watcher_udp, writer_udp = _udp_port(), _udp_port()

    def head(name: str, udp: int) -> str:
        return (
            f'site = "{name}"\nstate_dir = "{tmp_path / name}"\ninterval = "200ms"\n'
            f'[network]\nlisten = "127.0.0.1:{udp}"\nkey_file = "{key}"\n'
        )

    peers = f'peers = ["127.0.0.1:{watcher_udp}"]\n'
    writer_cfg = head("osaka", writer_udp) + "".join(
        f'[[beat]]\nid = "{pair}"\n{peers}' for pair in ("db1", "db2")
    )
    command = f'["{sys.executable}", "-c", "open({str(marker)!r}, \'a\').write(\'x\')"]'
    watcher_cfg = (
        'log_format = "json"\n'
        + head("tokyo", watcher_udp)
        + f'[webhook]\ntoken_file = "{token_file}"\nhold_down = "1s"\n'
        + '[[watch]]\nid = "db1"\nmethod = "network"\nfailover_single_path = true\n'
        + f"failover_without_arbiter = true\nfailover = {command}\n"
        + '[[watch]]\nid = "db2"\nmethod = "network"\n'
        + f"failover_without_arbiter = true\nfailover = {command}\n"
    )
    writer = start_site(writer_cfg, tmp_path, "osaka")
    try:
        with running_site(watcher_cfg, tmp_path, "tokyo") as watcher:

            def verdicts() -> dict[str, str]:
                return {pair: row["verdict"] for (pair, _), row in watcher.rows().items()}

            wait_for(lambda: verdicts() == {"db1": "alive", "db2": "alive"}, 10.0, "both alive")
            assert sorted(watcher.rows()) == [("db1", "network"), ("db2", "network")]
            text = watcher.metrics()
            for pair in ("db1", "db2"):
                assert metric_value(text, "hbmon_heartbeat_up", pair=pair, path="network") == 1
                assert metric_value(text, "hbmon_heartbeat_up", pair=pair, path="volume") is None
                assert metric_value(text, "hbmon_pair_verdict", pair=pair, verdict="alive") == 1
            assert post_host_down(watcher, token, "db1")["code"] == "table_disagrees"
            shown = subprocess.run(
                [sys.executable, "-m", "hbmon.cli", "status", "--url", watcher.url],
                capture_output=True,
                text=True,
                check=False,
            )
            assert shown.returncode == 0, shown.stderr
            table = [line.split() for line in shown.stdout.splitlines()[1:3]]
            assert sorted((r[0], r[1]) for r in table) == [("db1", "network"), ("db2", "network")]
            mine = writer.status()["writers"]
            assert sorted((w["pair"], w["volume"], w["written"]) for w in mine) == [
                ("db1", None, 0),
                ("db2", None, 0),
            ]
            sent = writer.metrics()
            assert (metric_value(sent, "hbmon_network_beats_sent_total", pair="db1") or 0) > 0
            assert metric_value(sent, "hbmon_beats_written_total", pair="db1") == 0

            writer.proc.send_signal(signal.SIGKILL)
            writer.proc.wait()
            wait_for(
                lambda: verdicts() == {"db1": "host_down", "db2": "host_down"},
                10.0,
                "both host_down",
            )
            assert post_host_down(watcher, token, "db2")["code"] == "single_path"
            assert post_host_down(watcher, token, "db1")["code"] == "host_down"
            wait_for(lambda: marker.exists() and marker.read_text() == "x", 10.0, "failover ran")
            text = watcher.metrics()
            assert metric_value(text, "hbmon_failover_total", pair="db1", result="executed") == 1
            assert metric_value(text, "hbmon_failover_total", pair="db2", result="refused") == 1
            # The guard's decisions, as structured log lines (log_format = "json").
            docs = [json.loads(line) for line in watcher.stderr().splitlines()]
            decided = [
                (d["pair"], d["result"], d.get("code"))
                for d in docs
                if d.get("event") == "failover"
            ]
            assert decided == [
                ("db1", "refused", "table_disagrees"),
                ("db2", "refused", "single_path"),
                ("db1", "executed", None),
            ]
            assert {d["site"] for d in docs if d["logger"].startswith("hbmon.")} == {"tokyo"}
    finally:
        writer.kill()


# -- two namespaces: the beats cross a veth link -----------------------------------------


@pytest.mark.root
@pytest.mark.timeout(90)
def test_network_only_pair_across_namespaces(tmp_path: Path) -> None:
    """Site A (namespace A) beats db1 over UDP only, across the veth link, to site B
    (namespace B), which watches it on the network path only; neither has a volume.
    The link cut: host_down, with the one-path note; healed: alive again."""
    key = _secret(tmp_path / "hb.key", KEY.decode())
    with two_namespaces() as lab:
        a_cfg = tmp_path / "A.toml"
        a_cfg.write_text(
            site_config(
                "A",
                tmp_path,
                listen_http=f"{lab.mgmt_a}:9799",
                listen_udp=f"{lab.site_a_ip}:9798",
                key_file=key,
                body=f'[[beat]]\nid = "db1"\npeers = ["{lab.site_b_ip}:9798"]\n',
            )
        )
        b_cfg = tmp_path / "B.toml"
        b_cfg.write_text(
            site_config(
                "B",
                tmp_path,
                listen_http=f"{lab.mgmt_b}:9799",
                listen_udp="0.0.0.0:9798",
                key_file=key,
                body='[[watch]]\nid = "db1"\nmethod = "network"\n',
            )
        )
        a = NsSite(lab, lab.ns_a, a_cfg, f"http://{lab.mgmt_a}:9799", "A").launch()
        b = NsSite(lab, lab.ns_b, b_cfg, f"http://{lab.mgmt_b}:9799", "B").launch()
        try:
            a.wait_ready()
            b.wait_ready()

            def verdict() -> str:
                rows = b.rows("db1")
                assert list(rows) == [("db1", "network")], rows
                return str(rows["db1", "network"]["verdict"])

            wait_for(lambda: verdict() == "alive", 10.0, "db1 alive at B")
            lab.cut()
            wait_for(lambda: verdict() == "host_down", 10.0, "db1 host_down at B")
            note = b.rows("db1")["db1", "network"]["verdict_note"]
            assert "only the network path is checked" in note
            lab.heal()
            wait_for(lambda: verdict() == "alive", 10.0, "db1 alive at B again")
            assert a.stop() == 0
            assert b.stop() == 0
        except BaseException as exc:
            exc.add_note(a.stderr_tail() + "\n" + b.stderr_tail())
            raise
        finally:
            a.kill()
            b.kill()


def test_a_watch_turned_network_only_stops_reading_its_volume(tmp_path: Path) -> None:
    """A reload from ``method = "both"`` to ``"network"`` without a volume: the volume is
    no longer read (no target, no volume row), the network row keeps its state."""
    from hbmon.config import Timing
    from hbmon.poller import Poller

    clock = FakeClock()
    table = StatusTable(clock)
    poller = Poller(table, clock, threads=1, ring=False)
    vol = tmp_path / "db1.vol"
    vol.write_bytes(bytes(4096))
    poller.watch("db1", str(vol), 0, "both", Timing())
    network = table.row("db1", "network")
    assert set(poller.targets) == {"db1"}
    poller.watch("db1", None, 0, "network", Timing())
    assert poller.targets == {}
    assert sorted(table.pairs["db1"].rows) == ["network"]
    assert table.row("db1", "network") is network
    assert table.pairs["db1"].volume is None
