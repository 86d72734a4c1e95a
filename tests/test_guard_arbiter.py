"""The guard's arbiter step: answered at once, the vote and the command in the background.

The arbiter here is a scripted candidate (the keeper on real etcd is tested in
tests/test_keeper.py and tests/test_arbiter_partitions.py); what is tested is what the
guard does with its answers: the fencing token journaled before the command and handed to
it, each refusal journaled with its code and counted, a repeated notification refused as
``running`` while the vote is pending, and nothing run twice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from hbmon.arbiter.base import Refusal, RefusalCode
from hbmon.clock import FakeClock
from hbmon.config import Timing
from hbmon.failover import FailoverGuard, Journal
from hbmon.record import Record
from hbmon.status import StatusTable

TIMING = Timing(interval=1.0, miss_threshold=3, recover_beats=2)
ENV_DUMP = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'a')); print()"


class Scripted:
    """A candidate that answers what the test says, when the test says."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, float]] = []
        self.answer = anyio.Event()
        self.token: int | None = 7
        self.refusal: tuple[RefusalCode, str] | None = None

    async def take_over(self, pair: str, wait: float) -> int:
        self.asked.append((pair, wait))
        await self.answer.wait()
        if self.refusal is not None:
            raise Refusal(*self.refusal)
        assert self.token is not None
        return self.token


def silent_table(clock: FakeClock, dump: Path, owner: str) -> StatusTable:
    table = StatusTable(clock, site="tokyo")
    table.set_owner_source(lambda pair: owner)  # type: ignore[arg-type, return-value]
    command = (sys.executable, "-c", ENV_DUMP.replace("sys.argv[1]", repr(str(dump))))
    table.add_pair("db1", "both", TIMING, failover=command)
    for row in table.pairs["db1"].rows.values():
        for serial in (1, 2):
            row.observe_record(Record("db1", 9, serial, clock.wall(), 1.0), clock.monotonic(), 0)
    clock.advance(5)  # every path stale
    return table


def entries(tmp_path: Path) -> list[dict[str, Any]]:
    return Journal(tmp_path / "failover.jsonl").entries()


@pytest.mark.parametrize(("owner", "verdict"), [("gone", "host_down"), ("alive", "isolated")])
async def test_the_vote_runs_in_the_background_and_the_token_reaches_the_command(
    tmp_path: Path, owner: str, verdict: str
) -> None:
    clock = FakeClock()
    dump = tmp_path / "env.json"
    table = silent_table(clock, dump, owner)
    assert table.pairs["db1"].judge(clock.monotonic()) == verdict
    arbiter = Scripted()
    guard = FailoverGuard(
        table, clock, Journal(tmp_path / "failover.jsonl"), arbiter=arbiter, arbiter_wait=17.0
    )
    async with anyio.create_task_group() as tg:
        decision = await guard.on_alert("db1", tg)
        assert decision.act  # answered at once, before the arbiter said anything
        assert decision.code == verdict
        await anyio.wait_all_tasks_blocked()
        assert arbiter.asked == [("db1", 17.0)]
        assert entries(tmp_path) == []  # nothing started before the vote
        again = await guard.on_alert("db1", tg)  # Alertmanager repeats itself meanwhile
        assert again.code == "running"
        arbiter.answer.set()
    started = [e for e in entries(tmp_path) if e["event"] == "started"]
    assert len(started) == 1
    assert started[0]["token"] == 7
    assert "the arbiter granted term 7" in started[0]["reason"]
    env = json.loads(dump.read_text())  # ran exactly once: one JSON document
    assert env["HBMON_FENCING_TOKEN"] == "7"
    assert [e["event"] for e in entries(tmp_path)] == ["refused", "started", "executed"]
    assert entries(tmp_path)[-1]["token"] == 7
    assert guard.statistics().decisions == {("db1", "refused"): 1, ("db1", "executed"): 1}
    assert guard.decide("db1").code == "hold_down"


@pytest.mark.parametrize("code", ["owner_alive", "no_quorum", "owner_taken"])
async def test_an_arbiter_refusal_is_journaled_with_its_code_and_runs_nothing(
    tmp_path: Path, code: RefusalCode
) -> None:
    clock = FakeClock()
    dump = tmp_path / "env.json"
    table = silent_table(clock, dump, "alive")
    arbiter = Scripted()
    arbiter.refusal = (code, f"because {code}")
    guard = FailoverGuard(table, clock, Journal(tmp_path / "failover.jsonl"), arbiter=arbiter)
    arbiter.answer.set()
    async with anyio.create_task_group() as tg:
        await guard.on_alert("db1", tg)
    (entry,) = entries(tmp_path)
    assert entry["event"] == "refused"
    assert entry["code"] == code
    assert entry["reason"] == f"because {code}"
    assert not dump.exists()
    assert guard.statistics().decisions == {("db1", "refused"): 1}
    assert guard.decide("db1").act  # no hold-down: nothing started
    assert "db1" not in guard.running


async def test_without_an_arbiter_host_down_is_refused_unless_the_pair_opts_in(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    table = silent_table(clock, tmp_path / "env.json", "gone")
    table.set_owner_source(None)
    guard = FailoverGuard(table, clock, Journal(tmp_path / "failover.jsonl"))
    refused = guard.decide("db1")
    assert refused.code == "no_arbiter"
    assert "failover_without_arbiter = true" in refused.reason
    table.pairs["db1"].failover_without_arbiter = True
    assert guard.decide("db1").code == "host_down"


def test_isolated_needs_an_arbiter_to_act(tmp_path: Path) -> None:
    """A table that says isolated (the owner's lease alive) with no arbiter to wait on."""
    clock = FakeClock()
    table = silent_table(clock, tmp_path / "env.json", "alive")
    guard = FailoverGuard(table, clock, Journal(tmp_path / "failover.jsonl"))
    assert guard.decide("db1").code == "table_disagrees"


@pytest.mark.parametrize(
    ("owner", "verdict"), [("gone", "host_down"), ("alive", "isolated"), ("unknown", "isolated")]
)
def test_every_path_stale_is_host_down_only_once_the_owner_is_gone(
    tmp_path: Path, owner: str, verdict: str
) -> None:
    clock = FakeClock()
    table = silent_table(clock, tmp_path / "env.json", owner)
    assert table.pairs["db1"].judge(clock.monotonic()) == verdict
