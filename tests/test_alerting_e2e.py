"""End to end with the real Prometheus and Alertmanager: a dead host fails over once.

The chain under test is the production one (docs/operations.md, "How to test the chain"):

    hbmon demo (osaka + tokyo) --/metrics--> Prometheus (shipped rules)
        --HbmonHostDown--> Alertmanager (shipped config) --webhook, bearer token-->
        tokyo's failover guard --> the failover command

Prometheus and Alertmanager run from the shipped ``deploy/`` files with only what must
differ on a test machine rewritten: ports, the token file path, scrape and evaluation
intervals (1 s), the rules' ``for:`` (2 s) and Alertmanager's group_wait/group_interval
(1 s) and repeat_interval (2 s).  Nothing is mocked.

"Exactly once" is checked against a real repeat: Alertmanager re-sends the firing
HbmonHostDown every ``repeat_interval`` (on a ``group_interval`` tick: every 2-3 s), the
guard journals each notification it gets and refuses every one after the first (already
running, then hold-down), and the failover command has still run once.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from helpers import free_port, free_port_pair, http_get, metric_value, parse_metrics, wait_for

pytestmark = [pytest.mark.tools, pytest.mark.slow, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "hbmon.rules.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
AM_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"

FAILOVER_WITHIN = 30.0  # the bound, from kill-host to the command having run
REPEAT_INTERVAL = "2s"  # Alertmanager re-sends a firing group this often (a group_interval
# multiple: a repeat goes out on a group_interval tick)
REPEATS = 2  # notifications after the first that the guard must see (and refuse)
REPEATS_WITHIN = 15.0  # seconds: two repeats 2-3 s apart, with room for a loaded machine
READY = 30.0

FAILOVER_SCRIPT = """\
import sys, time
log, pair = sys.argv[1], sys.argv[2]
with open(log, "a") as f:
    f.write(f"{pair} {time.time():.3f}\\n")
"""


# -- processes ------------------------------------------------------------------------------


class Processes:
    """Started subprocesses, each logging to a file; stopped in reverse order."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Path:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self.procs.append((name, proc))
        return log

    def check_running(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with code {proc.returncode}\n{self.tails()}")

    def tails(self, lines: int = 25) -> str:
        out = []
        for name, _ in self.procs:
            text = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
            out.append(f"--- {name} (last {lines} lines) ---")
            out.extend(text[-lines:])
        return "\n".join(out)

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs)
    try:
        yield procs
    finally:
        procs.stop_all()


# -- the shipped configuration, rewritten for the test ---------------------------------------


def sub_exactly(pattern: str, repl: str, text: str, count: int, what: str) -> str:
    new, found = re.subn(pattern, repl, text, flags=re.MULTILINE)
    assert found == count, (
        f"{what}: expected {count} match(es) of {pattern!r}, found {found}; the shipped "
        "file changed, update this test's rewriting"
    )
    return new


def make_rules(folder: Path) -> Path:
    """The shipped rules with every ``for:`` shortened to 2 s; nothing else changed."""
    text = RULES.read_text()
    alerts = len(re.findall(r"^\s*- alert:", text, flags=re.MULTILINE))
    text = sub_exactly(r"^(\s+for:\s*)\S+\s*$", r"\g<1>2s", text, alerts, "rules for:")
    path = folder / RULES.name
    path.write_text(text)
    return path


def make_prometheus_config(folder: Path, targets: list[str], alertmanager: str) -> Path:
    text = PROM_CONFIG.read_text()
    text = sub_exactly(r"^(\s+scrape_interval:\s*)\S+", r"\g<1>1s", text, 1, "prometheus.yml")
    text = sub_exactly(r"^(\s+evaluation_interval:\s*)\S+", r"\g<1>1s", text, 1, "prometheus.yml")
    text = sub_exactly(
        r'targets: \["127\.0\.0\.1:9093"\]',
        f"targets: {json.dumps([alertmanager])}",
        text,
        1,
        "prometheus.yml alertmanager",
    )
    text = sub_exactly(
        r'targets: \["127\.0\.0\.1:9799"\]',
        f"targets: {json.dumps(targets)}",
        text,
        1,
        "prometheus.yml hbmon targets",
    )
    assert re.search(r"^\s+- hbmon\.rules\.yml\s*$", text, re.MULTILINE)
    path = folder / PROM_CONFIG.name
    path.write_text(text)
    return path


