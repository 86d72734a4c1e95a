"""Issue 14's proof with real components: two ``hbmon run`` sites, a real etcd arbiter,
real partitions, and a history of every promote and demote that must never show two
primaries.

The lab is tests/etcdnet.py (network namespaces A, B and W joined by three veth pairs, one
etcd 3.4 member in each), shared by every case of this module; each case gets a fresh key
prefix, fresh volumes and state directories, and the lab is healed (links up, members
running, cluster healthy) after it.  The sites are bench/partitions.py's: A beats the pairs
(``demote`` commands), B watches them through the remote copy (a copier that stops while
the A-B link is down) and the network (``failover`` commands), and a hostile Alertmanager
posts firing HbmonHostDown and HbmonSiteIsolated for every pair to B every second,
throughout, unless the case says otherwise.  Every promote and demote command appends to
one history file (tests/history.py); every case ends with its checker: no two sites
primary at one instant, fencing tokens strictly increasing.

Timing: ``lease_ttl`` 5 s, ``request_timeout`` 0.25 s, ``demote_budget`` 0.5 s (the rule:
5/3 + 2 x 0.25 + 0.5 + 1 = 3.67 s <= 5 s), etcd ``--election-timeout 500
--heartbeat-interval 100`` with pre-vote.  An owner's renewal that falls due has until its
demote deadline, 5 - 5/3 - 0.5 - 1 = 1.83 s later, to get through; a renewal that fails is
retried every 0.25 s after its 2 x 0.25 s attempt.  Killing the etcd leader just before a
renewal falls due (the worst moment): the new leader was elected 0.5-1.4 s later
(polled), the renewal got through 0.9 s after it fell due, and A's lease never went below
2.4 s left against the 1.5 s at which it demotes.  With ``lease_ttl`` 4 s the window is
1.17 s and the same renewal got through with 0.3 s to spare (10 kills), too thin for a
loaded CI machine; with etcd's default 1000 ms election (1.15-1.55 s) it can fail
(bench/partitions.py's docstring saw A demote with ``lease_ttl`` 3 s).  Beats every
200 ms, stale after 3 missed.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import need
from etcdnet import EtcdNet, etcd_cluster
from helpers import Feeder, free_port, metric_value, post_host_down, running_site, wait_for
from history import Event, Report, analyze, check, mark, read
from netns import Mirror, http_get
from test_etcd import start_cluster, stop_cluster
from test_tls import make_ca, make_cert

from hbmon.arbiter.lease import MARGIN, LeaseTiming
from hbmon.errors import RecordError
from hbmon.failover import Journal
from hbmon.record import SLOT_SIZE, decode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import partitions as bench

pytestmark = [pytest.mark.root, pytest.mark.tools, pytest.mark.slow]

T = TypeVar("T")
PYTHON = sys.executable
TTL, RT, DB = 5.0, 0.25, 0.5
TIMING = bench.Timing(TTL, RT, DB)
RENEW = TTL / 3
ELECTION_MS, HEARTBEAT_MS = 500, 100
TAKEOVER_WAIT = TTL + 1.0 + MARGIN  # the keeper's wait for an owner key to go
GRACE = DB + MARGIN  # a thawed primary demotes within this (history resume_grace)
STALE_WITHIN = 4.0  # seconds from a cut to every path stale at B (0.6 s nominal)
SAMPLE_EVERY = 0.2
PAIR = "db0"
_cases = itertools.count(1)


# -- one case: two sites on the shared lab ---------------------------------------------------


def _sub(text: str, old: str, new: str, count: int = 1) -> str:
    found = text.count(old)
    assert found == count, f"expected {count} of {old!r} in the config, found {found}:\n{text}"
    return text.replace(old, new)


class Case:
    """The sites of one case, built on bench/partitions.py's Runner, and what they did."""

    def __init__(self, net: EtcdNet, folder: Path, *, pairs: int = 1, arbiter: bool = True):
        self.net, self.folder, self.arbiter = net, folder, arbiter
        self.runner = bench.Runner(net, folder, TIMING, pairs, arbiter=arbiter)
        self.pairs = self.runner.pairs
        self.history = folder / "history.jsonl"
        self.prefix = f"/hbmon-test/c{next(_cases)}-{os.getpid()}"
        self.configs = self.runner.prepare(folder, self.history, self.prefix, check=False)
        self.sites: dict[str, bench.Site] = {}
        self.extra: dict[str, tuple[str, int]] = {}  # process name -> (namespace, port)
        self.down: set[str] = set()  # processes killed on purpose
        self.initial: dict[str, int] = {}  # pair -> A's term at the start
        self.mirror: Mirror | None = None
        self.alerts: bench.Alerts | None = None
        self.closers: list[Callable[[], None]] = []
        self.t0 = time.monotonic()

    # -- configuration -----------------------------------------------------------------

    def edit(self, name: str, old: str, new: str, count: int = 1) -> None:
        path = self.configs[name]
        path.write_text(_sub(path.read_text(), old, new, count))

    def add_standby(self, name: str, *, http_port: int, udp_port: int) -> None:
        """A second ``hbmon run`` at site B (same site name, its own state, ports and
        history label), and A beating to it too."""
        text = self.configs["B"].read_text()
        text = _sub(text, '/state-B"', f'/state-{name}"')
        text = _sub(text, f':{bench.HTTP_PORT}"', f':{http_port}"')
        text = _sub(text, f':{bench.UDP_PORT}"', f':{udp_port}"')
        text = _sub(text, '"B", ', f'"{name}", ', len(self.pairs))  # failover argv: site label
        path = self.folder / f"{name}.toml"
        path.write_text(text)
        self.configs[name] = path
        self.extra[name] = ("B", http_port)
        b_addr = bench.address("B", "A")
        self.edit(
            "A",
            f'peers = ["{b_addr}:{bench.UDP_PORT}"]',
            f'peers = ["{b_addr}:{bench.UDP_PORT}", "{b_addr}:{udp_port}"]',
            len(self.pairs),
        )

    # -- running -----------------------------------------------------------------------

    def start(self) -> None:
        """The copy, every configured process (ready), A owning every pair, and every
        watcher seeing every pair alive."""
        self.mirror = Mirror(*self.runner.volumes, range(len(self.pairs))).start()
        for name, path in self.configs.items():
            ns, port = self.extra.get(name, (name, bench.HTTP_PORT))
            self.sites[name] = bench.Site(self.net, name, path, ns=ns, port=port)
        for site in self.sites.values():
            site.start()
        for site in self.sites.values():
            try:
                site.wait_ready()
            except RuntimeError as err:
                pytest.fail(str(err))
        if self.arbiter:
            try:
                self.initial = self.runner.wait_owned(3 * TTL)
            except RuntimeError as err:
                pytest.fail(f"{err}\n{self.tails()}")
        for name in self.watchers:
            try:
                self.runner.wait_alive(self.sites[name], 10.0)
            except RuntimeError as err:
                pytest.fail(str(err))
        print(f"\n[{time.monotonic() - self.t0:.1f} s] sites up, terms {self.initial}")

    @property
    def watchers(self) -> list[str]:
        return [n for n in self.sites if n != "A"]

    def start_alerts(self, to: str = "B") -> None:
        self.alerts = bench.Alerts(self.sites[to].url, self.runner.token, self.pairs).start()

    def host_death(self, name: str = "A") -> float:
        """kill -9 of everything the site runs (its etcd member excepted); the stamp."""
        self.sites[name].host_death()
        self.down.add(name)
        return mark(self.history, name, "crash")

    def note(self, what: str) -> float:
        return mark(self.history, "lab", "note", fault=what)

    def cut(self, x: str, y: str) -> float:
        self.net.cut(x, y)
        self._follow_wan()
        return self.note(f"cut {x}-{y}")

    def isolate(self, site: str) -> float:
        self.net.isolate(site)
        self._follow_wan()
        return self.note(f"isolate {site}")

    def heal(self) -> float:
        self.net.heal_all()
        self._follow_wan()
        return self.note("heal")

    def heal_until_alive(self) -> None:
        """Heal every link, then wait until B sees PAIR alive again."""
        self.heal()
        self.wait(lambda: self.verdict("B") == "alive", 10.0, "db0 alive at B after the heal")

    def _follow_wan(self) -> None:
        """The remote copy runs over the A-B link: it stops while that is down."""
        assert self.mirror is not None
        if ("A", "B") in self.net.down:
            self.mirror.pause()
        else:
            self.mirror.resume()

    def close(self) -> None:
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                closer()
        if self.alerts is not None:
            self.alerts.stop()
        for site in self.sites.values():
            site.stop()
        if self.mirror is not None:
            self.mirror.close()
        self.runner.restore()

    # -- looking -----------------------------------------------------------------------

    def wait(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            self.check_running()
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"timed out after {timeout:g} s waiting for {what} (last: {value!r})\n"
                    f"history:\n{self.history_text()}\n{self.tails()}"
                )
            time.sleep(0.1)

    def sample(self, seconds: float, probe: Callable[[], T]) -> list[tuple[float, T]]:
        """``probe()`` every SAMPLE_EVERY for ``seconds``: (stamp, value) each time."""
        out: list[tuple[float, T]] = []
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            out.append((now, probe()))
            self.check_running()
            time.sleep(max(0.0, min(SAMPLE_EVERY, end - time.monotonic())))
        return out

    def check_running(self) -> None:
        for name, site in self.sites.items():
            if name not in self.down and not site.running() and site.proc is not None:
                pytest.fail(f"hbmon {name} exited ({site.proc.returncode})\n{site.tail(40)}")

    def status(self, name: str) -> dict[str, Any]:
        code, body = http_get(self.sites[name].url + "/status.json")
        assert code == 200, f"{name} /status.json: HTTP {code}: {body[:300]}"
        doc: dict[str, Any] = json.loads(body)
        return doc

    def rows(self, name: str, pair: str = PAIR) -> list[dict[str, Any]]:
        return [r for r in self.status(name)["rows"] if r["pair"] == pair]

    def verdict(self, name: str, pair: str = PAIR) -> str | None:
        verdicts = {r["verdict"] for r in self.rows(name, pair)}
        assert len(verdicts) <= 1, verdicts
        return verdicts.pop() if verdicts else None

    def metrics(self, name: str) -> str:
        code, body = http_get(self.sites[name].url + "/metrics")
        assert code == 200, body[:300]
        return body

    def journal(self, name: str) -> list[dict[str, Any]]:
        return Journal(self.folder / f"state-{name}" / "failover.jsonl").entries()

    def refusals(self, name: str, *codes: str, pair: str = PAIR) -> list[dict[str, Any]]:
        return [
            e
            for e in self.journal(name)
            if e.get("event") == "refused" and e.get("pair") == pair and e.get("code") in codes
        ]

    def started(self, name: str, pair: str = PAIR) -> list[dict[str, Any]]:
        return [e for e in self.journal(name) if e.get("event") == "started" and e["pair"] == pair]

    def events(self, kind: str, pair: str = PAIR) -> list[Event]:
        events, problems = read(self.history)
        assert not problems, problems
        return [e for e in events if e.event == kind and e.pair == pair]

    def owner(self, pair: str = PAIR, via: str = "W") -> tuple[str, int] | str | None:
        """PREFIX/owner/PAIR read linearizably through ``via``'s member: (site, term), the
        raw value when it is not hbmon's, None when absent."""
        raw = self.net.get(via, f"{self.prefix}/owner/{pair}")
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            return str(doc["site"]), int(doc["term"])
        except (ValueError, KeyError, TypeError):
            return raw

    def arbiter_status(self, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.status(name)["arbiter"]
        return doc

    def assert_a_kept_the_pair(
        self, term: int, lease: Any, *, via: str = "W", check_up: bool = True
    ) -> None:
        """No promote and no demote in the history, the owner key (read through ``via``'s
        member) still A's at ``term``, and A's arbiter status: still on ``lease``, owning
        PAIR, and up (unless ``check_up`` is False)."""
        assert self.events("promote") == []
        assert self.events("demote") == []
        assert self.owner(via=via) == ("A", term)
        a = self.arbiter_status("A")
        if check_up:
            assert (a["up"], a["lease"], a["owned"]) == (True, lease, [PAIR])
        else:
            assert (a["lease"], a["owned"]) == (lease, [PAIR])

    def history_text(self) -> str:
        return self.history.read_text() if self.history.exists() else "(empty)"

    def tails(self) -> str:
        return "\n".join(site.tail(30) for site in self.sites.values())

    def finish(self, *, fenced: int = 0) -> Report:
        """The end of every case: nothing crashed, every process still running that was
        not killed on purpose stops cleanly, and the history checker passes."""
        self.check_running()
        if self.alerts is not None:
            self.alerts.stop()
            print(f"webhook answers: {dict(self.alerts.answers)}")
        for name, site in self.sites.items():
            if name not in self.down:
                site.stop()
                assert site.proc is not None
                assert site.proc.returncode == 0, f"{name} exit {site.proc.returncode}"
            assert not site.problems(), f"{name}: {site.problems()}\n{site.tail(60)}"
        report = check(
            self.history,
            initial_owner=dict.fromkeys(self.pairs, "A") if self.arbiter else None,
            initial_token=self.initial,
            resume_grace=GRACE,
        )
        assert len(report.fenced) == fenced, report.fenced
        print(f"[{time.monotonic() - self.t0:.1f} s] history: {report.summary()}")
        return report


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdNet]:
    with etcd_cluster(
        tmp_path_factory.mktemp("etcdnet"), election_ms=ELECTION_MS, heartbeat_ms=HEARTBEAT_MS
    ) as net:
        print(f"\netcd cluster formed in {net.formed_in:.2f} s")
        yield net


