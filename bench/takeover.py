"""Issue 14, Speed: from the last beat of a killed site to its failover command starting.

Everything is real and on localhost: a 3-member etcd 3.4 cluster on 127.0.0.1 ports, site A
``hbmon run`` beating one pair (``[arbiter]`` + ``demote``), site B ``hbmon run`` watching it
(``[[watch_glob]]`` over a folder, rescan 1 s, ``failover`` + the webhook token), a real
Prometheus with the shipped ``deploy/prometheus/prometheus.yml`` and ``hbmon.rules.yml``
scraping A and B, and a real Alertmanager with the shipped
``deploy/alertmanager/alertmanager.yml`` calling B's webhook.  The shipped files are
rewritten only where they must be on a test machine: ports, targets, the token file path,
and one external label ``bench_round`` (each round has its own Prometheus and its own copy of
the rules, so that each samples its own scrape and evaluation phase: see
``Lab.start_prometheus``); and, only when asked with ``--for``/``--group-wait``/
``--scrape-interval``/``--evaluation-interval``, the value named, to measure what a change
would give.  The
arbiter timing is hbmon's default (lease_ttl 15 s, request_timeout 2 s, demote_budget
5 s) unless ``--lease-ttl`` etc. say otherwise; hbmon's interval and miss_threshold are its
defaults (1 s, 3).  The "remote copy" is B reading A's PVOL file itself (the same file),
and the network beats go over UDP on loopback.

Each round (an independent sample): a fresh pair id and volume file in the folder B's glob
watches; A is started with a configuration that beats that pair; once B reads it alive on
both paths, A owns it at the arbiter (A's /status.json) and Prometheus has scraped it alive
at B, the bench waits a random 0-5 s (so the kill falls on every phase of the lease
renewal, the scrape and the rule evaluation), ``kill -9``s A, reads the writer time of A's
last beat from the PVOL slot, and waits for the failover command (a script that appends
CLOCK_REALTIME, CLOCK_MONOTONIC and HBMON_FENCING_TOKEN to a file) to start::

    takeover latency = promote time (the script's first line) - last beat's writer time

The round's breakdown, each relative to the last beat: every path stale at B (B's log,
"verdict alive -> isolated|host_down"), the owner key deleted at etcd (an ``etcdctl
watch`` the bench runs), the first Prometheus scrape of the non-alive verdict, the alert
firing at Prometheus (the first ``ALERTS{alertstate="firing"}`` sample), the first webhook
call (Alertmanager's "Notify success" for the hbmon-failover receiver, debug log), the
guard's journal entry ``started``, the promote.  The same-run baseline is the arbiter's
floor: the owner key deleted - last beat (no failover can start before it), per round.
Nothing asserts a time.

    python bench/takeover.py                  # 20 kills, the shipped settings
    python bench/takeover.py --kills 3        # quicker (--quick is the same)
    python bench/takeover.py --for 30s --group-wait 10s   # what main shipped before
"""

from __future__ import annotations

import argparse
import base64
import calendar
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from common import (
    REPO,
    Hbmon,
    exit_on_sigterm,
    fmt,
    free_port,
    http_get,
    http_json,
    info,
    loadavg,
    machine_line,
    quantile,
    report,
    stop,
)

from hbmon.arbiter.lease import LeaseTiming
from hbmon.record import SLOT_SIZE, RecordError, decode

PY = sys.executable
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "hbmon.rules.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
ACTING = ("HbmonHostDown", "HbmonSiteIsolated")  # the alerts routed to the webhook
GOAL = 30.0  # issue 14: p99 <= 30 s
JITTER = 5.0  # random wait before each kill: one scrape / evaluation / renewal period
READY = 60.0
PROMOTE_WITHIN = 120.0

#: Appends "CLOCK_REALTIME CLOCK_MONOTONIC pair token site event" to the file in argv[1].
SCRIPT = """\
import os, sys, time
real, mono = time.time(), time.monotonic()
env = os.environ
with open(sys.argv[1], "a") as f:
    f.write(f"{real:.6f} {mono:.6f} {env.get('HBMON_PAIR')} "
            f"{env.get('HBMON_FENCING_TOKEN')} {env.get('HBMON_SITE')} {sys.argv[2]}\\n")
"""


# -- processes -------------------------------------------------------------------------------


