"""The failover guard and the Alertmanager webhook, on a fake clock and a real HTTP server."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from hbmon.clock import FakeClock
from hbmon.config import Timing
from hbmon.failover import FailoverGuard, Journal
from hbmon.record import Record
from hbmon.status import StatusTable
from hbmon.webhook import Webhook

TIMING = Timing(interval=1.0, miss_threshold=3, recover_beats=2)
TOKEN = b"t" * 32


def make_table(clock: FakeClock, marker: Path, **pairs: str) -> StatusTable:
    """Pairs beat once, then go quiet; ``marker`` collects the failover commands' runs."""
    table = StatusTable(clock, site="tokyo")
    for pair, method in pairs.items():
        command = (sys.executable, "-c", f"open({str(marker)!r}, 'a').write('{pair}\\n')")
        table.add_pair(pair, method, TIMING, failover=command, failover_without_arbiter=True)
        for row in table.pairs[pair].rows.values():
            row.observe_record(Record(pair, 9, 1, clock.wall(), 1.0), clock.monotonic(), 0.0)
            row.observe_record(Record(pair, 9, 2, clock.wall(), 1.0), clock.monotonic(), 0.0)
    return table


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "ran.txt"


def guard_for(table: StatusTable, tmp_path: Path, **kw: Any) -> FailoverGuard:
    return FailoverGuard(table, table.clock, Journal(tmp_path / "failover.jsonl"), **kw)


def journal(tmp_path: Path) -> list[dict[str, Any]]:
    return Journal(tmp_path / "failover.jsonl").entries()


def test_refuses_while_the_table_disagrees(clock: FakeClock, tmp_path: Path, marker: Path) -> None:
    table = make_table(clock, marker, db1="both")
    guard = guard_for(table, tmp_path)
    decision = guard.decide("db1")
    assert not decision.act
    assert "disagrees: verdict alive" in decision.reason
    clock.advance(5)
    assert guard.decide("db1").act
    assert "unknown" not in guard.decide("nope").reason
    assert "not watched" in guard.decide("nope").reason


def test_a_partition_is_never_failed_over(clock: FakeClock, tmp_path: Path, marker: Path) -> None:
    table = make_table(clock, marker, db1="both")
    vol = table.row("db1", "volume")
    assert vol is not None
    for serial in range(3, 10):  # the volume keeps beating, the network is silent
        clock.advance(1)
        vol.observe_record(Record("db1", 9, serial, clock.wall(), 1.0), clock.monotonic(), 0.0)
    decision = guard_for(table, tmp_path).decide("db1")
    assert not decision.act
    assert "network_partition" in decision.reason


def test_one_path_needs_an_explicit_opt_in(clock: FakeClock, tmp_path: Path, marker: Path) -> None:
    table = make_table(clock, marker, db1="volume")
    clock.advance(5)
    guard = guard_for(table, tmp_path)
    decision = guard.decide("db1")
    assert not decision.act
    assert "failover_single_path" in decision.reason
    table.pairs["db1"].failover_single_path = True
    assert guard.decide("db1").act


def test_no_command_configured(clock: FakeClock, tmp_path: Path) -> None:
    table = StatusTable(clock)
    table.add_pair("db1", "both", TIMING)
    assert "no failover command" in guard_for(table, tmp_path).decide("db1").reason


async def test_executes_once_and_journals_before_and_after(
    clock: FakeClock, tmp_path: Path, marker: Path
) -> None:
    table = make_table(clock, marker, db1="both")
    clock.advance(5)
    guard = guard_for(table, tmp_path)
    async with anyio.create_task_group() as tg:
        first = await guard.on_alert("db1", tg)
        again = await guard.on_alert("db1", tg)  # a repeated notification, while running
        assert first.act
        assert not again.act
        assert "already running" in again.reason
    assert marker.read_text() == "db1\n"
    events = [e["event"] for e in journal(tmp_path)]
    assert events == ["started", "refused", "executed"]
    assert guard.statistics().decisions == {("db1", "executed"): 1, ("db1", "refused"): 1}
    async with anyio.create_task_group() as tg:  # within the hold-down
        late = await guard.on_alert("db1", tg)
    assert "hold-down" in late.reason
    assert marker.read_text() == "db1\n"


async def test_hold_down_survives_a_restart(clock: FakeClock, tmp_path: Path, marker: Path) -> None:
    table = make_table(clock, marker, db1="both")
    clock.advance(5)
    async with anyio.create_task_group() as tg:
        await guard_for(table, tmp_path, hold_down=600).on_alert("db1", tg)
    restarted = guard_for(table, tmp_path, hold_down=600)
    assert "hold-down" in restarted.decide("db1").reason
    clock.advance(601)
    assert restarted.decide("db1").act


