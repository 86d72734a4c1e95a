"""Abuse of the webhook, the failover command and the secret files, against the real daemon.

* The webhook of a running ``hbmon run`` answers every missing, wrong or malformed
  credential and every oversized or malformed body with a 4xx (never a 5xx, never a
  crash), and alerts for pairs it does not watch or that its table says are alive run
  nothing.
* A failover command runs without a shell, with exactly the documented environment
  (nothing of the daemon's, secrets included), standard input from /dev/null, and a
  timeout that kills its whole process group.
* Key and token files that others may read or rewrite are refused at start (exit 2, the
  file and the fix named).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import Site, metric_value, parse_metrics, record_block, running_site, wait_for

from hbmon.clock import FakeClock
from hbmon.config import Timing, parse_config
from hbmon.errors import ConfigError
from hbmon.failover import COMMAND_PATH, FailoverGuard, Journal
from hbmon.record import Record
from hbmon.site import Site as SiteProcess
from hbmon.status import StatusTable

TOKEN = "abuse-test-token-0123456789abcdef"
MARKER_SCRIPT = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"


def site_config(tmp_path: Path, *, beating: bool = True) -> str:
    """db1 watched on its volume; beaten by this site too unless ``beating`` is false (then
    the volume keeps one record and db1 goes host_down once the start-up grace is over)."""
    token = tmp_path / "webhook.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    vol = tmp_path / "db1.vol"
    vol.write_bytes(record_block("db1", 0x77, 1, 0.2))
    marker = tmp_path / "ran.txt"
    command = [sys.executable, "-c", MARKER_SCRIPT, str(marker), "db1"]
    beat = f'[[beat]]\nid = "db1"\nvolume = "{vol}"\n' if beating else ""
    return f"""
site = "abuse"
state_dir = "{tmp_path / "state"}"
method = "volume"
interval = "200ms"

[webhook]
token_file = "{token}"

