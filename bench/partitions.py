"""Randomized partition schedules against two hbmon sites and a real etcd arbiter (issue 14).

The lab is tests/etcdnet.py: network namespaces A (production: ``hbmon run`` beats the
pairs, ``demote`` commands), B (standby: watches them, ``failover`` commands) and W (the
witness), joined by three veth pairs, one etcd 3.4 member in each.  The "array remote
copy" is a copier thread (tests/netns.py ``Mirror``) from A's PVOL file to B's SVOL file
that stops whenever the A-B link (the WAN, which carries the copy too) is down.
Alertmanager is played by a thread that posts firing ``HbmonHostDown`` and
``HbmonSiteIsolated`` alerts for every pair to B's webhook every second, throughout: safety
must rest on the arbiter, never on the alerts being right.

Each schedule is a random sequence of steps; a step applies one fault (sometimes two at
once), holds it for a multiple of ``lease_ttl``, undoes it in reverse order and lets the
lab settle.  Faults::

    cut(A-B)       the WAN: A-B link down (and the copy stops), W reachable from both
    cut(A-W)       one witness link down (likewise B-W)
    isolate(X)     every link of X (A, B or W) down
    pause(X)       SIGSTOP hbmon at X (A or B), as in a frozen VM; SIGCONT at the undo
    kill(X)        host death at X: SIGKILL every process in X's namespace but its etcd
                   member; at the undo ``hbmon run`` starts again with the same state_dir
    leader(etcd)   SIGKILL the etcd leader; restarted at the undo
    quiet          nothing (the alerts still arrive)

Every promote and demote command appends to one history file (tests/history.py); the
runner adds ``crash``/``pause``/``resume``/``restart`` marks; the checker then asserts that
no two sites were primary at one instant and that fencing tokens strictly increase
(``resume_grace`` = demote_budget + 1 s for a site thawed after its lease expired).

Usage (root; etcd-server, etcd-client and iproute2 installed)::

    python bench/partitions.py --schedules 200 --seed 1        # the documented run
    python bench/partitions.py --schedules 3 --seed 4 --steps 1-2   # what CI runs (in-process:
                                                               # tests/test_arbiter_partitions.py)
    python bench/partitions.py --seed 7 --only 2               # schedule 2 of seed 7 again
    python bench/partitions.py --schedules 5 --seed 7 --print-only   # the schedules only
    python bench/partitions.py --schedules 2 --seed 7 --etcd-only    # faults + write probes
    python bench/partitions.py --schedules 2 --seed 7 --without-arbiter  # today's split brain

Prints the seed, each schedule, then per schedule: promotes, demotes, overlaps, fenced
overlaps, tokens, takeover times (fault applied -> promote), demote lead times (fault
applied -> demote started), the webhook's answers and pairs left without a primary (a
liveness finding: e.g. A demoted and B was never allowed to take over); a summary at the
end.  The folder of a schedule with an error, a violation, a pair without a primary or a
traceback in a site log is kept.  Exit status 1 on any violation or error.

With lease_ttl 3 s, etcd's default election (1 s timeout; 1.2-1.6 s measured) can outlast
the owner's lease margin: killing the etcd member A's hbmon talks to first made A demote
(no failover: B sees A alive).  ``--election-ms 500`` runs etcd faster.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from common import exit_on_sigterm, machine_line, quantile  # noqa: E402
from etcdnet import SITES, EtcdNet, address, etcd_cluster  # noqa: E402
from history import Report, analyze, mark, write_scripts  # noqa: E402
from netns import Mirror  # noqa: E402

from hbmon.arbiter.lease import MARGIN, LeaseTiming  # noqa: E402
from hbmon.record import Record  # noqa: E402
from hbmon.volume import claim_slot, open_volume, write_slot  # noqa: E402

PYTHON = sys.executable
UDP_PORT = 9798
HTTP_PORT = 9799
ALERT_EVERY = 1.0
SHOW = 6  # violations and fenced overlaps printed per schedule
ALERTS = ("HbmonHostDown", "HbmonSiteIsolated")
HOLDS = (0.5, 1.0, 2.0, 3.0)  # x lease_ttl
SETTLES = (1.0, 2.0)  # x lease_ttl
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

#: (fault, weight) for the generator
FAULTS: tuple[tuple[str, str, int], ...] = (
    ("cut", "A-B", 4),
    ("cut", "A-W", 1),
    ("cut", "B-W", 1),
    ("isolate", "A", 3),
    ("isolate", "B", 2),
    ("isolate", "W", 1),
    ("pause", "A", 3),
    ("pause", "B", 1),
    ("kill", "A", 3),
    ("kill", "B", 1),
    ("leader", "etcd", 2),
    ("quiet", "-", 1),
)


# -- schedules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str

    def __str__(self) -> str:
        return "quiet" if self.kind == "quiet" else f"{self.kind}({self.target})"

    def resources(self) -> set[str]:
        """What the fault takes hold of: two faults of one step share none."""
        if self.kind == "cut":
            return {self.target}
        if self.kind == "isolate":
            return {"-".join(sorted((self.target, n))) for n in SITES if n != self.target}
        if self.kind in ("pause", "kill"):
            return {f"hbmon@{self.target}"}
        if self.kind == "leader":
            return {"etcd"}
        return {"quiet"}

    @property
    def links(self) -> list[tuple[str, str]]:
        if self.kind == "cut":
            x, y = self.target.split("-")
            return [(x, y)]
        if self.kind == "isolate":
            return [(self.target, n) for n in SITES if n != self.target]
        return []


@dataclass(frozen=True)
class Step:
    faults: tuple[Fault, ...]
    hold: float  # multiples of lease_ttl
    settle: float

    def __str__(self) -> str:
        return f"{'+'.join(map(str, self.faults))} x{self.hold:g}"


@dataclass(frozen=True)
class Schedule:
    seed: int
    index: int
    steps: tuple[Step, ...]

    def __str__(self) -> str:
        return f"schedule {self.index}: " + " | ".join(map(str, self.steps))

    def seconds(self, lease_ttl: float) -> float:
        return sum((s.hold + s.settle) * lease_ttl for s in self.steps)


def generate(seed: int, index: int, steps: tuple[int, int] = (2, 5)) -> Schedule:
    """Schedule ``index`` of ``seed``: the same on every run, independent of the others."""
    rng = random.Random(f"hbmon-partitions:{seed}:{index}")
    kinds = [Fault(kind, target) for kind, target, _ in FAULTS]
    weights = [w for _, _, w in FAULTS]
    out = []
    for _ in range(rng.randint(*steps)):
        first = rng.choices(kinds, weights)[0]
        faults = [first]
        if first.kind != "quiet" and rng.random() < 0.3:
            second = rng.choices(kinds, weights)[0]
            if second.kind != "quiet" and not (second.resources() & first.resources()):
                faults.append(second)
        out.append(Step(tuple(faults), rng.choice(HOLDS), rng.choice(SETTLES)))
    return Schedule(seed, index, tuple(out))


# -- the sites -----------------------------------------------------------------------------


@dataclass
class Timing:
    lease_ttl: float
    request_timeout: float
    demote_budget: float

    def check(self) -> None:
        problem = LeaseTiming(self.lease_ttl, self.request_timeout, self.demote_budget).problem()
        if problem is not None:
            raise SystemExit(f"partitions: {problem}")


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


def site_config(
    net: EtcdNet,
    site: str,
    folder: Path,
    *,
    pairs: Sequence[str],
    pvol: Path,
    prefix: str,
    timing: Timing,
    key_file: Path,
    token_file: Path,
    promote: Path,
    demote: Path,
    arbiter: bool = True,
) -> str:
    """A's configuration beats every pair (with ``demote``), B's watches it (``failover``).

    ``arbiter=False``: no ``[arbiter]``, ``failover_without_arbiter = true`` (hbmon before
    issue 14: the runner then shows the split brain the arbiter is there to prevent)."""
    arbiter_table = (
        "\n[arbiter]\n"
        f"endpoints = {_toml_list(net.endpoints(site))}\n"
        f'prefix = "{prefix}"\n'
        f'lease_ttl = "{timing.lease_ttl:g}s"\n'
        f'request_timeout = "{timing.request_timeout:g}s"\n'
        f'demote_budget = "{timing.demote_budget:g}s"\n'
    )
    head = (
        f'site = "{site}"\n'
        f'state_dir = "{folder / f"state-{site}"}"\n'
        f'listen = "{net.mgmt[site]}:{HTTP_PORT}"\n'
        'interval = "200ms"\n'
        "miss_threshold = 3\n"
        'method = "both"\n'
        + ("" if arbiter else "failover_without_arbiter = true\n")
        + "\n[network]\n"
        f'listen = "{address(site, "B" if site == "A" else "A")}:{UDP_PORT}"\n'
        f'key_file = "{key_file}"\n'
        "\n[webhook]\n"
        f'token_file = "{token_file}"\n'
        'hold_down = "1s"\n' + (arbiter_table if arbiter else "")
    )
    body = []
    for slot, pair in enumerate(pairs):
        if site == "A":
            body.append(
                f'\n[[beat]]\nid = "{pair}"\nvolume = "{pvol}"\nslot = {slot}\n'
                f'peers = ["{address("B", "A")}:{UDP_PORT}"]\n'
                f"demote = {_toml_list([str(demote), site, pair])}\n"
            )
        else:
            body.append(
                f'\n[[watch]]\nid = "{pair}"\nvolume = "{pvol}"\nslot = {slot}\n'
                f'method = "both"\nfailover = {_toml_list([str(promote), site, pair])}\n'
            )
    return head + "".join(body)


class Site:
    """``hbmon run`` inside a namespace of the lab."""

    def __init__(
        self, net: EtcdNet, name: str, config: Path, *, ns: str | None = None, port: int = HTTP_PORT
    ) -> None:
        """``name`` runs in namespace ``ns`` (default: the site of that name), its HTTP API
        on the management address there, ``port`` (a second process at one site)."""
        self.net, self.name, self.config = net, name, config
        self.ns = ns or name
        self.log = config.with_suffix(".log")
        self.url = f"http://{net.mgmt[self.ns]}:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [PYTHON, "-m", "hbmon.cli", "run", "-c", str(self.config)]
        with self.log.open("ab") as log:
            self.proc = self.net.run_in(self.ns, argv, stdout=log, stderr=log, cwd=REPO)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise RuntimeError(f"hbmon at {self.name} exited\n{self.tail()}")
            with contextlib.suppress(OSError):
                with _NO_PROXY.open(self.url + "/healthz", timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"hbmon at {self.name} not ready\n{self.tail()}")
            time.sleep(0.05)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 2.0
        while _proc_state(self.proc.pid) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.005)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def host_death(self) -> None:
        """SIGKILL hbmon and everything it started (commands run in their own sessions),
        every process of the namespace but its etcd member."""
        keep = {p.pid for p in self.net.procs.values() if p is not None and p.poll() is None}
        out = subprocess.run(
            ["ip", "netns", "pids", self.net.ns[self.ns]], capture_output=True, text=True
        ).stdout
        for pid in (int(x) for x in out.split()):
            if pid not in keep:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"--- hbmon {self.name} ({self.log}) ---\n" + "\n".join(text)

    def problems(self) -> list[str]:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if "Traceback" in ln or " CRITICAL " in ln]


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


class Alerts:
    """Alertmanager, played hostile: every pair's alerts, firing, every second, to B."""

    def __init__(self, url: str, token: str, pairs: Sequence[str]) -> None:
        self.url, self.token, self.pairs = url + "/api/v1/alerts", token, list(pairs)
        self.answers: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)

    def _body(self) -> bytes:
        alerts = [
            {
                "status": "firing",
                "labels": {"alertname": name, "pair": pair, "severity": "critical"},
                "annotations": {},
                "startsAt": "2024-01-01T00:00:00Z",
            }
            for pair in self.pairs
            for name in ALERTS
        ]
        doc = {"version": "4", "status": "firing", "receiver": "hbmon", "alerts": alerts}
        return json.dumps(doc).encode()

    def _run(self) -> None:
        while not self._stop.wait(ALERT_EVERY):
            req = urllib.request.Request(
                self.url,
                data=self._body(),
                headers={
                    "Authorization": f"Bearer {self.token}",
                    "Content-Type": "application/json",
                },
            )
            try:
                with _NO_PROXY.open(req, timeout=2.0) as resp:
                    for d in json.loads(resp.read()).get("decisions", []):
                        what = d.get("code") or d.get("action") or "?"
                        self.answers[f"{d.get('alert')}:{what}"] += 1
            except urllib.error.HTTPError as err:
                self.answers[f"http_{err.code}"] += 1
            except (OSError, ValueError):
                self.answers["unreachable"] += 1

    def start(self) -> Alerts:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# -- one schedule ----------------------------------------------------------------------------