def make_alertmanager_config(folder: Path, webhook_port: int, token: Path) -> Path:
    text = AM_CONFIG.read_text()
    text = sub_exactly(
        r"url: http://127\.0\.0\.1:9799/api/v1/alerts",
        f"url: http://127.0.0.1:{webhook_port}/api/v1/alerts",
        text,
        1,
        "alertmanager.yml webhook url",
    )
    text = sub_exactly(
        r"credentials_file: /etc/hbmon/webhook\.token",
        f"credentials_file: {token}",
        text,
        1,
        "alertmanager.yml credentials_file",
    )
    timings = (("group_wait", "1s"), ("group_interval", "1s"), ("repeat_interval", REPEAT_INTERVAL))
    for key, value in timings:
        count = len(re.findall(rf"^\s+{key}:", text, flags=re.MULTILINE))
        assert count >= 1, key
        text = sub_exactly(rf"^(\s+{key}:\s*)\S+", rf"\g<1>{value}", text, count, key)
    path = folder / AM_CONFIG.name
    path.write_text(text)
    return path


# -- reading the running system --------------------------------------------------------------


def get_json(url: str) -> Any:
    code, body = http_get(url)
    assert code == 200, f"GET {url}: HTTP {code}: {body[:300]}"
    return json.loads(body)


