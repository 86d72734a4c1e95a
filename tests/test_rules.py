"""The shipped deployment files: alert rules (promtool), Alertmanager (amtool), systemd.

The rules are checked with ``promtool check rules`` and their unit tests
(``deploy/prometheus/hbmon.rules.test.yml``) run with ``promtool test rules``; every alert
must be tested both firing and not firing.  The text checks need no tool: PyYAML is not a
dependency, so the files are read with regular expressions on their (simple) layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import need
from helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "hbmon.rules.yml"
RULES_TEST = PROM_DIR / "hbmon.rules.test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
AM_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
UNIT = ROOT / "deploy" / "systemd" / "hbmon.service"
UNIT_DROPIN = ROOT / "deploy" / "systemd" / "hbmon.service.d" / "volumes.conf.example"
OPERATIONS = ROOT / "docs" / "operations.md"

ALERTS = {
    "HbmonHostDown",
    "HbmonSiteIsolated",
    "HbmonNetworkPartition",
    "HbmonRemoteLinkDown",
    "HbmonHeartbeatLate",
    "HbmonVolumeInvalid",
    "HbmonVolumeIOHung",
    "HbmonWriterUndead",
    "HbmonExporterDown",
    "HbmonClockSkew",
    "HbmonArbiterDown",
    "HbmonArbiterLeaseLow",
    "HbmonOwnershipLost",
}
#: The alerts that go to hbmon's failover webhook, with the verdict each one is about.
WEBHOOK_ALERTS = {"HbmonHostDown": "host_down", "HbmonSiteIsolated": "isolated"}
TOOL_TIMEOUT = 60


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )


def rule_blocks() -> dict[str, str]:
    """Alert name -> the text of its rule (from its ``- alert:`` line to the next)."""
    text = RULES.read_text()
    parts = re.split(r"^\s*- alert:\s*", text, flags=re.MULTILINE)[1:]
    blocks = {}
    for part in parts:
        name, _, body = part.partition("\n")
        blocks[name.strip()] = body
    return blocks


def rule_tests() -> list[tuple[str, bool]]:
    """``(alertname, expects firing)`` for every alert_rule_test case of the test file."""
    text = RULES_TEST.read_text()
    cases = re.findall(
        r"^\s*alertname:\s*(\S+)\s*\n\s*exp_alerts:[ \t]*(\S*)", text, flags=re.MULTILINE
    )
    return [(name, value != "[]") for name, value in cases]


def heading_anchors(markdown: str) -> set[str]:
    """GitHub-style anchors of the headings of a Markdown document."""
    anchors = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m and not in_code:
            title = re.sub(r"[^\w\- ]", "", m.group(1).lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


# -- text checks (no tools needed) -------------------------------------------------------


def test_rules_define_every_alert_of_the_contract() -> None:
    assert set(rule_blocks()) == ALERTS


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_every_alert_has_for_severity_and_annotations(alert: str) -> None:
    block = rule_blocks()[alert]
    assert re.search(r"^\s+for:\s*\d+[smh]\s*$", block, re.MULTILINE), f"{alert}: no for:"
    assert re.search(r"^\s+severity:\s*(critical|warning)\s*$", block, re.MULTILINE), alert
    for key in ("summary", "description", "runbook_url"):
        assert re.search(rf"^\s+{key}:", block, re.MULTILINE), f"{alert}: no {key}"


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_runbook_urls_point_at_sections_of_the_operations_guide(alert: str) -> None:
    block = rule_blocks()[alert]
    m = re.search(r'runbook_url:\s*"?(\S+?)"?\s*$', block, re.MULTILINE)
    assert m is not None, f"{alert}: no runbook_url"
    url = m.group(1)
    assert url.split("#")[0].endswith("docs/operations.md"), url
    anchor = url.partition("#")[2]
    assert anchor == alert.lower(), url
    assert anchor in heading_anchors(OPERATIONS.read_text()), (
        f"{url}: docs/operations.md has no heading with the anchor #{anchor}"
    )


@pytest.mark.parametrize(("alert", "verdict"), sorted(WEBHOOK_ALERTS.items()))
def test_webhook_alerts_are_critical_verdict_alerts_that_keep_the_pair(
    alert: str, verdict: str
) -> None:
    block = rule_blocks()[alert]
    expr = re.search(r"^\s+expr:[ ]*(>-\n(?: {10}.+\n)+|.+$)", block, re.MULTILINE)
    assert expr is not None
    lines = [line.strip() for line in expr.group(1).splitlines() if line.strip() != ">-"]
    assert lines[0] == f'hbmon_pair_verdict{{verdict="{verdict}"}} == 1'
    # HbmonSiteIsolated leaves out the pairs the alerting site owns itself (no cut there)
    assert lines[1:] in ([], ["unless on (instance, job, pair) hbmon_pair_owned == 1"]), lines
    assert re.search(r"^\s+severity:\s*critical\s*$", block, re.MULTILINE)
    # no aggregation may drop the pair label the webhook needs
    assert not re.search(r"\b(sum|max|min|avg|count)\b", expr.group(1))


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    cases = rule_tests()
    assert cases, "no alert_rule_test cases found"
    unknown = {name for name, _ in cases} - ALERTS
    assert not unknown, f"tests of alerts that do not exist: {unknown}"
    firing = {name for name, fires in cases if fires}
    quiet = {name for name, fires in cases if not fires}
    assert ALERTS - firing == set(), f"never tested firing: {sorted(ALERTS - firing)}"
    assert ALERTS - quiet == set(), f"never tested not firing: {sorted(ALERTS - quiet)}"


def test_every_alert_name_appears_in_expected_alerts() -> None:
    """Each firing case names its alert in exp_alerts (through the case's alertname)."""
    text = RULES_TEST.read_text()
    for alert in ALERTS:
        assert re.search(
            rf"alertname:\s*{alert}\s*\n\s*exp_alerts:[ \t]*(&\S+)?[ \t]*\n\s*- exp_labels:",
            text,
        ), f"{alert}: no case with a non-empty exp_alerts list"


def test_alertmanager_routes_the_verdict_alerts_to_the_failover_webhook() -> None:
    text = AM_CONFIG.read_text()
    for needle in (
        "name: hbmon-failover",
        "url: http://127.0.0.1:9799/api/v1/alerts",
        "credentials_file: /etc/hbmon/webhook.token",
        "send_resolved: true",
        'group_by: ["alertname", "pair"]',
        "group_wait: 0s",
        "repeat_interval: 4h",
        'alertname =~ "HbmonHostDown|HbmonSiteIsolated"',
    ):
        assert needle in text, f"alertmanager.yml lacks {needle!r}"
    named = set(re.findall(r"\bHbmon[A-Za-z]+", text))
    assert named <= ALERTS, f"alertmanager.yml names unknown alerts: {named - ALERTS}"


def seconds(text: str) -> float:
    """A Prometheus duration of one unit (``5s``, ``1m``, ``0s``) in seconds."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    assert m is not None, f"not a simple duration: {text!r}"
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def shipped_timing() -> dict[str, float]:
    """The numbers that decide how soon a dead site's pair is failed over."""
    prom = PROM_CONFIG.read_text()
    am = AM_CONFIG.read_text()
    route = am[am.index("- receiver: hbmon-failover") :]
    route = route[: route.index("- receiver: default")]
    numbers = {
        "scrape_interval": seconds(re.findall(r"^\s+scrape_interval:\s*(\S+)", prom, re.M)[0]),
        "evaluation_interval": seconds(
            re.findall(r"^\s+evaluation_interval:\s*(\S+)", prom, re.M)[0]
        ),
        "group_wait": seconds(re.findall(r"^\s+group_wait:\s*(\S+)", route, re.M)[0]),
    }
    for alert in WEBHOOK_ALERTS:
        found = re.search(r"^\s+for:\s*(\S+)", rule_blocks()[alert], re.M)
        assert found is not None, alert
        numbers[f"for {alert}"] = seconds(found.group(1))
    return numbers


def test_takeover_timing_leaves_the_wait_to_the_lease() -> None:
    """The shipped timing: a dead site's pair fails over within the issue's p99 <= 30 s.

    The alert chain (stale after miss_threshold x interval, then a scrape, an
    evaluation, the rule's for and Alertmanager's group_wait) runs beside the dead
    owner's lease, which etcd expires lease_ttl after its last renewal, i.e. between
    lease_ttl - lease_ttl / 3 and lease_ttl after the last beat: the guard waits for it.
    """
    from hbmon.arbiter.lease import LeaseTiming
    from hbmon.config import Timing

    n = shipped_timing()
    watch, lease = Timing(), LeaseTiming()
    stale = watch.miss_threshold * watch.interval
    fors = [n[f"for {alert}"] for alert in WEBHOOK_ALERTS]
    assert len(set(fors)) == 1, f"the webhook alerts should share one for: {n}"
    worst = stale + n["scrape_interval"] + n["evaluation_interval"] + fors[0] + n["group_wait"]
    typical = stale + (n["scrape_interval"] + n["evaluation_interval"]) / 2
    typical += fors[0] + n["group_wait"]
    # the lease expires at etcd 10-15 s after the last beat (+ its 0.5 s expiry check)
    lease_worst = lease.lease_ttl + 0.5
    # a rule needs its verdict at two evaluations in a row: for >= evaluation_interval
    assert fors[0] >= n["evaluation_interval"], n
    # typically the lease, not the alert chain, is what the failover waits for
    assert typical <= lease.lease_ttl, (typical, n)
    # and at worst the failover starts well within 30 s (5 s left for a loaded machine,
    # an etcd leader election and the claim's transaction)
    assert max(worst, lease_worst) <= 25.0, (worst, lease_worst, n)


def test_systemd_unit_is_hardened() -> None:
    text = UNIT.read_text()
    settings = {
        line.partition("=")[0]: line.partition("=")[2]
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }
    expected = {
        "User": "hbmon",
        "DynamicUser": "no",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/hbmon",
        "StateDirectory": "hbmon",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
        "SupplementaryGroups": "disk",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "ExecStart": "/usr/local/bin/hbmon run -c /etc/hbmon/site.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "10",
        "Restart": "on-failure",
    }
    for key, value in expected.items():
        assert settings.get(key) == value, f"{key}={settings.get(key)!r}, expected {value!r}"
    assert "SystemCallFilter=@system-service" in text.splitlines()
    assert "DeviceAllow" not in settings, "devices belong in the drop-in, not the unit"
    dropin = UNIT_DROPIN.read_text()
    assert re.search(r"^DevicePolicy=closed$", dropin, re.MULTILINE)
    assert re.search(r"^DeviceAllow=block-sd rw$", dropin, re.MULTILINE)


# -- with the real tools ------------------------------------------------------------------


@pytest.fixture
def amtool() -> str:
    """Return the path of ``amtool``; fail under CI, skip otherwise, if missing."""
    path = shutil.which("amtool")
    need(path is not None, "amtool not found (Debian package: prometheus-alertmanager)")
    assert path is not None
    return path


@pytest.mark.tools
def test_promtool_check_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


@pytest.mark.tools
def test_promtool_test_rules(promtool: str) -> None:
    result = run([promtool, "test", "rules", RULES_TEST.name], cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "FAILED" not in result.stdout + result.stderr


@pytest.mark.tools
@pytest.mark.parametrize(
    ("alert", "for_", "case"),
    [
        ("HbmonHostDown", "0s", "one-second host_down blip"),
        ("HbmonHostDown", "6s", "dead host fires HbmonHostDown after its for"),
        ("HbmonSiteIsolated", "0s", "one-second isolated blip"),
        ("HbmonSiteIsolated", "4s", "cut between the sites fires HbmonSiteIsolated"),
        ("HbmonArbiterDown", "0s", "a short outage does not"),
        ("HbmonArbiterLeaseLow", "1m", "one late renewal do not"),
        ("HbmonOwnershipLost", "0s", "a restart or a gain does not"),
    ],
)
def test_promtool_test_rules_catches_a_changed_for(
    promtool: str, tmp_path: Path, alert: str, for_: str, case: str
) -> None:
    """The unit tests have teeth: an alert with another for: fails its case.

    Only the test group named by ``case`` runs (the whole file takes seconds): first with
    the shipped rules, where it passes, then with the changed ``for:``.
    """
    head, _, body = RULES_TEST.read_text().partition("\ntests:\n")
    groups = [g for g in re.split(r"(?m)^(?=  - name: )", body) if case in g.partition("\n")[0]]
    assert len(groups) == 1, f"{case!r} names {len(groups)} test groups"
    (tmp_path / RULES_TEST.name).write_text(f"{head}\ntests:\n{groups[0]}")
    shutil.copy(RULES, tmp_path / RULES.name)
    result = run([promtool, "test", "rules", RULES_TEST.name], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    broken, count = re.subn(
        rf"(- alert: {alert}\n(?:.*\n)*?\s+for:\s*)\S+", rf"\g<1>{for_}", RULES.read_text()
    )
    assert count == 1
    (tmp_path / RULES.name).write_text(broken)
    result = run([promtool, "test", "rules", RULES_TEST.name], cwd=tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert case in result.stdout + result.stderr


@pytest.mark.tools
def test_promtool_check_prometheus_config(promtool: str) -> None:
    result = run([promtool, "check", "config", str(PROM_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


@pytest.mark.tools
def test_amtool_check_config(amtool: str) -> None:
    result = run([amtool, "check-config", str(AM_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.tools
@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (["alertname=HbmonHostDown", "pair=osaka-01"], "hbmon-failover,default"),
        (["alertname=HbmonSiteIsolated", "pair=osaka-01"], "hbmon-failover,default"),
        (["alertname=HbmonNetworkPartition", "pair=osaka-01"], "default"),
        (["alertname=HbmonExporterDown", "instance=tokyo:9799"], "default"),
        (["alertname=HbmonArbiterDown", "instance=tokyo:9799"], "default"),
        (["alertname=HbmonArbiterLeaseLow", "instance=osaka:9799"], "default"),
        (["alertname=HbmonOwnershipLost", "pair=osaka-01"], "default"),
    ],
)
def test_amtool_routes(amtool: str, labels: list[str], receivers: str) -> None:
    result = run(
        [
            amtool,
            "config",
            "routes",
            "test",
            f"--config.file={AM_CONFIG}",
            f"--verify.receivers={receivers}",
            *labels,
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receivers


class Receiver:
    """An HTTP server that records the Alertmanager webhook notifications it gets."""

    def __init__(self) -> None:
        self.got: list[tuple[float, str, str, dict[str, Any]]] = []  # (t, path, auth, body)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization", "")
                receiver.got.append((time.monotonic(), self.path, auth, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def alerts(self, path: str, status: str = "firing") -> list[tuple[float, str, str]]:
        """(arrival, alertname, pair) of every alert with ``status`` sent to ``path``."""
        return [
            (when, a["labels"]["alertname"], a["labels"].get("pair", ""))
            for when, where, _, body in list(self.got)
            if where == path
            for a in body["alerts"]
            if a["status"] == status
        ]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


PEOPLE_GROUP_WAIT = 5.0  # seconds: the people route's group_wait in the test (shipped: 30s)


@pytest.mark.tools
def test_alertmanager_sends_at_once_inhibits_and_spares_people_a_dying_owner(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The shipped alertmanager.yml in the real Alertmanager, alerts posted to its API.

    * HbmonSiteIsolated and HbmonHostDown reach hbmon's webhook at once (group_wait 0s),
      with the bearer token;
    * HbmonSiteIsolated inhibits the network-partition alert of its own pair, not
      another pair's;
    * a dead owner's pair reads isolated only until etcd deletes its key: an
      HbmonSiteIsolated that resolves within the people route's group_wait never
      reaches people, and the HbmonHostDown that follows it does.

    Rewritten: the webhook URL and token file, the people route's group_wait (30s ->
    5s, to keep the test short) and a webhook for the `default` receiver, so that what
    people would be sent can be seen.
    """
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    need(binary is not None, "alertmanager not found (Debian package: prometheus-alertmanager)")
    assert binary is not None
    token = tmp_path / "webhook.token"
    token.write_text("alertmanager-routing-test-token\n")
    token.chmod(0o600)
    text = AM_CONFIG.read_text()
    for old, new in (
        (
            "url: http://127.0.0.1:9799/api/v1/alerts",
            f"url: http://127.0.0.1:{receiver.port}/hbmon",
        ),
        ("credentials_file: /etc/hbmon/webhook.token", f"credentials_file: {token}"),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    text, count = re.subn(r"(?m)^  group_wait: 30s$", f"  group_wait: {PEOPLE_GROUP_WAIT:g}s", text)
    assert count == 1, "the root route's group_wait changed: update this test"
    text, count = re.subn(
        r"(?m)^  - name: default\s*$",
        "  - name: default\n    webhook_configs:\n"
        f"      - url: http://127.0.0.1:{receiver.port}/people\n",
        text,
    )
    assert count == 1
    config = tmp_path / "alertmanager.yml"
    config.write_text(text)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v2"
    log = (tmp_path / "alertmanager.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def get(path: str) -> Any:
        with urllib.request.urlopen(api + path, timeout=5) as resp:
            return json.load(resp)

    started: dict[tuple[str, str], datetime] = {}

    def post(*alerts: tuple[str, str, bool]) -> None:
        """Post alerts as Prometheus does: startsAt is when the alert began firing (the
        people route's group_wait counts from it), endsAt is in the future while it
        fires and the moment it resolved once it has."""
        now = datetime.now(UTC)
        body = []
        for name, pair, firing in alerts:
            start = started.setdefault((name, pair), now)
            end = now + timedelta(minutes=5) if firing else now
            body.append(
                {
                    "labels": {"alertname": name, "pair": pair, "instance": "tokyo:9799"},
                    "annotations": {},
                    "startsAt": start.isoformat(),
                    "endsAt": end.isoformat(),
                }
            )
        request = urllib.request.Request(
            api + "/alerts",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"alertmanager exited: {(tmp_path / 'alertmanager.log').read_text()}")
        try:
            return bool(get("/status")["config"])
        except OSError:
            return False

    try:
        wait_for(ready, 30, "Alertmanager's API")
        # every path of osaka-01 silent, its owner's lease still alive at the arbiter
        t0 = time.monotonic()
        post(
            ("HbmonSiteIsolated", "osaka-01", True),
            ("HbmonNetworkPartition", "osaka-01", True),
            ("HbmonNetworkPartition", "osaka-02", True),
        )
        got = wait_for(
            lambda: receiver.alerts("/hbmon"), 10, "HbmonSiteIsolated at hbmon's webhook"
        )
        assert [(n, p) for _, n, p in got] == [("HbmonSiteIsolated", "osaka-01")]
        isolated_after = got[0][0] - t0

        def partition_states() -> dict[str, str] | None:
            alerts = get("/alerts?filter=" + quote('alertname="HbmonNetworkPartition"'))
            states = {a["labels"]["pair"]: a["status"]["state"] for a in alerts}
            return states if states.get("osaka-01") == "suppressed" else None

        # HbmonSiteIsolated alone (no HbmonHostDown yet) inhibits its pair's partition
        states = wait_for(partition_states, 3, "osaka-01's partition alert inhibited")
        assert states == {"osaka-01": "suppressed", "osaka-02": "active"}, states

        # the owner was dead after all: etcd deleted its key, the verdict turns host_down
        post(("HbmonSiteIsolated", "osaka-01", False), ("HbmonHostDown", "osaka-01", True))
        t1 = time.monotonic()
        assert t1 - t0 < PEOPLE_GROUP_WAIT - 1, "too slow to test the people route's wait"
        got = wait_for(
            lambda: [a for a in receiver.alerts("/hbmon") if a[1] == "HbmonHostDown"],
            10,
            "HbmonHostDown at hbmon's webhook",
        )
        host_down_after = got[0][0] - t1
        print(f"at the webhook after {isolated_after:.2f} s and {host_down_after:.2f} s")
        assert isolated_after < 2.0, "the webhook route's group_wait is not 0s"
        assert host_down_after < 2.0, "the webhook route's group_wait is not 0s"
        assert {auth for _, path, auth, _ in receiver.got if path == "/hbmon"} == {
            "Bearer alertmanager-routing-test-token"
        }

        # people: after their group_wait, the host down and the other pair's partition;
        # never the isolated phase that resolved before it, never the inhibited alert
        wait_for(lambda: len(receiver.alerts("/people")) >= 2, PEOPLE_GROUP_WAIT + 10, "people")
        time.sleep(max(0.0, t0 + PEOPLE_GROUP_WAIT + 2 - time.monotonic()))
        people = sorted((n, p) for _, n, p in receiver.alerts("/people"))
        assert people == [("HbmonHostDown", "osaka-01"), ("HbmonNetworkPartition", "osaka-02")]
        assert not [a for a in receiver.got if a[1] == "/people" and "Isolated" in str(a[3])]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` of the unit and its drop-in.

    Skipped when systemd-analyze is missing, even under CI: containers often have no
    systemd at all.  ExecStart names /usr/local/bin/hbmon, an install-time path, and
    verify insists that it exists; the copy checked here runs this checkout's hbmon
    instead, and nothing else is changed.  verify warns about unknown or invalid settings
    on stderr but still exits 0, so stderr must be empty too.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found (containers often lack systemd)")
    hbmon = shutil.which("hbmon", path=os.path.dirname(sys.executable))
    hbmon = hbmon or shutil.which("hbmon")
    need(hbmon is not None, "the hbmon console script is not installed")
    assert hbmon is not None
    unit = tmp_path / UNIT.name
    text = UNIT.read_text()
    assert text.count("/usr/local/bin/hbmon ") == 2
    unit.write_text(text.replace("/usr/local/bin/hbmon ", f"{hbmon} "))
    (tmp_path / "hbmon.service.d").mkdir()
    shutil.copy(UNIT_DROPIN, tmp_path / "hbmon.service.d" / "volumes.conf")
    result = run([analyze, "verify", str(unit)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr
    # the drop-in is read: a bad key in it is reported
    with (tmp_path / "hbmon.service.d" / "volumes.conf").open("a") as f:
        f.write("NoSuchSetting=1\n")
    result = run([analyze, "verify", str(unit)], cwd=tmp_path)
    assert "NoSuchSetting" in result.stderr


def test_operations_guide_links_resolve() -> None:
    """Links of docs/operations.md to its own sections and to other docs exist."""
    docs = OPERATIONS.parent
    text = OPERATIONS.read_text()
    links = re.findall(r"\]\(([\w.-]*\.md)?(?:#([\w-]+))?\)", text)
    assert links
    for page, anchor in links:
        target = docs / page if page else OPERATIONS
        assert target.exists(), f"link to missing {page}"
        if anchor:
            assert anchor in heading_anchors(target.read_text()), f"{page}#{anchor}"