@dataclass
class Result:
    schedule: Schedule
    report: Report | None = None
    error: str | None = None
    takeovers: list[float] = field(default_factory=list)
    demote_leads: list[float] = field(default_factory=list)
    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    probes: list[str] = field(default_factory=list)  # --etcd-only
    site_problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def violations(self) -> int:
        return len(self.report.violations) if self.report is not None else 0

    @property
    def orphans(self) -> list[str]:
        """Pairs with no primary at the end (a liveness finding, not a safety one)."""
        if self.report is None:
            return []
        return sorted(
            pair
            for pair, ivs in self.report.intervals.items()
            if not any(iv.end == float("inf") for iv in ivs)
        )

    @property
    def anomalous(self) -> bool:
        return bool(self.error or self.violations or self.orphans or self.site_problems)

    def line(self) -> str:
        if self.error is not None:
            return f"  -> ERROR {self.error.splitlines()[0]}"
        parts = []
        if self.report is not None:
            r = self.report
            tokens = ", ".join(f"{p}:{t}" for p, t in sorted(r.tokens.items()))
            parts.append(
                f"promotes {len(r.promotes())} demotes {len(r.demotes())} "
                f"overlaps {r.overlaps} violations {len(r.violations)} fenced {len(r.fenced)} "
                f"tokens [{tokens}]"
            )
        if self.takeovers:
            parts.append("promote after " + ",".join(f"{t:.1f}" for t in self.takeovers) + " s")
        if self.demote_leads:
            parts.append("demote after " + ",".join(f"{t:.2f}" for t in self.demote_leads) + " s")
        if self.probes:
            parts.append("writes " + " ".join(self.probes))
        if self.answers:
            parts.append("webhook " + ",".join(f"{k}={v}" for k, v in sorted(self.answers.items())))
        if self.orphans:
            parts.append("no primary at the end: " + ",".join(self.orphans))
        if self.site_problems:
            parts.append(f"{len(self.site_problems)} tracebacks in site logs")
        return f"  -> {'; '.join(parts)} ({self.seconds:.0f} s)"