@pytest.fixture
def cases(lab: EtcdNet, tmp_path: Path) -> Iterator[Callable[..., Case]]:
    made: list[Case] = []

    def new(**kwargs: Any) -> Case:
        folder = tmp_path / f"case{len(made)}"
        folder.mkdir()
        made.append(Case(lab, folder, **kwargs))
        return made[-1]

    try:
        yield new
    finally:
        for case in made:
            case.close()


def _running(cases: Callable[..., Case]) -> tuple[Case, int]:
    """A case started (A owning PAIR, B seeing it alive) with the hostile Alertmanager
    posting to B: the case and A's term of PAIR."""
    c = cases()
    c.start()
    c.start_alerts()
    return c, c.initial[PAIR]


class OwnerWatch:
    """``etcdctl watch`` on the case's owner keys from W, each event stamped on arrival."""

    def __init__(self, case: Case) -> None:
        argv = [
            "etcdctl", f"--endpoints={case.net.member_url('W')}", "watch", "--prefix",
            f"{case.prefix}/owner/", "-w", "json",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.proc = case.net.run_in(
            "W", argv, stdout=subprocess.PIPE, env={**env, "ETCDCTL_API": "3"}, text=True
        )
        self.events: list[tuple[float, str, str, dict[str, Any] | None, int]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        case.closers.append(self.close)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            stamp = time.monotonic()
            with contextlib.suppress(ValueError):
                for ev in json.loads(line).get("Events") or []:
                    kv = ev["kv"]
                    key = base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1]
                    kind = "DELETE" if ev.get("type") == 1 else "PUT"
                    value = json.loads(base64.b64decode(kv["value"])) if kind == "PUT" else None
                    self.events.append((stamp, kind, key, value, int(kv["mod_revision"])))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._thread.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


# -- the partition cases -------------------------------------------------------------------


def test_host_death_fails_over_once_after_etcd_deleted_the_key(
    cases: Callable[..., Case],
) -> None:
    c = cases()
    c.start()
    term = c.initial[PAIR]
    keys = OwnerWatch(c)
    c.start_alerts()
    time.sleep(0.5)  # (the watch is established)
    t_kill = c.host_death("A")
    c.wait(lambda: c.events("promote"), TTL + TAKEOVER_WAIT, "B's failover")
    c.sample(2.5, lambda: None)  # more alerts, past the 1 s hold-down: still one
    (promote,) = c.events("promote")
    assert (promote.site, promote.token) == ("B", term + 1)
    # etcd deleted A's key (its lease expired) before B's key with the new term was put
    changes = [(kind, value) for _, kind, key, value, _ in keys.events if key == PAIR]
    assert changes[-2:] == [
        ("DELETE", None),
        ("PUT", {"site": "B", "term": term + 1, "lease": changes[-1][1]["lease"]}),
    ]
    deleted = [e for e in keys.events if e[1] == "DELETE"][-1]
    put = keys.events[-1]
    assert deleted[4] < put[4]
    # A's last renewal was at most RENEW before the kill: etcd cannot expire it sooner
    # than TTL after that, and B did not act on its stale paths (< 1 s) before
    took = promote.t - t_kill
    assert took >= TTL - RENEW - 0.05, f"promoted {took:.2f} s after the kill"
    assert promote.t > deleted[0] - 0.5
    (started,) = c.started("B")
    assert started["token"] == term + 1
    executed = [e for e in c.journal("B") if e.get("event") == "executed"]
    assert len(executed) == 1, executed
    assert c.owner() == ("B", term + 1)
    print(f"kill -> key deleted {deleted[0] - t_kill:.2f} s -> promote {took:.2f} s")
    c.finish()


def test_a_wan_cut_with_the_witness_reachable_is_isolated_and_never_fails_over(
    cases: Callable[..., Case],
) -> None:
    c, term = _running(cases)
    t_cut = c.cut("A", "B")
    seen = c.sample(3 * TTL, lambda: (c.verdict("B"), {r["owner"] for r in c.rows("B")}))
    verdicts = [v for _, (v, _) in seen]
    assert "host_down" not in verdicts, seen
    first = next((i for i, v in enumerate(verdicts) if v == "isolated"), None)
    assert first is not None, seen
    assert seen[first][0] - t_cut < STALE_WITHIN
    assert set(verdicts[first:]) == {"isolated"}, seen[first:]
    assert {o for _, (_, owners) in seen for o in owners} == {"A"}
    refused = c.refusals("B", "owner_alive")
    assert refused, c.journal("B")[-5:]
    assert f"still held by A at term {term}" in refused[0]["reason"]
    assert c.events("promote") == []
    assert c.events("demote") == []
    assert c.started("B") == []
    assert c.owner() == ("A", term)
    assert c.arbiter_status("A")["owned"] == [PAIR]
    c.heal_until_alive()
    print(f"isolated from {seen[first][0] - t_cut:.2f} s after the cut, {len(refused)} "
          f"owner_alive refusals")  # fmt: skip
    c.finish()


def test_an_isolated_owner_demotes_then_the_other_site_fails_over_once(
    cases: Callable[..., Case],
) -> None:
    c, term = _running(cases)
    t_iso = c.isolate("A")
    c.wait(lambda: c.events("demote"), TTL, "A's demote")
    c.wait(lambda: c.events("promote"), TTL + TAKEOVER_WAIT, "B's failover")
    (demote,) = c.events("demote")
    (promote,) = c.events("promote")
    assert demote.site == "A"
    assert promote.site == "B"
    assert (demote.token, promote.token) == (term, term + 1)
    assert demote.t < promote.t, "B promoted before A had demoted"
    lead = json.loads(demote.text)["t_start"] - t_iso
    assert lead <= TTL - DB, f"demote started {lead:.2f} s after the isolation"
    assert [e["result"] for e in c.journal("A") if e.get("event") == "demote"] == ["executed"]

    c.heal()
    # A gets a lease again, but never takes the pair back; its beats say standby
    c.wait(lambda: (a := c.arbiter_status("A"))["up"] and a["lease"], 10.0, "A's new lease")
    c.sample(2 * RENEW, lambda: None)
    assert c.owner() == ("B", term + 1)
    assert c.arbiter_status("A")["owned"] == []
    assert metric_value(c.metrics("A"), "hbmon_pair_owned", pair=PAIR) == 0.0
    show = subprocess.run(
        [PYTHON, "-m", "hbmon.cli", "volume", "show", str(c.runner.volumes[0]), "--slot", "0",
         "--json"], capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    (record,) = json.loads(show.stdout)["records"]
    assert record["state"] == "standby", record
    c.wait(
        lambda: {r["state"] for r in c.rows("B")} == {"stopped"},
        10.0,
        "B reading A's standby records on both paths",
    )
    assert len(c.events("promote")) == 1
    assert len(c.events("demote")) == 1
    print(
        f"isolate -> demote started {lead:.2f} s, finished {demote.t - t_iso:.2f} s; "
        f"promote {promote.t - t_iso:.2f} s"
    )
    c.finish()


def test_an_isolated_standby_gets_no_quorum_and_the_owner_keeps_the_pair(
    cases: Callable[..., Case],
) -> None:
    c, term = _running(cases)
    lease = c.arbiter_status("A")["lease"]
    t_iso = c.isolate("B")
    c.wait(lambda: c.refusals("B", "no_quorum"), STALE_WITHIN + 4 * RT + 3, "no_quorum at B")
    c.sample(max(0.0, t_iso + TTL + 1.5 - time.monotonic()), lambda: None)
    c.assert_a_kept_the_pair(term, lease)
    assert c.started("B") == []
    assert metric_value(c.metrics("B"), "hbmon_arbiter_up") == 0.0
    c.heal_until_alive()
    c.finish()


def test_an_isolated_witness_changes_nothing(cases: Callable[..., Case]) -> None:
    c, term = _running(cases)
    lease = c.arbiter_status("A")["lease"]
    leader = c.net.leader()
    c.isolate("W")
    seen = c.sample(1.5 * TTL, lambda: c.verdict("B"))
    assert_never_all_stale(seen)
    c.assert_a_kept_the_pair(term, lease, via="B", check_up=False)
    assert {e.get("code") for e in c.journal("B")} == {"table_disagrees"}
    print(f"etcd leader was {leader}")
    c.finish()


def assert_never_all_stale(seen: list[tuple[float, str | None]]) -> None:
    """B's verdict samples never had every path stale (host_down, isolated): the fault
    did not touch the sites' links.  (On a loaded machine a path may be late or even
    stale a moment, the copier being a thread of the test: degraded, never both.)"""
    verdicts = [v for _, v in seen]
    assert not {"host_down", "isolated"} & set(verdicts), seen
    assert verdicts.count("alive") >= len(verdicts) // 2, seen
    if set(verdicts) != {"alive"}:
        print(f"B's verdicts: {collections.Counter(verdicts)}")


def _record(path: Path, pair: str) -> tuple[int, int, str] | None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, SLOT_SIZE, 0)
    finally:
        os.close(fd)
    try:
        rec = decode(data[:512], pair)
    except RecordError:
        return None
    return rec.incarnation, rec.serial, rec.state.label


def test_a_paused_owner_demotes_on_resume_before_any_active_beat(
    cases: Callable[..., Case],
) -> None:
    c, term = _running(cases)
    pvol = c.runner.volumes[0]
    a = c.sites["A"]
    a.pause()
    t_pause = mark(c.history, "A", "pause")
    frozen = _record(pvol, PAIR)
    assert frozen is not None
    assert frozen[2] == "active"
    c.wait(lambda: c.events("promote"), TTL + TAKEOVER_WAIT, "B's failover")
    time.sleep(max(0.0, t_pause + 2 * TTL - time.monotonic()))
    records: list[tuple[float, tuple[int, int, str] | None]] = []
    done = threading.Event()

    def watch_pvol() -> None:
        while not done.is_set():
            records.append((time.monotonic(), _record(pvol, PAIR)))
            done.wait(0.005)

    sampler = threading.Thread(target=watch_pvol, daemon=True)
    sampler.start()
    try:
        t_resume = mark(c.history, "A", "resume")
        a.resume()
        c.wait(lambda: c.events("demote"), GRACE + 2.0, "A's demote after SIGCONT")
        time.sleep(1.0)  # a few beats after it
    finally:
        done.set()
        sampler.join(5)
    (promote,) = c.events("promote")
    (demote,) = c.events("demote")
    assert (promote.site, promote.token) == ("B", term + 1)
    assert (demote.site, demote.token) == ("A", term)
    assert t_resume < demote.t < t_resume + GRACE
    written = [(t, r) for t, r in records if r is not None and r[:2] != frozen[:2]]
    assert written, "A wrote nothing after SIGCONT"
    active = [(t - t_resume, r) for t, r in written if r[2] == "active"]
    assert active == [], f"active beats after the resume: {active}"
    assert {r[2] for _, r in written} == {"standby"}
    # B's promote came while A was frozen (fenced: lower token); A demoted on resume
    report = c.finish(fenced=1)
    assert "thawed" in report.fenced[0]
    print(
        f"promote {promote.t - t_pause:.2f} s into the pause; demote "
        f"{demote.t - t_resume:.3f} s after SIGCONT; first record after it "
        f"{written[0][0] - t_resume:.3f} s: {written[0][1][2]}"
    )


class Sampler:
    """A thread calling ``probe()`` every ``every`` seconds: (stamp, value) each time."""

    def __init__(self, probe: Callable[[], Any], every: float) -> None:
        self.probe, self.every = probe, every
        self.samples: list[tuple[float, Any]] = []
        self.errors: list[BaseException] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                self.samples.append((time.monotonic(), self.probe()))
            except Exception as exc:  # reported by stop()
                self.errors.append(exc)
                return
            self._done.wait(self.every)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, Any]]:
        self._done.set()
        self._thread.join(5)
        assert not self.errors, f"sampler failed: {self.errors[0]!r}"
        return self.samples


