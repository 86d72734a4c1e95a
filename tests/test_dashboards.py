"""The Grafana dashboards (dashboards/*.json) against a real Prometheus (issue 6).

A real ``hbmon demo`` (6 pairs, 250 ms interval, its etcd arbiter on) runs with faults
injected through the real ``hbmon lab`` CLI: the host of osaka-01 is killed, the SVOL record
of tokyo-02 is corrupted, the remote copy and the network beats of osaka-03 are cut while
its writer and osaka's lease live on (isolated: a cut, not a death), and
Alertmanager-style notifications make tokyo fail osaka-01 over (executed, a new term) and
osaka refuse to fail tokyo-02 over (it is degraded, not down).  The real Prometheus
binary scrapes both sites every second.  Then every target of every panel of both
dashboards is sent to Prometheus' query API, with the dashboard variables filled in as
Grafana would (``$pair`` with each faulted pair, ``$__rate_interval`` with 5s): the query
must parse, return data, and show the faults where the panel says it should.

The panels are read from the JSON files, so a new panel is checked as soon as it is
added: it fails until it returns data and has an entry in ``EXPECT`` saying what the
faults look like in it.

Demo layout: osaka serves HTTP on PORT, tokyo on PORT+1; osaka-NN pairs are beaten by
osaka and watched by tokyo, tokyo-NN pairs the other way round.  The arbiter panels are
checked against what the sites' own /metrics said (``ARBITER``): the terms before the
faults, the demotes after them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from conftest import need
from helpers import free_port, free_port_pair, http_get, parse_metrics

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "dashboards"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
OUTPUT = REPO / "test-output"
PROMETHEUS = "/usr/bin/prometheus"

PAIRS = 6
INTERVAL = 0.25
KILLED = "osaka-01"  # kill-host: every path of it goes stale -> host_down
CORRUPTED = "tokyo-02"  # corrupt: its volume path is invalid (checksum) -> degraded
ISOLATED = "osaka-03"  # cut-link + partition: every path stale, its owner alive -> isolated
FAULTED = (KILLED, CORRUPTED, ISOLATED)
ALL_PAIRS = {f"osaka-{i:02d}" for i in range(1, 4)} | {f"tokyo-{i:02d}" for i in range(1, 4)}
FAULT_SOAK = 8.0  # seconds of scrapes after the faults, before the queries
LAST_FAULT_SOAK = 6.0  # and at least this long after the last fault (the CLI is slow on a
# loaded machine: the last fault can come several seconds after the first)
BASELINE = 4.0  # seconds of healthy scrapes before the faults
STALE_AFTER = 3 * INTERVAL  # miss_threshold x interval
#: Grafana's variables as the test fills them in ($pair is set per run).
GRAFANA_VARS = {"$__rate_interval": "5s", "$__interval": "1s", "$__range": "1m"}
#: The per-pair dashboard is checked for each faulted pair; these panels may be empty
#: for a pair (no data is their way of saying "nothing wrong").
MAY_BE_EMPTY = {
    ("hbmon-pair", "Volume read errors by reason", "A", KILLED),
    ("hbmon-pair", "Volume read errors by reason", "A", ISOLATED),
    ("hbmon-fleet", "Demotes", "A", None),
    *(("hbmon-pair", "Demotes", "A", pair) for pair in FAULTED),
}
#: One panel is drawn (from a range query) for the README: dashboard, title, $pair.
PICTURE = ("hbmon-pair", "Heartbeat age per path", CORRUPTED)


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    return doc


def dashboards() -> dict[str, dict[str, Any]]:
    docs = [load(p.name) for p in sorted(DASHBOARDS.glob("*.json"))]
    return {d["uid"]: d for d in docs}


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])


@dataclass(frozen=True)
class Query:
    dashboard: str  # uid
    panel: str  # title
    ref: str  # refId of the target
    expr: str  # as written in the dashboard
    pair: str | None  # what $pair stands for, if the dashboard has that variable

    @property
    def id(self) -> str:
        where = f"{self.dashboard}[{self.pair}]" if self.pair else self.dashboard
        return f"{where}/{self.panel}/{self.ref}"

    def promql(self) -> str:
        expr = self.expr
        for name, value in GRAFANA_VARS.items():
            expr = expr.replace(name, value)
        if self.pair is not None:
            expr = expr.replace("${pair}", self.pair).replace("$pair", self.pair)
        assert "$" not in expr, f"{self.id}: a variable is left in {expr!r}"
        return expr


def queries() -> list[Query]:
    out = []
    for uid, doc in dashboards().items():
        variables = {v["name"] for v in doc["templating"]["list"]}
        for panel in panels(doc):
            for t in panel.get("targets", []):
                runs: list[str | None] = [*FAULTED] if "pair" in variables else [None]
                for pair in runs:
                    out.append(Query(uid, panel["title"], t["refId"], t["expr"], pair))
    return out


QUERIES = queries()


# -- the dashboards as files --------------------------------------------------------------------


def test_dashboards_are_well_formed() -> None:
    docs = dashboards()
    assert set(docs) == {"hbmon-fleet", "hbmon-pair"}
    for uid, doc in docs.items():
        assert doc["title"], uid
        assert doc["schemaVersion"] >= 36, uid
        assert doc["id"] is None, f"{uid}: provisioned dashboards carry no database id"
        variables = {v["name"]: v for v in doc["templating"]["list"]}
        ds = variables["datasource"]
        assert ds["type"] == "datasource", uid
        assert ds["query"] == "prometheus", uid
        ids = [p["id"] for p in panels(doc)]
        assert len(ids) == len(set(ids)), f"{uid}: panel ids repeat"
        titles = [p["title"] for p in panels(doc)]
        assert len(titles) == len(set(titles)), f"{uid}: panel titles repeat"
        cells: set[tuple[int, int]] = set()
        for p in panels(doc):
            g = p["gridPos"]
            assert 0 <= g["x"] < g["x"] + g["w"] <= 24, (uid, p["title"])
            assert g["y"] >= 0, (uid, p["title"])
            assert g["h"] > 0, (uid, p["title"])
            xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
            mine = {(x, y) for x in xs for y in ys}
            assert not cells & mine, f"{uid}: panel {p['title']!r} overlaps another"
            cells |= mine
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p.get("description"), f"{uid}: panel {p['title']!r} has no description"
            refs = [t["refId"] for t in p["targets"]]
            assert refs, (uid, p["title"])
            assert len(refs) == len(set(refs)), (uid, p["title"])
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"], (uid, p["title"])
                assert t["expr"].strip(), (uid, p["title"])
    pair = {v["name"]: v for v in docs["hbmon-pair"]["templating"]["list"]}["pair"]
    assert pair["type"] == "query"
    assert pair["query"] == "label_values(hbmon_heartbeat_up, pair)"
    assert pair["datasource"]["uid"] == "${datasource}"


def test_every_panel_has_an_expectation() -> None:
    """A panel must say what the faults look like in it; an expectation must name a panel."""
    keys = {(q.dashboard, q.panel, q.ref) for q in QUERIES}
    missing = sorted(keys - set(EXPECT))
    assert not missing, f"add to EXPECT what these panels show under the faults: {missing}"
    stale = sorted(set(EXPECT) - keys)
    assert not stale, f"EXPECT names panels that no dashboard has: {stale}"


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    dashboards_yml = (PROVISIONING / "dashboards" / "hbmon.yml").read_text()
    assert re.search(r"^apiVersion: 1$", dashboards_yml, re.MULTILINE)
    assert re.search(r"^\s+type: file$", dashboards_yml, re.MULTILINE)
    path = re.search(r"^\s+path: (\S+)$", dashboards_yml, re.MULTILINE)
    assert path is not None, "the file provider needs a path"
    assert path.group(1).startswith("/"), "the file provider needs an absolute path"
    datasources_yml = (PROVISIONING / "datasources" / "prometheus.yml").read_text()
    assert re.search(r"^\s+type: prometheus$", datasources_yml, re.MULTILINE)
    assert re.search(r"^\s+url: http", datasources_yml, re.MULTILINE)
    for text in (dashboards_yml, datasources_yml):
        assert "\t" not in text, "YAML must be indented with spaces"


# -- processes ----------------------------------------------------------------------------------


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def alive(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path} ---\n" + "\n".join(text)


@dataclass
class Arbiter:
    """What the sites' own /metrics said of ownership (filled in by the ``lab`` fixture)."""

    instances: dict[str, str] = field(default_factory=dict)  # site -> scrape instance
    terms_before: dict[str, float] = field(default_factory=dict)  # pair -> term, pre-faults
    demotes: dict[tuple[str, str, str], float] = field(default_factory=dict)  # non-zero


