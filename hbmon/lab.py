"""Fault injection for the demo: the ``/lab`` endpoints and the ``hbmon lab`` client.

Every fault acts on the real parts of a running demo (the beaters, the simulated remote
copy, the network beats), so the verdicts it causes come out of the same code that runs
in production:

==========================  =========================================================
``kill-host PAIR``          the writer stops on both paths, no stopping record (with the
                            arbiter its ownership goes too: see ``Lab._release``)
``freeze-host PAIR``        the writer pauses (same incarnation; ownership as kill-host)
``thaw-host PAIR``          the frozen writer resumes: reported as an undead writer
``cut-link [PAIR]``         the remote copy stops (for one pair or all)
``partition [PAIR]``        network beats are dropped (for one pair or all)
``corrupt PAIR``            the SVOL record is damaged
``hang-read PAIR``          the watcher's reads of PAIR's SVOL block (a FIFO nobody writes)
``truncate PAIR``           the SVOL file ends inside PAIR's slot (later slots are cut too)
``isolate-site SITE``       every link of SITE: the remote copy and network beats between
                            the sites, and its etcd links to the other site and the witness
``cut-wan``                 the links between the sites only (remote copy, network beats,
                            etcd osaka-tokyo); the witness stays reachable from both
``isolate-witness``         the witness's etcd links to both sites
``pause-site SITE SECONDS`` every timed loop of SITE stops for SECONDS (beats, polls,
                            timers, lease renewals), as in a frozen VM; then it resumes
``heal``                    all of the above undone; killed hosts restart
==========================  =========================================================

The etcd links (:class:`hbmon.cluster.Links`) exist when the demo runs its etcd cluster;
without it ``isolate-site`` and ``cut-wan`` cut the copy and the network beats only.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web

from hbmon.clock import SystemClock
from hbmon.cluster import Links
from hbmon.errors import ArbiterError, HbmonError, OwnerTaken, UsageError
from hbmon.mirror import RemoteCopy
from hbmon.site import Site

ACTIONS = {
    "kill-host": "pair",
    "freeze-host": "pair",
    "thaw-host": "pair",
    "cut-link": "optional",
    "partition": "optional",
    "corrupt": "pair",
    "hang-read": "pair",
    "truncate": "pair",
    "isolate-site": "site",
    "cut-wan": "none",
    "isolate-witness": "none",
    "pause-site": "site-seconds",
    "heal": "none",
}
MAX_PAUSE = 3600.0
RECLAIM_ATTEMPTS = 5
RECLAIM_PAUSE = 0.5  # seconds between attempts
DEMO_GLOB = "hbmon-demo-*"
DEMO_FILE = "demo.json"


class PausableClock(SystemClock):
    """The system clock of one demo site, whose sleepers the lab can hold (pause-site).

    Every timed loop of a site sleeps on its clock (:meth:`sleep_until`: the beater, the
    poller, the status table's timers, and the arbiter's lease renewals), so holding the
    sleepers stops them all, as a frozen VM stops: a loop that comes to the end of its
    sleep while the site is paused waits until the pause is over, and none runs a round
    meanwhile.  Monotonic time goes on (a paused process finds the time jumped).  The
    site's HTTP server and network listener are not loops on the clock and go on.

    Integration point (issue 14): the site's arbiter keeper must sleep on ``site.clock``
    too (its renewals and retries), as the beater does; then pause-site stops the lease
    renewal with everything else.
    """

    def __init__(self) -> None:
        self.paused_until = -math.inf
        self._resumed: anyio.Event | None = None

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.monotonic() + seconds)

    def resume(self) -> None:
        self.paused_until = -math.inf
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None

    def paused_for(self) -> float:
        """Seconds of the pause still to come (0 when not paused)."""
        return max(0.0, self.paused_until - self.monotonic())

    async def sleep_until(self, deadline: float, wake: anyio.Event | None = None) -> None:
        await super().sleep_until(deadline, wake)
        while (left := self.paused_for()) > 0:
            if self._resumed is None:
                self._resumed = anyio.Event()
            with anyio.move_on_after(left):
                await self._resumed.wait()


@dataclass
class Lab:
    """The faults of one demo: which site beats each pair, the copy, the network, and
    (with the demo's etcd cluster) the links between the sites and the witness."""

    writers: dict[str, Site]  # pair -> the site that beats it
    mirror: RemoteCopy
    sites: list[Site]
    links: Links | None = None  # the etcd links; None: the demo runs without etcd
    clocks: dict[str, PausableClock] = field(default_factory=dict)  # site -> its clock
    killed: set[str] = field(default_factory=set)
    frozen: set[str] = field(default_factory=set)
    partitioned: set[str] = field(default_factory=set)
    partition_all: bool = False
    hung: dict[str, tuple[Site, str, int]] = field(default_factory=dict)  # pair -> SVOL slot

    def __post_init__(self) -> None:
        for site in self.sites:
            if site.sender is not None:
                site.sender.drop = lambda record: self._dropped(record.pair_id)

    def _dropped(self, pair: str) -> bool:
        return self.partition_all or pair in self.partitioned

    def _watcher(self, pair: str) -> Site:
        return next(s for s in self.sites if pair in s.table.pairs)

    def _site(self, pair: str | None) -> Site:
        if pair is None or pair not in self.writers:
            known = ", ".join(sorted(self.writers)[:6])
            raise UsageError(f"unknown pair {pair!r} (pairs look like: {known}, ...)")
        return self.writers[pair]

    async def apply(self, action: str, pair: str | None, seconds: float | None = None) -> str:
        if action not in ACTIONS:
            raise UsageError(f"unknown lab action {action!r}; one of {', '.join(ACTIONS)}")
        kind = ACTIONS[action]
        if kind.startswith("site"):
            return self._site_fault(action, pair, seconds)
        if kind == "pair" and pair is None:
            raise UsageError(f"{action} needs a PAIR")
        if kind == "none" and pair is not None:
            raise UsageError(f"{action} takes no PAIR")
        if action in ("cut-wan", "isolate-witness"):
            return self._wan_fault(action)
        if pair is not None:
            self._site(pair)
        if action == "kill-host":
            self._site(pair).beater.pause(str(pair))
            self.killed.add(str(pair))
            owner = await self._release(str(pair))
            return f"host of {pair} killed: no beats on either path, no stopping record{owner}"
        if action == "freeze-host":
            self._site(pair).beater.pause(str(pair))
            self.frozen.add(str(pair))
            owner = await self._release(str(pair))
            return f"host of {pair} frozen: it will resume with the same incarnation{owner}"
        if action == "thaw-host":
            if pair not in self.frozen:
                raise UsageError(f"{pair} is not frozen")
            self.frozen.discard(str(pair))
            owner = await self._reclaim(str(pair))
            self._site(pair).beater.resume(str(pair))
            return f"host of {pair} thawed: beating again with its old incarnation{owner}"
        if action == "cut-link":
            if pair is None:
                self.mirror.cut_all = True
            else:
                self.mirror.cut.add(pair)
            return f"remote copy stopped for {pair or 'every pair'}"
        if action == "partition":
            if pair is None:
                self.partition_all = True
            else:
                self.partitioned.add(pair)
            return f"network beats dropped for {pair or 'every pair'}"
        if action == "corrupt":
            await self.mirror.corrupt(str(pair))
            return f"SVOL record of {pair} corrupted; copies for it stopped"
        if action == "hang-read":
            return self._hang(str(pair))
        if action == "truncate":
            await self.mirror.truncate(str(pair))
            return f"SVOL file cut inside the slot of {pair}; copies for it stopped"
        return await self.heal()

    # With the arbiter a pair is owned by its site's lease, one for all of the site's
    # pairs, so a host of one pair that dies or freezes would leave its pair owned (every
    # path stale while the owner lives: `isolated`).  The lab lets the ownership go with
    # the host instead, as it would go with a host that holds its own lease: the site
    # demotes the pair (journaled) and deletes its owner key.  The restarted or thawed
    # host claims the pair again, unless another site has taken it over meanwhile (then
    # it stays standby: it never takes a pair back by itself).

    async def _release(self, pair: str) -> str:
        keeper = self._site(pair).keeper
        if keeper is None:
            return ""
        try:
            await keeper.release(pair)
        except ArbiterError as err:
            return f"; its ownership could not be released: {err}"
        return "; its ownership goes with it (demoted, owner key deleted)"

    async def _reclaim(self, pair: str) -> str:
        keeper = self._site(pair).keeper
        if keeper is None or keeper.owned(pair):
            return ""
        for attempt in range(RECLAIM_ATTEMPTS):
            try:
                term = await keeper.claim(pair)
            except OwnerTaken as err:
                return f"; it stays standby: {err}"
            except ArbiterError as err:
                if attempt + 1 == RECLAIM_ATTEMPTS:
                    return f"; it stays standby: the claim failed: {err}"
                await anyio.sleep(RECLAIM_PAUSE)  # (an election after a heal, say)
            else:
                return f"; it owns {pair} again (term {term})"
        return ""

    def _site_name(self, action: str, name: str | None) -> str:
        names = [site.config.site for site in self.sites]
        if name not in names:
            raise UsageError(f"{action} needs a SITE: one of {', '.join(names)} (not {name!r})")
        return name

    def _site_fault(self, action: str, name: str | None, seconds: float | None) -> str:
        site = self._site_name(action, name)
        if action == "pause-site":
            if seconds is None or not 0 < seconds <= MAX_PAUSE:
                raise UsageError(f"pause-site {site} needs SECONDS, more than 0, at most 3600")
            clock = self.clocks.get(site)
            if clock is None:
                raise UsageError(f"site {site} does not run on a clock the lab can pause")
            clock.pause(seconds)
            return (
                f"site {site} paused for {seconds:g} s: its beats, polls, timers and lease "
                "renewals stop, as in a frozen VM; it resumes by itself (or on heal)"
            )
        self.mirror.cut_all = True
        self.partition_all = True
        etcd = "no etcd links (the demo runs without etcd)"
        if self.links is not None:
            self.links.isolate(site)
            etcd = "its etcd links to " + " and ".join(m for m in self.links.members if m != site)
        return f"site {site} isolated: remote copy and network beats cut, and {etcd}"

    def _wan_fault(self, action: str) -> str:
        if action == "isolate-witness":
            if self.links is None:
                raise UsageError("there is no witness: the demo runs without etcd")
            self.links.isolate("witness")
            return "witness isolated: its etcd links to both sites are cut"
        self.mirror.cut_all = True
        self.partition_all = True
        names = [site.config.site for site in self.sites]
        etcd = "no etcd links (the demo runs without etcd)"
        if self.links is not None:
            self.links.cut(names[0], names[1])
            etcd = f"the etcd link {names[0]}-{names[1]}; the witness stays reachable from both"
        return f"WAN cut: remote copy and network beats between the sites, and {etcd}"

    def _hang(self, pair: str) -> str:
        """Point the watcher's poller at a FIFO that nobody writes: opening it for reading
        blocks a worker thread, as a read of a dead device would."""
        site = self._watcher(pair)
        if pair in self.hung or pair not in site.poller.targets:
            return f"reads of {pair} already hang"
        target, spec = site.poller.targets[pair], site.table.pairs[pair]
        fifo = Path(target.path).with_name(f"hung-{pair}.fifo")
        with contextlib.suppress(FileExistsError):
            os.mkfifo(fifo, 0o600)
        self.hung[pair] = (site, target.path, target.slot)
        args = (spec.method, spec.timing, spec.failover, spec.failover_single_path)
        site.poller.watch(pair, str(fifo), 0, *args)
        return f"reads of {pair} by {site.config.site} hang (volume {fifo})"

    def _unhang(self) -> None:
        for pair, (site, path, slot) in self.hung.items():
            fifo = Path(path).with_name(f"hung-{pair}.fifo")
            spec = site.table.pairs[pair]
            args = (spec.method, spec.timing, spec.failover, spec.failover_single_path)
            site.poller.watch(pair, path, slot, *args)  # back on the SVOL
            # A writer releases the worker blocked opening the FIFO (its read then fails
            # and is discarded: the target is gone); once unlinked nobody can block on it.
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
                os.unlink(fifo)
                os.close(fd)
        self.hung.clear()

    async def heal(self) -> str:
        if self.links is not None:
            self.links.heal_all()  # (first: the restarted hosts claim their pairs)
        claims = []
        for pair in sorted(self.frozen | self.killed):
            said = await self._reclaim(pair)
            if said:
                claims.append(f"{pair}{said}")
        for pair in self.frozen:
            self.writers[pair].beater.resume(pair)
        for pair in self.killed:
            self.writers[pair].beater.resume(pair, new_incarnation_=True)
        restarted = len(self.killed)
        self.frozen.clear()
        self.killed.clear()
        self.partitioned.clear()
        self.partition_all = False
        self._unhang()
        self.mirror.heal()
        paused = [name for name, clock in self.clocks.items() if clock.paused_for() > 0]
        for clock in self.clocks.values():
            clock.resume()
        resumed = f", {len(paused)} paused site(s) resumed" if paused else ""
        owners = "".join(f"\n  {claim}" for claim in claims)
        return (
            f"healed: link and network restored, {restarted} killed host(s) restarted"
            f"{resumed}{owners}"
        )

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/lab/{action}", self._handle), web.get("/lab", self._state)]

    async def _handle(self, request: web.Request) -> web.Response:
        pair = request.query.get("pair") or request.query.get("site") or None
        try:
            text = request.query.get("seconds")
            try:
                seconds = float(text) if text else None
            except ValueError:
                raise UsageError(f"seconds={text!r} is not a number") from None
            message = await self.apply(request.match_info["action"], pair, seconds)
        except UsageError as err:
            return web.json_response({"ok": False, "error": str(err)}, status=400)
        return web.json_response({"ok": True, "message": message})

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "killed": sorted(self.killed),
                "frozen": sorted(self.frozen),
                "partitioned": "all" if self.partition_all else sorted(self.partitioned),
                "cut": "all" if self.mirror.cut_all else sorted(self.mirror.cut),
                "corrupted": sorted(self.mirror.corrupted),
                "hung": sorted(self.hung),
                "arbiter": self.links is not None,
                "links_cut": [] if self.links is None else self.links.cut_links(),
                "paused": {
                    name: round(clock.paused_for(), 1)
                    for name, clock in self.clocks.items()
                    if clock.paused_for() > 0
                },
            }
        )


