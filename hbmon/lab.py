"""Fault injection for the demo: the ``/lab`` endpoints and the ``hbmon lab`` client.

Every fault acts on the real parts of a running demo (the beaters, the simulated remote
copy, the network beats), so the verdicts it causes come out of the same code that runs
in production:

==========================  =========================================================
``kill-host PAIR``          the writer stops on both paths, no stopping record
``freeze-host PAIR``        the writer pauses (same incarnation)
``thaw-host PAIR``          the frozen writer resumes: reported as an undead writer
``cut-link [PAIR]``         the remote copy stops (for one pair or all)
``partition [PAIR]``        network beats are dropped (for one pair or all)
``corrupt PAIR``            the SVOL record is damaged
``hang-read PAIR``          the watcher's reads of PAIR's SVOL block (a FIFO nobody writes)
``truncate PAIR``           the SVOL file ends inside PAIR's slot (later slots are cut too)
``heal``                    all of the above undone; killed hosts restart
==========================  =========================================================
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from hbmon.errors import HbmonError, UsageError
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
    "heal": "none",
}
DEMO_GLOB = "hbmon-demo-*"
DEMO_FILE = "demo.json"


@dataclass
class Lab:
    """The faults of one demo: which site beats each pair, the copy, the network."""

    writers: dict[str, Site]  # pair -> the site that beats it
    mirror: RemoteCopy
    sites: list[Site]
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

    async def apply(self, action: str, pair: str | None) -> str:
        if action not in ACTIONS:
            raise UsageError(f"unknown lab action {action!r}; one of {', '.join(ACTIONS)}")
        if ACTIONS[action] == "pair" and pair is None:
            raise UsageError(f"{action} needs a PAIR")
        if pair is not None:
            self._site(pair)
        if action == "kill-host":
            self._site(pair).beater.pause(str(pair))
            self.killed.add(str(pair))
            return f"host of {pair} killed: no beats on either path, no stopping record"
        if action == "freeze-host":
            self._site(pair).beater.pause(str(pair))
            self.frozen.add(str(pair))
            return f"host of {pair} frozen: it will resume with the same incarnation"
        if action == "thaw-host":
            if pair not in self.frozen:
                raise UsageError(f"{pair} is not frozen")
            self.frozen.discard(str(pair))
            self._site(pair).beater.resume(str(pair))
            return f"host of {pair} thawed: beating again with its old incarnation"
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
        return self.heal()

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

    def heal(self) -> str:
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
        return f"healed: link and network restored, {restarted} killed host(s) restarted"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/lab/{action}", self._handle), web.get("/lab", self._state)]

    async def _handle(self, request: web.Request) -> web.Response:
        pair = request.query.get("pair") or None
        try:
            message = await self.apply(request.match_info["action"], pair)
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


def lab_request(url: str, action: str, pair: str | None) -> str:
    query = f"?pair={urllib.parse.quote(pair)}" if pair else ""
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