#: The arbiter panels are checked against this; the ``lab`` fixture fills it in.
ARBITER = Arbiter()


def exported(urls: dict[str, str], name: str) -> list[tuple[str, dict[str, str], float]]:
    """``(site, labels, value)`` of every sample of ``name`` the sites export now."""
    return [
        (site, labels, value)
        for site, url in urls.items()
        for sample, labels, value in parse_metrics(http_get(url + "/metrics")[1])
        if sample == name
    ]


@dataclass
class Lab:
    """The running demo and the Prometheus that scrapes it, faults injected."""

    osaka: str
    tokyo: str
    prometheus: str
    tmp: Path
    decisions: dict[str, Any]

    def query(self, promql: str) -> dict[str, Any]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            doc: dict[str, Any] = get_json(url)
        except urllib.error.HTTPError as err:
            doc = json.load(err)
        return doc

    def query_range(self, promql: str, seconds: float, step: float) -> list[dict[str, Any]]:
        end = time.time()
        params = {"query": promql, "start": end - seconds, "end": end, "step": step}
        doc = get_json(f"{self.prometheus}/api/v1/query_range?" + urllib.parse.urlencode(params))
        assert doc["status"] == "success", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result


def hbmon_cli(*args: str, env: dict[str, str]) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "hbmon.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert res.returncode == 0, f"hbmon {' '.join(args)}: {res.returncode}\n{res.stderr}"
    return res.stdout