{beat}
[[watch]]
id = "db1"
volume = "{vol}"
failover = {json.dumps(command)}
failover_without_arbiter = true
failover_single_path = true
"""


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with running_site(site_config(tmp_path), tmp_path) as running:
        wait_for(lambda: running.row("db1")["state"] == "alive", 10, "db1 alive")
        yield running


@pytest.fixture
def dead_site(tmp_path: Path) -> Iterator[Site]:
    """A site on which an alert for db1 would run the failover command (it writes
    ``ran.txt``): what a request must not reach unless it is authenticated and whole."""
    with running_site(site_config(tmp_path, beating=False), tmp_path) as running:

        def would_fail_over() -> bool:
            code, text = running.get("/api/v1/failover/db1")
            return code == 200 and json.loads(text)["action"] == "failover"

        wait_for(would_fail_over, 10, "db1 host_down (a failover alert would act)")
        yield running


def request(
    site: Site,
    body: bytes | Iterator[bytes],
    headers: dict[str, str | bytes],
    *,
    chunked: bool = False,
) -> tuple[int, str]:
    """A raw POST to the webhook (http.client sends header bytes as they are)."""
    port = int(site.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", "/api/v1/alerts")
        for name, value in headers.items():
            conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            assert not isinstance(body, bytes)
            try:
                for chunk in body:
                    conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                conn.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer 413 and close before the body ends
        else:
            assert isinstance(body, bytes)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def alert(pair: str, status: str = "firing", name: str = "HbmonHostDown") -> dict[str, Any]:
    return {"status": status, "labels": {"alertname": name, "pair": pair}}


def notification(*alerts: dict[str, Any]) -> bytes:
    return json.dumps({"version": "4", "status": "firing", "alerts": list(alerts)}).encode()


GOOD = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def assert_an_alert_fails_db1_over(site: Site, tmp_path: Path) -> None:
    """The check that the refusals before it could fail: a whole, authenticated alert does
    run the command on this site."""
    status, text = request(site, notification(alert("db1")), GOOD)
    assert status == 200, text
    assert json.loads(text)["decisions"][0]["action"] == "failover", text
    marker = tmp_path / "ran.txt"
    wait_for(lambda: marker.exists() and marker.read_text() == "db1\n", 10, "the command ran")


def test_webhook_rejects_missing_wrong_and_odd_credentials(
    dead_site: Site, tmp_path: Path
) -> None:
    site = dead_site
    body = notification(alert("db1"))
    cases: list[tuple[str, dict[str, str | bytes], int]] = [
        ("no header", {}, 401),
        ("empty bearer", {"Authorization": "Bearer"}, 403),
        ("wrong token", {"Authorization": "Bearer " + "x" * len(TOKEN)}, 403),
        ("token prefix", {"Authorization": "Bearer " + TOKEN[:-1]}, 403),
        ("token plus more", {"Authorization": "Bearer " + TOKEN + "x"}, 403),
        ("basic scheme", {"Authorization": "Basic " + TOKEN}, 403),
        ("token without scheme", {"Authorization": TOKEN}, 403),
        ("not UTF-8", {"Authorization": b"Bearer \xff\xfe" + TOKEN.encode()}, 403),
        ("latin-1 token", {"Authorization": "Bearer " + TOKEN[:-1] + "\xe9"}, 403),
    ]
    for what, headers, expected in cases:
        status, text = request(site, body, headers)
        assert status == expected, f"{what}: HTTP {status}: {text}"
        assert "error" in json.loads(text), what
    assert site.running()
    assert not (tmp_path / "ran.txt").exists()
    # nothing was decided: no journal entries, no failover counted
    assert not (tmp_path / "state" / "failover.jsonl").exists()
    counted = [v for n, _, v in parse_metrics(site.metrics()) if n == "hbmon_failover_total"]
    assert sum(counted) == 0
    assert_an_alert_fails_db1_over(site, tmp_path)


def test_webhook_rejects_oversized_and_malformed_bodies(dead_site: Site, tmp_path: Path) -> None:
    site = dead_site
    down = json.dumps(alert("db1")).encode()  # each body below carries it where it can
    big = b'{"version": "4", "alerts": [' + down + b" " * (2 << 20) + b"]}"
    cases: list[tuple[str, bytes, int, str]] = [
        ("not JSON", b"not json", 400, "not JSON"),
        ("empty", b"", 400, "not JSON"),
        ("an array", b"[" + down + b"]", 400, "JSON object"),
        (
            "version 3",
            json.dumps({"version": "3", "alerts": [alert("db1")]}).encode(),
            400,
            "speaks",
        ),
        (
            "alerts not a list",
            json.dumps({"version": "4", "alerts": {"0": alert("db1")}}).encode(),
            400,
            "must be a list",
        ),
        (
            "labels missing",
            json.dumps({"version": "4", "alerts": [alert("db1"), {"status": "firing"}]}).encode(),
            400,
            "labels",
        ),
        (
            "status odd",
            json.dumps({"version": "4", "alerts": [alert("db1"), alert("db1", "odd")]}).encode(),
            400,
            "not firing or resolved",
        ),
        ("deeply nested", b"[" * 100_000 + b"]" * 100_000, 400, ""),
        ("invalid UTF-8", b'{"version": "4", "alerts": ["\xff"]}', 400, ""),
        ("over 1 MiB", big, 413, ""),
    ]
    for what, body, expected, words in cases:
        status, text = request(site, body, GOOD)
        assert status == expected, f"{what}: HTTP {status}: {text[:300]}"
        assert words in text, f"{what}: {text[:300]}"

    def endless() -> Iterator[bytes]:  # chunked: no Content-Length to refuse up front
        yield b'{"version": "4", "alerts": [' + down
        for _ in range(64):
            yield b" " * 65536

    status, _ = request(site, endless(), GOOD, chunked=True)
    assert status == 413
    assert site.running()
    assert site.healthz() == 200
    assert not (tmp_path / "ran.txt").exists()
    assert not (tmp_path / "state" / "failover.jsonl").exists()  # nothing reached the guard
    assert_an_alert_fails_db1_over(site, tmp_path)


def test_alerts_for_unknown_or_alive_pairs_run_nothing(site: Site, tmp_path: Path) -> None:
    names = [f"ghost-{i}" for i in range(200)] + ["../../etc/passwd", "db1; rm -rf /", "x" * 300]
    body = notification(*(alert(name) for name in names), alert("db1"))
    status, text = request(site, body, GOOD)
    assert status == 200, text
    decisions = json.loads(text)["decisions"]
    assert len(decisions) == len(names) + 1
    assert all(d["action"] == "none" for d in decisions), decisions
    assert all("not watched by this site" in d["reason"] for d in decisions[:-1])
    assert "disagrees: verdict alive" in decisions[-1]["reason"]  # db1 is beating
    assert not (tmp_path / "ran.txt").exists()
    metrics = site.metrics()
    # unknown names share one series: a flood of made-up pairs adds no label values
    assert metric_value(metrics, "hbmon_failover_total", pair="(unknown)", result="refused") == (
        len(names)
    )
    assert metric_value(metrics, "hbmon_failover_total", pair="db1", result="refused") == 1
    assert "ghost-" not in metrics
    entries = Journal(tmp_path / "state" / "failover.jsonl").entries()
    assert [e["event"] for e in entries] == ["refused"] * (len(names) + 1)
    assert {e["pair"] for e in entries} == {*names, "db1"}  # the journal keeps the names


# -- the failover command -------------------------------------------------------------------

ENV_DUMP = """\
import json, os, sys
out = sys.argv[1]
json.dump({"env": dict(os.environ), "argv": sys.argv[2:], "stdin": sys.stdin.read(),
           "sid": os.getsid(0) == os.getpid(), "cwd": os.getcwd()}, open(out, "w"))
