"""The shipped deployment files: alert rules (promtool), Alertmanager (amtool), systemd.

The rules are checked with ``promtool check rules`` and their unit tests
(``deploy/prometheus/hbmon.rules.test.yml``) run with ``promtool test rules``; every alert
must be tested both firing and not firing.  The text checks need no tool: PyYAML is not a
dependency, so the files are read with regular expressions on their (simple) layout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need

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
    "HbmonNetworkPartition",
    "HbmonRemoteLinkDown",
    "HbmonHeartbeatLate",
    "HbmonVolumeInvalid",
    "HbmonVolumeIOHung",
    "HbmonWriterUndead",
    "HbmonExporterDown",
    "HbmonClockSkew",
}
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


def test_host_down_is_the_critical_verdict_alert_that_keeps_the_pair() -> None:
    block = rule_blocks()["HbmonHostDown"]
    expr = re.search(r"^\s+expr:\s*(.+)$", block, re.MULTILINE)
    assert expr is not None
    assert expr.group(1).strip() == 'hbmon_pair_verdict{verdict="host_down"} == 1'
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


def test_alertmanager_routes_host_down_to_the_failover_webhook() -> None:
    text = AM_CONFIG.read_text()
    for needle in (
        "name: hbmon-failover",
        "url: http://127.0.0.1:9799/api/v1/alerts",
        "credentials_file: /etc/hbmon/webhook.token",
        "send_resolved: true",
        'group_by: ["alertname", "pair"]',
        "group_wait: 10s",
        "repeat_interval: 4h",
        'alertname = "HbmonHostDown"',
    ):
        assert needle in text, f"alertmanager.yml lacks {needle!r}"
    named = set(re.findall(r"\bHbmon[A-Za-z]+", text))
    assert named <= ALERTS, f"alertmanager.yml names unknown alerts: {named - ALERTS}"


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
def test_promtool_test_rules_catches_a_rule_without_its_for(promtool: str, tmp_path: Path) -> None:
    """The unit tests have teeth: HbmonHostDown without its for: fails them."""
    broken, count = re.subn(
        r"(- alert: HbmonHostDown\n(?:.*\n)*?\s+for:\s*)\S+", r"\g<1>0s", RULES.read_text()
    )
    assert count == 1
    (tmp_path / RULES.name).write_text(broken)
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    result = run([promtool, "test", "rules", RULES_TEST.name], cwd=tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "one-second host_down blip" in result.stdout + result.stderr


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
        (["alertname=HbmonNetworkPartition", "pair=osaka-01"], "default"),
        (["alertname=HbmonExporterDown", "instance=tokyo:9799"], "default"),
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