def _lease_left(c: Case) -> float | None:
    return metric_value(c.metrics("A"), "hbmon_arbiter_lease_remaining_seconds")


def test_killing_the_etcd_leader_in_steady_state_costs_no_demote_and_no_failover(
    cases: Callable[..., Case],
) -> None:
    """The leader is killed at the worst moment: just before A's renewal falls due, so
    that renewal is the one that has to get through the election (by A's demote_at,
    TTL - RENEW - DB - MARGIN = 1.17 s after it fell due)."""
    c, term = _running(cases)
    lease = c.arbiter_status("A")["lease"]
    leader = c.net.leader()
    assert leader is not None
    due = TTL - RENEW  # A's lease left when its next renewal falls due
    c.wait(lambda: due < (_lease_left(c) or 0) <= due + 0.15, 3 * TTL, "A's renewal due")
    c.net.kill_member(leader)
    t_kill = c.note(f"killed the etcd leader {leader}")
    left = Sampler(lambda: _lease_left(c), 0.02).start()
    try:
        new_leader, elected = c.net.wait_leader(10.0, other_than=leader)
        seen = c.sample(max(0.0, t_kill + TTL - time.monotonic()), lambda: c.verdict("B"))
    finally:
        lows = left.stop()
    c.net.start_member(leader)
    c.net.wait_healthy(20.0)
    seen += c.sample(RENEW * 2, lambda: c.verdict("B"))
    assert_never_all_stale(seen)
    c.assert_a_kept_the_pair(term, lease)
    assert [e for e in c.journal("A") if e.get("event") == "demote"] == []
    low = min(v for _, v in lows if v is not None)
    print(
        f"leader {leader} killed: {new_leader} elected in {elected:.2f} s; A's lease "
        f"never below {low:.2f} s left (demote at {DB + MARGIN:g} s)"
    )
    assert low > DB + MARGIN
    c.finish()


