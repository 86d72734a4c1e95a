"""The keeper (hbmon/arbiter/keeper.py) on a fake clock and the in-memory store: the
lease counted from send time, demotes before the store can expire the lease, restarts,
takeovers, and never taking a pair back by itself (issue 14).  No test sleeps: virtual
time passes with FakeClock.run_for, which waits (in real time) only for the demote
commands and file writes the keeper has under way."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from hbmon.arbiter.base import Owner, OwnerEvent, Refusal
from hbmon.arbiter.keeper import Keeper
from hbmon.arbiter.lease import MARGIN, LeaseTiming
from hbmon.arbiter.memory import MemoryStore
from hbmon.clock import FakeClock
from hbmon.config import BeatConfig
from hbmon.errors import ArbiterUnavailable, LeaseLost, OwnerTaken
from hbmon.failover import Journal

TIMING = LeaseTiming(lease_ttl=15.0, request_timeout=2.0, demote_budget=5.0)
T0 = 1000.0  # FakeClock's start
WAIT = TIMING.lease_ttl + 1.0 + MARGIN  # what the guard waits: lease_ttl + election + margin


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(clock)


def recorder(log: Path) -> tuple[str, ...]:
    """A demote command that appends what it was told (pair, token, site) to ``log``."""
    script = 'echo "$HBMON_PAIR $HBMON_FENCING_TOKEN $HBMON_SITE" >> "$0"'
    return ("/bin/sh", "-c", script, str(log))


def make(
    store: MemoryStore,
    clock: FakeClock,
    tmp_path: Path,
    site: str = "osaka",
    pairs: Sequence[str] = ("db1",),
    demote: tuple[str, ...] | None = None,
) -> Keeper:
    command = recorder(tmp_path / f"{site}.demoted") if demote is None else demote
    beats = [BeatConfig(id=p, volume=Path("/dev/null"), demote=command) for p in pairs]
    journal = Journal(tmp_path / f"{site}.jsonl")
    return Keeper(
        store, site, beats, TIMING, clock, journal, state_file=tmp_path / f"{site}.json"
    )


def two_sites(store: MemoryStore, clock: FakeClock, tmp_path: Path) -> tuple[Keeper, Keeper]:
    """osaka beating (so owning) db1, and tokyo beating nothing: a candidate for db1."""
    osaka = make(store, clock, tmp_path)
    tokyo = make(store, clock, tmp_path, site="tokyo", pairs=())
    return osaka, tokyo


async def start(tg: anyio.abc.TaskGroup, keeper: Keeper) -> anyio.CancelScope:
    """Run ``keeper`` in ``tg`` until ready; cancelling the scope kills it (no clean-up)."""
    scope = anyio.CancelScope()

    async def runner(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        with scope:
            await keeper.run(task_status=task_status)

    await tg.start(runner)
    return scope


async def start_all(tg: anyio.abc.TaskGroup, *keepers: Keeper) -> list[anyio.CancelScope]:
    """:func:`start` each of ``keepers`` in turn."""
    return [await start(tg, keeper) for keeper in keepers]


async def run_for(clock: FakeClock, seconds: float, *keepers: Keeper) -> None:
    """Let ``seconds`` of virtual time pass, then the keepers' work under way finish."""
    busy = lambda: any(k.working for k in keepers)  # noqa: E731
    await clock.run_for(seconds, busy=busy)
    await clock.run_for(0, busy=busy)


def gate(log: Path, go: Path) -> tuple[str, ...]:
    """A demote command that notes its pair in ``log``, then waits for ``go`` to exist."""
    script = 'echo "$HBMON_PAIR" >> "$0"; while [ ! -e "$1" ]; do sleep 0.01; done'
    return ("/bin/sh", "-c", script, str(log), str(go))


def gated(store: MemoryStore, clock: FakeClock, tmp_path: Path) -> tuple[Keeper, Path]:
    """A keeper of db1 whose demote command notes itself in ``tmp_path/gate``, then waits
    until the file returned exists."""
    go = tmp_path / "go"
    return make(store, clock, tmp_path, demote=gate(tmp_path / "gate", go)), go


async def until(ready: Callable[[], object], within: float = 5.0) -> None:
    """Wait in real time (for a real process) until ``ready()``; TimeoutError after
    ``within`` seconds."""
    with anyio.fail_after(within):
        while not ready():  # (a real process: no event to wait on)
            await anyio.sleep(0.01)


def demotes(keeper: Keeper) -> list[dict[str, Any]]:
    return [e for e in keeper.journal.entries() if e["event"] == "demote"]


def demoted(tmp_path: Path, site: str = "osaka") -> list[str]:
    path = tmp_path / f"{site}.demoted"
    return sorted(path.read_text().splitlines()) if path.exists() else []