class Procs:
    """Every process the bench starts, each logging to a file; all stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                **popen,
            )  # fmt: skip
        self.procs[name] = proc
        return proc

    def check(self, *names: str) -> None:
        for name in names or list(self.procs):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 25) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"--- {name} ({self.logs / name}.log) ---\n" + "\n".join(text[-lines:])

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            stop(proc)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def missing_tools(*names: str) -> list[str]:
    """Which of the programs ``names`` are not on PATH (the alertmanager under either name)."""
    found = {n: shutil.which(n) is not None for n in names}
    if "prometheus-alertmanager" in found:
        found["prometheus-alertmanager"] |= shutil.which("alertmanager") is not None
    return [n for n, ok in found.items() if not ok]


#: The Debian package of each tool the arbiter benches need.
PACKAGES = {"etcd": "etcd-server", "etcdctl": "etcd-client", "prometheus": "prometheus",
            "prometheus-alertmanager": "prometheus-alertmanager"}  # fmt: skip


def skipped_without(target: str, *tools: str) -> bool:
    """True, after the line that says the bench is skipped, when a tool is not installed."""
    missing = missing_tools(*tools)
    if missing:
        print(f"target {target}: skipped, not installed: {', '.join(missing)} (Debian "
              f"packages {', '.join(PACKAGES[t] for t in tools)})")  # fmt: skip
    return bool(missing)


def wait_until(what: str, check: Any, timeout: float, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


# -- etcd --------------------------------------------------------------------------------------


class Etcd:
    """A 3-member etcd cluster on 127.0.0.1 (default raft timing: 100 ms / 1000 ms)."""

    NAMES = ("e1", "e2", "e3")

    def __init__(self, procs: Procs, folder: Path) -> None:
        self.procs, self.folder = procs, folder
        self.client = {n: free_port() for n in self.NAMES}
        self.peer = {n: free_port() for n in self.NAMES}
        self.token = f"hbmon-bench-{secrets.token_hex(4)}"

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{self.client[n]}" for n in self.NAMES]

    def argv(self, name: str) -> list[str]:
        cluster = ",".join(f"{n}=http://127.0.0.1:{self.peer[n]}" for n in self.NAMES)
        client, peer = f"http://127.0.0.1:{self.client[name]}", f"http://127.0.0.1:{self.peer[name]}"
        return [
            "etcd", "--name", name, "--data-dir", str(self.folder / f"{name}.data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", cluster, "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", "stderr",
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> float:
        began = time.monotonic()
        for name in self.NAMES:
            self.procs.start(f"etcd-{name}", self.argv(name))
        wait_until("a healthy etcd cluster", self.healthy, timeout, every=0.2)
        return time.monotonic() - began

    def etcdctl(self, *args: str, timeout: float = 3.0) -> subprocess.CompletedProcess[str]:
        argv = ["etcdctl", f"--endpoints={','.join(self.endpoints)}",
                f"--command-timeout={timeout:g}s", *args]  # fmt: skip
        env = {**os.environ, "ETCDCTL_API": "3"}
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout + 5)

    def healthy(self) -> bool:
        self.procs.check(*(f"etcd-{n}" for n in self.NAMES))
        out = self.etcdctl("endpoint", "health", "-w", "json", timeout=2.0)
        try:
            return all(e.get("health") for e in json.loads(out.stdout)) and out.returncode == 0
        except ValueError:
            return False

    def watch(self, prefix: str) -> KeyWatch:
        return KeyWatch(self, prefix)


class KeyWatch:
    """``etcdctl watch --prefix``: every event's wall time of arrival, type and key."""

    def __init__(self, etcd: Etcd, prefix: str) -> None:
        argv = ["etcdctl", f"--endpoints={','.join(etcd.endpoints)}", "watch", "--prefix",
                prefix, "-w", "json"]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "ETCDCTL_API": "3"}, bufsize=0,
        )  # fmt: skip
        self.events: list[tuple[float, str, str]] = []  # (time.time(), PUT|DELETE, key)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, name="etcd-watch", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.time()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                for ev in json.loads(raw).get("Events") or []:
                    key = base64.b64decode(ev["kv"]["key"]).decode()
                    kind = "DELETE" if ev.get("type") == 1 else "PUT"
                    with self.lock:
                        self.events.append((now, kind, key))

    def first(self, kind: str, key: str, after: float) -> float | None:
        with self.lock:
            return next((t for t, k, n in self.events if k == kind and n == key and t >= after),
                        None)  # fmt: skip

    def close(self) -> None:
        stop(self.proc)
        self.thread.join(5)


# -- scripts, keys, volumes --------------------------------------------------------------------


def write_script(folder: Path) -> Path:
    path = folder / "record_start.py"
    path.write_text(SCRIPT)
    return path


def secret_file(path: Path) -> str:
    value = secrets.token_hex(32)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


def init_volume(path: Path, pair: str) -> None:
    with path.open("wb") as f:
        f.truncate(SLOT_SIZE)
    subprocess.run(
        [PY, "-m", "hbmon.cli", "volume", "init", str(path), "--id", pair],
        check=True, capture_output=True, cwd=REPO, timeout=60,
    )  # fmt: skip


def last_beat(path: Path, pair: str) -> float:
    """The writer time of the record in slot 0 of ``path`` (A's last beat after the kill)."""
    with path.open("rb") as f:
        data = f.read(SLOT_SIZE)
    try:
        return decode(data, pair).writer_time
    except RecordError as err:
        raise RuntimeError(f"{path}: no valid record of {pair}: {err}") from None


