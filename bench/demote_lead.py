"""Issue 14, Speed: from isolating site A to A's demote command starting, and how long
before etcd could expire A's lease it started.

The lab is on localhost: a real 3-member etcd 3.4 cluster on 127.0.0.1 ports (the pieces
of bench/takeover.py) and site A ``hbmon run`` beating one pair with ``[arbiter]`` (hbmon's
default timing unless overridden: lease_ttl 15 s, request_timeout 2 s, demote_budget 5 s)
and a ``demote`` command (a script that appends CLOCK_REALTIME and HBMON_FENCING_TOKEN to a
file).  A talks to etcd only through three TCP proxies run by this bench, one per member;
its ``[arbiter] endpoints`` are the proxies.  Isolating A = every proxy stops forwarding at
once, as a cut network does: what is in flight is held, never answered, and new
connections are accepted and then hang (a black hole, no RST), until the heal.

Each trial: a fresh pair id and a fresh A; once A owns the pair and has renewed its lease
at least once, the bench waits a random 0 - lease_ttl/3 s (so the cut falls on every phase
of the renewal period), cuts, and waits for the demote command::

    demote after isolation = demote start (the script's first line) - cut
    bound                  = lease_ttl - demote_budget   (issue 14)
    lead before expiry     = (last successful renewal's send time + lease_ttl) - demote start

The renewal's send time is when the proxy forwarded A's POST /v3/lease/keepalive (or the
grant) to etcd, "successful" when the proxy forwarded etcd's answer back to A before the
cut: etcd counts the TTL from when it handles the request, later than that, so this is
the earliest instant etcd could expire the lease.  Printed beside it: hbmon's own figure
(its log line at the give-up: "N s left before the arbiter may expire it", counted from
its send time on its monotonic clock), hbmon_arbiter_lease_remaining_seconds scraped just
before the cut, and when etcd actually deleted the pair's owner key (an ``etcdctl watch``
straight to the members).  Nothing asserts a time.

    python bench/demote_lead.py                 # 10 trials, hbmon's default timing
    python bench/demote_lead.py --trials 3      # quicker (--quick is the same)
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    Hbmon,
    exit_on_sigterm,
    fmt,
    free_port,
    info,
    loadavg,
    machine_line,
    metric_value,
    quantile,
    report,
)
from takeover import (
    ArbiterLab,
    ArbiterTiming,
    add_lab_args,
    first_start,
    hbmon_log,
    init_volume,
    lab_parser,
    round_count,
    seed_and_timing,
    site_file,
    skipped_without,
    toml_list,
    wait_until,
)

RENEWALS = (b"POST /v3/lease/keepalive", b"POST /v3/lease/grant")
GIVE_UP = re.compile(
    r"arbiter: giving up lease \S+: the lease could not be renewed in time \(last renewal "
    r"sent ([\d.]+) s ago, ([\d.]+) s left before the arbiter may expire it\)"
)


# -- the black-hole proxies ------------------------------------------------------------------


@dataclass
class _Conn:
    pending: float | None = None  # when a renewal request was forwarded, unanswered yet


class Blackhole:
    """TCP proxies 127.0.0.1:port -> 127.0.0.1:upstream on one asyncio loop (a thread),
    forwarding until :meth:`cut`, holding everything from then until :meth:`heal`."""

    def __init__(self, upstreams: Sequence[int]) -> None:
        self.upstreams = list(upstreams)
        self.ports = [free_port() for _ in upstreams]
        self.loop = asyncio.new_event_loop()
        self.renewals: list[tuple[float, float]] = []  # (forwarded, answered) wall times
        self.cut_at: float | None = None
        self._healed: asyncio.Event | None = None
        self._servers: list[asyncio.Server] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="proxy", daemon=True)
        self._thread.start()
        self._call(self._start()).result(10)

    def _call(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def _start(self) -> None:
        self._healed = asyncio.Event()
        for port, upstream in zip(self.ports, self.upstreams, strict=True):

            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                             upstream: int = upstream) -> None:  # fmt: skip
                await self._handle(r, w, upstream)

            self._servers.append(await asyncio.start_server(handle, "127.0.0.1", port))

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    async def _hold(self) -> None:
        assert self._healed is not None
        await self._healed.wait()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, up: int) -> None:
        try:
            if self.cut_at is not None:
                await self._hold()  # a connection made during the cut hangs, then closes
                return
            ur, uw = await asyncio.open_connection("127.0.0.1", up)
            conn = _Conn()
            try:
                await asyncio.gather(self._pump(r, uw, conn, True), self._pump(ur, w, conn, False))
            finally:
                uw.close()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, conn: _Conn, out: bool
    ) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if self.cut_at is not None:
                    await self._hold()  # never forwarded; the heal closes the connection
                    break
                if out and any(req in data for req in RENEWALS):
                    conn.pending = time.time()
                dst.write(data)
                await dst.drain()
                if not out and conn.pending is not None:
                    self.renewals.append((conn.pending, time.time()))
                    conn.pending = None
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.close()

    async def _cut(self) -> float:
        self.cut_at = time.time()
        return self.cut_at

    async def _heal(self) -> None:
        assert self._healed is not None
        self.cut_at = None
        self._healed.set()
        self._healed = asyncio.Event()

    def cut(self) -> float:
        """Stop forwarding now; the wall time of the cut."""
        cut: float = self._call(self._cut()).result(10)
        return cut

    def heal(self) -> None:
        self._call(self._heal()).result(10)

    def last_renewal(self, before: float) -> tuple[float, float] | None:
        """The newest renewal (forwarded, answered) whose answer reached A before ``before``."""
        done = [r for r in list(self.renewals) if r[1] <= before]
        return max(done) if done else None

    def close(self) -> None:
        async def stop() -> None:
            await self._heal()
            for s in self._servers:
                s.close()

        with contextlib.suppress(Exception):
            self._call(stop()).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


# -- one trial ---------------------------------------------------------------------------------


@dataclass
class Trial:
    pair: str
    cut: float
    demote: float
    renewal: tuple[float, float] | None
    lease_ttl: float
    hbmon_left: float | None = None  # hbmon's own "s left" at the give-up
    metric_left: float | None = None  # expiry from the last scrape before the cut - demote
    deleted: float | None = None  # owner key deleted at etcd (wall)
    result: str = "?"
    events: dict[str, float] = field(default_factory=dict)

    @property
    def after(self) -> float:
        return self.demote - self.cut

    @property
    def lead(self) -> float | None:
        return None if self.renewal is None else self.renewal[0] + self.lease_ttl - self.demote

    @property
    def phase(self) -> float | None:
        """Seconds from the last successful renewal's send time to the cut."""
        return None if self.renewal is None else self.cut - self.renewal[0]