class Outcome:
    """A take_over run in the background: its token or its refusal, and when."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.token: int | None = None
        self.refusal: Refusal | None = None
        self.at: float | None = None

    async def take_over(self, keeper: Keeper, pair: str, wait: float) -> None:
        try:
            self.token = await keeper.take_over(pair, wait)
        except Refusal as refusal:
            self.refusal = refusal
        self.at = self.clock.monotonic()


# -- the lease --------------------------------------------------------------------------


async def test_the_demote_is_due_from_the_renewal_send_time_not_from_the_reply(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    keeper = make(store, clock, tmp_path)
    async with anyio.create_task_group() as tg:
        kill = await start(tg, keeper)
        store.delay = 1.5  # the store handles (and answers) each call 1.5 s after it is sent
        await run_for(clock, 6.5, keeper)  # the renewal sent at T0+5 is answered at T0+6.5
        assert (T0 + 5, "keepalive") in store.sent
        assert store.lease_expires_at(keeper.lease or 0) == T0 + 6.5 + 15  # the store's count
        assert keeper.lease_clock.demote_at == T0 + 5 + 15 - 5 - MARGIN  # ours: from the send
        store.unavailable = True
        await run_for(clock, T0 + 13.75 - clock.monotonic(), keeper)
        assert keeper.owned("db1")
        assert demotes(keeper) == []
        assert keeper.statistics().lease_remaining == pytest.approx(6.25)
        await run_for(clock, 0.25, keeper)  # T0 + 14: demote_at, 1.5 s before "reply + 9"
        assert not keeper.owned("db1")
        [entry] = demotes(keeper)
        assert entry["time"] == clock.wall_offset + T0 + 14
        assert (entry["pair"], entry["term"], entry["result"]) == ("db1", 1, "executed")
        assert "could not be renewed" in entry["reason"]
        kill.cancel()


async def test_renewals_every_third_of_the_ttl_and_steady_traffic_does_not_grow_with_pairs(
    tmp_path: Path,
) -> None:
    seen: dict[int, tuple[list[tuple[float, str]], int]] = {}
    for n in (100, 10_000):
        clock = FakeClock()
        store = MemoryStore(clock)
        keeper = make(store, clock, tmp_path / str(n), pairs=[f"p{i:05}" for i in range(n)])
        async with anyio.create_task_group() as tg:
            kill = await start(tg, keeper)
            assert len(keeper.statistics().owned) == n
            assert store.calls["claim"] == n  # (once each, at start only)
            await run_for(clock, 1, keeper)
            mark, requests = len(store.sent), keeper.requests
            await run_for(clock, 60, keeper)
            seen[n] = (store.sent[mark:], keeper.requests - requests)
            assert keeper.status()["pairs"]["p00042"]["owner"] == "osaka"
            assert keeper.owner_state("p00042") == "gone"  # (own: no other writer to wait on)
            kill.cancel()
    renewals = [(T0 + 5 * i, "keepalive") for i in range(1, 13)]  # every 5 s, from the send
    assert seen[100] == seen[10_000] == (renewals, 12)


async def test_an_unreachable_store_demotes_every_pair_with_budget_and_margin_left(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    keeper = make(store, clock, tmp_path, pairs=("db1", "db2", "db3"))
    async with anyio.create_task_group() as tg:
        kill = await start(tg, keeper)
        await run_for(clock, 5.0, keeper)  # renewed at T0+5 (sent then, answered at once)
        old = keeper.lease or 0
        store_expiry = store.lease_expires_at(old)
        assert store_expiry == T0 + 20
        store.unavailable = True
        await run_for(clock, 8.75, keeper)
        assert keeper.statistics().owned == {"db1", "db2", "db3"}
        await run_for(clock, 0.25, keeper)
        now = clock.monotonic()
        assert now == T0 + 14
        assert store_expiry - now >= TIMING.demote_budget + MARGIN
        entries = demotes(keeper)
        assert sorted(e["pair"] for e in entries) == ["db1", "db2", "db3"]
        assert {e["time"] for e in entries} == {clock.wall()}  # all at once
        assert {(e["result"], e["term"], e["site"]) for e in entries} == {("executed", 1, "osaka")}
        assert demoted(tmp_path) == ["db1 1 osaka", "db2 1 osaka", "db3 1 osaka"]
        stats = keeper.statistics()
        assert stats.owned == frozenset()
        assert not stats.up
        assert stats.demotes == {(p, "executed"): 1 for p in ("db1", "db2", "db3")}
        assert keeper.lease is None
        assert keeper.owner_state("db1") == "unknown"
        # The store answers again: a fresh lease, but the pairs stay demoted and unclaimed
        # even though their keys are absent once the old lease has expired.
        store.unavailable = False
        await run_for(clock, 60, keeper)
        assert keeper.lease not in (None, old)
        assert old not in store.leases
        assert keeper.owner_state("db1") == "gone"
        assert not any(keeper.owned(p) for p in ("db1", "db2", "db3"))
        assert store.calls["claim"] == 3  # the three at start, none since
        assert len(demotes(keeper)) == 3
        assert keeper.statistics().up
        kill.cancel()


async def test_a_demote_command_that_hangs_is_killed_at_the_demote_budget(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    hang = ("/bin/sh", "-c", 'echo $$ > "$0"; exec sleep 30', str(pid_file))
    keeper = make(store, clock, tmp_path, demote=hang)
    async with anyio.create_task_group() as tg:
        kill = await start(tg, keeper)
        store.unavailable = True
        await clock.run_for(T0 + 9 - clock.monotonic())  # demote_at: the command starts
        assert keeper.working == 1
        await until(lambda: pid_file.exists() and pid_file.read_text().strip())
        pid = int(pid_file.read_text())
        clock.advance(TIMING.demote_budget - 0.25)
        await clock.settle()
        os.kill(pid, 0)  # still running
        assert demotes(keeper) == []
        clock.advance(0.25)  # killed now, on the keeper's clock (not 30 s or 5 s later)
        await until(lambda: not keeper.working, within=3.0)
        [entry] = demotes(keeper)
        assert entry["result"] == "timed_out"
        assert entry["duration"] == TIMING.demote_budget
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert keeper.statistics().demotes == {("db1", "timed_out"): 1}
        kill.cancel()


async def test_a_process_paused_past_its_lease_is_not_owner_before_its_next_beat(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    keeper = make(store, clock, tmp_path)
    async with anyio.create_task_group() as tg:
        kill = await start(tg, keeper)
        await run_for(clock, 2, keeper)
        assert keeper.owned("db1")
        clock.advance(20.0)  # SIGSTOP / a VM frozen for 20 s: no task of the keeper has run
        assert not keeper.owned("db1")  # the beater's first question after the pause
        await run_for(clock, 0, keeper)  # and the demote runs at once, no time later
        [entry] = demotes(keeper)
        assert entry["time"] == clock.wall_offset + T0 + 22
        assert entry["result"] == "executed"
        assert store.calls["keepalive"] == 0  # never renewed past demote_at
        kill.cancel()


async def test_a_renewal_hanging_in_flight_does_not_delay_the_demote(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    store.deadline = 4.2  # a store slow to give up on a call
    keeper = make(store, clock, tmp_path)
    async with anyio.create_task_group() as tg:
        kill = await start(tg, keeper)  # granted at T0: demote_at T0 + 9
        store.pause()  # the renewal sent at T0+5 hangs until T0+9.2
        await run_for(clock, 8.75, keeper)
        assert keeper.owned("db1")
        assert demotes(keeper) == []
        await run_for(clock, 0.25, keeper)
        [entry] = demotes(keeper)
        assert entry["time"] == clock.wall_offset + T0 + 9
        assert [(t, name) for t, name in store.sent if t > T0] == [
            (T0 + 5, "keepalive"),  # (still out when the demote starts)
            (T0 + 9, "revoke"),
        ]
        kill.cancel()


async def test_the_lease_is_revoked_only_once_the_demote_has_ended(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    keeper, go = gated(store, clock, tmp_path)
    async with anyio.create_task_group() as tg:
        kill = await start(tg, keeper)
        lease = keeper.lease
        clock.advance(10.0)  # paused past demote_at (T0+9), not past the store's T0+15
        assert not keeper.owned("db1")
        await clock.settle()
        await until(lambda: (tmp_path / "gate").exists())
        assert lease in store.leases  # so the owner key stays: no winner can start yet
        assert "db1" in (await store.view()).owners
        go.touch()
        await until(lambda: not keeper.working)
        await run_for(clock, 0, keeper)
        assert lease not in store.leases  # revoked at T0+10: the winner need not wait
        assert "db1" not in (await store.view()).owners
        assert store.calls["keepalive"] == 0  # no renewal past demote_at
        kill.cancel()


async def test_a_release_the_store_did_not_take_leaves_the_pair_demoted(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    keeper, go = gated(store, clock, tmp_path)
    async with anyio.create_task_group() as tg:
        kill = await start(tg, keeper)
        failed: list[Exception] = []

        async def release() -> None:
            try:
                await keeper.release("db1")
            except Exception as err:
                failed.append(err)

        tg.start_soon(release)
        await until(lambda: (tmp_path / "gate").exists())
        store.unavailable = True  # the store goes away while the demote runs
        go.touch()
        await until(lambda: failed)
        assert isinstance(failed[0], ArbiterUnavailable)
        store.unavailable = False
        await run_for(clock, 10, keeper)
        assert "db1" in (await store.view()).owners  # still under this site's lease...
        assert not keeper.owned("db1")  # ...but demoted, and not taken back
        await keeper.release("db1")  # the operator tries again: no second demote
        assert "db1" not in (await store.view()).owners
        assert len(demotes(keeper)) == 1
        kill.cancel()


# -- restarts ----------------------------------------------------------------------------


async def test_a_restart_within_the_lease_keeps_ownership_and_term(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    first = make(store, clock, tmp_path, pairs=("db1", "db2"))
    async with anyio.create_task_group() as tg:
        kill = await start(tg, first)
        await run_for(clock, 6, first)  # renewed at T0+5: the store keeps it until T0+20
        lease = first.lease
        kill.cancel()  # kill -9: nothing revoked
    clock.advance(10)  # restarted 11 s after the last renewal
    second = make(store, clock, tmp_path, pairs=("db1", "db2"))
    async with anyio.create_task_group() as tg:
        kill = await start(tg, second)
        assert second.lease == lease
        assert second.owned("db1")
        assert second.owned("db2")
        assert second.statistics().terms == {"db1": 1, "db2": 1}
        assert store.calls["grant"] == 1
        await run_for(clock, 30, second)
        assert second.owned("db1")
        assert second.status()["pairs"]["db1"]["owner"] == "osaka"
        assert second.owner_state("db1") == "gone"  # (this site's own)
        kill.cancel()
    assert demotes(second) == []
    state = json.loads((tmp_path / "osaka.json").read_text())
    assert state == {"site": "osaka", "lease": lease, "demoted": {}}


async def test_a_restart_after_the_lease_expired_claims_absent_keys_only(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    first = make(store, clock, tmp_path, pairs=("db1", "db2", "db3"))
    async with anyio.create_task_group() as tg:
        kill = await start(tg, first)
        kill.cancel()
    clock.advance(16)
    store.expire()  # etcd deletes both owner keys with the lease
    tokyo = await store.grant(15)
    await store.claim("db2", "tokyo", tokyo)  # and another site takes db2 (term 2)
    store.put_raw(store.key("owner", "db3"), "garbage")  # and someone else writes db3
    second = make(store, clock, tmp_path, pairs=("db1", "db2", "db3", "db4"))
    async with anyio.create_task_group() as tg:
        kill = await start(tg, second)
        assert second.lease != first.lease
        assert second.owned("db1")
        assert not second.owned("db2")
        assert not second.owned("db3")
        assert second.owned("db4")  # (a foreign key does not stop the other claims)
        await run_for(clock, 1, second)
        assert second.statistics().terms == {"db1": 2, "db2": 2, "db3": 1, "db4": 1}
        assert second.owner_state("db3") == "unknown"
        assert second.status()["pairs"]["db2"]["owner"] == "tokyo"
        assert second.owner_state("db2") == "alive"
        kill.cancel()
    assert demotes(second) == []


async def test_an_unreachable_store_at_start_owns_nothing_until_it_answers(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    keeper = make(store, clock, tmp_path)
    store.unavailable = True
    async with anyio.create_task_group() as tg:
        kill = await start(tg, keeper)  # ready after one try
        assert keeper.lease is None
        assert not keeper.owned("db1")
        assert keeper.owner_state("db1") == "unknown"
        await run_for(clock, 30, keeper)
        assert not keeper.owned("db1")
        store.unavailable = False
        await run_for(clock, 1, keeper)
        assert keeper.owned("db1")  # the claim at start, made once the store answers
        assert keeper.owner_state("db1") == "gone"  # current again (and this site's own)
        kill.cancel()
    assert demotes(keeper) == []


# -- the watch ---------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["deleted", "taken"])
async def test_an_owned_key_deleted_or_taken_is_demoted_at_once(
    clock: FakeClock, store: MemoryStore, tmp_path: Path, change: str
) -> None:
    osaka = make(store, clock, tmp_path, pairs=("db1", "db2"))
    tokyo = make(store, clock, tmp_path, site="tokyo", pairs=())
    async with anyio.create_task_group() as tg:
        kills = await start_all(tg, osaka, tokyo)
        await run_for(clock, 1, osaka, tokyo)
        view = await store.view()
        if change == "deleted":  # (an operator with etcdctl, say)
            await store.release(view.owners["db1"])
        else:
            await store.hand_over(view.owners["db1"], "tokyo")
        await run_for(clock, 0, osaka, tokyo)
        assert not osaka.owned("db1")
        assert osaka.owned("db2")
        [entry] = demotes(osaka)
        assert entry["time"] == clock.wall_offset + T0 + 1
        assert ("deleted" if change == "deleted" else "taken by tokyo at term 2") in entry["reason"]
        assert osaka.owner_state("db1") == ("gone" if change == "deleted" else "alive")
        # A key handed to tokyo's lease is tokyo's to renew and demote from now on.
        assert tokyo.owned("db1") == (change == "taken")
        await run_for(clock, 30, osaka, tokyo)
        assert not osaka.owned("db1")
        assert store.calls["claim"] == 2
        for kill in kills:
            kill.cancel()


async def test_a_broken_watch_is_unknown_until_the_view_is_read_again(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    keeper = make(store, clock, tmp_path, site="tokyo", pairs=())
    osaka_lease = await store.grant(15)
    owner = await store.claim("db1", "osaka", osaka_lease)
    async with anyio.create_task_group() as tg:
        kill = await start(tg, keeper)
        await run_for(clock, 0, keeper)
        assert keeper.owner_state("db1") == "alive"
        assert keeper.owner_state("db2") == "gone"
        store.pause()  # a frozen store: answers nothing, so the view cannot be current
        store.break_watches()
        await run_for(clock, 0, keeper)
        assert keeper.owner_state("db1") == "unknown"
        await run_for(clock, 3, keeper)
        assert keeper.owner_state("db1") == "unknown"
        store.resume()
        await run_for(clock, 0, keeper)
        assert keeper.owner_state("db1") == "alive"
        store.break_watches()
        await store.release(owner)  # changed while no watch was open
        await run_for(clock, 1, keeper)
        assert keeper.owner_state("db1") == "gone"
        store.put_raw(store.key("owner", "db3"), "not hbmon's")
        await run_for(clock, 1, keeper)
        assert keeper.owner_state("db3") == "unknown"  # a foreign key is never "gone"
        assert keeper.owner_state("db1") == "gone"
        kill.cancel()


# -- takeover ----------------------------------------------------------------------------


async def test_take_over_refuses_owner_alive_after_waiting(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    osaka, tokyo = two_sites(store, clock, tmp_path)
    outcome = Outcome(clock)
    async with anyio.create_task_group() as tg:
        kills = await start_all(tg, osaka, tokyo)
        tg.start_soon(outcome.take_over, tokyo, "db1", WAIT)
        await run_for(clock, WAIT - 0.25, osaka, tokyo)
        assert outcome.at is None  # still waiting for the key to go
        await run_for(clock, 0.25, osaka, tokyo)
        assert outcome.refusal is not None
        assert outcome.refusal.code == "owner_alive"
        assert outcome.at == T0 + WAIT
        assert "osaka at term 1" in outcome.refusal.reason
        assert osaka.owned("db1")
        assert not tokyo.owned("db1")
        for kill in kills:
            kill.cancel()


async def test_take_over_once_the_store_deleted_the_dead_owner_key(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    osaka, tokyo = two_sites(store, clock, tmp_path)
    outcome = Outcome(clock)
    async with anyio.create_task_group() as tg:
        kill_osaka, kill_tokyo = await start_all(tg, osaka, tokyo)
        await run_for(clock, 5, osaka, tokyo)  # osaka renewed at T0+5: expires at T0+20
        kill_osaka.cancel()  # the host dies
        tg.start_soon(outcome.take_over, tokyo, "db1", WAIT)
        await run_for(clock, T0 + 20 - 0.25 - clock.monotonic(), tokyo)
        store.expire()
        await run_for(clock, 0, tokyo)
        assert outcome.at is None  # the lease lives: no takeover on a timer of our own
        await run_for(clock, 0.25, tokyo)
        store.expire()  # etcd deletes the owner key at T0+20 (if no call did already)
        assert osaka.lease not in store.leases
        await run_for(clock, 0, tokyo)
        assert outcome.token == 2
        assert outcome.at == T0 + 20
        assert tokyo.owned("db1")
        assert tokyo.statistics().terms == {"db1": 2}
        kill_tokyo.cancel()


class LosesClaimAnswers(MemoryStore):
    """A store whose next ``lost`` claims commit but whose answers never arrive (the
    network fails between etcd's commit and its reply: EtcdStore then raises
    ArbiterUnavailable)."""

    lost = 0

    async def claim(self, pair: str, site: str, lease: int, *, keep: bool = False) -> Owner:
        owner = await super().claim(pair, site, lease, keep=keep)
        if self.lost > 0:
            self.lost -= 1
            raise ArbiterUnavailable("memory store: the answer to claim was lost")
        return owner


async def test_a_takeover_whose_claim_answer_was_lost_is_still_the_takeover(
    clock: FakeClock, tmp_path: Path
) -> None:
    """Seen in bench/partitions.py (cut(A-B) + kill(A)): the candidate's claim committed,
    its answer was lost; take_over refused no_quorum while the watch made the candidate
    the owner, so the pair was owned at the new term and its failover never ran."""
    store = LosesClaimAnswers(clock)
    osaka, tokyo = two_sites(store, clock, tmp_path)
    outcome = Outcome(clock)
    async with anyio.create_task_group() as tg:
        kill_osaka, kill_tokyo = await start_all(tg, osaka, tokyo)
        kill_osaka.cancel()  # the host dies
        store.lost = 1
        tg.start_soon(outcome.take_over, tokyo, "db1", WAIT)
        await run_for(clock, 15, tokyo)
        store.expire()  # etcd deletes osaka's key; tokyo's claim commits, answer lost
        await run_for(clock, 1, tokyo)
        assert store.calls["claim"] >= 2  # osaka's at start, tokyo's
        assert store.lost == 0
        assert outcome.refusal is None, outcome.refusal
        assert outcome.token == 2
        assert tokyo.owned("db1")
        kill_tokyo.cancel()


@pytest.mark.parametrize("sites", [("tokyo", "nagoya"), ("tokyo", "tokyo")])
async def test_of_two_candidates_exactly_one_takes_over(
    clock: FakeClock, store: MemoryStore, tmp_path: Path, sites: tuple[str, str]
) -> None:
    osaka = make(store, clock, tmp_path)
    candidates = [
        make(store, clock, tmp_path / str(i), site=site, pairs=())
        for i, site in enumerate(sites)
    ]
    outcomes = [Outcome(clock), Outcome(clock)]
    async with anyio.create_task_group() as tg:
        kill_osaka = await start(tg, osaka)
        kills = [await start(tg, c) for c in candidates]
        kill_osaka.cancel()
        for outcome, candidate in zip(outcomes, candidates, strict=True):
            tg.start_soon(outcome.take_over, candidate, "db1", WAIT)
        await run_for(clock, 15, *candidates)
        store.expire()
        await run_for(clock, 0, *candidates)
        assert sorted(o.token or 0 for o in outcomes) == [0, 2]
        [loser] = [o for o in outcomes if o.token is None]
        assert loser.refusal is not None
        assert loser.refusal.code == "owner_taken"
        assert [c.owned("db1") for c in candidates] == [o.token == 2 for o in outcomes]
        for kill in kills:
            kill.cancel()


async def test_take_over_refuses_no_quorum_and_foreign_keys_and_its_own_pair(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    tokyo = make(store, clock, tmp_path, site="tokyo", pairs=("db7",))
    store.put_raw(store.key("owner", "db9"), '{"site": "osaka"}')  # written by someone else
    async with anyio.create_task_group() as tg:
        kill = await start(tg, tokyo)
        with pytest.raises(Refusal) as foreign:
            await tokyo.take_over("db9", WAIT)
        assert foreign.value.code == "owner_taken"
        assert "did not write" in foreign.value.reason
        with pytest.raises(Refusal) as own:
            await tokyo.take_over("db7", WAIT)
        assert own.value.code == "owner_taken"
        assert "this site" in own.value.reason
        store.unavailable = True
        with pytest.raises(Refusal) as cut_off:
            await tokyo.take_over("db1", WAIT)
        assert cut_off.value.code == "no_quorum"
        assert clock.monotonic() == T0  # refused at once: nothing to wait for
        kill.cancel()
    assert store.calls["claim"] == 1  # db7 at start; no candidate claim was tried


# -- the operator -------------------------------------------------------------------------


async def test_release_hand_over_and_claim_demote_first_and_raise_the_term(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    osaka, tokyo = two_sites(store, clock, tmp_path)
    async with anyio.create_task_group() as tg:
        kills = await start_all(tg, osaka, tokyo)
        await osaka.release("db1")
        assert demoted(tmp_path) == ["db1 1 osaka"]  # the demote ran before the key went
        await run_for(clock, 1, osaka, tokyo)
        assert not osaka.owned("db1")
        assert tokyo.owner_state("db1") == "gone"
        await run_for(clock, 30, osaka, tokyo)
        assert not osaka.owned("db1")  # released is released: not taken back by itself
        assert await osaka.claim("db1") == 2  # the operator's explicit claim: a new term
        assert await osaka.hand_over("db1", "tokyo") == 3
        await run_for(clock, 1, osaka, tokyo)
        assert tokyo.owned("db1")
        assert not osaka.owned("db1")
        assert [e["reason"] for e in demotes(osaka)] == [
            "released by the operator",
            "handed over to tokyo by the operator",
        ]
        assert [e["term"] for e in demotes(osaka)] == [1, 2]
        status = osaka.status()
        json.dumps(status)
        assert status["pairs"]["db1"] == {"owner": "tokyo", "term": 3, "owned": False,
                                          "foreign": False}  # fmt: skip
        assert status["site"] == "osaka"
        assert status["lease"] == f"{osaka.lease:x}"
        for kill in kills:
            kill.cancel()


# -- the memory store itself -------------------------------------------------------------


async def test_the_memory_store_keeps_etcds_rules(clock: FakeClock, store: MemoryStore) -> None:
    osaka, tokyo = await store.grant(2.5), await store.grant(15)
    assert await store.time_left(osaka) == 3.0  # whole seconds, rounded up
    first = await store.claim("db1", "osaka", osaka)
    assert (first.term, first.lease) == (1, osaka)
    with pytest.raises(OwnerTaken):
        await store.claim("db1", "tokyo", tokyo)
    with pytest.raises(OwnerTaken):
        await store.claim("db1", "osaka", tokyo)  # the same site, but not asked to keep it
    restarted = await store.grant(15)
    kept = await store.claim("db1", "osaka", restarted, keep=True)
    assert (kept.term, kept.lease) == (1, restarted)
    assert kept.revision > first.revision
    with pytest.raises(OwnerTaken):
        await store.release(first)  # not exactly that key any more
    await store.revoke(osaka)  # the old lease ends: the key moved away survives it
    assert (await store.view()).owners["db1"] == kept
    with pytest.raises(LeaseLost):
        await store.hand_over(kept, "tokyo")  # tokyo is not registered
    await store.register("tokyo", tokyo)
    handed = await store.hand_over(kept, "tokyo")
    assert (handed.site, handed.term, handed.lease) == ("tokyo", 2, tokyo)
    await store.release(handed)
    assert (await store.view()).terms == {"db1": 2}  # the term key stays
    again = await store.claim("db1", "osaka", restarted)
    assert again.term == 3
    events = store.watch(first.revision)  # replays what came after, then goes on
    seen = [await anext(events) for _ in range(4)]
    assert [(e.owner.site, e.owner.term) if e.owner else None for e in seen] == [
        ("osaka", 1),
        ("tokyo", 2),
        None,
        ("osaka", 3),
    ]
    clock.advance(15)
    assert store.expire() == [tokyo, restarted]  # etcd's leases end on their own
    assert await anext(events) == OwnerEvent("db1", None, store.revision)
    await events.aclose()  # type: ignore[attr-defined]
    with pytest.raises(LeaseLost):
        await store.keepalive(restarted)
    store.put_raw("/hbmon/owner/db2", "[]")
    store.put_raw("/hbmon/elsewhere", "{}")
    view = await store.view()
    assert view.owners == {}
    assert view.foreign == ("/hbmon/elsewhere", "/hbmon/owner/db2")
    store.unavailable = True
    with pytest.raises(ArbiterUnavailable):
        await store.view()
    store.unavailable = False
    store.pause()  # a frozen store: the call is given up after its deadline, on the clock
    async with anyio.create_task_group() as tg:
        failed: list[float] = []

        async def ask() -> None:
            with pytest.raises(ArbiterUnavailable):
                await store.view()
            failed.append(clock.monotonic())

        tg.start_soon(ask)
        await clock.run_for(10)
    assert failed == [T0 + 15 + store.deadline]


# -- who takes a pair back at start (booth #68: a failed-over site must not grab it back) --


async def test_a_site_back_after_a_takeover_does_not_claim_even_an_expired_key(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    """osaka lost db1 to tokyo; tokyo's daemon stops past its lease, so the key expires;
    osaka restarts: it must not take db1 back (the term key says tokyo took it last)."""
    tokyo_lease = await store.grant(15)
    await store.register("tokyo", tokyo_lease)
    taken = await store.claim("db1", "tokyo", tokyo_lease)
    assert taken.term == 1
    clock.advance(16)
    store.expire()  # tokyo's daemon was stopped: its lease (and the owner key) are gone
    osaka = make(store, clock, tmp_path, pairs=("db1", "db2"))
    async with anyio.create_task_group() as tg:
        kill = await start(tg, osaka)
        await run_for(clock, 1, osaka)
        assert not osaka.owned("db1")  # tokyo's, even with no key now
        assert osaka.owned("db2")  # never owned before: osaka's from the start
        kill.cancel()
    assert (await store.view()).owners.keys() == {"db2"}


async def test_a_site_that_took_a_pair_over_takes_it_back_after_its_own_restart(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    """tokyo took db1 over (it has no [[beat]] for it); its daemon restarts after its lease
    ran out: the pair is still tokyo's, so tokyo claims it again, at a new term."""
    osaka = make(store, clock, tmp_path, pairs=("db1",))
    async with anyio.create_task_group() as tg:
        kill = await start(tg, osaka)
        kill.cancel()  # osaka dies
    clock.advance(16)
    store.expire()
    tokyo = make(store, clock, tmp_path, site="tokyo", pairs=())
    async with anyio.create_task_group() as tg:
        kill = await start(tg, tokyo)
        token = await tokyo.take_over("db1", WAIT)
        assert token == 2
        kill.cancel()
    clock.advance(16)
    store.expire()  # tokyo's daemon was down longer than its lease
    again = make(store, clock, tmp_path, site="tokyo", pairs=())
    async with anyio.create_task_group() as tg:
        kill = await start(tg, again)
        assert again.owned("db1")
        assert again.statistics().terms["db1"] == 3
        kill.cancel()