def read_starts(path: Path) -> list[dict[str, Any]]:
    """The lines the start-recording script appended: realtime, monotonic, pair, token."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) == 6:
            out.append({"real": float(parts[0]), "mono": float(parts[1]), "pair": parts[2],
                        "token": parts[3], "site": parts[4], "event": parts[5]})  # fmt: skip
    return out


def first_start(path: Path, pair: str, event: str) -> dict[str, Any] | None:
    """The first line of ``read_starts(path)`` of ``pair`` and ``event`` (promote, demote)."""
    return next((s for s in read_starts(path) if s["pair"] == pair and s["event"] == event), None)


def site_file(folder: Path, site: str, port: int, body: str) -> Path:
    """``folder/SITE.toml``: site, state_dir (``folder/state``) and listen, then ``body``."""
    (folder / "state").mkdir(parents=True, exist_ok=True)
    path = folder / f"{site}.toml"
    path.write_text(
        f'site = "{site}"\nstate_dir = "{folder / "state"}"\nlisten = "127.0.0.1:{port}"\n'
        + body
    )
    return path


def seconds(text: str) -> float:
    """A Prometheus duration of one unit ("5s", "1m", "500ms") in seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text.strip())
    if m is None:
        raise ValueError(f"duration {text!r}: expected e.g. 5s, 1m or 500ms")
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]


def toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


@dataclass(frozen=True)
class ArbiterTiming:
    """``[arbiter]`` timing keys to write; None: not written (hbmon's default)."""

    lease_ttl: float | None = None
    request_timeout: float | None = None
    demote_budget: float | None = None

    def table(self, endpoints: Sequence[str], prefix: str) -> str:
        text = f"\n[arbiter]\nendpoints = {toml_list(endpoints)}\nprefix = \"{prefix}\"\n"
        for key in ("lease_ttl", "request_timeout", "demote_budget"):
            value = getattr(self, key)
            if value is not None:
                text += f'{key} = "{value:g}s"\n'
        return text

    def effective(self) -> LeaseTiming:
        d = LeaseTiming()
        return LeaseTiming(
            d.lease_ttl if self.lease_ttl is None else self.lease_ttl,
            d.request_timeout if self.request_timeout is None else self.request_timeout,
            d.demote_budget if self.demote_budget is None else self.demote_budget,
        )

    def describe(self) -> str:
        t = self.effective()
        parts = []
        for key in ("lease_ttl", "request_timeout", "demote_budget"):
            given = getattr(self, key) is not None
            parts.append(f"{key} {getattr(t, key):g}s" + (" (override)" if given else " (default)"))
        return ", ".join(parts)