def alert(url: str, token: str, pair: str) -> Any:
    """An Alertmanager (v4) notification of a firing HbmonHostDown for ``pair``."""
    body = {
        "version": "4",
        "status": "firing",
        "receiver": "hbmon",
        "groupKey": f"{{}}:{{pair={pair!r}}}",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "HbmonHostDown", "pair": pair},
                "annotations": {},
                "startsAt": "2026-01-01T00:00:00Z",
            }
        ],
    }
    request = urllib.request.Request(
        url + "/api/v1/alerts",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    need(os.access(PROMETHEUS, os.X_OK), f"{PROMETHEUS} not found (Debian package: prometheus)")
    need(shutil.which("etcd") is not None, "etcd not found (Debian package: etcd-server)")
    tmp = tmp_path_factory.mktemp("dashboards")
    (tmp / "tmpdir").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp / "tmpdir")}
    env.pop("HBMON_URL", None)
    token = tmp / "webhook.token"
    token.write_text("dashboards-test-token\n")
    token.chmod(0o600)
    port = free_port_pair()
    osaka, tokyo = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
    demo_log = tmp / "demo.log"
    with demo_log.open("wb") as log:
        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hbmon.cli",
                "demo",
                f"--pairs={PAIRS}",
                f"--interval={INTERVAL * 1000:.0f}ms",
                f"--listen=127.0.0.1:{port}",
                f"--webhook-token-file={token}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=tmp,
            start_new_session=True,
        )
    prom_port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "hbmon",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]}],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    prom_log = tmp / "prometheus.log"
    with prom_log.open("wb") as log:
        prom = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=tmp,
            start_new_session=True,
        )
    running = Lab(osaka, tokyo, f"http://127.0.0.1:{prom_port}", tmp, {})
    try:
        deadline = time.monotonic() + 30
        while not (
            alive(osaka + "/healthz")
            and alive(tokyo + "/healthz")
            and alive(running.prometheus + "/-/ready")
        ):
            if demo.poll() is not None or prom.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"demo or prometheus did not start\n{tail(demo_log)}\n{tail(prom_log)}")
            time.sleep(0.1)

        def healthy() -> bool:
            up = running.query('up{job="hbmon"} == 1')["data"]["result"]
            fine = running.query('hbmon_pair_verdict{verdict="alive"} == 1')["data"]["result"]
            arbiter = running.query("hbmon_arbiter_up == 1")["data"]["result"]
            owned = running.query("hbmon_pair_owned == 1")["data"]["result"]
            return len(up) == 2 and len(fine) == PAIRS and len(arbiter) == 2 and len(owned) == PAIRS

        deadline = time.monotonic() + 20
        while not healthy():
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus never saw a healthy demo\n{tail(prom_log)}")
            time.sleep(0.2)
        time.sleep(BASELINE)
        sites = {"osaka": osaka, "tokyo": tokyo}
        ARBITER.instances.update(osaka=f"127.0.0.1:{port}", tokyo=f"127.0.0.1:{port + 1}")
        for _, labels, term in exported(sites, "hbmon_pair_owner_term"):
            pair = labels["pair"]
            ARBITER.terms_before[pair] = max(term, ARBITER.terms_before.get(pair, 0.0))

        hbmon_cli("lab", "kill-host", KILLED, "--url", osaka, env=env)
        faulted = time.monotonic()
        time.sleep(1.0)  # so that osaka-01's heartbeats are the oldest of all
        hbmon_cli("lab", "corrupt", CORRUPTED, "--url", osaka, env=env)
        time.sleep(1.0)  # and tokyo-02's volume path the next oldest
        hbmon_cli("lab", "cut-link", ISOLATED, "--url", osaka, env=env)
        hbmon_cli("lab", "partition", ISOLATED, "--url", osaka, env=env)
        last_fault = time.monotonic()
        deadline = time.monotonic() + 10
        while True:
            rows = get_json(tokyo + "/status.json")["rows"]
            killed = {r["verdict"] for r in rows if r["pair"] == KILLED}
            isolated = {r["verdict"] for r in rows if r["pair"] == ISOLATED}
            if killed == {"host_down"} and isolated == {"isolated"}:
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{KILLED} never host_down or {ISOLATED} never isolated on tokyo (a killed "
                    "host must take its hold on the pair at the arbiter with it; a cut-off "
                    f"one keeps it): {rows}"
                )
            time.sleep(0.05)
        secret = token.read_text().strip()
        running.decisions[KILLED] = alert(tokyo, secret, KILLED)
        running.decisions[CORRUPTED] = alert(osaka, secret, CORRUPTED)
        soaked = max(faulted + FAULT_SOAK, last_fault + LAST_FAULT_SOAK)
        time.sleep(max(0.0, soaked - time.monotonic()))
        for site, labels, count in exported(sites, "hbmon_demote_total"):
            if count:
                key = (ARBITER.instances[site], labels["pair"], labels["result"])
                ARBITER.demotes[key] = count
        yield running
    finally:
        stop(prom)
        stop(demo)


