"""The keeper's helpers that hold no state: a call bounded on the injected clock, the
demote command, the state file that lets a restart reuse the lease."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import anyio

from hbmon.clock import Clock
from hbmon.failover import OUTPUT_LIMIT, command_env, run_command

T = TypeVar("T")
DemoteResult = Literal["executed", "failed", "timed_out", "no_command"]
DEMOTE_RESULTS: tuple[DemoteResult, ...] = get_args(DemoteResult)


async def on_clock(clock: Clock, deadline: float, call: Callable[[], Awaitable[T]]) -> T:
    """``call()``'s result, or TimeoutError (``call`` cancelled) once ``clock`` reaches
    ``deadline`` first."""
    done: list[T] = []
    failed: list[Exception] = []

    async def alarm() -> None:
        await clock.sleep_until(deadline)
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(alarm)
        try:
            done.append(await call())
        except Exception as err:  # (raised below, not wrapped in an ExceptionGroup)
            failed.append(err)
        tg.cancel_scope.cancel()
    if failed:
        raise failed[0]
    if not done:
        raise TimeoutError
    return done[0]


def demote_env(pair: str, site: str, reason: str, term: int) -> dict[str, str]:
    """A demote command's whole environment: a failover command's, plus the term the
    site held (``HBMON_FENCING_TOKEN``)."""
    return {**command_env(pair, site, reason), "HBMON_FENCING_TOKEN": str(term)}


async def run_demote(
    command: tuple[str, ...], env: dict[str, str], clock: Clock, deadline: float, budget: float
) -> tuple[DemoteResult, dict[str, Any]]:
    """Run a demote command (no shell, own session) until ``deadline`` on ``clock``, when
    its process group is killed; its result and what the journal says of it."""
    if not command:
        return "no_command", {}
    try:
        code, output = await on_clock(clock, deadline, lambda: run_command(command, env))
    except TimeoutError:
        detail = f"no exit within the demote budget ({budget:g} s); its process group was killed"
        return "timed_out", {"detail": detail}
    except OSError as err:
        return "failed", {"detail": f"could not start: {err}"}
    output_text = output[-OUTPUT_LIMIT:].decode(errors="replace")
    return ("executed" if code == 0 else "failed"), {"exit_code": code, "output": output_text}


def read_state(path: Path | None, site: str) -> int | None:
    """The lease id a previous process of ``site`` left in ``path``, if any."""
    try:
        doc = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    lease = doc.get("lease") if isinstance(doc, dict) and doc.get("site") == site else None
    return lease if isinstance(lease, int) and not isinstance(lease, bool) else None


def write_state(path: Path, site: str, lease: int | None) -> None:
    """Replace ``path`` atomically (write, fsync, rename, fsync the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"site": site, "lease": lease}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
