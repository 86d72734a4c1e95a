"""SIGHUP applies ``[webhook] hold_down`` and ``failover_timeout`` to the running guard.

The real daemon starts with a hold-down of an hour and a command timeout of a minute; the
reload makes them 3 s and 1 s.  The failover that follows is killed after 1 s, an alert
within 3 s of its start is refused naming the new hold-down, and one after it runs the
command again: with the settings of the start, neither could happen within the test.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from helpers import Site, post_host_down, record_block, running_site, wait_for

from hbmon.failover import Journal

TOKEN = "reload-test-token-0123456789abcdef"
# appends a line to the marker, then outlives any timeout this test could wait for
COMMAND_SCRIPT = "import sys, time; open(sys.argv[1], 'a').write('ran\\n'); time.sleep(30)"


def config(tmp_path: Path, hold_down: str, timeout: str) -> str:
    token = tmp_path / "webhook.token"
    if not token.exists():
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
    vol = tmp_path / "db1.vol"
    if not vol.exists():  # one record, never beaten again: db1 goes host_down
        vol.write_bytes(record_block("db1", 0x51, 1, 0.2))
    command = [sys.executable, "-c", COMMAND_SCRIPT, str(tmp_path / "ran.txt")]
    return f"""
site = "reload"
state_dir = "{tmp_path / "state"}"
method = "volume"
interval = "200ms"

[webhook]
token_file = "{token}"
hold_down = "{hold_down}"
failover_timeout = "{timeout}"

[[watch]]
id = "db1"
volume = "{vol}"
failover = {json.dumps(command)}
failover_without_arbiter = true
failover_single_path = true
"""


def alert(site: Site) -> dict[str, Any]:
    return post_host_down(site, TOKEN)


def test_sighup_applies_hold_down_and_failover_timeout(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state" / "failover.jsonl")
    marker = tmp_path / "ran.txt"
    with running_site(config(tmp_path, "1h", "60s"), tmp_path) as site:

        def would_fail_over() -> bool:
            code, text = site.get("/api/v1/failover/db1")
            return code == 200 and json.loads(text)["action"] == "failover"

        wait_for(would_fail_over, 10, "db1 host_down (an alert would fail it over)")

        (tmp_path / "site.toml").write_text(config(tmp_path, "3s", "1s"))
        site.proc.send_signal(signal.SIGHUP)
        line = "failover settings reloaded: hold_down 3600 s -> 3 s, failover_timeout 60 s -> 1 s"
        wait_for(lambda: line in site.stderr(), 5, "the reload's log line")

        started = time.monotonic()
        first = alert(site)
        assert (first["action"], first["code"]) == ("failover", "host_down"), first
        ended = wait_for(
            lambda: [e for e in journal.entries() if e["event"] == "timed_out"],
            5,
            "the command to be killed at the reloaded timeout of 1 s (not 60 s)",
        )
        took = time.monotonic() - started
        assert ended[0]["detail"] == "no exit within 1 s; its process group was killed", ended
        assert 1.0 <= took < 3.0, f"timed out {took:.2f} s after the alert"

        held = alert(site)
        assert time.monotonic() - started < 3.0, "too slow to check within the hold-down"
        assert (held["action"], held["code"]) == ("none", "hold_down"), held
        assert held["reason"].endswith("(hold_down 3 s)"), held

        time.sleep(max(0.0, started + 3.2 - time.monotonic()))
        again = alert(site)  # under the hold-down of the start (1 h) this is refused
        assert (again["action"], again["code"]) == ("failover", "host_down"), again
        wait_for(lambda: marker.read_text() == "ran\nran\n", 5, "the command's second run")