# -- the panels against Prometheus ---------------------------------------------------------------

Result = list[dict[str, Any]]
Check = Callable[[Result, str | None], None]


def values(result: Result, *labels: str) -> dict[Any, float]:
    """``{label value (or tuple of them): sample value}`` of an instant vector."""
    out: dict[Any, float] = {}
    for series in result:
        key = tuple(series["metric"].get(name, "") for name in labels)
        assert key not in out, f"two series for {key}: {result}"
        out[key[0] if len(key) == 1 else key] = float(series["value"][1])
    return out


def by_value(result: Result, *labels: str) -> list[Any]:
    """Label values of the series, highest value first (how the panel sorts them)."""
    ranked = sorted(result, key=lambda s: -float(s["value"][1]))
    return [tuple(s["metric"].get(n, "") for n in labels) for s in ranked]


def expect_verdicts(result: Result, pair: str | None) -> None:
    assert values(result, "verdict") == {
        "host_down": 1,
        "degraded": 1,
        "isolated": 1,
        "alive": PAIRS - 3,
    }


def expect_host_down(result: Result, pair: str | None) -> None:
    assert values(result, "pair") == {KILLED: 1}


def expect_not_alive(result: Result, pair: str | None) -> None:
    assert values(result, "pair", "verdict") == {
        (KILLED, "host_down"): 1,
        (CORRUPTED, "degraded"): 1,
        (ISOLATED, "isolated"): 1,
    }


def expect_paths_not_fresh(result: Result, pair: str | None) -> None:
    assert values(result, "pair", "path", "state") == {
        (KILLED, "volume", "stale"): 1,
        (KILLED, "network", "stale"): 1,
        (CORRUPTED, "volume", "invalid"): 1,
        (ISOLATED, "volume", "stale"): 1,
        (ISOLATED, "network", "stale"): 1,
    }


def expect_oldest(result: Result, pair: str | None) -> None:
    ranked = by_value(result, "pair", "path")
    assert len(ranked) == 10
    assert ranked[0][0] == KILLED, f"the oldest heartbeat should be {KILLED}'s: {ranked}"
    assert set(ranked[:3]) == {(KILLED, "volume"), (KILLED, "network"), (CORRUPTED, "volume")}


def expect_no_stuck_workers(result: Result, pair: str | None) -> None:
    got = values(result, "instance")
    assert len(got) == 2, got  # both sites
    assert set(got.values()) == {0.0}, got  # no hung volume was injected


def expect_missed_total(result: Result, pair: str | None) -> None:
    assert values(result)[()] > 0  # the killed host's beats are missed, every interval