def lab_parser(doc: str, count: str, default: int) -> argparse.ArgumentParser:
    """The bench's parser with its first options: --COUNT (how many rounds), --quick (3 of
    them), --seed; the bench adds its own, then :func:`add_lab_args`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument(f"--{count}", type=int, default=default)
    p.add_argument("--quick", action="store_true", help=f"3 {count}")
    p.add_argument("--seed", type=int, default=None)
    return p


def round_count(args: argparse.Namespace, count: str, default: int) -> int:
    """How many rounds: --COUNT, or 3 with --quick unless --COUNT says otherwise."""
    given: int = getattr(args, count)
    return 3 if args.quick and given == default else given


def add_lab_args(p: argparse.ArgumentParser) -> None:
    """The options after the bench's own: the arbiter timing, --keep, run_all's --runs."""
    p.add_argument("--lease-ttl", type=float)
    p.add_argument("--request-timeout", type=float)
    p.add_argument("--demote-budget", type=float)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--runs", type=int, help="ignored (bench/run_all passes it to every bench)")


def seed_and_timing(args: argparse.Namespace, bench: str) -> tuple[int, ArbiterTiming]:
    """``--seed`` (or a random one) and the arbiter timing; exits if it cannot be safe."""
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    timing = ArbiterTiming(args.lease_ttl, args.request_timeout, args.demote_budget)
    problem = timing.effective().problem()
    if problem is not None:
        raise SystemExit(f"{bench}: {problem}")
    return seed, timing


# -- the shipped Prometheus and Alertmanager configuration, rewritten ----------------------------


def sub_exactly(pattern: str, repl: str, text: str, count: int, what: str) -> str:
    new, found = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if found != count:
        raise RuntimeError(
            f"{what}: expected {count} match(es) of {pattern!r}, found {found}; the shipped "
            "file changed: update bench/takeover.py's rewriting"
        )
    return new


def _alert_for(name: str) -> str:
    """The ``for:`` value of alert ``name`` (group 2) in the rules file."""
    return rf"(^\s*- alert: {name}\s*\n(?:(?!\s*- alert:).*\n)*?\s+for:\s*)(\S+)"


def shipped(text: str, pattern: str) -> str | None:
    m = re.search(pattern, text, flags=re.MULTILINE)
    return m.group(2) if m else None


def _webhook_group_wait() -> str:
    """group_wait of the route whose receiver is hbmon-failover (group 2)."""
    return (
        r"(^\s*- receiver: hbmon-failover\s*\n(?:(?!\s*- receiver:).*\n)*?"
        r"\s+group_wait:\s*)(\S+)"
    )


@dataclass(frozen=True)
class Overrides:
    """Values changed in this run only (None: as shipped)."""

    rule_for: str | None = None  # HbmonHostDown and HbmonSiteIsolated
    group_wait: str | None = None  # the webhook route
    scrape_interval: str | None = None
    evaluation_interval: str | None = None


def shipped_settings() -> dict[str, str | None]:
    rules, prom, am = RULES.read_text(), PROM_CONFIG.read_text(), AM_CONFIG.read_text()
    out: dict[str, str | None] = {f"{a} for": shipped(rules, _alert_for(a)) for a in ACTING}
    out["webhook route group_wait"] = shipped(am, _webhook_group_wait())
    for key in ("scrape_interval", "evaluation_interval"):
        out[key] = shipped(prom, rf"^(\s+{key}:\s*)(\S+)")
    routed = re.search(r"- receiver: hbmon-failover\s*\n\s*matchers:\s*\n\s*- (.+)", am)
    out["webhook route matcher"] = routed.group(1).strip() if routed else None
    return out


def make_rules(folder: Path, ov: Overrides) -> Path:
    text = RULES.read_text()
    if ov.rule_for is not None:
        for name in ACTING:
            if shipped(text, _alert_for(name)) is not None:
                text = sub_exactly(_alert_for(name), rf"\g<1>{ov.rule_for}", text, 1, name)
    path = folder / RULES.name
    path.write_text(text)
    return path


def make_prometheus_config(
    folder: Path, targets: list[str], alertmanager: str, ov: Overrides,
    external: dict[str, str] | None = None,
) -> Path:
    text = PROM_CONFIG.read_text()
    if external:
        labels = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in external.items())
        text = sub_exactly(r"^global:\s*\n", f"global:\n  external_labels:\n{labels}", text, 1,
                           "prometheus.yml global")  # fmt: skip
    for key, value in (("scrape_interval", ov.scrape_interval),
                       ("evaluation_interval", ov.evaluation_interval)):  # fmt: skip
        if value is not None:
            text = sub_exactly(rf"^(\s+{key}:\s*)\S+", rf"\g<1>{value}", text, 1, key)
    text = sub_exactly(
        r'targets: \["127\.0\.0\.1:9093"\]', f"targets: {json.dumps([alertmanager])}", text, 1,
        "prometheus.yml alertmanager target",
    )  # fmt: skip
    text = sub_exactly(
        r'targets: \["127\.0\.0\.1:9799"\]', f"targets: {json.dumps(targets)}", text, 1,
        "prometheus.yml hbmon targets",
    )  # fmt: skip
    path = folder / PROM_CONFIG.name
    path.write_text(text)
    return path


def make_alertmanager_config(folder: Path, webhook_port: int, token: Path, ov: Overrides) -> Path:
    text = AM_CONFIG.read_text()
    text = sub_exactly(
        r"url: http://127\.0\.0\.1:9799/api/v1/alerts",
        f"url: http://127.0.0.1:{webhook_port}/api/v1/alerts", text, 1, "webhook url",
    )  # fmt: skip
    text = sub_exactly(
        r"credentials_file: /etc/hbmon/webhook\.token", f"credentials_file: {token}", text, 1,
        "credentials_file",
    )  # fmt: skip
    if ov.group_wait is not None:
        text = sub_exactly(_webhook_group_wait(), rf"\g<1>{ov.group_wait}", text, 1, "group_wait")
    path = folder / AM_CONFIG.name
    path.write_text(text)
    return path


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        doc = http_json(f"{self.url}/api/v1/query?query={urllib.parse.quote(expr)}", timeout=10)
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def first_sample(self, selector: str, after: float, window: str = "30m") -> float | None:
        """The time stamp of the first raw sample of ``selector`` with value 1 after
        ``after`` (Unix seconds), over every series it selects."""
        times = [
            float(t)
            for series in self.query(f"{selector}[{window}]")
            for t, v in series.get("values", [])
            if float(t) >= after and float(v) == 1.0
        ]
        return min(times) if times else None


# -- reading logs --------------------------------------------------------------------------------

HBMON_LOG = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ (\S+): (.*)$")
AM_TS = re.compile(r"\bts=(\S+)")


def hbmon_log(path: Path) -> list[tuple[float, str]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = HBMON_LOG.match(line)
        if m:
            wall = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
            out.append((wall + int(m.group(2)) / 1000, m.group(4)))
    return out


def parse_rfc3339(text: str) -> float:
    """Alertmanager's ts=2024-01-02T03:04:05.678Z (UTC, any sub-second digits)."""
    head, _, frac = text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))


def webhook_calls(am_log: Path, pair: str, after: float) -> list[tuple[float, str]]:
    """(time, alertname) of each notification of ``pair``'s group that the hbmon-failover
    receiver delivered after ``after``, from Alertmanager's debug log: a "flushing" line
    names the group (its aggrGroup has the pair and the alertname), the "Notify success"
    line of receiver hbmon-failover that follows it within 5 s is its delivery (the
    webhook has answered).  The people route's groups flush too (group_wait 30s), but no
    hbmon-failover delivery follows them unless one of the webhook's coincides."""
    lines = []
    for line in am_log.read_text(errors="replace").splitlines():
        m = AM_TS.search(line)
        if m:
            lines.append((parse_rfc3339(m.group(1)), line))
    out = []
    for i, (when, line) in enumerate(lines):
        if when < after or "msg=flushing" not in line or f'pair=\\"{pair}\\"' not in line:
            continue
        name = re.search(r'alertname=\\"(Hbmon\w+)\\", pair=', line)
        for later, other in lines[i + 1 :]:
            if later > when + 5.0:
                break
            if "Notify success" in other and "receiver=hbmon-failover" in other:
                out.append((later, name.group(1) if name else "?"))
                break
    return sorted(set(out))