"""


def quiet_table(clock: FakeClock, command: tuple[str, ...]) -> StatusTable:
    """Pair db1 on both paths: two beats, then silence (host_down after 5 s)."""
    table = StatusTable(clock, site="tokyo")
    timing = Timing(interval=1.0, miss_threshold=3)
    table.add_pair("db1", "both", timing, failover=command, failover_without_arbiter=True)
    for row in table.pairs["db1"].rows.values():
        for serial in (1, 2):
            row.observe_record(Record("db1", 9, serial, clock.wall(), 1.0), clock.monotonic(), 0)
    clock.advance(5)
    return table


async def run_failover(tmp_path: Path, command: tuple[str, ...], limit: float = 10.0) -> None:
    """Fail ``command`` over with the guard's ``limit`` as its timeout."""
    clock = FakeClock()
    table = quiet_table(clock, command)
    guard = FailoverGuard(table, clock, Journal(tmp_path / "failover.jsonl"), timeout=limit)
    with anyio.fail_after(limit + 10):
        async with anyio.create_task_group() as tg:
            decision = await guard.on_alert("db1", tg)
            assert decision.act, decision.reason


async def test_failover_command_gets_a_clean_environment_and_no_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HBMON_TEST_SECRET", "do-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-either")
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent/evil.so")
    dump = tmp_path / "env.json"
    pwned = tmp_path / "pwned"
    tricks = [f"; touch {pwned}", f"$(touch {pwned})", f"`touch {pwned}`", "$HOME", "*"]
    await run_failover(tmp_path, (sys.executable, "-c", ENV_DUMP, str(dump), *tricks))
    seen = json.loads(dump.read_text())
    assert seen["env"] == {
        "PATH": COMMAND_PATH,
        "LANG": "C.UTF-8",
        "HBMON_PAIR": "db1",
        "HBMON_SITE": "tokyo",
        "HBMON_REASON": "host_down on every configured path (network stale, volume stale); "
        "no arbiter (failover_without_arbiter = true)",
    }
    assert seen["argv"] == tricks  # passed as they are: no shell expanded anything
    assert not pwned.exists()
    assert seen["stdin"] == ""  # /dev/null
    assert seen["sid"]  # its own session (and process group)
    last = Journal(tmp_path / "failover.jsonl").entries()[-1]
    assert last["event"] == "executed"


async def test_a_timed_out_command_loses_its_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 60 & echo $! > {pids}; exec sleep 60"
    limit = 1.0
    started = time.monotonic()
    await run_failover(tmp_path, ("sh", "-c", script), limit=limit)
    took = time.monotonic() - started
    last = Journal(tmp_path / "failover.jsonl").entries()[-1]
    assert last["event"] == "timed_out", last
    assert "process group was killed" in last["detail"]
    # measured: 1.01 s; the command is killed at its timeout, not before and not much later
    # (a kill that waited for the backgrounded child's 60 s, or a grace period, would not be)
    assert limit <= took < limit + 0.5, f"the timeout of {limit:g} s took {took:.2f} s"
    child = int(pids.read_text())

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        # a zombie until its reaper (init) collects it: dead all the same
        stat = Path(f"/proc/{child}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "Z"

    wait_for(gone, 5, f"the backgrounded child {child} of the timed-out command to die")


# -- secret files ------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hbmon.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=cwd,
    )