def expect_missed_by_pair(result: Result, pair: str | None) -> None:
    got = values(result, "pair")
    # the killed and the cut-off pair miss every beat on both paths, the others none
    assert set(sorted(got, key=got.__getitem__)[-2:]) == {KILLED, ISOLATED}, got
    for silent in (KILLED, ISOLATED):
        # 2 paths x 4 beats/s x 60 s: 480 missed beats a minute, give or take the edges
        assert 240 < got[silent] < 720, got


def expect_latency(result: Result, pair: str | None) -> None:
    got = values(result, "instance")
    assert len(got) == 2, got
    for instance, seconds in got.items():
        assert math.isfinite(seconds), (instance, seconds)
        assert 0 < seconds < 1, (instance, seconds)


def expect_read_errors(result: Result, pair: str | None) -> None:
    got = values(result, "reason")
    assert set(got) == {"checksum_mismatch"}, got
    assert got["checksum_mismatch"] > 0, got


def expect_poll_lag(result: Result, pair: str | None) -> None:
    got = values(result, "instance")
    assert len(got) == 2, got
    assert all(0 <= v < 1 for v in got.values()), got


def expect_failovers(result: Result, pair: str | None) -> None:
    # every pair with a failover command exports zeros from the start; count the non-zero
    got = {k: v for k, v in values(result, "pair", "result").items() if v}
    assert got == {(KILLED, "executed"): 1, (CORRUPTED, "refused"): 1}


def expect_sites(result: Result, pair: str | None) -> None:
    assert {s["metric"]["site"] for s in result} == {"osaka", "tokyo"}


def expect_pair_verdict(result: Result, pair: str | None) -> None:
    want = {KILLED: "host_down", CORRUPTED: "degraded", ISOLATED: "isolated"}[str(pair)]
    assert values(result, "verdict") == {want: 1}


def expect_pair_states(result: Result, pair: str | None) -> None:
    want = {
        KILLED: {("volume", "stale"): 1, ("network", "stale"): 1},
        CORRUPTED: {("volume", "invalid"): 1, ("network", "alive"): 1},
        ISOLATED: {("volume", "stale"): 1, ("network", "stale"): 1},
    }[str(pair)]
    got = values(result, "path", "state")
    if got.pop(("network", "late"), None) is not None:  # a busy machine delays a beat
        got[("network", "alive")] = 1
    assert got == want


def expect_writes(result: Result, pair: str | None) -> None:
    rate = values(result)[()]
    if pair == KILLED:
        assert rate == 0, "a killed host writes nothing"
    else:  # the cut-off owner too keeps its lease and beats on
        assert rate > 0.5 / INTERVAL, f"{pair}'s host writes every {INTERVAL} s: {rate}/s"


def expect_pair_failovers(result: Result, pair: str | None) -> None:
    want = {KILLED: {"executed": 1}, CORRUPTED: {"refused": 1}, ISOLATED: {}}[str(pair)]
    assert {k: v for k, v in values(result, "result").items() if v} == want


def expect_ages(result: Result, pair: str | None) -> None:
    got = values(result, "path")
    assert set(got) == {"volume", "network"}
    assert got["volume"] > STALE_AFTER * 4, got  # nothing new on the volume for seconds
    if pair in (KILLED, ISOLATED):
        assert got["network"] > STALE_AFTER * 4, got
    else:
        assert got["network"] < STALE_AFTER, got  # the network path is fine


def expect_serials(result: Result, pair: str | None) -> None:
    got = values(result, "path")
    assert set(got) == {"volume", "network"}
    if pair == CORRUPTED:
        # The network path kept counting after the volume path froze.
        assert got["network"] - got["volume"] >= 2 / INTERVAL, got


def expect_pair_missed(result: Result, pair: str | None) -> None:
    got = values(result, "path")
    assert set(got) == {"volume", "network"}, got
    if pair in (KILLED, ISOLATED):
        assert got["volume"] > 0, got
        assert got["network"] > 0, got


def expect_fresh(result: Result, pair: str | None) -> None:
    want = {
        KILLED: {"volume": 0, "network": 0},
        CORRUPTED: {"volume": 0, "network": 1},
        ISOLATED: {"volume": 0, "network": 0},
    }
    assert values(result, "path") == want[str(pair)]


def expect_skew(result: Result, pair: str | None) -> None:
    got = values(result)
    assert len(got) == 1, got
    assert abs(got[()]) < 5, got  # writer and reader share one clock