# -- the lab -----------------------------------------------------------------------------------


@dataclass
class Sample:
    pair: str
    latency: float  # promote - last beat
    last_beat: float
    jitter: float
    events: dict[str, float | None] = field(default_factory=dict)  # name -> seconds after beat
    token: str = "?"
    note: str = ""


T = TypeVar("T")


class ArbiterLab:
    """What the labs of this bench and bench/demote_lead.py share: etcd and a watch on the
    owner keys for the whole run, the start-recording script, site A (one per round), and
    the loop over the rounds."""

    def __init__(self, root: Path, timing: ArbiterTiming, seed: int, name: str) -> None:
        self.root, self.timing = root, timing
        self.rng = random.Random(seed)
        (root / "logs").mkdir(parents=True)
        self.procs = Procs(root / "logs")
        self.etcd = Etcd(self.procs, root / "etcd")
        self.prefix = f"/hbmon-{name}-{secrets.token_hex(3)}"
        self.script = write_script(root)
        self.starts = root / "starts.log"
        self.a: Hbmon | None = None
        self.watch: KeyWatch | None = None

    def start(self) -> None:
        formed = self.etcd.start()
        info(f"etcd: 3 members on 127.0.0.1 formed in {formed:.1f} s")
        self.watch = self.etcd.watch(f"{self.prefix}/owner/")

    def sites(self) -> list[Hbmon | None]:
        return [self.a]

    def close(self) -> None:
        for site in self.sites():
            if site is not None:
                with contextlib.suppress(Exception):
                    site.stop()
        if self.watch is not None:
            self.watch.close()
        self.procs.stop_all()

    def dump(self) -> None:
        """After an error: the end of every process's log."""
        for name in list(self.procs.procs):
            print(self.procs.tail(name, 10))

    def a_owns(self, pair: str) -> bool:
        assert self.a is not None
        self.a.check()
        try:
            arbiter = self.a.status().get("arbiter") or {}
        except (urllib.error.URLError, OSError):
            return False
        return pair in (arbiter.get("owned") or [])

    def run(
        self, count: int, word: str, one: Callable[[int], T], line: Callable[[T], str],
        keep: bool,
    ) -> tuple[list[T], int]:  # fmt: skip
        """Start, then ``one(n)`` for n < ``count``, each printed with ``line`` (a
        RuntimeError fails that round, the third one the run), then close and remove the
        folder (kept with ``keep`` or after an error): (the rounds, how many failed)."""
        out: list[T] = []
        failures = 0
        try:
            self.start()
            for n in range(count):
                try:
                    item = one(n)
                except RuntimeError as err:
                    failures += 1
                    print(f"{word} {n}: FAILED: {err}", flush=True)
                    if failures >= 3:
                        raise
                    continue
                out.append(item)
                print(line(item) + f"  load {loadavg()}", flush=True)
        except Exception as err:
            print(f"ERROR: {type(err).__name__}: {err}")
            self.dump()
            keep = True
        finally:
            self.close()
            if keep:
                print(f"kept {self.root}")
            else:
                shutil.rmtree(self.root, ignore_errors=True)
        return out, failures