def _site_fault(
    history: Path, site: Site, do: Callable[[], object], event: str, undo_event: str,
    undo: Callable[[], object],
) -> Callable[[], None]:  # fmt: skip
    """``do`` the fault to ``site`` and note ``event`` in the history; the undo notes
    ``undo_event`` first, then runs ``undo``."""
    do()
    mark(history, site.name, event)

    def back() -> None:
        mark(history, site.name, undo_event)
        undo()

    return back


class Runner:
    def __init__(
        self,
        net: EtcdNet,
        root: Path,
        timing: Timing,
        pairs: int,
        *,
        etcd_only: bool = False,
        arbiter: bool = True,
    ) -> None:
        self.net, self.root, self.timing, self.etcd_only = net, root, timing, etcd_only
        self.arbiter = arbiter
        self.pairs = [f"db{i}" for i in range(pairs)]
        self.key_file = root / "hb.key"
        self.key_file.write_text(os.urandom(32).hex() + "\n")
        self.key_file.chmod(0o600)
        self.token = os.urandom(16).hex()
        self.token_file = root / "webhook.token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)
        self.prefix = "/hbmon-bench/unset"  # per schedule, set by _configs()
        self.volumes: tuple[Path, Path] = (root / "pvol.img", root / "svol.img")
        self.scripts: tuple[Path, Path] = (root / "bin" / "promote.py", root / "bin" / "demote.py")

    # -- set-up --------------------------------------------------------------------------

    def _volumes(self, folder: Path) -> tuple[Path, Path]:
        """The PVOL with an install record per pair (what ``hbmon volume init`` writes,
        done in this process: a CLI start per pair costs seconds on a loaded machine), and
        the SVOL as its copy."""
        pvol, svol = folder / "pvol.img", folder / "svol.img"
        with pvol.open("wb") as f:
            f.truncate(1 << 20)
        vol = open_volume(str(pvol), write=True)
        try:
            for slot, pair in enumerate(self.pairs):
                claim_slot(vol, slot, pair)
                record = Record(pair, 0, 0, time.time(), 1.0)  # (volume init's default)
                write_slot(vol, slot, record.encode_block(vol.io_size))
        finally:
            vol.close()
        shutil.copyfile(pvol, svol)
        return pvol, svol

    def _configs(self, folder: Path, schedule: Schedule, history: Path) -> dict[str, Path]:
        prefix = f"/hbmon-bench/s{schedule.index:04d}-{os.getpid()}"
        return self.prepare(folder, history, prefix)

    def prepare(
        self,
        folder: Path,
        history: Path,
        prefix: str,
        *,
        check: bool = True,
        arbiter: bool | None = None,
    ) -> dict[str, Path]:
        """In ``folder``: the promote/demote scripts (appending to ``history``), the volumes
        and both sites' configurations under ``prefix``, each checked with ``hbmon config
        check`` unless ``check=False``; site -> path.  tests/test_arbiter_partitions.py
        builds its cases on this."""
        promote, demote = write_scripts(folder / "bin", history)
        pvol, svol = self._volumes(folder)
        self.prefix = prefix
        self.volumes = (pvol, svol)
        self.scripts = (promote, demote)
        paths = {}
        for site, vol in (("A", pvol), ("B", svol)):
            text = site_config(
                self.net, site, folder, pairs=self.pairs, pvol=vol, prefix=prefix,
                timing=self.timing, key_file=self.key_file, token_file=self.token_file,
                promote=promote, demote=demote,
                arbiter=self.arbiter if arbiter is None else arbiter,
            )  # fmt: skip
            path = folder / f"{site}.toml"
            path.write_text(text)
            if check:
                proc = subprocess.run(
                    [PYTHON, "-m", "hbmon.cli", "config", "check", str(path)],
                    capture_output=True, text=True, cwd=REPO,
                )  # fmt: skip
                if proc.returncode != 0:
                    raise RuntimeError(f"config check {path}: {proc.stderr.strip()}")
            paths[site] = path
        return paths

    def owners(self) -> dict[str, tuple[str, int]]:
        """pair -> (site, term) from the owner keys (a linearizable read through W)."""
        proc = self.net.etcdctl("W", "get", "--prefix", f"{self.prefix}/owner/", "-w", "json")
        if proc.returncode != 0:
            return {}
        out = {}
        for kv in json.loads(proc.stdout).get("kvs", []):
            key = base64.b64decode(kv["key"]).decode()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                value = json.loads(base64.b64decode(kv["value"]))
                out[key.rsplit("/", 1)[1]] = (str(value["site"]), int(value["term"]))
        return out

    def start_sites(self, configs: dict[str, Path]) -> dict[str, Site]:
        sites = {name: Site(self.net, name, path) for name, path in configs.items()}
        # Issue 14: the two `hbmon run` processes with `[arbiter]` in their configs.  The
        # runner was written before hbmon's keeper used the arbiter (then A owned nothing
        # and wait_owned() stopped the schedule with a clear message); with the keeper
        # wired in (main since de5f591) A claims every pair at start, term 1.
        for site in sites.values():
            site.start()
        for site in sites.values():
            site.wait_ready()
        return sites

    def wait_owned(self, timeout: float) -> dict[str, int]:
        """Until A owns every pair in the arbiter; pair -> term (the initial token)."""
        deadline = time.monotonic() + timeout
        while True:
            owners = self.owners()
            if all(owners.get(p, ("", 0))[0] == "A" for p in self.pairs):
                return {p: owners[p][1] for p in self.pairs}
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"A does not own every pair in the arbiter after {timeout:g} s "
                    f"(owner keys under {self.prefix}/owner/: {owners}); "
                    "is [arbiter] wired into `hbmon run` yet?"
                )
            time.sleep(0.1)

    def wait_alive(self, site: Site, timeout: float) -> None:
        """Until ``site`` sees every pair alive.  A fault before the watcher's first beat
        leaves a pair ``awaiting`` there (the first record read is only a baseline), and
        a schedule that starts so can never fail over: a finding about the runner, not
        about hbmon."""
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                with _NO_PROXY.open(site.url + "/status.json", timeout=1.0) as resp:
                    rows = json.loads(resp.read())["rows"]
                seen = {r["pair"] for r in rows if r["verdict"] == "alive"}
                if seen >= set(self.pairs):
                    return
            if not site.running():
                raise RuntimeError(f"hbmon at {site.name} exited\n{site.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{site.name} sees only {sorted(seen)} of {self.pairs} alive after "
                    f"{timeout:g} s\n{site.tail()}"
                )
            time.sleep(0.1)

    # -- faults ----------------------------------------------------------------------------

    def _mirror_follows_wan(self, mirror: Mirror | None) -> None:
        if mirror is None:
            return
        if ("A", "B") in self.net.down:
            mirror.pause()
        else:
            mirror.resume()

    def apply(self, fault: Fault, sites: dict[str, Site], history: Path, undo: list[Any]) -> None:
        net = self.net
        if fault.kind in ("cut", "isolate"):
            for x, y in fault.links:
                net.cut(x, y)
            undo.append(lambda: [net.heal(x, y) for x, y in fault.links])
        elif fault.kind == "pause" and fault.target in sites:
            site = sites[fault.target]
            undo.append(_site_fault(history, site, site.pause, "pause", "resume", site.resume))
        elif fault.kind == "kill" and fault.target in sites:
            site = sites[fault.target]
            undo.append(_site_fault(history, site, site.host_death, "crash", "restart", site.start))
        elif fault.kind == "leader":
            lead = net.leader()
            if lead is not None:
                mark(history, "lab", "note", killed_etcd_leader=lead)
                net.kill_member(lead)
                undo.append(lambda: net.start_member(lead))

    def run(self, schedule: Schedule) -> Result:
        result = Result(schedule)
        t0 = time.monotonic()
        folder = self.root / f"s{schedule.index:04d}"
        folder.mkdir(parents=True)
        history = folder / "history.jsonl"
        sites: dict[str, Site] = {}
        mirror: Mirror | None = None
        alerts: Alerts | None = None
        applied: list[float] = []
        try:
            configs = self._configs(folder, schedule, history)
            initial: dict[str, int] = {}
            if not self.etcd_only:
                mirror = Mirror(*self.volumes, range(len(self.pairs))).start()
                sites = self.start_sites(configs)
                if self.arbiter:
                    initial = self.wait_owned(3 * self.timing.lease_ttl)
                self.wait_alive(sites["B"], 10.0)
                alerts = Alerts(sites["B"].url, self.token, self.pairs).start()
            for n, step in enumerate(schedule.steps):
                undo: list[Any] = []
                applied.append(time.monotonic())
                mark(history, "lab", "note", step=n, apply=str(step))
                for fault in step.faults:
                    self.apply(fault, sites, history, undo)
                self._mirror_follows_wan(mirror)
                time.sleep(step.hold * self.timing.lease_ttl)
                if self.etcd_only:
                    result.probes.append(f"{n}:" + self._probe())
                mark(history, "lab", "note", step=n, undo=str(step))
                for action in reversed(undo):
                    action()
                self._mirror_follows_wan(mirror)
                time.sleep(step.settle * self.timing.lease_ttl)
            if alerts is not None:
                alerts.stop()
                result.answers = alerts.answers
            for site in sites.values():
                site.stop()
            result.report = analyze(
                history,
                initial_owner=dict.fromkeys(self.pairs, "A"),
                initial_token=initial,
                resume_grace=self.timing.demote_budget + MARGIN,
            )
            self._times(result, applied)
            for site in sites.values():
                result.site_problems += site.problems()
        except Exception as exc:
            tails = "\n".join(s.tail() for s in sites.values())
            result.error = f"{type(exc).__name__}: {exc}\n{tails}"
        finally:
            if alerts is not None:
                alerts.stop()
            for site in sites.values():
                site.stop()
            if mirror is not None:
                mirror.close()
            self.restore()
            result.seconds = time.monotonic() - t0
        return result

    def _probe(self) -> str:
        """--etcd-only: which of A and B can write now (each endpoint tried for 1 s)."""
        out = ""
        for site in ("A", "B"):
            ok = self.net.put(site, f"/hbmon-bench/probe/{site}", "x", timeout=1.0)
            out += site if ok else site.lower()
        return out

    def _times(self, result: Result, applied: list[float]) -> None:
        """Per step and pair, the first promote and the first demote after the step's
        faults were applied (repeats within a step are the guard's, not the fault's)."""
        assert result.report is not None
        edges = [*applied, float("inf")]
        for event, out in (("promote", result.takeovers), ("demote", result.demote_leads)):
            seen: set[tuple[int, str | None]] = set()
            for e in result.report.events:
                if e.event != event:
                    continue
                started = float(json.loads(e.text).get("t_start", e.t))
                step = next((i for i in range(len(applied)) if edges[i + 1] > started), None)
                if step is None or started < applied[0] or (step, e.pair) in seen:
                    continue
                seen.add((step, e.pair))
                out.append(started - applied[step])

    def restore(self) -> None:
        """Back to a healthy lab between schedules: links up, every member running."""
        self.net.heal_all()
        for site in SITES:
            if site in self.net.paused:
                self.net.resume_member(site)
            if not self.net.running(site):
                self.net.start_member(site)
        self.net.wait_healthy(30.0, sites=SITES)