def expect_pair_read_errors(result: Result, pair: str | None) -> None:
    if pair == CORRUPTED:
        expect_read_errors(result, pair)
    else:
        assert result == [], f"{pair} was never corrupted: {result}"


# -- the arbiter panels ---------------------------------------------------------------------


def owner_site(pair: str) -> str:
    """Who owns ``pair`` after the faults: its writer's site, but osaka-01 failed over."""
    return "tokyo" if pair == KILLED or pair.startswith("tokyo-") else "osaka"


def expect_arbiter_up(result: Result, pair: str | None) -> None:
    # the cut of osaka-03's links is not a cut of osaka from the arbiter
    assert values(result, "instance") == {i: 1 for i in ARBITER.instances.values()}


def expect_lease(result: Result, pair: str | None) -> None:
    got = values(result, "instance")
    assert set(got) == set(ARBITER.instances.values()), got
    assert all(0 < v <= 60 for v in got.values()), f"both sites hold a lease: {got}"


def expect_isolated(result: Result, pair: str | None) -> None:
    assert values(result, "pair", "instance") == {(ISOLATED, ARBITER.instances["tokyo"]): 1}


def expect_owned_counts(result: Result, pair: str | None) -> None:
    # the failover moved osaka-01 from osaka's count to tokyo's
    assert values(result, "instance") == {
        ARBITER.instances["osaka"]: PAIRS // 2 - 1,
        ARBITER.instances["tokyo"]: PAIRS // 2 + 1,
    }


def expect_owners(result: Result, pair: str | None) -> None:
    got = values(result, "pair", "instance")
    assert len({p for p, _ in got}) == len(got), f"a pair with two owners: {got}"
    assert got == {(p, ARBITER.instances[owner_site(p)]): 1 for p in ALL_PAIRS}


def expect_terms(result: Result, pair: str | None) -> None:
    # the failover raised osaka-01's term (its fencing token) by one; no other term moved
    assert set(ARBITER.terms_before) == ALL_PAIRS, ARBITER.terms_before
    assert all(t >= 1 for t in ARBITER.terms_before.values()), ARBITER.terms_before
    want = {p: t + (p == KILLED) for p, t in ARBITER.terms_before.items()}
    assert values(result, "pair") == want


def expect_demotes(result: Result, pair: str | None) -> None:
    got = values(result, "instance", "pair", "result")
    assert got == ARBITER.demotes, "Prometheus and the sites' /metrics disagree"
    # the cut-off owner keeps its lease, and the standby site lost nothing
    tokyo = ARBITER.instances["tokyo"]
    assert not [k for k in got if k[1] in (ISOLATED, CORRUPTED) or k[0] == tokyo], got


def expect_owned_by(result: Result, pair: str | None) -> None:
    assert values(result, "instance") == {ARBITER.instances[owner_site(str(pair))]: 1}


def expect_pair_term(result: Result, pair: str | None) -> None:
    assert values(result) == {(): ARBITER.terms_before[str(pair)] + (pair == KILLED)}


def expect_pair_demotes(result: Result, pair: str | None) -> None:
    got = values(result, "instance", "result")
    want = {(i, r): v for (i, p, r), v in ARBITER.demotes.items() if p == pair}
    assert got == want, "Prometheus and the sites' /metrics disagree"
    if pair != KILLED:
        assert got == {}, f"{pair} was never demoted: {got}"


def expect_silent(result: Result, pair: str | None) -> None:
    want = {
        KILLED: {"host_down": 1, "isolated": 0},
        CORRUPTED: {"host_down": 0, "isolated": 0},
        ISOLATED: {"host_down": 0, "isolated": 1},
    }[str(pair)]
    assert values(result, "verdict") == want