class Lab(ArbiterLab):
    """etcd + B + Prometheus + Alertmanager for the whole run; A per round."""

    def __init__(self, root: Path, timing: ArbiterTiming, ov: Overrides, seed: int) -> None:
        super().__init__(root, timing, seed, "takeover")
        self.ov = ov
        self.vols = root / "vols"
        self.vols.mkdir()
        self.key = root / "hb.key"
        secret_file(self.key)
        self.token_file = root / "webhook.token"
        secret_file(self.token_file)
        self.port_a, self.port_b = free_port(), free_port()
        self.udp_a, self.udp_b = free_port(), free_port()
        self.am_port, self.prom_port = free_port(), free_port()
        self.prom = Prometheus(f"http://127.0.0.1:{self.prom_port}")
        self.b: Hbmon | None = None

    # -- set-up ---------------------------------------------------------------------------

    def b_config(self) -> Path:
        return site_file(
            self.root / "B", "B", self.port_b,
            'method = "both"\n'
            f'\n[network]\nlisten = "127.0.0.1:{self.udp_b}"\nkey_file = "{self.key}"\n'
            f'\n[webhook]\ntoken_file = "{self.token_file}"\n'
            + self.timing.table(self.etcd.endpoints, self.prefix)
            + f'\n[[watch_glob]]\npattern = "{self.vols}/*.vol"\nmethod = "both"\n'
            'rescan = "1s"\n'
            f"failover = {toml_list([PY, str(self.script), str(self.starts), 'promote'])}\n",
        )  # fmt: skip

    def a_config(self, pair: str, folder: Path) -> Path:
        return site_file(
            folder, "A", self.port_a,
            f'\n[network]\nlisten = "127.0.0.1:{self.udp_a}"\nkey_file = "{self.key}"\n'
            + self.timing.table(self.etcd.endpoints, self.prefix)
            + f'\n[[beat]]\nid = "{pair}"\nvolume = "{self.vols / (pair + ".vol")}"\nslot = 0\n'
            f'peers = ["127.0.0.1:{self.udp_b}"]\n'
            f"demote = {toml_list([PY, str(self.script), str(self.starts), 'demote'])}\n",
        )  # fmt: skip

    def start(self) -> None:
        super().start()
        check = subprocess.run(
            [PY, "-m", "hbmon.cli", "config", "check", str(self.b_config())],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )  # fmt: skip
        if check.returncode != 0:
            raise RuntimeError(f"config check B: {check.stdout}{check.stderr}")
        self.b = Hbmon(self.b_config(), self.root / "logs" / "hbmon-B.log", self.port_b, "info")
        self.b.wait_serving()
        conf = self.root / "conf"
        conf.mkdir()
        am_config = make_alertmanager_config(conf, self.port_b, self.token_file, self.ov)
        am = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if am is None or shutil.which("prometheus") is None:
            raise RuntimeError("prometheus and prometheus-alertmanager must be installed")
        self.procs.start("alertmanager", [
            am, f"--config.file={am_config}", f"--storage.path={self.root / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{self.am_port}", "--cluster.listen-address=",
            "--log.level=debug",
        ])  # fmt: skip
        url = f"http://127.0.0.1:{self.am_port}/-/ready"
        wait_until("alertmanager", lambda: self._ready("alertmanager", url), READY, 0.2)

    def start_prometheus(self, n: int) -> None:
        """A fresh Prometheus for round ``n``.  Prometheus derives the phase of its scrapes
        from a hash of the target and its external labels, and the phase of a rule group's
        evaluation from a hash of the group's name and file: one process would give every
        round the same scrape-to-evaluation phase.  So each round gets its own process, an
        external label ``bench_round`` and its own copy of the rules file (a folder per
        round): the phases differ from round to round like the rest of the sample."""
        self.procs.stop("prometheus")
        conf = self.root / "conf" / f"r{n:03d}"
        conf.mkdir(parents=True)
        make_rules(conf, self.ov)
        prom_config = make_prometheus_config(
            conf, [f"127.0.0.1:{self.port_a}", f"127.0.0.1:{self.port_b}"],
            f"127.0.0.1:{self.am_port}", self.ov, external={"bench_round": f"r{n:03d}"},
        )  # fmt: skip
        self.procs.start("prometheus", [
            "prometheus", f"--config.file={prom_config}",
            f"--storage.tsdb.path={self.root / 'prom-data' / f'r{n:03d}'}",
            f"--web.listen-address=127.0.0.1:{self.prom_port}",
        ])  # fmt: skip
        url = f"{self.prom.url}/-/ready"
        wait_until("prometheus", lambda: self._ready("prometheus", url), READY, 0.2)

    def _ready(self, name: str, url: str) -> bool:
        self.procs.check(name)
        try:
            http_get(url, timeout=2)
            return True
        except (urllib.error.URLError, OSError):
            return False

    def sites(self) -> list[Hbmon | None]:
        return [self.a, self.b]

    def dump(self) -> None:
        super().dump()
        if self.b is not None:
            print(self.b.log_tail(20))

    # -- one round -----------------------------------------------------------------------------

    def b_rows(self, pair: str) -> list[dict[str, Any]]:
        assert self.b is not None
        self.b.check()
        try:
            rows: list[dict[str, Any]] = self.b.status()["rows"]
        except (urllib.error.URLError, OSError, KeyError):
            return []
        return [r for r in rows if r.get("pair") == pair]

    def ready(self, pair: str) -> bool:
        rows = self.b_rows(pair)
        alive = len(rows) == 2 and all(r["state"] == "alive" for r in rows)
        if not (alive and rows[0].get("verdict") == "alive" and self.a_owns(pair)):
            return False
        seen = self.prom.query(
            f'hbmon_pair_verdict{{pair="{pair}",verdict="alive",'
            f'instance="127.0.0.1:{self.port_b}"}} == 1'
        )
        return bool(seen)

    def round(self, n: int) -> Sample:
        pair = f"k{n:03d}"
        vol = self.vols / f"{pair}.vol"
        init_volume(vol, pair)
        self.start_prometheus(n)
        folder = self.root / f"A-{pair}"
        self.a = Hbmon(self.a_config(pair, folder), folder / "hbmon-A.log", self.port_a, "info")
        try:
            self.a.wait_serving()
            wait_until(f"{pair} alive at B, owned by A, scraped alive", lambda: self.ready(pair),
                       READY, 0.25)  # fmt: skip
            jitter = self.rng.uniform(0.0, JITTER)
            time.sleep(jitter)
            self.a.check()
            self.a.proc.send_signal(signal.SIGKILL)
            killed = time.time()
            self.a.proc.wait(10)
        finally:
            if self.a.alive():
                self.a.stop()
        beat = last_beat(vol, pair)

        def promoted() -> dict[str, Any] | None:
            assert self.b is not None
            self.b.check()
            return first_start(self.starts, pair, "promote")

        start = wait_until(f"the failover command of {pair}", promoted, PROMOTE_WITHIN, 0.05)
        time.sleep(1.0)  # (logs and journals written; the alert's samples stored)
        sample = Sample(pair, start["real"] - beat, beat, jitter, token=start["token"])
        sample.events = self.breakdown(pair, beat, killed, start["real"])
        sample.note = self.phases(sample)
        vol.unlink()  # B's rescan drops the pair: its alerts resolve, the next is independent
        return sample

    def phases(self, s: Sample) -> str:
        """Where in the scrape and evaluation periods this round fell: the scrape that
        first saw the pair not alive and the evaluation that fired the first alert, each
        modulo its interval (differs from round to round: see start_prometheus)."""
        settings = shipped_settings()
        scrape = seconds(self.ov.scrape_interval or settings["scrape_interval"] or "5s")
        every = seconds(self.ov.evaluation_interval or settings["evaluation_interval"] or "5s")
        seen = s.events.get("scraped not alive")
        fired = [s.events.get(f"{a} firing") for a in ACTING]
        fire = min((f for f in fired if f is not None), default=None)
        parts = []
        if seen is not None:
            parts.append(f"scrape at {(s.last_beat + seen) % scrape:.1f}")
        if fire is not None:
            parts.append(f"evaluation at {(s.last_beat + fire) % every:.1f}")
        return ", ".join(parts) + f" s (mod {scrape:g}/{every:g} s)" if parts else ""

    def breakdown(self, pair: str, beat: float, killed: float, promote: float) -> dict[str, Any]:
        ev: dict[str, float | None] = {"kill -9": killed}
        assert self.b is not None
        stale = next((t for t, msg in hbmon_log(self.b.log)
                      if t >= beat and re.match(rf"pair {re.escape(pair)}: verdict \S+ -> "
                                                r"(isolated|host_down)", msg)), None)  # fmt: skip
        ev["stale at B (verdict)"] = stale
        # (the verdict turning host_down at B: once etcd deleted the owner key, if B's
        # table judges the pair again then; n/a when it stays isolated)
        ev["host_down at B (verdict)"] = next(
            (t for t, msg in hbmon_log(self.b.log)
             if t >= beat and re.match(rf"pair {re.escape(pair)}: verdict \S+ -> host_down", msg)),
            None,
        )  # fmt: skip
        assert self.watch is not None
        ev["owner key deleted"] = self.watch.first("DELETE", f"{self.prefix}/owner/{pair}", beat)
        instance = f'instance="127.0.0.1:{self.port_b}"'
        try:
            ev["scraped not alive"] = self.prom.first_sample(
                f'hbmon_pair_verdict{{pair="{pair}",verdict=~"isolated|host_down",{instance}}}',
                beat,
            )
            for name in ACTING:
                ev[f"{name} firing"] = self.prom.first_sample(
                    f'ALERTS{{alertname="{name}",alertstate="firing",pair="{pair}",{instance}}}',
                    beat,
                )
        except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
            info(f"warning: Prometheus query failed: {err}")
        calls = webhook_calls(self.procs.logs / "alertmanager.log", pair, beat)
        ev["webhook call"] = calls[0][0] if calls else None
        ev["webhook alert"] = None
        self._webhook_alert = calls[0][1] if calls else "none"
        started = None
        with contextlib.suppress(OSError, ValueError):
            for line in (self.root / "B" / "state" / "failover.jsonl").read_text().splitlines():
                entry = json.loads(line)
                if entry.get("pair") == pair and entry.get("event") == "started":
                    started = float(entry["time"])
                    break
        ev["guard started"] = started
        ev["promote"] = promote
        return {k: (None if v is None else v - beat) for k, v in ev.items() if k != "webhook alert"}