def journal(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def failover_runs(log: Path) -> list[str]:
    try:
        return [line.split()[0] for line in log.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[dict[str, Any]] = []  # every alert (pending or firing) ever seen

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = get_json(self.url + "/api/v1/alerts")["data"]["alerts"]
        self.seen.extend(alerts)
        return alerts

    def firing(self, name: str, pair: str) -> bool:
        return any(
            a["labels"].get("alertname") == name
            and a["labels"].get("pair") == pair
            and a["state"] == "firing"
            for a in self.alerts()
        )

    def targets_up(self, count: int) -> bool:
        query = urllib.parse.quote('up{job="hbmon"} == 1')
        result = get_json(f"{self.url}/api/v1/query?query={query}")["data"]["result"]
        return len(result) == count


# -- the test ----------------------------------------------------------------------------------


def test_host_down_fails_over_once_and_a_partition_never(
    tmp_path: Path, processes: Processes
) -> None:
    prometheus_bin = shutil.which("prometheus")
    alertmanager_bin = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    need(prometheus_bin is not None, "prometheus not found (Debian package: prometheus)")
    need(
        alertmanager_bin is not None,
        "alertmanager not found (Debian package: prometheus-alertmanager)",
    )
    assert prometheus_bin is not None
    assert alertmanager_bin is not None

    started = time.monotonic()
    port = free_port_pair()  # osaka on port, tokyo on port + 1
    osaka, tokyo = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
    am_port, prom_port = free_port(), free_port()

    token = tmp_path / "webhook.token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(24) + "\n")
    token.chmod(0o600)
    script = tmp_path / "failover.py"
    script.write_text(FAILOVER_SCRIPT)
    runs = tmp_path / "failovers.log"
    demo_tmp = tmp_path / "demo-tmp"  # the demo's folder lands in here (TMPDIR)
    demo_tmp.mkdir()

    try:
        # -- hbmon: two sites; tokyo watches osaka-NN, osaka watches tokyo-NN ---------------
        failover = shlex.join([sys.executable, str(script), str(runs), "{pair}"])
        demo_log = processes.start(
            "hbmon-demo",
            [
                sys.executable,
                "-m",
                "hbmon.cli",
                "demo",
                "--pairs",
                "4",
                "--interval",
                "250ms",
                "--listen",
                f"127.0.0.1:{port}",
                "--failover",
                failover,
                "--webhook-token-file",
                str(token),
                "--keep",
            ],
            env={**os.environ, "TMPDIR": str(demo_tmp)},
        )

        def banner_folder() -> Path | None:
            processes.check_running()
            m = re.search(r"^\s+files\s+(\S+) \(kept on exit\)", demo_log.read_text(), re.M)
            return Path(m.group(1)) if m else None

        folder = wait_for(banner_folder, READY, "the demo banner")
        tokyo_journal = folder / "tokyo" / "failover.jsonl"
        osaka_journal = folder / "osaka" / "failover.jsonl"

        # -- Alertmanager and Prometheus from the shipped files ----------------------------
        config_dir = tmp_path / "config"
        config_dir.mkdir()
        am_config = make_alertmanager_config(config_dir, port + 1, token)
        make_rules(config_dir)
        prom_config = make_prometheus_config(
            config_dir, [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"], f"127.0.0.1:{am_port}"
        )
        processes.start(
            "alertmanager",
            [
                alertmanager_bin,
                f"--config.file={am_config}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
        )
        processes.start(
            "prometheus",
            [
                prometheus_bin,
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
        )
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")

        def ready(url: str) -> bool:
            processes.check_running()
            try:
                return http_get(url, timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(lambda: ready(f"http://127.0.0.1:{am_port}/-/ready"), READY, "Alertmanager")
        wait_for(lambda: ready(f"{prom.url}/-/ready"), READY, "Prometheus")
        wait_for(lambda: prom.targets_up(2), READY, "both hbmon sites scraped (up == 1)")
        print(f"demo, Alertmanager and Prometheus ready: {time.monotonic() - started:.1f} s")

        def verdict(site: str, pair: str, name: str) -> bool:
            return (
                metric_value(
                    http_get(site + "/metrics")[1], "hbmon_pair_verdict", pair=pair, verdict=name
                )
                == 1.0
            )

        wait_for(lambda: verdict(tokyo, "osaka-01", "alive"), READY, "osaka-01 alive at tokyo")
        wait_for(lambda: verdict(osaka, "tokyo-01", "alive"), READY, "tokyo-01 alive at osaka")
        assert failover_runs(runs) == []
        # every metric the rules use is exported (a rename would silence an alert)
        exported = set(re.findall(r"^# TYPE (\S+)", http_get(tokyo + "/metrics")[1], re.M))
        used = set(re.findall(r"\bhbmon_[a-z_]+", RULES.read_text()))
        assert used - exported == set(), f"rules use metrics hbmon does not export: {used}"

        # -- a dead host: exactly one failover, journaled with its reason ------------------
        lab = [sys.executable, "-m", "hbmon.cli", "lab"]
        killed = subprocess.run(
            [*lab, "kill-host", "osaka-01", "--url", osaka],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert killed.returncode == 0, killed.stdout + killed.stderr
        t_kill = time.monotonic()

        def failed_over() -> list[str]:
            processes.check_running()
            return failover_runs(runs)

        wait_for(failed_over, FAILOVER_WITHIN, "the failover command for osaka-01")
        took = time.monotonic() - t_kill
        print(f"kill-host to failover command: {took:.1f} s")
        assert prom.firing("HbmonHostDown", "osaka-01")

        # -- Alertmanager repeats the notification: each reaches the guard and is refused --
        def decisions() -> list[dict[str, Any]]:
            """What the guard decided on each notification for osaka-01 it received."""
            processes.check_running()
            return [
                e
                for e in journal(tokyo_journal)
                if e.get("pair") == "osaka-01" and e.get("event") in ("started", "refused")
            ]

        t_first = time.monotonic()
        seen = wait_for(
            lambda: len(decisions()) > REPEATS and decisions(),
            REPEATS_WITHIN,
            f"{REPEATS} repeated HbmonHostDown notifications at tokyo's guard",
        )
        print(f"{len(seen) - 1} repeat(s) at the guard in {time.monotonic() - t_first:.1f} s")
        assert [e["event"] for e in seen] == ["started"] + ["refused"] * (len(seen) - 1), seen
        for refused in seen[1:]:
            assert refused["action"] == "none", refused
            reason = refused["reason"]
            assert "hold-down" in reason or "already running" in reason, refused

        def counts_agree() -> tuple[float, float, int] | None:
            """Alertmanager's webhook notifications (none failed), the guard's journal and
            hbmon_failover_total, read at a moment between two repeats."""
            am = parse_metrics(http_get(f"http://127.0.0.1:{am_port}/metrics")[1])
            sent = sum(
                v
                for n, labels, v in am
                if n == "alertmanager_notifications_total"
                and labels.get("integration") == "webhook"
            )
            failed = sum(
                v
                for n, labels, v in am
                if n == "alertmanager_notifications_failed_total"
                and labels.get("integration") == "webhook"
            )
            assert failed == 0, f"{failed} webhook notification(s) failed"
            refused = metric_value(
                http_get(tokyo + "/metrics")[1],
                "hbmon_failover_total",
                pair="osaka-01",
                result="refused",
            )
            decided = len(decisions())
            return (sent, refused or 0, decided) if sent == decided == (refused or 0) + 1 else None

        sent, _, _ = wait_for(
            counts_agree, 10, "Alertmanager's notification count to match the guard's decisions"
        )
        assert sent > REPEATS
        assert failover_runs(runs) == ["osaka-01"], (
            f"after {took:.1f} s and {sent:.0f} notifications"
        )

        entries = [e for e in journal(tokyo_journal) if e.get("pair") == "osaka-01"]
        starts = [e for e in entries if e["event"] == "started"]
        assert len(starts) == 1, entries
        assert "host_down" in starts[0]["reason"], starts[0]
        assert starts[0]["action"] == "failover"
        executed = [e for e in entries if e["event"] == "executed"]
        assert len(executed) == 1, entries
        assert executed[0]["exit_code"] == 0
        assert not [e for e in entries if e["event"] in ("failed", "timed_out")], entries
        assert (
            metric_value(
                http_get(tokyo + "/metrics")[1],
                "hbmon_failover_total",
                pair="osaka-01",
                result="executed",
            )
            == 1.0
        )

        # -- a network partition: the alert fires, no failover ever runs -------------------
        parted = subprocess.run(
            [*lab, "partition", "tokyo-01", "--url", osaka],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert parted.returncode == 0, parted.stdout + parted.stderr
        t_part = time.monotonic()
        wait_for(
            lambda: prom.firing("HbmonNetworkPartition", "tokyo-01"),
            FAILOVER_WITHIN,
            "HbmonNetworkPartition firing for tokyo-01 in Prometheus",
        )
        print(f"partition to HbmonNetworkPartition firing: {time.monotonic() - t_part:.1f} s")
        # long enough for a (wrong) HbmonHostDown to pass its for, group_wait and the webhook
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            prom.alerts()
            time.sleep(0.25)
        assert verdict(osaka, "tokyo-01", "network_partition")
        wrong = [
            a
            for a in prom.seen
            if a["labels"].get("alertname") == "HbmonHostDown"
            and a["labels"].get("pair") == "tokyo-01"
        ]
        assert wrong == [], wrong
        assert "tokyo-01" not in failover_runs(runs)
        assert not [
            e
            for e in journal(osaka_journal)
            if e.get("pair") == "tokyo-01" and e.get("event") == "started"
        ]
        dry = subprocess.run(
            [*lab[:-1], "failover", "tokyo-01", "--dry-run", "--url", osaka],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert "would be refused" in dry.stdout
        assert "network_partition" in dry.stdout
        assert failover_runs(runs) == ["osaka-01"]
        # Alertmanager kept repeating osaka-01's HbmonHostDown all along: still one start
        late = decisions()
        assert [e["event"] for e in late].count("started") == 1, late
        assert len(late) > len(seen), "no repeat reached the guard during the partition check"
        processes.check_running()
    except BaseException as exc:
        exc.add_note(processes.tails())
        raise
    finally:
        elapsed = time.monotonic() - started
        print(f"end-to-end chain: {elapsed:.1f} s")