#: What every panel target shows under the faults, by (dashboard uid, title, refId).
EXPECT: dict[tuple[str, str, str], Check] = {
    ("hbmon-fleet", "Pairs by verdict", "A"): expect_verdicts,
    ("hbmon-fleet", "Host down", "A"): expect_host_down,
    ("hbmon-fleet", "Stuck I/O workers", "A"): expect_no_stuck_workers,
    ("hbmon-fleet", "Pairs not alive", "A"): expect_not_alive,
    ("hbmon-fleet", "Paths not fresh", "A"): expect_paths_not_fresh,
    ("hbmon-fleet", "Oldest heartbeats", "A"): expect_oldest,
    ("hbmon-fleet", "Verdicts over time", "A"): expect_verdicts,
    ("hbmon-fleet", "Missed beats", "A"): expect_missed_total,
    ("hbmon-fleet", "Missed beats", "B"): expect_missed_by_pair,
    ("hbmon-fleet", "Volume read latency", "A"): expect_latency,
    ("hbmon-fleet", "Volume read latency", "B"): expect_latency,
    ("hbmon-fleet", "Volume read latency", "C"): expect_latency,
    ("hbmon-fleet", "Volume read errors by reason", "A"): expect_read_errors,
    ("hbmon-fleet", "Poll lag and stuck workers", "A"): expect_poll_lag,
    ("hbmon-fleet", "Poll lag and stuck workers", "B"): expect_no_stuck_workers,
    ("hbmon-fleet", "Failovers", "A"): expect_failovers,
    ("hbmon-fleet", "Sites", "A"): expect_sites,
    ("hbmon-fleet", "Arbiter", "A"): expect_arbiter_up,
    ("hbmon-fleet", "Isolated pairs", "A"): expect_isolated,
    ("hbmon-fleet", "Owned pairs per site", "A"): expect_owned_counts,
    ("hbmon-fleet", "Demotes", "A"): expect_demotes,
    ("hbmon-fleet", "Arbiter lease remaining", "A"): expect_lease,
    ("hbmon-fleet", "Owner per pair", "A"): expect_owners,
    ("hbmon-fleet", "Owner term per pair", "A"): expect_terms,
    ("hbmon-pair", "Verdict", "A"): expect_pair_verdict,
    ("hbmon-pair", "State per path", "A"): expect_pair_states,
    ("hbmon-pair", "Beats written by its host", "A"): expect_writes,
    ("hbmon-pair", "Failovers", "A"): expect_pair_failovers,
    ("hbmon-pair", "Heartbeat age per path", "A"): expect_ages,
    ("hbmon-pair", "Serial per path", "A"): expect_serials,
    ("hbmon-pair", "Missed beats", "A"): expect_pair_missed,
    ("hbmon-pair", "Fresh per path", "A"): expect_fresh,
    ("hbmon-pair", "Clock skew", "A"): expect_skew,
    ("hbmon-pair", "Volume read errors by reason", "A"): expect_pair_read_errors,
    ("hbmon-pair", "Owned by", "A"): expect_owned_by,
    ("hbmon-pair", "Owner term", "A"): expect_pair_term,
    ("hbmon-pair", "Demotes", "A"): expect_pair_demotes,
    ("hbmon-pair", "Arbiter", "A"): expect_arbiter_up,
    ("hbmon-pair", "Every path silent", "A"): expect_silent,
    ("hbmon-pair", "Arbiter lease remaining", "A"): expect_lease,
}


@pytest.mark.tools
@pytest.mark.slow
def test_the_faults_were_injected(lab: Lab) -> None:
    """The ground truth the panels are checked against, as hbmon itself reports it."""
    killed = lab.decisions[KILLED]["decisions"]
    refused = lab.decisions[CORRUPTED]["decisions"]
    assert [(d["pair"], d["action"]) for d in killed] == [(KILLED, "failover")], killed
    assert [(d["pair"], d["action"]) for d in refused] == [(CORRUPTED, "none")], refused
    rows = {(r["pair"], r["path"]): r for r in get_json(lab.osaka + "/status.json")["rows"]}
    assert rows[(CORRUPTED, "volume")]["reason"] == "checksum_mismatch"
    rows = {(r["pair"], r["path"]): r for r in get_json(lab.tokyo + "/status.json")["rows"]}
    assert {rows[(ISOLATED, path)]["verdict"] for path in ("volume", "network")} == {"isolated"}
    assert set(ARBITER.instances) == {"osaka", "tokyo"}


@pytest.mark.tools
@pytest.mark.slow
def test_pair_variable_lists_every_pair(lab: Lab) -> None:
    """``label_values(hbmon_heartbeat_up, pair)``, as Grafana asks Prometheus for it."""
    for doc in dashboards().values():
        for var in doc["templating"]["list"]:
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", str(var.get("query", "")))
            if var["type"] != "query" or m is None:
                continue
            params = urllib.parse.urlencode({"match[]": m.group(1)})
            got = get_json(f"{lab.prometheus}/api/v1/label/{m.group(2)}/values?{params}")
            assert got["status"] == "success"
            assert set(got["data"]) == ALL_PAIRS, (doc["uid"], var["name"], got["data"])