# -- output --------------------------------------------------------------------------------------

ORDER = (
    "kill -9",
    "stale at B (verdict)",
    "scraped not alive",
    "HbmonSiteIsolated firing",
    "HbmonHostDown firing",
    "owner key deleted",
    "host_down at B (verdict)",
    "webhook call",
    "guard started",
    "promote",
)


def sample_line(s: Sample, alert: str) -> str:
    e = s.events
    bound = "?"
    key, call = e.get("owner key deleted"), e.get("webhook call")
    if key is not None and call is not None:
        bound = "arbiter" if key >= call else "alerts"
    return (
        f"{s.pair}: {s.latency:6.2f} s  (stale {fmt(e.get('stale at B (verdict)'), '', 2)}, "
        f"key deleted {fmt(key, '', 2)}, webhook {fmt(call, '', 2)} [{alert}], "
        f"promote {fmt(e.get('promote'), '', 2)}; token {s.token}; bound by {bound}; "
        f"kill {s.jitter:.1f} s after ready; {s.note})"
    )


def breakdown_lines(s: Sample) -> list[str]:
    """The round's events in the order they happened, each with its step from the one
    before; those that did not happen (an alert that never fired) at the end."""
    seen = sorted((v, k) for k, v in s.events.items() if v is not None)
    out, prev = [], 0.0
    for value, name in seen:
        out.append(f"  {name:<26} {value:7.2f} s after the last beat  (+{value - prev:5.2f})")
        prev = value
    out += [f"  {name:<26}     n/a" for name, v in s.events.items() if v is None]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    exit_on_sigterm()
    p = lab_parser(__doc__, "kills", 20)
    p.add_argument("--for", dest="rule_for", help="override for: of HbmonHostDown/SiteIsolated")
    p.add_argument("--group-wait", help="override group_wait of the webhook route")
    p.add_argument("--scrape-interval", help="override prometheus.yml scrape_interval")
    p.add_argument("--evaluation-interval", help="override prometheus.yml evaluation_interval")
    add_lab_args(p)
    args = p.parse_args(argv)
    if skipped_without("14 takeover", "etcd", "etcdctl", "prometheus", "prometheus-alertmanager"):
        return 0
    kills = round_count(args, "kills", 20)
    seed, timing = seed_and_timing(args, "takeover")
    ov = Overrides(args.rule_for, args.group_wait, args.scrape_interval, args.evaluation_interval)
    print("command: " + " ".join(["python", "bench/takeover.py", *(argv or sys.argv[1:])]))
    print(machine_line(), flush=True)
    settings = shipped_settings()
    print("shipped: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    changed = {k: v for k, v in vars(ov).items() if v is not None}
    print(f"overridden in this run: {changed or 'nothing'}; arbiter {timing.describe()}")
    print(f"hbmon: interval 1s, miss_threshold 3 (defaults); {kills} kills, seed {seed}",
          flush=True)  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="hbmon-bench-takeover-"))
    lab = Lab(root, timing, ov, seed)
    rounds, failures = lab.run(
        kills, "round", lambda n: (lab.round(n), lab._webhook_alert),
        lambda r: sample_line(*r), args.keep,
    )  # fmt: skip
    samples = [s for s, _ in rounds]
    alerts = [a for _, a in rounds]
    return summary(samples, alerts, failures, timing, kills)


