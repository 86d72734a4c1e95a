"""The failover guard: hbmon acts on an alert only when its own table agrees.

Alertmanager says "HbmonHostDown is firing for pair P"; the guard decides:

* refused when P is unknown, has no failover command, is not ``host_down`` in hbmon's
  own table right now (every configured path stale), is watched on one path only and
  its configuration does not opt in (``failover_single_path = true``: a stale SVOL may
  mean a stopped remote copy, a silent network a partition), is already failing over,
  or failed over less than ``hold_down`` ago;
* executed otherwise: the command runs with a timeout, never twice at once for a pair,
  without a shell, in its own session, with standard input from ``/dev/null`` and a
  clean environment (:func:`command_env`): nothing of the daemon's environment leaks
  into it.

Every decision is appended to a journal as one JSON line and fsync'ed, before the
command starts and after it ends, so hold-downs survive restarts and every action can
be audited.  ``hbmon_failover_total{pair,result}`` counts the decisions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from hbmon.clock import Clock
from hbmon.status import StatusTable

log = logging.getLogger(__name__)

RESULTS = ("executed", "refused", "failed", "timed_out")
JOURNAL_NAME = "failover.jsonl"
OUTPUT_LIMIT = 4096  # bytes of the command's output kept in the journal
#: The search path of a failover command (systemd's default for services).
COMMAND_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def command_env(pair: str, site: str, reason: str) -> dict[str, str]:
    """The whole environment of a failover command: a fixed ``PATH`` and ``LANG`` and
    what the failover is about.  Nothing is inherited from the daemon."""
    return {
        "PATH": COMMAND_PATH,
        "LANG": "C.UTF-8",
        "HBMON_PAIR": pair,
        "HBMON_SITE": site,
        "HBMON_REASON": reason,
    }


@dataclass(frozen=True)
class Decision:
    pair: str
    act: bool
    reason: str
    command: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "pair": self.pair,
            "action": "failover" if self.act else "none",
            "reason": self.reason,
            "command": list(self.command),
        }


class Journal:
    """Append-only JSON lines, fsync'ed after every entry."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def unwritable(self) -> str | None:
        """Why this process could not append to the journal, or None when it can.

        Checked without creating anything, so a daemon that lacks access learns it at start
        rather than at its first failover."""
        if self.path.exists():
            if self.path.is_dir() or not os.access(self.path, os.W_OK):
                return f"{self.path} is not a writable file"
            return None
        parent = self.path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot create {self.path}: {parent} is not a writable directory"
        return None

    def entries(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line after a crash
        return out


class FailoverGuard:
    """Decides and runs failovers; see the module docstring."""

    def __init__(
        self,
        table: StatusTable,
        clock: Clock,
        journal: Journal,
        *,
        hold_down: float = 600.0,
        timeout: float = 60.0,
    ) -> None:
        self.table = table
        self.clock = clock
        self.journal = journal
        self.hold_down = hold_down
        self.timeout = timeout
        self.running: set[str] = set()
        self.last_started: dict[str, float] = {}  # pair -> wall time of the last start
        self.counts = table.failovers  # (pair, result) -> decisions; exported as metrics
        for entry in journal.entries():  # hold-downs survive restarts
            if entry.get("event") == "started":
                self.last_started[str(entry["pair"])] = float(entry["time"])

    def decide(self, pair_id: str) -> Decision:
        """What an alert for ``pair_id`` would cause now, and why."""
        pair = self.table.pairs.get(pair_id)
        if pair is None:
            return Decision(pair_id, False, f"pair {pair_id!r} is not watched by this site")
        if not pair.failover:
            return Decision(pair_id, False, "no failover command is configured for this pair")
        verdict = pair.judge(self.clock.monotonic())
        states = ", ".join(f"{p} {r.state}" for p, r in sorted(pair.rows.items()))
        if verdict != "host_down":
            return Decision(
                pair_id, False, f"hbmon's table disagrees: verdict {verdict} ({states})"
            )
        if pair.method != "both" and not pair.failover_single_path:
            return Decision(
                pair_id,
                False,
                f"only the {pair.method} path is watched, so a dead host cannot be told from "
                "a broken path; set failover_single_path = true for this pair to allow it",
            )
        if pair_id in self.running:
            return Decision(pair_id, False, "a failover of this pair is already running")
        last = self.last_started.get(pair_id)
        if last is not None:
            since = self.clock.wall() - last
            if since < self.hold_down:
                return Decision(
                    pair_id,
                    False,
                    f"hold-down: the last failover started {since:.0f} s ago "
                    f"(hold_down {self.hold_down:.0f} s)",
                )
        return Decision(
            pair_id, True, f"host_down on every configured path ({states})", pair.failover
        )

    async def on_alert(self, pair_id: str, task_group: anyio.abc.TaskGroup) -> Decision:
        """A firing HbmonHostDown notification: decide, journal, and start the command."""
        decision = self.decide(pair_id)
        if not decision.act:
            # A name from the request that is not a watched pair gets no series of its own.
            counted = pair_id if pair_id in self.table.pairs else "(unknown)"
            self.counts[(counted, "refused")] += 1
            await self._journal({"event": "refused", **decision.as_dict()})
            log.warning("failover of %s refused: %s", pair_id, decision.reason)
            return decision
        self.running.add(pair_id)
        self.last_started[pair_id] = self.clock.wall()
        try:
            await self._journal({"event": "started", **decision.as_dict()})
        except BaseException:
            self.running.discard(pair_id)
            raise
        log.warning("failover of %s: running %s", pair_id, " ".join(decision.command))
        task_group.start_soon(self._execute, decision)
        return decision

    async def _execute(self, decision: Decision) -> None:
        pair = decision.pair
        started = self.clock.monotonic()
        entry: dict[str, Any] = {
            "pair": pair,
            "command": list(decision.command),
            "reason": decision.reason,
        }
        try:
            with anyio.fail_after(self.timeout):
                env = command_env(pair, self.table.site, decision.reason)
                code, output = await run_command(decision.command, env)
        except TimeoutError:
            result = "timed_out"
            entry["detail"] = f"no exit within {self.timeout:g} s; its process group was killed"
        except OSError as err:
            result = "failed"
            entry["detail"] = f"could not start: {err}"
        else:
            result = "executed" if code == 0 else "failed"
            entry["exit_code"] = code
            entry["output"] = output[-OUTPUT_LIMIT:].decode(errors="replace")
        entry["duration"] = round(self.clock.monotonic() - started, 3)
        self.counts[(pair, result)] += 1
        try:
            with anyio.CancelScope(shield=True):
                await self._journal({"event": result, **entry})
        finally:
            self.running.discard(pair)
        log.warning("failover of %s: %s", pair, result)

    async def _journal(self, entry: dict[str, Any]) -> None:
        entry = {"time": self.clock.wall(), "site": self.table.site, **entry}
        await anyio.to_thread.run_sync(self.journal.append, entry)


async def run_command(
    command: tuple[str, ...], env: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """Run ``command`` (an argv list: no shell) in its own session with exactly ``env`` as
    its environment (None: an empty one); if cancelled (a deadline), kill the group."""
    async with await anyio.open_process(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env if env is not None else {},
    ) as proc:
        output = bytearray()
        try:
            assert proc.stdout is not None
            async for chunk in proc.stdout:
                output += chunk
                del output[: max(0, len(output) - OUTPUT_LIMIT)]
            code = await proc.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            raise
    return code, bytes(output)