SECRET_CASES = [
    ("network.key_file", "hb.key", 0o644, "world-readable"),
    ("network.key_file", "hb.key", 0o602, "world-writable"),
    ("webhook.token_file", "webhook.token", 0o620, "group-writable"),
    ("webhook.token_file", "webhook.token", 0o604, "world-readable"),
]


def secrets_config(tmp_path: Path) -> tuple[Path, Path, Path]:
    key, token = tmp_path / "hb.key", tmp_path / "webhook.token"
    for path in (key, token):
        path.write_text(os.urandom(24).hex() + "\n")
        path.chmod(0o600)
    config = tmp_path / "site.toml"
    config.write_text(
        f"""
site = "secrets"
state_dir = "{tmp_path / "state"}"
listen = "127.0.0.1:0"
[network]
listen = "127.0.0.1:0"
key_file = "{key}"
[webhook]
token_file = "{token}"
"""
    )
    return config, key, token


@pytest.mark.parametrize(("key", "name", "mode", "words"), SECRET_CASES)
def test_run_refuses_secret_files_others_may_read_or_rewrite(
    tmp_path: Path, key: str, name: str, mode: int, words: str
) -> None:
    config, *_ = secrets_config(tmp_path)
    secret = tmp_path / name
    secret.chmod(mode)
    result = run_cli("run", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line == (
        f"hbmon: error: {secret}: {key}: secret file is {words} (mode {mode:04o}); "
        f"run `chmod 600 {secret}` (or 640 to let the service's group read it)"
    )


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400, 0o440])
def test_private_secret_files_are_accepted(tmp_path: Path, mode: int) -> None:
    config, key, token = secrets_config(tmp_path)
    key.chmod(mode)
    token.chmod(mode)
    site = SiteProcess(parse_config(_toml(config), str(config)))
    try:
        assert site.webhook.token == token.read_bytes().strip()
    finally:
        if site.sender is not None:
            site.sender.close()


def test_a_secret_file_hbmon_cannot_read_is_named(tmp_path: Path) -> None:
    config, key, _ = secrets_config(tmp_path)
    key.unlink()
    with pytest.raises(ConfigError) as err:
        SiteProcess(parse_config(_toml(config), str(config)))
    expected = f"{key}: network.key_file: cannot read the file: No such file or directory"
    assert str(err.value) == expected


def _toml(path: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(path.read_text())


def test_a_secret_never_appears_in_the_error(tmp_path: Path) -> None:
    config, _, token = secrets_config(tmp_path)
    token.write_text("short\n")
    result = run_cli("run", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "webhook.token_file: key is 5 bytes" in result.stderr
    assert "short" not in result.stderr.replace("5 bytes", "")


def test_webhook_does_not_exist_without_a_token(tmp_path: Path) -> None:
    """A site without [webhook] token_file answers 503 and runs nothing."""
    vol = tmp_path / "db1.vol"
    vol.write_bytes(record_block("db1", 1, 1, 0.2))
    config = f"""
site = "notoken"
state_dir = "{tmp_path / "state"}"
method = "volume"
[[watch]]
id = "db1"
volume = "{vol}"
failover = ["/bin/true"]
failover_without_arbiter = true
"""
    with running_site(config, tmp_path) as site:
        status, text = request(site, notification(alert("db1")), GOOD)
    assert status == 503, text
    assert "token_file" in text
    assert not (tmp_path / "state" / "failover.jsonl").exists()


def test_a_slow_client_cannot_hold_the_webhook(site: Site) -> None:
    """A client that sends half a request and stalls does not block the others."""
    port = int(site.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as stalled:
        stalled.sendall(b"POST /api/v1/alerts HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        status, text = request(site, notification(alert("nobody")), GOOD)
        assert status == 200, text
        assert site.healthz() == 200