async def test_a_restart_within_the_lease_keeps_a_taken_pair_without_promoting_it_again(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    """Seen in bench/partitions.py (seed 1408, schedule 32: kill(B) after B took the pairs
    over): tokyo's daemon restarts within its lease, reuses it, and finds db1's owner key
    already under it.  That is its own pair, not a handover: on_gained (which runs the
    failover command again, with the same token) must not be told; the watch's first read
    came before the start claims and took it for one."""
    osaka = make(store, clock, tmp_path, pairs=("db1",))
    async with anyio.create_task_group() as tg:
        kill = await start(tg, osaka)
        kill.cancel()  # osaka dies
    clock.advance(16)
    store.expire()
    tokyo = make(store, clock, tmp_path, site="tokyo", pairs=())
    async with anyio.create_task_group() as tg:
        kill = await start(tg, tokyo)
        assert await tokyo.take_over("db1", WAIT) == 2
        kill.cancel()  # tokyo's daemon is killed ...
    clock.advance(2)  # ... and back within its lease
    again = make(store, clock, tmp_path, site="tokyo", pairs=())
    gained: list[tuple[str, int]] = []
    again.on_gained = lambda pair, term: gained.append((pair, term))
    async with anyio.create_task_group() as tg:
        kill = await start(tg, again)
        await run_for(clock, 1, again)
        assert again.lease == tokyo.lease
        assert again.owned("db1")
        assert again.statistics().terms["db1"] == 2
        kill.cancel()
    assert gained == []


async def test_a_pair_demoted_here_is_not_taken_back_by_a_restart(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    """osaka demoted db1 (its lease could not be renewed); nobody took it over; osaka's
    daemon restarts: db1 stays demoted (its service was stopped) until an operator acts."""
    osaka = make(store, clock, tmp_path, pairs=("db1",))
    async with anyio.create_task_group() as tg:
        kill = await start(tg, osaka)
        store.unavailable = True
        await run_for(clock, 20, osaka)
        assert demoted(tmp_path) == ["db1 1 osaka"]
        kill.cancel()
    store.unavailable = False
    store.expire()
    restarted = make(store, clock, tmp_path, pairs=("db1",))
    async with anyio.create_task_group() as tg:
        kill = await start(tg, restarted)
        await run_for(clock, 1, restarted)
        assert not restarted.owned("db1")
        assert (await store.view()).owners == {}
        term = await restarted.claim("db1")  # the operator's explicit claim
        assert term == 2
        assert restarted.owned("db1")
        kill.cancel()
    state = json.loads((tmp_path / "osaka.json").read_text())
    assert state["demoted"] == {}


async def test_garbage_over_a_live_owner_key_stops_nobody_and_starts_nobody(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    """Someone overwrites osaka's owner key of db1 with a value hbmon did not write (as
    EtcdStore's watch, the memory store's watch skips it): osaka goes on as the owner
    (no demote for a stranger's write), the view calls it foreign, and tokyo's take-over
    is refused owner_taken, so the pair can never have two primaries through it: also
    the take-over already waiting for the key to go (a stranger's write is no delete)."""
    osaka = make(store, clock, tmp_path, pairs=("db1",))
    tokyo = make(store, clock, tmp_path, site="tokyo", pairs=("db7",))
    waiting = Outcome(clock)
    async with anyio.create_task_group() as tg:
        kills = await start_all(tg, osaka, tokyo)
        tg.start_soon(waiting.take_over, tokyo, "db1", WAIT)
        await run_for(clock, 1, osaka, tokyo)
        assert waiting.at is None  # waiting for osaka's key to go
        store.put_raw(store.key("owner", "db1"), "garbage")
        await run_for(clock, 0, osaka, tokyo)
        assert waiting.refusal is not None, waiting.token
        assert waiting.refusal.code == "owner_taken"
        assert waiting.at == T0 + 1
        assert osaka.owned("db1")
        assert osaka.owner_state("db1") == "unknown"  # told by the watch at once
        await run_for(clock, 20, osaka, tokyo)  # leases renewed past one lease_ttl
        assert osaka.owned("db1")
        assert osaka.statistics().up
        assert store.key("owner", "db1") in (await store.view()).foreign
        with pytest.raises(Refusal) as refused:
            await tokyo.take_over("db1", WAIT)
        assert refused.value.code == "owner_taken"
        assert "did not write" in refused.value.reason
        for kill in kills:
            kill.cancel()
    assert demotes(osaka) == []


async def test_start_claims_slower_than_a_renewal_period_do_not_hold_the_renewals_back(
    clock: FakeClock, store: MemoryStore, tmp_path: Path
) -> None:
    """600 pairs whose start claims take 0.1 s each (one by one: the memory store has no
    batches) need ~15 s, a whole lease_ttl.  The renewals go on beside them (they waited
    for the claims once, and at 10,000 pairs a site gave up its lease and demoted
    everything during its own start): every pair is claimed, nothing is demoted, and the
    lease was renewed every renew_every meanwhile."""
    pairs = tuple(f"p{n:03d}" for n in range(600))
    keeper = make(store, clock, tmp_path, pairs=pairs)
    store.delay = 0.1
    async with anyio.create_task_group() as tg:
        kill = await start(tg, keeper)
        began = clock.monotonic()
        while len(keeper.statistics().owned) < len(pairs):
            await run_for(clock, 1, keeper)
            assert clock.monotonic() - began < 60, len(keeper.statistics().owned)
        took = clock.monotonic() - began
        assert took >= TIMING.lease_ttl, took  # (the case: claims outlast a lease)
        assert store.calls["keepalive"] >= took // TIMING.renew_every - 1, store.calls
        assert keeper.lease_clock.valid()
        kill.cancel()
    assert demotes(keeper) == []
