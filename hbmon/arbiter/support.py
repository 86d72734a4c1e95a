"""The keeper's timing-free helpers: what it reports, its book of owners, a call bounded
on the injected clock, the demote command, the state file that lets a restart reuse the
lease."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import anyio

from hbmon.arbiter.base import FOREIGN, Owner, OwnerView, Store
from hbmon.clock import Clock
from hbmon.errors import ArbiterUnavailable, LeaseLost, OwnerTaken
from hbmon.failover import OUTPUT_LIMIT, command_env, run_command

T = TypeVar("T")
log = logging.getLogger("hbmon.arbiter.keeper")
DemoteResult = Literal["executed", "failed", "timed_out", "no_command"]
DEMOTE_RESULTS: tuple[DemoteResult, ...] = get_args(DemoteResult)


@dataclass(frozen=True, slots=True)
class ArbiterStatistics:
    """What the keeper tells about itself (for the metrics)."""

    up: bool  # a request answered within renew_every (+ request_timeout for the answer)
    lease_remaining: float
    owned: frozenset[str] = frozenset()
    terms: Mapping[str, int] = field(default_factory=dict)  # every pair in the view
    demotes: Mapping[tuple[str, DemoteResult], int] = field(default_factory=dict)
    requests: int = 0


class OwnerBook:
    """Who owns what as the store last said (a view, then the watch's events)."""

    def __init__(self) -> None:
        self.owners: dict[str, Owner] = {}
        self.terms: dict[str, int] = {}  # pair -> the newest term seen
        self.foreign: set[str] = set()  # pairs whose owner key hbmon did not write
        self.revision = 0

    def reset(self, view: OwnerView, owner_base: str) -> None:
        self.revision = view.revision
        self.owners = dict(view.owners)
        self.terms = {**view.terms, **{p: o.term for p, o in view.owners.items()}}
        self.foreign = {k[len(owner_base) :] for k in view.foreign if k.startswith(owner_base)}

    def note(self, pair: str, owner: Owner | None) -> None:
        if owner is None:
            self.owners.pop(pair, None)
        else:
            self.owners[pair] = owner
            self.terms[pair] = max(owner.term, self.terms.get(pair, 0))

    def describe(self, pair: str) -> dict[str, Any]:
        owner = self.owners.get(pair)
        site = owner.site if owner is not None else None
        return {"owner": site, "term": self.terms.get(pair), "foreign": pair in self.foreign}


async def aclose(events: object) -> None:
    """Close an async iterator that can be closed (a watch left before its end)."""
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


async def claim_each(
    claim: Callable[[Sequence[str]], Awaitable[Mapping[str, Owner | OwnerTaken]]],
    pairs: Sequence[str],
    chunk: int,
    at_once: int,
    got: Callable[[Owner], None],
) -> set[str]:
    """Claim ``pairs`` ``chunk`` at a time (Store.claim_many), ``at_once`` chunks in
    flight, handing each owner to ``got``; stop at the first ArbiterUnavailable (the rest
    are tried later, not all failing now) or LeaseLost (raised).  The pairs answered:
    claimed, or held by another site."""
    answered: set[str] = set()
    lost: list[LeaseLost] = []
    limiter = anyio.CapacityLimiter(at_once)

    async def some(part: Sequence[str]) -> None:
        async with limiter:
            try:
                answers = await claim(part)
            except LeaseLost as err:
                lost.append(err)
                return tg.cancel_scope.cancel()
            except ArbiterUnavailable:
                return tg.cancel_scope.cancel()
        for pair, answer in answers.items():
            if isinstance(answer, OwnerTaken):
                log.warning("arbiter: %s is not this site's: %s", pair, answer)
            else:
                got(answer)
            answered.add(pair)

    async with anyio.create_task_group() as tg:
        for i in range(0, len(pairs), chunk):
            tg.start_soon(some, pairs[i : i + chunk])
    if lost:
        raise lost[0]
    return answered


async def key_deleted(store: Store, holder: Owner, revision: int) -> bool:
    """Watch from ``revision`` until ``holder``'s owner key is deleted: True then, False
    if the stream ends; OwnerTaken when another owner or term takes the key (the holder
    moving it to its new lease is no change); ArbiterUnavailable when the stream breaks."""
    events = store.watch(revision)
    try:
        async for event in events:
            now = event.owner
            if event.pair != holder.pair:
                continue
            if event.foreign:
                raise OwnerTaken(holder.pair, FOREIGN, None)
            if now is None:
                return True
            if (now.site, now.term) != (holder.site, holder.term):
                raise OwnerTaken(holder.pair, now.site, now.term)
    finally:
        await aclose(events)
    return False


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
    its process group is killed; its result and the journal entry (event ``demote``)."""
    started, wall = clock.monotonic(), clock.wall()
    result, entry = await _run_demote(command, env, clock, deadline, budget)
    entry.update(
        event="demote", time=wall, site=env["HBMON_SITE"], pair=env["HBMON_PAIR"],
        term=int(env["HBMON_FENCING_TOKEN"]), result=result, reason=env["HBMON_REASON"],
        command=list(command), duration=round(clock.monotonic() - started, 3),
    )  # fmt: skip
    return result, entry


async def _run_demote(
    command: tuple[str, ...], env: dict[str, str], clock: Clock, deadline: float, budget: float
) -> tuple[DemoteResult, dict[str, Any]]:
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


def read_demoted(path: Path | None, site: str) -> dict[str, int]:
    """pair -> the term at which this site demoted it (never taken back at that term)."""
    try:
        doc = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return {}
    demoted = doc.get("demoted") if isinstance(doc, dict) and doc.get("site") == site else None
    if not isinstance(demoted, dict):
        return {}
    return {p: t for p, t in demoted.items() if isinstance(t, int) and not isinstance(t, bool)}


def write_state(
    path: Path, site: str, lease: int | None, demoted: Mapping[str, int] | None = None
) -> None:
    """Replace ``path`` atomically (write, fsync, rename, fsync the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"site": site, "lease": lease, "demoted": dict(demoted or {})}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