class DemoteLab(ArbiterLab):
    """etcd, its watch and the black-hole proxies for the whole run; A per trial."""

    def __init__(self, root: Path, timing: ArbiterTiming, seed: int) -> None:
        super().__init__(root, timing, seed, "demote")
        self.t = timing.effective()
        self.port = free_port()
        self.proxy: Blackhole | None = None

    def start(self) -> None:
        super().start()
        self.proxy = Blackhole([self.etcd.client[n] for n in self.etcd.NAMES])

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        super().close()

    def a_config(self, pair: str, folder: Path) -> Path:
        assert self.proxy is not None
        (folder / "state").mkdir(parents=True, exist_ok=True)
        vol = folder / f"{pair}.vol"
        init_volume(vol, pair)
        return site_file(
            folder, "A", self.port,
            'method = "volume"\n'
            + self.timing.table(self.proxy.endpoints, self.prefix)
            + f'\n[[beat]]\nid = "{pair}"\nvolume = "{vol}"\nslot = 0\n'
            f"demote = {toml_list([sys.executable, str(self.script), str(self.starts), 'demote'])}"
            "\n",
        )  # fmt: skip

    def trial(self, n: int) -> Trial:
        proxy, watch = self.proxy, self.watch
        if proxy is None or watch is None:
            raise RuntimeError("the lab is not started")
        pair = f"d{n:03d}"
        folder = self.root / f"A-{pair}"
        self.a = Hbmon(self.a_config(pair, folder), folder / "hbmon-A.log", self.port, "info")
        try:
            self.a.wait_serving()
            wait_until(f"A owns {pair}", lambda: self.a_owns(pair), 60.0, 0.1)
            began = time.time()
            # At least one renewal after the grant, then a random phase of the period.
            wait_until("a lease renewal", lambda: any(r[0] > began for r in proxy.renewals),
                       self.t.lease_ttl, 0.05)  # fmt: skip
            time.sleep(self.rng.uniform(0.0, self.t.renew_every))
            scraped = time.time()
            left = metric_value(self.a.metrics(), "hbmon_arbiter_lease_remaining_seconds")
            cut = proxy.cut()

            def demoted() -> dict[str, Any] | None:
                assert self.a is not None
                self.a.check()
                return first_start(self.starts, pair, "demote")

            start = wait_until(f"the demote command of {pair}", demoted, 3 * self.t.lease_ttl, 0.02)
            renewal = proxy.last_renewal(cut)
            trial = Trial(pair, cut, start["real"], renewal, self.t.lease_ttl)
            # The key's deletion at etcd: up to lease_ttl - (demote - renewal) + etcd's check.
            deadline = (renewal[0] if renewal else cut) + self.t.lease_ttl + 5.0
            key = f"{self.prefix}/owner/{pair}"
            deleted = wait_until(
                f"etcd deleting the owner key of {pair}",
                lambda: watch.first("DELETE", key, cut) or (time.time() > deadline and -1.0),
                self.t.lease_ttl + 10.0, 0.05,
            )  # fmt: skip
            trial.deleted = None if deleted == -1.0 else deleted
            if left is not None and not any(scraped < r[0] < cut for r in proxy.renewals):
                trial.metric_left = scraped + left - trial.demote
            time.sleep(0.5)  # (the give-up line and the journal written)
            for when, msg in hbmon_log(self.a.log):
                m = GIVE_UP.search(msg)
                if m and when >= cut - 1.0:
                    trial.hbmon_left = float(m.group(2))
                    break
            for line in (folder / "state" / "failover.jsonl").read_text().splitlines():
                if f'"{pair}"' in line and '"demote"' in line:
                    trial.result = re.search(r'"result": "(\w+)"', line).group(1)  # type: ignore[union-attr]
            return trial
        finally:
            proxy.heal()
            if self.a.alive():
                self.a.proc.send_signal(signal.SIGTERM)
            self.a.stop()
            self.a = None