@pytest.mark.tools
@pytest.mark.slow
@pytest.mark.parametrize("query", QUERIES, ids=[q.id for q in QUERIES])
def test_panel_query_shows_the_faults(lab: Lab, query: Query) -> None:
    promql = query.promql()
    doc = lab.query(promql)
    assert doc["status"] == "success", f"{query.id}: {promql}\n{doc.get('error')}"
    result = doc["data"]["result"]
    key = (query.dashboard, query.panel, query.ref)
    if not result and (*key, query.pair) not in MAY_BE_EMPTY:
        pytest.fail(f"{query.id}: no data from {promql}")
    check = EXPECT.get(key)
    assert check is not None, f"{query.id}: no expectation in EXPECT"
    try:
        check(result, query.pair)
    except AssertionError as err:
        raise AssertionError(f"{query.id}: {promql}\n{err}\nresult: {result}") from None


# -- a picture of one panel's data, for the README -----------------------------------------------

PALETTE = ("#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9")


def svg_chart(title: str, series: list[tuple[str, list[tuple[float, float]]]], unit: str) -> str:
    """A small line chart of ``(label, [(unix time, value)])`` series, Grafana-dark style."""
    width, height, left, right, top, bottom = 720, 300, 56, 130, 34, 30
    times = [t for _, points in series for t, _ in points]
    vals = [v for _, points in series for _, v in points]
    t0, t1 = min(times), max(times)
    top_value = max(vals) or 1.0
    step = 10 ** math.floor(math.log10(top_value))
    for mult in (1, 2, 5, 10):
        if top_value / (step * mult) <= 5:
            step *= mult
            break
    v1 = step * math.ceil(top_value / step)
    pw, ph = width - left - right, height - top - bottom

    def x(t: float) -> float:
        return left + (t - t0) / ((t1 - t0) or 1) * pw

    def y(v: float) -> float:
        return top + ph - v / v1 * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="#181b1f"/>',
        '<text x="12" y="21" fill="#ccccdc" font-size="13" font-weight="bold">'
        f"{escape(title)}</text>",
    ]
    tick = 0.0
    while tick <= v1 + 1e-9:
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            'stroke="#2c3235"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" fill="#8e8e8e" text-anchor="end">'
            f"{tick:g} {unit}</text>"
        )
        tick += step
    for i in range(5):
        t = t0 + (t1 - t0) * i / 4
        label = datetime.fromtimestamp(t).strftime("%H:%M:%S")
        out.append(
            f'<text x="{x(t):.1f}" y="{height - 10}" fill="#8e8e8e" text-anchor="middle">'
            f"{label}</text>"
        )
    for i, (label, points) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        ly = top + 14 + 18 * i
        out.append(
            f'<rect x="{width - right + 14}" y="{ly - 9}" width="12" height="4" fill="{colour}"/>'
        )
        out.append(
            f'<text x="{width - right + 32}" y="{ly - 4}" fill="#ccccdc">{escape(label)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


@pytest.mark.tools
@pytest.mark.slow
def test_draw_a_panel(lab: Lab, tmp_path: Path) -> None:
    """Draw one panel's data (a range query, as Grafana runs it) as SVG, and PNG if possible."""
    uid, title, pair = PICTURE
    panel = next(p for p in panels(dashboards()[uid]) if p["title"] == title)
    target = panel["targets"][0]
    promql = Query(uid, title, target["refId"], target["expr"], pair).promql()
    result = lab.query_range(promql, seconds=BASELINE + FAULT_SOAK + 2, step=1.0)
    assert result, f"no data for {promql}"
    legend = target["legendFormat"]
    series = [
        (
            re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m, s=s: s["metric"].get(m.group(1), ""), legend),
            [(float(t), float(v)) for t, v in s["values"]],
        )
        for s in result
    ]
    svg = svg_chart(f"{title} — {pair} (hbmon pair dashboard)", sorted(series), "s")
    name = f"panel-{uid}-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}"
    for folder in (tmp_path, OUTPUT):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.svg").write_text(svg)
    print(f"\npanel drawn: {OUTPUT / name}.svg ({len(series)} series, {promql})")
    chromium = shutil.which("chromium")
    if chromium is not None:
        png = tmp_path / f"{name}.png"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={tmp_path / 'chromium-profile'}",
                f"--screenshot={png}",
                "--window-size=720,300",
                (tmp_path / f"{name}.svg").as_uri(),
            ],
            capture_output=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert png.read_bytes().startswith(b"\x89PNG"), "chromium made no PNG"
        shutil.copy(png, OUTPUT / png.name)
        print(f"panel drawn: {OUTPUT / png.name}")