@pytest.mark.parametrize(
    ("command", "result"),
    [
        (("false",), "failed"),
        (("/nonexistent/promote",), "failed"),
        (("sh", "-c", "sleep 30 & sleep 30"), "timed_out"),
    ],
)
async def test_failed_and_timed_out_commands_are_journaled(
    clock: FakeClock, tmp_path: Path, marker: Path, command: tuple[str, ...], result: str
) -> None:
    table = make_table(clock, marker, db1="both")
    table.pairs["db1"].failover = command
    clock.advance(5)
    guard = guard_for(table, tmp_path, timeout=0.5)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await guard.on_alert("db1", tg)
    last = journal(tmp_path)[-1]
    assert last["event"] == result
    assert guard.statistics().decisions == {("db1", result): 1}
    assert "db1" not in guard.running


# -- the webhook ----------------------------------------------------------------------


def notification(*alerts: tuple[str, str, str]) -> dict[str, Any]:
    return {
        "version": "4",
        "status": "firing",
        "receiver": "hbmon-failover",
        "groupLabels": {},
        "alerts": [
            {"status": status, "labels": {"alertname": name, "pair": pair}}
            for name, pair, status in alerts
        ],
    }


async def with_client(guard: FailoverGuard, body: Any) -> Any:
    async with anyio.create_task_group() as tg:
        hook = Webhook(guard, TOKEN, lambda: tg)
        app = web.Application(client_max_size=1 << 20)
        app.router.add_routes(hook.routes())
        async with TestClient(TestServer(app)) as client:
            result = await body(client)
    return result


async def test_webhook_authentication_and_validation(
    clock: FakeClock, tmp_path: Path, marker: Path
) -> None:
    table = make_table(clock, marker, db1="both")
    clock.advance(5)  # db1 host_down: a request that reached the guard would fail it over
    guard = guard_for(table, tmp_path)
    good = {"Authorization": "Bearer " + TOKEN.decode()}
    db1_down = {"status": "firing", "labels": {"alertname": "HbmonHostDown", "pair": "db1"}}
    odd = {"status": "odd", "labels": {}}
    valid = json.dumps(notification(("HbmonHostDown", "db1", "firing")))
    padded = b'{"version": "4", "alerts": [%s%s]}' % (
        json.dumps(db1_down).encode(),
        b" " * (1 << 20),
    )

    async def calls(client: TestClient[Any, Any]) -> list[tuple[int, str]]:
        out = []
        for headers, data in [
            ({}, valid),
            ({"Authorization": "Bearer wrong"}, valid),
            ({"Authorization": "Basic " + TOKEN.decode()}, valid),
            (good, "not json"),
            (good, json.dumps({"version": "3", "alerts": [db1_down]})),
            (good, json.dumps({"version": "4", "alerts": [db1_down, {"status": "firing"}]})),
            (good, json.dumps({"version": "4", "alerts": [db1_down, odd]})),
            (good, io.BytesIO(padded)),
        ]:
            resp = await client.post("/api/v1/alerts", data=data, headers=headers)
            out.append((resp.status, await resp.text()))
        return out

    results = await with_client(guard, calls)
    assert [status for status, _ in results] == [401, 403, 403, 400, 400, 400, 400, 413]
    assert "bearer token required" in results[0][1]
    assert "not JSON" in results[3][1]
    assert "speaks" in results[4][1]
    assert "must be an object with a 'labels' object" in results[5][1]
    assert "not firing or resolved" in results[6][1]
    assert not marker.exists()
    assert journal(tmp_path) == []  # nothing reached the guard

    async def accepted(client: TestClient[Any, Any]) -> Any:
        resp = await client.post("/api/v1/alerts", data=valid, headers=good)
        assert resp.status == 200
        return await resp.json()

    # the same notification, authenticated and whole, does fail db1 over
    answer = await with_client(guard, accepted)
    assert answer["decisions"][0]["action"] == "failover", answer
    assert marker.read_text() == "db1\n"


async def test_webhook_acts_only_on_firing_host_down(
    clock: FakeClock, tmp_path: Path, marker: Path
) -> None:
    table = make_table(clock, marker, db1="both", db2="both")
    clock.advance(5)
    guard = guard_for(table, tmp_path)
    good = {"Authorization": "Bearer " + TOKEN.decode()}
    body = notification(
        ("HbmonHostDown", "db1", "firing"),
        ("HbmonHostDown", "db2", "resolved"),
        ("HbmonNetworkPartition", "db2", "firing"),
    )

    async def post_twice(client: TestClient[Any, Any]) -> list[Any]:
        out = []
        for _ in range(2):
            resp = await client.post("/api/v1/alerts", json=body, headers=good)
            assert resp.status == 200
            out.append(await resp.json())
        return out

    first, second = await with_client(guard, post_twice)
    actions = [(d.get("pair"), d["action"]) for d in first["decisions"]]
    assert actions == [("db1", "failover"), ("db2", "ignored"), ("db2", "ignored")]
    assert second["decisions"][0]["action"] == "none"  # repeated: idempotent
    assert marker.read_text() == "db1\n"