def trial_line(t: Trial, bound: float) -> str:
    return (
        f"{t.pair}: demote {t.after:5.2f} s after the cut (bound {bound:g} s, "
        f"{bound - t.after:+.2f} s to spare); lead before expiry {fmt(t.lead, ' s', 2)} "
        f"(hbmon's own {fmt(t.hbmon_left, ' s', 2)}, from the scrape "
        f"{fmt(t.metric_left, ' s', 2)}); etcd deleted the key "
        f"{fmt(None if t.deleted is None else t.deleted - t.demote, ' s', 2)} after the demote "
        f"started; cut {fmt(t.phase, ' s', 2)} after the last renewal's send; demote {t.result}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    exit_on_sigterm()
    p = lab_parser(__doc__, "trials", 10)
    add_lab_args(p)
    args = p.parse_args(argv)
    if skipped_without("14 demote", "etcd", "etcdctl"):
        return 0
    trials = round_count(args, "trials", 10)
    seed, timing = seed_and_timing(args, "demote_lead")
    t = timing.effective()
    bound = t.lease_ttl - t.demote_budget
    print("command: " + " ".join(["python", "bench/demote_lead.py", *(argv or sys.argv[1:])]))
    print(machine_line(), flush=True)
    print(f"arbiter {timing.describe()}; renew every {t.renew_every:g} s; demote_at = send "
          f"time + lease_ttl - demote_budget - 1 s margin; {trials} trials, seed {seed}",
          flush=True)  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="hbmon-bench-demote-"))
    lab = DemoteLab(root, timing, seed)
    out, failures = lab.run(trials, "trial", lab.trial, lambda x: trial_line(x, bound), args.keep)
    if not out:
        print("demote_lead: no trial")
        return 1
    after = [x.after for x in out]
    leads = [x.lead for x in out if x.lead is not None]
    print(f"results: {len(out)} of {trials} trials ({failures} failed); load average {loadavg()}")
    report(
        "14 demote",
        "isolation -> demote command started, max",
        fmt(max(after), " s", 2),
        fmt(bound, " s (lease_ttl - demote_budget)", 2),
        f"{max(after) / bound:.2f} of the bound",
        f"<= lease_ttl - demote_budget = {bound:g} s",
    )
    info(f"demote after isolation: p50 {quantile(after, 0.5):.2f} s, max {max(after):.2f} s, "
         f"min {min(after):.2f} s; theory: the cut falls 0-{t.renew_every:g} s after a renewal, "
         f"the demote comes lease_ttl - demote_budget - 1 s = {bound - 1:g} s after it: "
         f"{bound - 1 - t.renew_every:g}-{bound - 1:g} s after the cut")  # fmt: skip
    if leads:
        info(f"lead before etcd could expire the lease: min {min(leads):.2f} s, p50 "
             f"{quantile(leads, 0.5):.2f} s, max {max(leads):.2f} s (demote_budget "
             f"{t.demote_budget:g} s + 1 s margin = {t.demote_budget + 1:g} s planned)"
             )  # fmt: skip
    deleted = [x.deleted - x.demote for x in out if x.deleted is not None]
    if deleted:
        info(f"etcd deleted the owner key after the demote started: min {min(deleted):.2f} s, "
             f"p50 {quantile(deleted, 0.5):.2f} s ({len(deleted)}/{len(out)} trials)")  # fmt: skip
    results = {r: sum(1 for x in out if x.result == r) for r in sorted({x.result for x in out})}
    info(f"demote results: {results}; within the bound: "
         f"{sum(1 for a in after if a <= bound)}/{len(after)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
