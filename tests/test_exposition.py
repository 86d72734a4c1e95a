"""The fast /metrics renderer says exactly what the prometheus-client collector says."""

from __future__ import annotations

import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hbmon.clock import FakeClock
from hbmon.config import Timing
from hbmon.exposition import Renderer
from hbmon.failover import GuardStatistics
from hbmon.metrics import Components, make_registry, site_registry
from hbmon.netbeat import NetStatistics
from hbmon.poller import PollerStatistics
from hbmon.record import Record
from hbmon.status import Histogram, StatusTable

TIMING = Timing(interval=1.0, miss_threshold=3, recover_beats=2)


def busy_table() -> StatusTable:
    clock = FakeClock()
    table = StatusTable(clock, site="tokyo")
    ids = ["db1", "web-2", 'odd"name\\x', "net-only", "vol-only", "dead", "broken"]
    methods = ["both", "both", "both", "network", "volume", "both", "volume"]
    for pair, method in zip(ids, methods, strict=True):
        table.add_pair(pair, method, TIMING)
    for serial in (1, 2):
        for pair in ids:
            for row in table.pairs[pair].rows.values():
                rec = Record(pair, 5, serial, clock.wall() + 2.5, 0.5 if pair == "web-2" else 1.0)
                row.observe_record(rec, clock.monotonic(), clock.wall())
                row.observe_latency(0.001)
        clock.advance(0.5)
    clock.advance(4)  # "dead" and everything else goes quiet...
    for pair in ids[:5]:  # ...but these keep beating
        for row in table.pairs[pair].rows.values():
            row.observe_record(Record(pair, 5, 3, clock.wall(), 1.0), clock.monotonic(), 0.0)
    broken = table.row("broken", "volume")
    assert broken is not None
    broken.observe_problem("invalid", "checksum_mismatch", "bad crc", clock.monotonic())
    broken.observe_problem("invalid", "identity_mismatch", "db9", clock.monotonic())
    table.evaluate()
    return table


def busy_components() -> Components:
    """What a poller, a listener and a guard that have been at work would tell."""
    reads, ticks = Histogram(), Histogram()
    reads.observe(0.002)
    ticks.observe(0.004)
    polls = PollerStatistics("io_uring", reads.snapshot(), ticks.snapshot(), 0.004, 0.004, 2)
    return Components(
        poller=lambda: polls,
        listener=lambda: NetStatistics({"replay": 3}, dropped=7),
        guard=lambda: GuardStatistics({("dead", "refused"): 1}),
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("process_"):
                continue  # the process metrics move between the two renderings
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_fast_rendering_equals_the_reference_collector() -> None:
    table = busy_table()
    renderer = Renderer(table, site_registry(table, busy_components()))
    fast = renderer.render(renderer.inputs()).decode()
    reference = generate_latest(make_registry(table, busy_components())).decode()
    got, want = samples(fast), samples(reference)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert ("hbmon_pair_verdict", (("pair", "dead"), ("verdict", "host_down"))) in got
    assert got[("hbmon_pair_verdict", (("pair", "dead"), ("verdict", "host_down")))] == 1.0
    # the site-wide families come from the components' statistics
    assert got[("hbmon_network_rejected_total", (("reason", "replay"),))] == 3
    assert got[("hbmon_network_receive_dropped_total", ())] == 7
    assert got[("hbmon_failover_total", (("pair", "dead"), ("result", "refused")))] == 1
    assert got[("hbmon_volume_read_duration_seconds_count", ())] == 1
    assert got[("hbmon_poll_tick_lag_seconds_sum", ())] == pytest.approx(0.004)
    assert got[("hbmon_workers_stuck", ())] == 2
    # web-2 beat at 1.0 last: no interval mismatch
    assert (
        "hbmon_timing_warning",
        (("pair", "web-2"), ("path", "network"), ("warning", "interval_mismatch")),
    ) not in got
    helps = [line for line in fast.splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(set(helps))


def test_rendering_forgets_removed_pairs() -> None:
    table = busy_table()
    renderer = Renderer(table, site_registry(table))
    renderer.render(renderer.inputs())
    for pair in list(table.pairs):
        table.remove_pair(pair)
    text = renderer.render(renderer.inputs()).decode()
    assert "db1" not in text
    assert renderer.inputs() == []


@pytest.mark.tools
def test_promtool_accepts_the_fast_rendering(promtool: str) -> None:
    table = busy_table()
    renderer = Renderer(table, site_registry(table))
    body = renderer.render(renderer.inputs())
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == b""


def test_pairs_added_and_removed_between_scrapes_are_rendered() -> None:
    """The renderer keeps its list of rows between scrapes; adding or removing a pair (or
    changing its method, hence its paths) shows on the next scrape."""
    table = busy_table()
    renderer = Renderer(table, site_registry(table))

    def pairs_in(body: bytes) -> set[str]:
        return {
            s.labels["pair"]
            for family in text_string_to_metric_families(body.decode())
            if family.name == "hbmon_pair_verdict"
            for s in family.samples
        }

    before = pairs_in(renderer.render(renderer.inputs()))
    assert "late-comer" not in before
    table.add_pair("late-comer", "volume", Timing(), volume="/v/late")
    assert pairs_in(renderer.render(renderer.inputs())) == before | {"late-comer"}
    gone = sorted(before)[0]
    table.remove_pair(gone)
    assert pairs_in(renderer.render(renderer.inputs())) == (before | {"late-comer"}) - {gone}
    table.add_pair("late-comer", "both", Timing(), volume="/v/late")  # a second path
    body = renderer.render(renderer.inputs()).decode()
    assert 'hbmon_heartbeat_up{pair="late-comer",path="network"}' in body