# -- the client (hbmon lab) ------------------------------------------------------------


def find_demo_url() -> str:
    """The URL of the one running demo, from its ``demo.json``."""
    running = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), DEMO_GLOB, DEMO_FILE)):
        try:
            info: dict[str, Any] = json.loads(Path(path).read_text())
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError):
            continue  # a demo that ended without cleaning up, or half written
        running.append(str(info["url"]))
    if not running:
        raise HbmonError("no running demo found: start one with `hbmon demo`, or pass --url")
    if len(running) > 1:
        raise UsageError(f"{len(running)} demos are running ({', '.join(running)}): pass --url")
    return running[0]


def lab_request(url: str, action: str, pair: str | None, seconds: float | None = None) -> str:
    """POST /lab/ACTION; ``pair`` is the PAIR, or the SITE of isolate-site and pause-site."""
    params = {}
    if pair:
        params["site" if ACTIONS.get(action, "").startswith("site") else "pair"] = pair
    if seconds is not None:
        params["seconds"] = f"{seconds:g}"
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    request = urllib.request.Request(f"{url.rstrip('/')}/lab/{action}{query}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return str(json.load(resp)["message"])
    except urllib.error.HTTPError as err:
        try:
            detail = json.load(err)["error"]
        except (ValueError, KeyError):
            detail = f"HTTP {err.code}"
        raise UsageError(str(detail)) from None
    except (urllib.error.URLError, OSError) as err:
        raise HbmonError(f"cannot reach the demo at {url}: {err}") from None
