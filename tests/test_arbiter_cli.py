"""``hbmon arbiter status`` and the planned handover / fail-back, on a real etcd.

Two real daemons (osaka beats db1, tokyo watches it) share a single etcd member.  The
status command reads etcd itself; a handover at the owner demotes there (journaled), moves
the pair to the target with a new term, and the target runs its failover command with
that term as HBMON_FENCING_TOKEN; the old owner's records turn ``standby``.  Fail-back is
the same command the other way, with a higher term again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import running_site
from test_etcd import Member, start_cluster, stop_cluster

from hbmon.failover import Journal
from hbmon.record import Record

pytestmark = pytest.mark.tools

RECORDER = 'echo "$HBMON_SITE $HBMON_PAIR $HBMON_FENCING_TOKEN" >> "$0"'


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Member]:
    (member,) = members = start_cluster(tmp_path_factory.mktemp("etcd"), 1)
    yield member
    stop_cluster(members)


def hbmon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hbmon.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def until(ready: Callable[[], object], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        time.sleep(0.1)


def configs(tmp_path: Path, etcd: Member) -> tuple[str, str, Path, Path]:
    vol = tmp_path / "db1.vol"
    vol.write_bytes(Record("db1", 0, 0, time.time(), 0.5).encode_block(4096))
    token = tmp_path / "webhook.token"
    token.write_text("t" * 40)
    os.chmod(token, 0o600)
    log = tmp_path / "commands.log"
    command = json.dumps(["/bin/sh", "-c", RECORDER, str(log)])
    arbiter = f"""
[arbiter]
endpoints = ["{etcd.url}"]
prefix = "/cli-{tmp_path.name}"
lease_ttl = "3s"
request_timeout = "0.25s"
demote_budget = "0.5s"
[webhook]
token_file = "{token}"
"""
    watch = f"""[[watch]]
id = "db1"
volume = "{vol}"
failover = {command}
"""

    def site(name: str, tables: str) -> str:
        return f"""site = "{name}"
state_dir = "{tmp_path / name}"
method = "volume"
interval = "0.5s"
{arbiter}
{tables}"""

    osaka = site("osaka", f"""[[beat]]
id = "db1"
volume = "{vol}"
interval = "0.5s"
demote = {command}
{watch}""")  # fmt: skip
    tokyo = site("tokyo", f"{watch}demote = {command}\n")
    return osaka, tokyo, log, token


def handover(to: str, url: str, token: Path) -> subprocess.CompletedProcess[str]:
    """``hbmon arbiter handover db1 --to TO`` asked of the daemon at ``url``."""
    return hbmon("arbiter", "handover", "db1", "--to", to, "--url", url, "--token-file", str(token))


def commands(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_status_handover_and_fail_back(tmp_path: Path, etcd: Member) -> None:
    osaka_cfg, tokyo_cfg, log, token = configs(tmp_path, etcd)
    (tmp_path / "tokyo.toml").write_text(tokyo_cfg)
    with (
        running_site(osaka_cfg, tmp_path, "osaka") as osaka,
        running_site(tokyo_cfg, tmp_path, "tokyo") as tokyo,
    ):
        until(lambda: tokyo.row("db1")["state"] == "alive", "tokyo to see db1 alive")
        shown = hbmon("arbiter", "status", "-c", str(tmp_path / "tokyo.toml"))
        assert shown.returncode == 0, shown.stderr
        assert "db1  osaka  1" in shown.stdout
        assert "osaka  " in shown.stdout
        assert "tokyo  " in shown.stdout
        as_json = json.loads(
            hbmon("arbiter", "status", "-c", str(tmp_path / "tokyo.toml"), "--json").stdout
        )
        assert as_json["pairs"]["db1"]["owner"] == "osaka"
        assert tokyo.row("db1")["owner"] == "osaka"
        assert tokyo.row("db1")["term"] == 1

        # A planned handover, asked of the owner: it demotes, tokyo promotes at term 2.
        moved = handover("tokyo", osaka.url, token)
        assert moved.returncode == 0, moved.stderr
        assert "handed over to tokyo at term 2" in moved.stdout
        until(lambda: "tokyo db1 2" in commands(log), "tokyo's failover command, token 2")
        assert commands(log) == ["osaka db1 1", "tokyo db1 2"]  # demote first, then promote
        until(lambda: tokyo.row("db1")["state"] == "stopped", "osaka's standby records")
        demote = [e for e in Journal(tmp_path / "osaka/failover.jsonl").entries()
                  if e["event"] == "demote"]  # fmt: skip
        assert [(e["pair"], e["result"]) for e in demote] == [("db1", "executed")]
        started = [e for e in Journal(tmp_path / "tokyo/failover.jsonl").entries()
                   if e["event"] == "started"]  # fmt: skip
        assert [(e["code"], e["token"]) for e in started] == [("handover", 2)]

        # Fail-back: the same command at the new owner, a higher term again.
        back = handover("osaka", tokyo.url, token)
        assert back.returncode == 0, back.stderr
        assert "handed over to osaka at term 3" in back.stdout
        until(lambda: tokyo.row("db1")["state"] == "alive", "osaka's active beats again")
        until(lambda: len(commands(log)) == 4, "osaka's promote at term 3")
        assert commands(log)[2:] == ["tokyo db1 2", "osaka db1 3"]  # demote, then promote
        wrong = handover("osaka", tokyo.url, token)
        assert wrong.returncode == 1
        assert "not handed over" in wrong.stderr  # tokyo no longer owns it


def test_status_of_an_unreachable_arbiter_says_so(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        'site = "x"\n[arbiter]\nendpoints = ["http://127.0.0.1:9"]\nrequest_timeout = "0.5s"\n'
    )
    done = hbmon("arbiter", "status", "-c", str(config))
    assert done.returncode == 1
    assert "http://127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr
    missing = tmp_path / "none.toml"
    missing.write_text('site = "x"\n')
    done = hbmon("arbiter", "status", "-c", str(missing))
    assert done.returncode == 2
    assert "no [arbiter]" in done.stderr
