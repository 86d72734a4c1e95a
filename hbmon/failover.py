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

With an arbiter (``[arbiter]``, DESIGN.md "Arbiter") a pair whose every path is stale
(verdict ``host_down``, or ``isolated`` while the owner's lease still lives) is only a
candidate: the guard answers Alertmanager at once and, in the background under the root
task group, asks the arbiter to wait for the old owner's key to be deleted by etcd and to
grant this site the pair with a higher term.  Only then is ``started`` journaled, with
that term as the fencing token, and the command run with ``HBMON_FENCING_TOKEN``.  The
arbiter's refusals (``owner_alive``, ``no_quorum``, ``owner_taken``) are journaled and
counted like the guard's own.  Without an arbiter a ``host_down`` failover is refused as
``no_arbiter`` unless the pair opts in with ``failover_without_arbiter = true``.

Every decision is appended to a journal as one JSON line and fsync'ed, before the
command starts and after it ends, so hold-downs survive restarts and every action can
be audited.  ``hbmon_failover_total{pair,result}`` counts the decisions.

The hold-down is judged on the monotonic clock: a step of the wall clock (NTP, an
operator) neither shortens nor stretches it.  Each ``started`` entry also carries the
boot id and CLOCK_BOOTTIME, so a restarted daemon places an earlier start exactly on
the same boot.  A start it cannot place is taken as late as it can have been: one from
an earlier boot as having happened at this boot, an old entry without a boot stamp as
no older than both its wall-clock age and this boot (see :func:`journaled_age`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import anyio
import anyio.abc
import anyio.to_thread

from hbmon.arbiter.base import Refusal
from hbmon.clock import BootStamp, Clock, boot_stamp
from hbmon.status import StatusTable

log = logging.getLogger(__name__)

Result = Literal["executed", "refused", "failed", "timed_out"]
RESULTS: tuple[Result, ...] = get_args(Result)
#: Why the guard decided as it did: ``host_down`` and ``isolated`` act (the latter only
#: once the arbiter lets it), every other code is a refusal.
Code = Literal[
    "host_down",
    "isolated",
    "handover",
    "unknown_pair",
    "no_command",
    "table_disagrees",
    "single_path",
    "running",
    "hold_down",
    "no_arbiter",
    "owner_alive",
    "no_quorum",
    "owner_taken",
]
CODES: tuple[Code, ...] = get_args(Code)
ACTING: frozenset[Code] = frozenset({"host_down", "isolated", "handover"})
JOURNAL_NAME = "failover.jsonl"
OUTPUT_LIMIT = 4096  # bytes of the command's output kept in the journal
#: The search path of a failover command (systemd's default for services).
COMMAND_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def command_env(pair: str, site: str, reason: str, token: int | None = None) -> dict[str, str]:
    """The whole environment of a failover (or demote) command: a fixed ``PATH`` and
    ``LANG``, what the failover is about and, with an arbiter, the fencing token.  Nothing
    is inherited from the daemon."""
    env = {
        "PATH": COMMAND_PATH,
        "LANG": "C.UTF-8",
        "HBMON_PAIR": pair,
        "HBMON_SITE": site,
        "HBMON_REASON": reason,
    }
    if token is not None:
        env["HBMON_FENCING_TOKEN"] = str(token)
    return env


class Candidate(Protocol):
    """The arbiter as the guard sees it (:class:`hbmon.arbiter.keeper.Keeper`)."""

    async def take_over(self, pair: str, wait: float) -> int:
        """Wait up to ``wait`` seconds for etcd to delete the owner key of ``pair``, then
        take it with a higher term; the term (fencing token), or raise Refusal."""
        ...


@dataclass(frozen=True)
class Decision:
    """What the guard decided for a pair: ``code`` for programs, ``reason`` for people."""

    pair: str
    code: Code
    reason: str
    command: tuple[str, ...] = ()

    @property
    def act(self) -> bool:
        return self.code in ACTING

    def as_dict(self) -> dict[str, Any]:
        return {
            "pair": self.pair,
            "action": "failover" if self.act else "none",
            "code": self.code,
            "reason": self.reason,
            "command": list(self.command),
        }


def journaled_age(entry: dict[str, Any], wall: float, boot: BootStamp) -> float:
    """How long ago a journaled ``started`` entry happened, never more than is certain.

    On the same boot its CLOCK_BOOTTIME stamp gives the age exactly, whatever the wall
    clock did.  From an earlier boot it is at least as old as this boot, and no more is
    certain: its age is taken as the time since boot.  An entry without a boot stamp
    (written before hbmon kept one) is taken as no older than its wall-clock age and no
    older than this boot, whichever is less.
    """
    elapsed = boot.elapsed_since(entry.get("boot_id"), entry.get("since_boot"))
    if elapsed is not None:
        return elapsed
    if "boot_id" in entry and entry["boot_id"] != boot.boot_id:
        return boot.since_boot
    recorded = entry.get("time")
    by_wall = wall - float(recorded) if isinstance(recorded, int | float) else 0.0
    return min(max(by_wall, 0.0), boot.since_boot)


class Journal:
    """Append-only JSON lines, fsync'ed after every entry."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` as one whole line, on disk when this returns, or raise OSError.

        A write the file system cuts short (a full disk takes what fits in the last page)
        is taken back, so no torn line is left for the next entry to be glued to; a torn
        last line left by a crash is ended before the new one begins."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
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


@dataclass(frozen=True, slots=True)
class GuardStatistics:
    """What the failover guard tells about itself."""

    decisions: Mapping[tuple[str, Result], int] = field(default_factory=dict)
    journal_errors: int = 0


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
        boot: Callable[[], BootStamp] = boot_stamp,
        arbiter: Candidate | None = None,
        arbiter_wait: float = 17.0,
    ) -> None:
        self.table = table
        self.arbiter = arbiter
        self.arbiter_wait = arbiter_wait  # lease_ttl + election timeout + margin
        self.clock = clock
        self.journal = journal
        self.hold_down = hold_down
        self.timeout = timeout
        self.boot = boot
        self.running: set[str] = set()
        self.last_started: dict[str, float] = {}  # pair -> monotonic time of the last start
        self.counts: Counter[tuple[str, Result]] = Counter()  # (pair, result) -> decisions
        self.journal_errors = 0  # journal entries that could not be written
        now, wall, stamp = clock.monotonic(), clock.wall(), boot()
        for entry in journal.entries():  # hold-downs survive restarts
            if entry.get("event") == "started" and isinstance(entry.get("pair"), str):
                started = now - journaled_age(entry, wall, stamp)
                pair = entry["pair"]
                self.last_started[pair] = max(started, self.last_started.get(pair, started))

    def statistics(self) -> GuardStatistics:
        return GuardStatistics(dict(self.counts), self.journal_errors)

    def decide(self, pair_id: str) -> Decision:
        """What an alert for ``pair_id`` would cause now, and why."""
        pair = self.table.pairs.get(pair_id)
        if pair is None:
            text = f"pair {pair_id!r} is not watched by this site"
            return Decision(pair_id, "unknown_pair", text)
        if not pair.failover:
            return Decision(
                pair_id, "no_command", "no failover command is configured for this pair"
            )
        verdict = pair.judge(self.clock.monotonic())
        states = ", ".join(f"{p} {r.state}" for p, r in sorted(pair.rows.items()))
        if verdict not in ACTING or (verdict == "isolated" and self.arbiter is None):
            return Decision(
                pair_id, "table_disagrees", f"hbmon's table disagrees: verdict {verdict} ({states})"
            )
        if pair.method != "both" and not pair.failover_single_path:
            return Decision(
                pair_id,
                "single_path",
                f"only the {pair.method} path is watched, so a dead host cannot be told from "
                "a broken path; set failover_single_path = true for this pair to allow it",
            )
        if pair_id in self.running:
            return Decision(pair_id, "running", "a failover of this pair is already running")
        last = self.last_started.get(pair_id)
        if last is not None:
            since = self.clock.monotonic() - last
            if since < self.hold_down:
                return Decision(
                    pair_id,
                    "hold_down",
                    f"hold-down: the last failover started {since:.0f} s ago "
                    f"(hold_down {self.hold_down:.0f} s)",
                )
        if self.arbiter is None:
            if not pair.failover_without_arbiter:
                return Decision(
                    pair_id,
                    "no_arbiter",
                    f"every path is stale ({states}), but without an arbiter a dead site "
                    "cannot be told from a cut between the sites; configure [arbiter], or "
                    "set failover_without_arbiter = true to accept the risk of two primaries",
                )
            return Decision(
                pair_id,
                "host_down",
                f"host_down on every configured path ({states}); no arbiter "
                "(failover_without_arbiter = true)",
                pair.failover,
            )
        if verdict == "isolated":
            return Decision(
                pair_id,
                "isolated",
                f"every path is stale ({states}) but the owner's lease was alive: waiting up "
                f"to {self.arbiter_wait:g} s for the arbiter to let it expire",
                pair.failover,
            )
        return Decision(
            pair_id,
            "host_down",
            f"host_down on every configured path ({states}) and the owner is gone from "
            "the arbiter",
            pair.failover,
        )

    async def on_alert(self, pair_id: str, task_group: anyio.abc.TaskGroup) -> Decision:
        """A firing notification: decide, journal, and start the command.

        With an arbiter the answer comes at once; the wait for the arbiter and the
        command run in ``task_group``, and a repeated notification meanwhile is refused
        as ``running``."""
        decision = self.decide(pair_id)
        if not decision.act:
            await self._refuse(decision)
            return decision
        self.running.add(pair_id)
        if self.arbiter is not None:
            task_group.start_soon(self._take_over, decision, self.arbiter)
            return decision
        try:
            await self._start(decision, None)
        except BaseException:  # not journaled: not started, and nothing held down
            self.running.discard(pair_id)
            raise
        task_group.start_soon(self._execute, decision, None)
        return decision

    async def handed_over(self, pair_id: str, token: int) -> None:
        """The arbiter handed ``pair_id`` to this site (``hbmon arbiter handover`` at the
        old owner, who demoted first): run its failover command with the new term."""
        pair = self.table.pairs.get(pair_id)
        if pair is None or not pair.failover:
            log.warning(
                "pair %s handed to this site at term %d: no failover command here to start "
                "it; start the service by hand",
                pair_id,
                token,
            )
            return
        if pair_id in self.running:
            log.warning("pair %s handed over while a failover runs: not started twice", pair_id)
            return
        decision = Decision(
            pair_id, "handover", f"handed to this site at term {token}", pair.failover
        )
        self.running.add(pair_id)
        try:
            await self._start(decision, token)
        except BaseException:
            self.running.discard(pair_id)
            raise
        await self._execute(decision, token)

    async def _refuse(self, decision: Decision) -> None:
        pair_id = decision.pair
        # A name from the request that is not a watched pair gets no series of its own.
        counted = pair_id if pair_id in self.table.pairs else "(unknown)"
        self.counts[(counted, "refused")] += 1
        await self._journal({"event": "refused", **decision.as_dict()})
        log.warning(
            "failover of %s refused: %s",
            pair_id,
            decision.reason,
            extra={
                "event": "failover",
                "pair": pair_id,
                "result": "refused",
                "code": decision.code,
            },
        )

    async def _take_over(self, decision: Decision, arbiter: Candidate) -> None:
        """In the background: the arbiter's vote, then the command (or a refusal)."""
        pair = decision.pair
        try:
            try:
                token = await arbiter.take_over(pair, self.arbiter_wait)
            except Refusal as refusal:
                refused = Decision(pair, refusal.code, refusal.reason, decision.command)
                with contextlib.suppress(OSError):  # counted and logged by _journal
                    await self._refuse(refused)
                return
            granted = Decision(
                pair,
                decision.code,
                f"{decision.reason}; the arbiter granted term {token}",
                decision.command,
            )
            try:
                await self._start(granted, token)
            except OSError as err:
                log.error(
                    "failover of %s: term %d granted but the start could not be journaled "
                    "(%s): not run",
                    pair,
                    token,
                    err,
                )
                return
            await self._execute(granted, token)
        finally:
            self.running.discard(pair)

    async def _start(self, decision: Decision, token: int | None) -> None:
        """Journal ``started`` (with the fencing token) and arm the hold-down."""
        now, stamp = self.clock.monotonic(), self.boot()
        entry: dict[str, Any] = {
            "event": "started",
            "boot_id": stamp.boot_id,
            "since_boot": stamp.since_boot,
            **decision.as_dict(),
        }
        if token is not None:
            entry["token"] = token
        await self._journal(entry)
        self.last_started[decision.pair] = now
        log.warning(
            "failover of %s: running %s%s",
            decision.pair,
            " ".join(decision.command),
            "" if token is None else f" (fencing token {token})",
        )

    async def _execute(self, decision: Decision, token: int | None) -> None:
        pair = decision.pair
        started = self.clock.monotonic()
        entry: dict[str, Any] = {
            "pair": pair,
            "command": list(decision.command),
            "reason": decision.reason,
        }
        if token is not None:
            entry["token"] = token
        result: Result
        try:
            with anyio.fail_after(self.timeout):
                env = command_env(pair, self.table.site, decision.reason, token)
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
        except OSError as err:  # the command has run: say so, and keep the site running
            log.error("failover of %s: %s, but not journaled: %s", pair, result, err)
        finally:
            self.running.discard(pair)
        log.warning(
            "failover of %s: %s",
            pair,
            result,
            extra={"event": "failover", "pair": pair, "result": result},
        )

    async def _journal(self, entry: dict[str, Any]) -> None:
        entry = {"time": self.clock.wall(), "site": self.table.site, **entry}
        try:
            await anyio.to_thread.run_sync(self.journal.append, entry)
        except OSError:
            self.journal_errors += 1
            raise


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