def summary(
    samples: list[Sample], alerts: list[str], failures: int, timing: ArbiterTiming, kills: int
) -> int:
    if not samples:
        print("takeover: no sample")
        return 1
    lat = [s.latency for s in samples]
    t = timing.effective()
    floors = [s.events["owner key deleted"] for s in samples
              if s.events.get("owner key deleted") is not None]  # fmt: skip
    p50, p99 = quantile(lat, 0.5), quantile(lat, 0.99)
    print(f"results: {len(samples)} of {kills} kills measured ({failures} failed rounds); "
          f"load average {loadavg()}")  # fmt: skip
    report(
        "14 takeover",
        "last beat -> failover command started, p99",
        fmt(p99, " s", 2),
        fmt(quantile(floors, 0.99) if floors else None, " s (owner key deleted, p99)", 2),
        fmt(p99 / quantile(floors, 0.99) if floors else None, "x", 2),
        f"p99 <= {GOAL:g} s",
    )
    info(f"p50 {p50:.2f} s, p99 {p99:.2f} s, max {max(lat):.2f} s, min {min(lat):.2f} s "
         f"(nearest-rank quantiles over {len(lat)} samples)")  # fmt: skip
    if floors:
        info(f"baseline (same run): owner key deleted after the last beat p50 "
             f"{quantile(floors, 0.5):.2f} s, p99 {quantile(floors, 0.99):.2f} s, max "
             f"{max(floors):.2f} s; lease_ttl {t.lease_ttl:g} s, renewed every "
             f"{t.renew_every:g} s: theory {t.lease_ttl - t.renew_every:g}-{t.lease_ttl:g} s "
             "+ etcd's expiry check (<= 0.5 s)")  # fmt: skip
    by: dict[str, list[float]] = {"arbiter": [], "alerts": []}
    for s in samples:
        key, call = s.events.get("owner key deleted"), s.events.get("webhook call")
        if key is not None and call is not None:
            by["arbiter" if key >= call else "alerts"].append(s.latency)
    info("bound by the arbiter (webhook call before the key was deleted): "
         f"{len(by['arbiter'])} rounds" + (f", p50 {quantile(by['arbiter'], 0.5):.2f} s"
                                          if by["arbiter"] else ""))  # fmt: skip
    info("bound by the alert chain (key deleted before the first webhook call): "
         f"{len(by['alerts'])} rounds" + (f", p50 {quantile(by['alerts'], 0.5):.2f} s"
                                         if by["alerts"] else ""))  # fmt: skip
    counts = {a: alerts.count(a) for a in sorted(set(alerts))}
    info(f"first webhook call carried: {counts}")
    for name in ORDER[1:-1]:
        vals = [s.events[name] for s in samples if s.events.get(name) is not None]
        if vals:
            info(f"{name:<26} p50 {quantile(vals, 0.5):6.2f} s  max {max(vals):6.2f} s "
                 f"({len(vals)}/{len(samples)} rounds)")  # fmt: skip
    typical = min(samples, key=lambda s: abs(s.latency - p50))
    print(f"breakdown of a typical round ({typical.pair}, {typical.latency:.2f} s, closest to "
          "the p50):")  # fmt: skip
    for line in breakdown_lines(typical):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