# -- two candidates at B, two Alertmanagers ---------------------------------------------------


class Alertmanagers:
    """Two clustered ``prometheus-alertmanager`` processes in the root namespace, both
    routing HbmonHostDown and HbmonSiteIsolated to every webhook given."""

    def __init__(self, folder: Path, webhooks: list[str], token_file: Path, count: int = 2):
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        need(binary is not None, "alertmanager not found (Debian: prometheus-alertmanager)")
        assert binary is not None
        hooks = "".join(
            f"      - url: {url}/api/v1/alerts\n"
            "        send_resolved: true\n"
            "        http_config:\n"
            "          authorization:\n"
            "            type: Bearer\n"
            f"            credentials_file: {token_file}\n"
            for url in webhooks
        )
        config = folder / "alertmanager.yml"
        config.write_text(
            "route:\n"
            "  receiver: default\n"
            "  group_by: [alertname, pair]\n"
            "  routes:\n"
            "    - receiver: hbmon\n"
            "      matchers: ['alertname =~ \"HbmonHostDown|HbmonSiteIsolated\"']\n"
            "      group_by: [alertname, pair]\n"
            "      group_wait: 1s\n"
            "      group_interval: 1s\n"
            "      repeat_interval: 2s\n"
            "receivers:\n"
            "  - name: default\n"
            "  - name: hbmon\n"
            "    webhook_configs:\n" + hooks
        )
        ports = [(free_port(), free_port()) for _ in range(count)]
        self.urls = [f"http://127.0.0.1:{web}" for web, _ in ports]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        for i, (web, gossip) in enumerate(ports):
            peers = [f"--cluster.peer=127.0.0.1:{g}" for j, (_, g) in enumerate(ports) if j != i]
            log = folder / f"alertmanager{i}.log"
            with log.open("wb") as out:
                self.procs.append(subprocess.Popen(
                    [
                        binary, f"--config.file={config}", f"--storage.path={folder / f'am{i}'}",
                        f"--web.listen-address=127.0.0.1:{web}",
                        f"--cluster.listen-address=127.0.0.1:{gossip}", *peers,
                        "--cluster.gossip-interval=50ms", "--cluster.pushpull-interval=1s",
                        "--cluster.peer-timeout=1s", "--cluster.settle-timeout=2s",
                    ],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                ))  # fmt: skip
            self.logs.append(log)

    def ready(self) -> bool:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                pytest.fail(f"alertmanager exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            for url in self.urls:
                if http_get(url + "/-/ready", timeout=1.0)[0] != 200:
                    return False
                cluster = json.loads(http_get(url + "/api/v2/status")[1])["cluster"]
                if cluster["status"] != "ready" or len(cluster["peers"]) != len(self.urls):
                    return False
        except (OSError, ValueError):
            return False
        return True

    def post(self, pairs: list[str]) -> None:
        """One firing alert of each kind per pair to every Alertmanager (as Prometheus
        does: to all of them)."""
        now = datetime.now(UTC)
        alerts = [
            {
                "labels": {"alertname": name, "pair": pair, "severity": "critical"},
                "annotations": {},
                "startsAt": (now - timedelta(seconds=30)).isoformat(),
                "endsAt": (now + timedelta(seconds=60)).isoformat(),
            }
            for pair in pairs
            for name in bench.ALERTS
        ]
        body = json.dumps(alerts).encode()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for url in self.urls:
            req = urllib.request.Request(
                url + "/api/v2/alerts", data=body, headers={"Content-Type": "application/json"}
            )
            with contextlib.suppress(OSError), opener.open(req, timeout=2.0):
                pass

    def sent(self, url: str) -> float:
        text = http_get(url + "/metrics")[1]
        return sum(
            value
            for line in text.splitlines()
            if line.startswith("alertmanager_notifications_total{")
            and 'integration="webhook"' in line
            for value in [float(line.rsplit(" ", 1)[1])]
        )

    def close(self) -> None:
        for proc in self.procs:  # (SIGTERM waits 10 s to leave the gossip mesh)
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_two_standby_processes_and_two_clustered_alertmanagers_fail_over_once(
    cases: Callable[..., Case], tmp_path: Path
) -> None:
    c = cases()
    c.add_standby("B2", http_port=bench.HTTP_PORT - 2, udp_port=bench.UDP_PORT - 2)
    ams = Alertmanagers(
        tmp_path, [f"http://{c.net.mgmt['B']}:{p}" for p in (bench.HTTP_PORT, bench.HTTP_PORT - 2)],
        c.runner.token_file,
    )  # fmt: skip
    c.closers.append(ams.close)
    c.start()
    term = c.initial[PAIR]
    c.wait(ams.ready, 20.0, "both Alertmanagers ready, clustered")
    done = threading.Event()

    def post() -> None:
        while not done.is_set():
            ams.post(c.pairs)
            done.wait(1.0)

    poster = threading.Thread(target=post, daemon=True)
    poster.start()
    c.closers.append(lambda: (done.set(), poster.join(5)))
    # both processes at B hear from the Alertmanagers (and refuse: A is alive)
    c.wait(
        lambda: c.refusals("B", "table_disagrees") and c.refusals("B2", "table_disagrees"),
        15.0,
        "notifications at both B processes",
    )
    t_kill = c.host_death("A")
    c.wait(lambda: c.events("promote"), TTL + TAKEOVER_WAIT + 3, "one failover")
    (promote,) = c.events("promote")
    winner = promote.site
    loser = "B2" if winner == "B" else "B"
    assert promote.token == term + 1
    c.wait(
        lambda: c.refusals(loser, "owner_taken", "owner_alive"),
        TAKEOVER_WAIT + 4,
        f"the arbiter's refusal at {loser}",
    )
    c.sample(2.0, lambda: None)
    assert len(c.events("promote")) == 1, c.history_text()
    assert len(c.started(winner)) == 1
    assert c.started(loser) == []
    assert c.owner() == ("B", term + 1)
    sent = [ams.sent(url) for url in ams.urls]
    assert sum(sent) > 0, sent
    print(
        f"{winner} promoted {promote.t - t_kill:.2f} s after the kill; {loser} refused "
        f"{sorted({e['code'] for e in c.refusals(loser, 'owner_taken', 'owner_alive')})}; "
        f"webhook notifications sent per Alertmanager {sent}"
    )
    done.set()
    c.finish()


# -- without an arbiter -----------------------------------------------------------------------


def test_without_an_arbiter_host_down_is_refused_unless_the_pair_opts_in(
    cases: Callable[..., Case],
) -> None:
    c = cases(pairs=2, arbiter=False)
    c.edit("B", 'hold_down = "1s"', 'hold_down = "60s"')  # (one failover per hold-down)
    c.edit("B", "failover_without_arbiter = true\n", "")  # bench's top-level opt-in: off
    c.edit("B", 'id = "db1"\n', 'id = "db1"\nfailover_without_arbiter = true\n')
    c.start()
    c.start_alerts()
    t_kill = c.host_death("A")
    c.wait(lambda: c.events("promote", "db1"), STALE_WITHIN + 3, "db1's failover")
    c.wait(lambda: c.refusals("B", "no_arbiter"), 5.0, "db0's no_arbiter refusal")
    c.sample(1.5, lambda: None)
    (promote,) = c.events("promote", "db1")
    assert promote.site == "B"
    assert promote.token is None
    assert promote.t - t_kill < STALE_WITHIN + 2, "today's behaviour: at once on host_down"
    assert c.events("promote", "db0") == []
    refused = c.refusals("B", "no_arbiter")[0]
    assert "without an arbiter a dead site cannot be told from a cut" in refused["reason"]
    assert c.verdict("B", "db0") == "host_down"
    # the history has one finding: a promote without a fencing token; no overlap (A died)
    report = analyze(c.history, initial_owner={p: "A" for p in c.pairs})
    assert report.overlaps == 0
    assert len(report.violations) == 1, report.violations
    assert report.violations[0].startswith("token missing on db1"), report.violations
    c.check_running()
    if c.alerts is not None:
        c.alerts.stop()
    c.sites["B"].stop()
    assert not c.sites["B"].problems()
    print(f"db1 promoted {promote.t - t_kill:.2f} s after the kill, without a token")


# -- bad input ------------------------------------------------------------------------------


def test_a_timing_that_breaks_the_rule_is_rejected_naming_the_keys(tmp_path: Path) -> None:
    assert LeaseTiming(TTL, RT, DB).problem() is None  # (what this module runs)
    base = (
        'site = "B"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        "[arbiter]\n"
        'endpoints = ["http://127.0.0.1:2379"]\n'
    )
    for timing, keys in (
        ('lease_ttl = "4s"\nrequest_timeout = "1s"\ndemote_budget = "1s"\n',
         "lease_ttl, request_timeout, demote_budget"),
        ('lease_ttl = "1s"\n', "lease_ttl"),
    ):  # fmt: skip
        path = tmp_path / "bad.toml"
        path.write_text(base + timing)
        for argv in (["config", "check", str(path)], ["run", "-c", str(path)]):
            proc = subprocess.run(
                [PYTHON, "-m", "hbmon.cli", *argv], capture_output=True, text=True, timeout=60,
                check=False,
            )  # fmt: skip
            assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
            assert f"bad.toml: arbiter.{keys}: " in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
    assert "exceeds lease_ttl" in proc.stderr or "at least 2 s" in proc.stderr


_FAKE_ETCD = r"""
import asyncio, sys
from aiohttp import web

def app(mode):
    async def handle(request):
        await request.read()
        if mode == "notjson":
            return web.Response(text="<html><body>502 Bad Gateway (a proxy)</body></html>")
        if mode == "noheader":
            return web.json_response({"result": {"kvs": []}, "kvs": []})
        return web.json_response({"header": {"cluster_id": "1"}})  # nofields
    made = web.Application()
    made.router.add_post("/v3/{path:.*}", handle)
    return made

async def main():
    for arg in sys.argv[1:]:  # MODE:PORT
        mode, port = arg.split(":")
        runner = web.AppRunner(app(mode))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", int(port)).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    need(shutil.which("openssl") is not None, "the openssl command is missing")
    folder = tmp_path / "pki"
    folder.mkdir()
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    both = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    make_cert(folder, "server", "ca", both)
    return folder


def _fake_etcd(tmp_path: Path) -> tuple[list[str], Callable[[], None]]:
    modes = {mode: free_port() for mode in ("notjson", "noheader", "nofields")}
    script = tmp_path / "fake_etcd.py"
    script.write_text(_FAKE_ETCD)
    proc = subprocess.Popen(
        [PYTHON, str(script), *(f"{m}:{p}" for m, p in modes.items())],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"

    def close() -> None:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()

    return [f"http://127.0.0.1:{port}" for port in modes.values()], close


@pytest.mark.parametrize("kind", ["unreachable", "wrong_ca", "not_etcd"])
def test_a_bad_arbiter_never_fails_over_and_never_crashes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A watcher whose arbiter cannot be asked: the pair's every path stale (its writer
    stopped) is ``isolated``, an alert is answered, then refused ``no_quorum`` with the
    reason; ``hbmon_arbiter_up`` 0, the daemon serves on, no failover command runs."""
    closers: list[Callable[[], None]] = []
    extra = ""
    if kind == "unreachable":  # nothing listening, no route, a listener that never answers
        silent = socket.create_server(("127.0.0.1", 0), backlog=16)
        closers.append(silent.close)
        port = silent.getsockname()[1]
        endpoints = [f"http://127.0.0.1:{free_port()}", "http://192.0.2.1:2379",
                     f"http://127.0.0.1:{port}"]  # fmt: skip
        expect = ["ClientConnectorError", "no answer within"]
    elif kind == "wrong_ca":
        folder = request.getfixturevalue("pki")
        tls = (
            "--cert-file", str(folder / "server.crt"), "--key-file", str(folder / "server.key"),
        )  # fmt: skip
        (tmp_path / "etcd").mkdir()
        good = ssl.create_default_context(cafile=folder / "ca.crt")
        members = start_cluster(tmp_path / "etcd", 1, scheme="https", extra=tls, context=good)
        closers.append(lambda: stop_cluster(members))
        endpoints = [members[0].url]
        extra = f'ca_file = "{folder / "other-ca.crt"}"\n'
        expect = ["TLS: ", "certificate verify failed"]
    else:
        endpoints, close = _fake_etcd(tmp_path)
        closers.append(close)
        expect = ["HTTP 200, not JSON: b'<html>", "'header' is None, not dict",
                  "no lease granted"]  # fmt: skip
    pvol = tmp_path / "pvol.img"
    pvol.write_bytes(bytes(1 << 20))
    token = os.urandom(16).hex()
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "token").chmod(0o600)
    history = tmp_path / "history.jsonl"
    promote, _ = bench.write_scripts(tmp_path / "bin", history)
    config = (
        'site = "B"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        'interval = "200ms"\n'
        "miss_threshold = 3\n"
        "[webhook]\n"
        f'token_file = "{tmp_path / "token"}"\n'
        "[arbiter]\n"
        f"endpoints = {json.dumps(endpoints)}\n"
        f'lease_ttl = "{TTL:g}s"\nrequest_timeout = "{RT:g}s"\ndemote_budget = "{DB:g}s"\n'
        + extra
        + "[[watch]]\n"
        f'id = "{PAIR}"\nvolume = "{pvol}"\nslot = 0\nmethod = "volume"\n'
        "failover_single_path = true\n"
        f'failover = ["{promote}", "B", "{PAIR}"]\n'
    )
    feeder = Feeder([(PAIR, pvol, 0)], 0.2).start()
    try:
        with running_site(config, tmp_path, "B") as site:

            def verdict() -> str:
                return str(site.row(PAIR)["verdict"])

            wait_for(lambda: verdict() == "alive", 10.0, "the pair alive")
            feeder.stop_feeding(PAIR)
            wait_for(lambda: verdict() == "isolated", STALE_WITHIN, "the pair isolated")
            decision = post_host_down(site, token, PAIR)
            assert decision["code"] == "isolated", decision  # answered at once
            journal = Journal(tmp_path / "state" / "failover.jsonl")

            def refused() -> list[dict[str, Any]]:
                return [e for e in journal.entries() if e.get("code") == "no_quorum"]

            (refusal,) = wait_for(refused, 4 * RT + 3.0, "the no_quorum refusal")
            for text in expect:
                assert text in refusal["reason"], refusal["reason"]
            for url in endpoints:
                assert url in refusal["reason"]
            assert metric_value(site.metrics(), "hbmon_arbiter_up") == 0.0
            assert site.status()["arbiter"]["up"] is False
            assert verdict() == "isolated"
            assert site.healthz() == 200
            assert "Traceback" not in site.stderr()
            assert not history.exists(), history.read_text()
            print(f"{kind}: refused {refusal['reason'][:300]}")
    finally:
        feeder.close()
        for closer in closers:
            closer()