# -- main ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _lab(keep: list[bool], election_ms: int | None) -> Iterator[tuple[EtcdNet, Path]]:
    """The lab in a temporary folder, removed at the end unless ``keep[0]`` is True by
    then (--keep, or a schedule with something to look at)."""
    root = Path(tempfile.mkdtemp(prefix="hbmon-partitions-"))
    heartbeat = None if election_ms is None else max(10, election_ms // 10)
    try:
        with etcd_cluster(root / "lab", election_ms=election_ms, heartbeat_ms=heartbeat) as net:
            yield net, root
    finally:
        if keep[0]:
            print(f"kept {root} (each schedule's history.jsonl, configs, logs, journals)")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None, help="default: a random seed")
    parser.add_argument("--only", type=int, default=None, help="run schedule N of the seed")
    parser.add_argument("--steps", default="2-5", help="steps per schedule, MIN-MAX")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--lease-ttl", type=float, default=3.0)
    parser.add_argument("--request-timeout", type=float, default=0.25)
    parser.add_argument("--demote-budget", type=float, default=0.5)
    parser.add_argument("--print-only", action="store_true", help="print the schedules")
    parser.add_argument("--etcd-only", action="store_true", help="no hbmon: faults + probes")
    parser.add_argument(
        "--without-arbiter",
        action="store_true",
        help="no [arbiter], failover_without_arbiter = true: shows the split brain",
    )
    parser.add_argument(
        "--election-ms",
        type=int,
        default=None,
        help="etcd --election-timeout (heartbeat a tenth of it); default: etcd's 1000 ms",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    lo, _, hi = args.steps.partition("-")
    steps = (int(lo), int(hi or lo))
    timing = Timing(args.lease_ttl, args.request_timeout, args.demote_budget)
    timing.check()
    indexes = [args.only] if args.only is not None else list(range(args.schedules))
    schedules = [generate(seed, i, steps) for i in indexes]
    print(
        f"partitions: seed {seed}, {len(schedules)} schedules, lease_ttl {timing.lease_ttl:g}s "
        f"request_timeout {timing.request_timeout:g}s demote_budget {timing.demote_budget:g}s, "
        f"{args.pairs} pairs; rerun one with --seed {seed} --only N",
        flush=True,
    )
    if args.print_only:
        for s in schedules:
            print(f"{s}  (~{s.seconds(timing.lease_ttl):.0f} s)")
        return 0
    print(machine_line(), flush=True)
    exit_on_sigterm()
    results: list[Result] = []
    keep = [bool(args.keep)]
    with _lab(keep, args.election_ms) as (net, root):
        print(f"etcd cluster formed in {net.formed_in:.2f} s", flush=True)
        runner = Runner(
            net,
            root,
            timing,
            args.pairs,
            etcd_only=args.etcd_only,
            arbiter=not args.without_arbiter,
        )
        for s in schedules:
            print(s, flush=True)
            result = runner.run(s)
            results.append(result)
            print(result.line(), flush=True)
            if result.anomalous:
                keep[0] = True
                print(f"     (kept: {root / f's{s.index:04d}'})")
            if result.report is not None:
                violations = result.report.violations
                ordered = sorted(violations, key=lambda v: not v.startswith("overlap"))
                shown = ordered + result.report.fenced
                for v in shown[:SHOW]:
                    print("     " + v.replace("\n", "\n     "))
                if len(shown) > SHOW:
                    print(f"     ... and {len(shown) - SHOW} more (--keep keeps the history)")
            if result.error is not None:
                print("     " + result.error.replace("\n", "\n     "))
    return _summary(results, seed)


def _summary(results: list[Result], seed: int) -> int:
    reports = [r.report for r in results if r.report is not None]
    takeovers = [t for r in results for t in r.takeovers]
    leads = [t for r in results for t in r.demote_leads]
    errors = [r for r in results if r.error is not None]
    violations = sum(r.violations for r in results)
    orphans = sum(len(r.orphans) for r in results)
    line = (
        f"summary (seed {seed}): {len(results)} schedules, {len(errors)} errors, "
        f"{orphans} pairs left without a primary, "
        f"{sum(r.overlaps for r in reports)} overlaps, {violations} violations, "
        f"{sum(len(r.fenced) for r in reports)} fenced, "
        f"{sum(len(r.promotes()) for r in reports)} promotes, "
        f"{sum(len(r.demotes()) for r in reports)} demotes"
    )
    if takeovers:
        line += (
            f"; promote after fault p50 {quantile(takeovers, 0.5):.1f} s "
            f"p99 {quantile(takeovers, 0.99):.1f} s"
        )
    if leads:
        line += f"; demote after fault p50 {quantile(leads, 0.5):.2f} s max {max(leads):.2f} s"
    print(line)
    return 1 if violations or errors else 0


if __name__ == "__main__":
    sys.exit(main())