def test_a_foreign_owner_key_is_refused_and_never_failed_over(
    cases: Callable[..., Case],
) -> None:
    c, _ = _running(cases)
    key = f"{c.prefix}/owner/{PAIR}"
    assert c.net.put("W", key, "not hbmon's {")  # (no lease: it outlives every site)
    # what A makes of it (reported, not asserted: see the report of this test's author)
    a_after = c.sample(1.0, lambda: c.arbiter_status("A")["owned"])[-1][1]
    t_kill = c.host_death("A")
    c.wait(lambda: c.refusals("B", "owner_taken"), STALE_WITHIN + 3, "owner_taken at B")
    c.sample(max(0.0, t_kill + TTL + 2 - time.monotonic()), lambda: None)
    refused = c.refusals("B", "owner_taken")
    assert "holds a value hbmon did not write" in refused[-1]["reason"], refused[-1]
    assert c.events("promote") == []
    assert c.started("B") == []
    assert c.owner() == "not hbmon's {"
    assert c.verdict("B") == "isolated"  # never host_down: the key is not "nobody"
    status = subprocess.run(
        c.net.exec_argv("B", [PYTHON, "-m", "hbmon.cli", "arbiter", "status", "-c",
                              str(c.configs["B"])]),
        capture_output=True, text=True, timeout=30, check=False, cwd=bench.REPO,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert f"warning: {key} was not written by hbmon" in status.stdout, status.stdout
    print(
        f"{len(refused)} owner_taken refusals in {time.monotonic() - t_kill:.1f} s; A after "
        f"the overwrite, before its death: owned {a_after}, "
        f"{len(c.events('demote'))} demotes"
    )
    c.finish()


# -- the randomized runner -----------------------------------------------------------------


SEED = 4  # schedules: kill(A) | cut(A-B)+kill(A); leader(etcd)+cut(A-B) | cut(A-B)+kill(B);
# isolate(A) (bench/partitions.py --seed 4 --schedules 3 --steps 1-2 --print-only)


def _may_lose_quorum(schedule: bench.Schedule) -> bool:
    etcd_faults = ("leader", "cut", "isolate")
    return any(sum(f.kind in etcd_faults for f in step.faults) > 1 for step in schedule.steps)


def test_three_random_schedules_of_the_bench_show_no_overlap(lab: EtcdNet, tmp_path: Path) -> None:
    timing = bench.Timing(3.0, 0.25, 0.5)  # bench/partitions.py's defaults
    timing.check()
    runner = bench.Runner(lab, tmp_path, timing, 2)
    results = []
    for index in range(3):
        schedule = bench.generate(SEED, index, (1, 2))
        print(f"\n{schedule}")
        result = runner.run(schedule)
        print(result.line())
        results.append(result)
    for result in results:
        assert result.error is None, result.error
        assert result.report is not None
        assert result.report.overlaps == 0, result.report.violations
        assert result.violations == 0, result.report.violations
        assert not result.site_problems, result.site_problems
        # Liveness too: a schedule whose every step leaves a majority of etcd reachable
        # from A or B ends with a primary for every pair (A's, or B's after a takeover);
        # this is how the lost claim answer was found.  Two etcd faults at once (the
        # leader W killed while A-B is cut) can leave no majority anywhere: A demotes,
        # nobody may take over, and A never takes the pair back by itself.
        if not _may_lose_quorum(result.schedule):
            assert result.orphans == [], f"{result.schedule}: {result.line()}"
    assert sum(len(r.report.promotes()) for r in results if r.report) > 0
