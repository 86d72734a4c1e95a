"""``hbmon demo``: a complete two-site lab in one process, on files in a temporary folder.

Two :class:`~hbmon.site.Site` instances ("osaka" and "tokyo") run in this one process,
each with its own status table, HTTP port, UDP port, beater and poller, exactly as two
``hbmon run`` daemons would.  Each beats half of the pairs into a PVOL LUN file (one slot
per pair) and watches the other site's pairs on an SVOL LUN file that a simulated array
remote copy (:mod:`hbmon.mirror`) keeps in step, ``lag`` behind.  Network beats travel
over UDP on loopback.  ``hbmon lab`` injects faults through the ``/lab`` endpoints.

When the ``etcd`` binary is there (Debian's etcd-server), a real 3-member etcd cluster
(:mod:`hbmon.cluster`: members osaka, tokyo and witness) is each site's ``[arbiter]``,
through proxies the lab can cut.  Without it the demo runs with the arbiter off, and the
guards refuse ``host_down`` failovers as ``no_arbiter``.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import anyio
import anyio.abc

from hbmon.clock import SystemClock
from hbmon.cluster import Cluster
from hbmon.config import SiteConfig, load_config, parse_hostport
from hbmon.console import format_status
from hbmon.errors import HbmonError
from hbmon.lab import DEMO_FILE, Lab, PausableClock
from hbmon.mirror import Link, RemoteCopy
from hbmon.record import SLOT_SIZE
from hbmon.site import Site

log = logging.getLogger(__name__)

SITES = ("osaka", "tokyo")
ARBITER_OFF = (
    "arbiter off: etcd not found (install etcd-server); "
    "host_down failovers will be refused as no_arbiter"
)
#: The demo's [arbiter] timing: lease_ttl / 3 + 2 x request_timeout + demote_budget +
#: 1 s margin = 3.3 + 1 + 2 + 1 = 7.3 s <= lease_ttl (hbmon/arbiter/lease.py).  A site
#: demotes 3 s before its lease can expire, so a renewal that fails may be retried until
#: 3.7 to 7 s after the last good one: time enough for etcd to elect a new leader when
#: the old one is cut off (1 to 2 s with a 1 s election timeout).  With lease_ttl 6 s
#: (which the rule allows) that window is 1 to 3 s, and isolating the witness while it
#: led made both sites demote every pair.
ARBITER_TIMING = {"lease_ttl": "10s", "request_timeout": "0.5s", "demote_budget": "2s"}
ARBITER_PREFIX = "/hbmon-demo"


@dataclass(frozen=True)
class DemoOptions:
    pairs: int = 8
    listen: str = "127.0.0.1:9799"
    duration: float | None = None
    lag: float = 0.05
    interval: float = 1.0
    miss_threshold: int = 3
    keep: bool = False
    failover: tuple[str, ...] = ()  # command template; "{pair}" is replaced by the pair
    demote: tuple[str, ...] = ()  # the same for the [[beat]]s' demote command
    etcd: str = "etcd"  # the etcd binary (looked up on PATH); "" runs the arbiter off
    webhook_token_file: Path | None = None
    hold_down: float = 600.0


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pair_names(site: str, count: int) -> list[str]:
    width = max(2, len(str(count)))
    return [f"{site}-{i:0{width}d}" for i in range(1, count + 1)]


def log_command(folder: Path, name: str) -> tuple[str, ...]:
    """The default failover/demote command: append the time, the pair and the fencing token
    (when there is one) to ``folder/name``."""
    script = (
        "import os, sys, time; t = os.environ.get('HBMON_FENCING_TOKEN'); "
        "open(sys.argv[1], 'a').write(f'{time.time():.3f} {sys.argv[2]}' "
        "+ (f' token {t}' if t else '') + '\\n')"
    )
    return (sys.executable, "-c", script, str(folder / name), "{pair}")


def prepare(
    folder: Path, opts: DemoOptions, arbiter: dict[str, list[str]] | None = None
) -> tuple[list[SiteConfig], list[Link]]:
    """Write the key, the LUN files and one configuration per site into ``folder``;
    ``arbiter`` maps each site to its etcd endpoints (None: no ``[arbiter]``)."""
    key = folder / "hb.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    token = opts.webhook_token_file or folder / "webhook.token"
    if opts.webhook_token_file is None:
        token.write_text(os.urandom(24).hex() + "\n")
        token.chmod(0o600)
    failover = opts.failover or log_command(folder, "failovers.log")
    demote = opts.demote or log_command(folder, "demotes.log")
    host, port = parse_hostport(opts.listen)
    http_ports = [port, port + 1] if port else [free_port(socket.SOCK_STREAM) for _ in SITES]
    udp_ports = [free_port() for _ in SITES]
    counts = [(opts.pairs + 1) // 2, opts.pairs // 2]
    names = {site: pair_names(site, n) for site, n in zip(SITES, counts, strict=True)}
    links: list[Link] = []
    configs = []
    for i, site in enumerate(SITES):
        other = SITES[1 - i]
        (folder / site).mkdir()
        pvol = folder / site / "pvol.lun"
        svol = folder / site / f"svol-from-{other}.lun"
        lines = [
            f'site = "{site}"',
            f'state_dir = "{folder / site}"',
            f'listen = "{host}:{http_ports[i]}"',
            f'interval = "{opts.interval}s"',
            f"miss_threshold = {opts.miss_threshold}",
            'method = "both"',
            "[network]",
            f'listen = "127.0.0.1:{udp_ports[i]}"',
            f'key_file = "{key}"',
            "[webhook]",
            f'token_file = "{token}"',
            f'hold_down = "{opts.hold_down}s"',
            'failover_timeout = "30s"',
        ]
        if arbiter is not None:
            lines += [
                "[arbiter]",
                f"endpoints = {json.dumps(arbiter[site])}",
                f'prefix = "{ARBITER_PREFIX}"',
                *(f'{key} = "{value}"' for key, value in ARBITER_TIMING.items()),
            ]
        for slot, pair in enumerate(names[site]):
            lines += [
                "[[beat]]",
                f'id = "{pair}"',
                f'volume = "{pvol}"',
                f"slot = {slot}",
                f'peers = ["127.0.0.1:{udp_ports[1 - i]}"]',
            ]
            if arbiter is not None:
                command = [arg.replace("{pair}", pair) for arg in demote]
                lines.append(f"demote = {json.dumps(command)}")
            links.append(Link(pair, str(pvol), str(folder / other / f"svol-from-{site}.lun"), slot))
        for slot, pair in enumerate(names[other]):
            command = [arg.replace("{pair}", pair) for arg in failover]
            lines += [
                "[[watch]]",
                f'id = "{pair}"',
                f'volume = "{svol}"',
                f"slot = {slot}",
                f"failover = {json.dumps(command)}",
            ]
        for lun, n in ((pvol, counts[i]), (svol, counts[1 - i])):
            with open(lun, "wb") as f:
                f.truncate(max(n, 1) * SLOT_SIZE)  # zeroed slots: "awaiting" until beats come
        path = folder / f"{site}.toml"
        path.write_text("\n".join(lines) + "\n")
        configs.append(load_config(path))
    return configs, links


class RecentEvents(logging.Handler):
    """Keeps the last log lines for the live view (logging to the terminal would tear it)."""

    def __init__(self, size: int = 6) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=size)
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Demo:
    def __init__(self, opts: DemoOptions, out: TextIO = sys.stdout) -> None:
        self.opts = opts
        self.out = out
        # A hangup before the sites' signal receiver is open (while the files are made,
        # etcd starts) is remembered and ends the demo once it is: the folder goes.
        self.hung_up = False
        signal.signal(signal.SIGHUP, self._early_hangup)
        self.folder = Path(tempfile.mkdtemp(prefix="hbmon-demo-"))
        self.events: RecentEvents | None = None
        self.sites: list[Site] = []
        self.etcd = shutil.which(opts.etcd) if opts.etcd else None
        self.cluster: Cluster | None = None
        self.lab: Lab | None = None

    def banner(self) -> str:
        a, b = (s.address or ("?", 0) for s in self.sites)
        url_a, url_b = f"http://{a[0]}:{a[1]}", f"http://{b[0]}:{b[1]}"
        first = sorted(self.sites[0].table.writers)[:1] or ["PAIR"]
        pair = first[0]
        kept = "kept on exit" if self.opts.keep else "removed on exit"
        lines = [
            f"hbmon demo: sites {SITES[0]} and {SITES[1]} in this process, {self.opts.pairs} "
            f"pairs beating both ways, remote copy lag {self.opts.lag * 1000:.0f} ms",
            f"  files     {self.folder} ({kept})",
            f"  {SITES[0]:<9} {url_a}/metrics   {url_a}/status (page)   {url_a}/status.json",
            f"  {SITES[1]:<9} {url_b}/metrics   {url_b}/status (page)   {url_b}/status.json",
            f"  status    hbmon status --url {url_b}      (or --url {url_a})",
            f"  faults    hbmon lab kill-host {pair} | freeze-host {pair} | thaw-host {pair}",
            f"            hbmon lab cut-link [PAIR] | partition [PAIR] | corrupt {pair} | heal",
            f"            hbmon lab isolate-site {SITES[0]} | cut-wan | "
            + ("isolate-witness | " if self.cluster is not None else "")
            + f"pause-site {SITES[0]} 20",
            f"  failover  Alertmanager webhook {url_a}/api/v1/alerts (and {url_b}), token in "
            f"{self.opts.webhook_token_file or self.folder / 'webhook.token'}",
            self._arbiter_line(),
            "  stop      Ctrl-C",
        ]
        return "\n".join(lines)

    def _arbiter_line(self) -> str:
        cluster = self.cluster
        if cluster is None:
            if self.opts.etcd:
                return f"  {ARBITER_OFF}"
            return "  arbiter off (--etcd ''): host_down failovers will be refused as no_arbiter"
        timing = ", ".join(f"{key} {value}" for key, value in ARBITER_TIMING.items())
        return (
            f"  arbiter   etcd {cluster.version}: members {', '.join(cluster.members)} behind "
            f"the lab's proxies (logs in {cluster.folder}); prefix {ARBITER_PREFIX}, {timing}"
        )

    def _early_hangup(self, signum: int, frame: object) -> None:
        self.hung_up = True

    def _progress(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    async def run(self) -> None:
        try:
            await self._run()
        except BaseExceptionGroup as group:
            sole: BaseException = group
            while isinstance(sole, BaseExceptionGroup) and len(sole.exceptions) == 1:
                sole = sole.exceptions[0]
            if isinstance(sole, HbmonError | OSError):
                raise sole from None  # one line and an exit code, not a traceback
            raise
        finally:
            if not self.opts.keep:
                shutil.rmtree(self.folder, ignore_errors=True)

    async def _run(self) -> None:
        cluster = None
        if self.etcd is not None:
            port = parse_hostport(self.opts.listen)[1]  # the sites' HTTP: port, port + 1
            cluster = Cluster(
                self.folder / "etcd",
                self.etcd,
                progress=self._progress,
                avoid=(port, port + 1) if port else (),
            )
        self.cluster = cluster
        arbiter = {site: cluster.endpoints(site) for site in SITES} if cluster else None
        configs, links = prepare(self.folder, self.opts, arbiter)
        mirror = RemoteCopy(SystemClock(), links, lag=self.opts.lag)
        # Each site on a clock of its own, which the lab can pause (pause-site).
        clocks = {cfg.site: PausableClock() for cfg in configs}
        self.sites = [
            Site(cfg, clock=clocks[cfg.site], on_written=mirror.written) for cfg in configs
        ]
        writers = {pair: site for site in self.sites for pair in site.table.writers}
        lab = self.lab = Lab(
            writers, mirror, self.sites, links=cluster.links if cluster else None, clocks=clocks
        )
        for site in self.sites:
            site.api.extra_routes.extend(lab.routes())
        async with anyio.create_task_group() as tg:
            # SIGHUP too: the terminal closed (or `tmux kill-session`) ends the demo like
            # Ctrl-C, and its folder is removed (`hbmon run` reloads on SIGHUP instead).
            stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
            with anyio.open_signal_receiver(*stops) as signals:
                await tg.start(mirror.run)
                if cluster is not None:
                    await tg.start(cluster.run)  # formed before the sites ask it for leases
                for site in self.sites:
                    await tg.start(site.run)
                self._announce()
                if self.events is not None:
                    tg.start_soon(self._live_view)
                with anyio.move_on_after(self.opts.duration or math.inf):
                    if self.hung_up:
                        log.info("SIGHUP received at start: stopping the demo")
                    else:
                        async for signum in signals:
                            name = signal.Signals(signum).name
                            log.info("%s received: stopping the demo", name)
                            break
            # A hangup comes twice (the kernel's to the terminal's process group, the
            # shell's to its jobs): the second must not kill the demo before it has
            # stopped etcd and removed its folder.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            tg.cancel_scope.cancel()

    def _announce(self) -> None:
        url = "http://{}:{}".format(*(self.sites[0].address or ("127.0.0.1", 0)))
        info = {
            "pid": os.getpid(),
            "url": url,
            "folder": str(self.folder),
            "arbiter": self.cluster.state() if self.cluster is not None else None,
        }
        (self.folder / DEMO_FILE).write_text(json.dumps(info))
        print(self.banner(), file=self.out, flush=True)

    async def _live_view(self) -> None:
        """Redraw the status of both sites in place, once a second."""
        while True:
            size = shutil.get_terminal_size((120, 40))
            budget = max(2, (size.lines - 14) // 2)
            parts = [self.banner(), ""]
            for site in reversed(self.sites):  # tokyo watches osaka's pairs first
                doc = site.api.status_document()
                verdicts = collections.Counter(
                    p.verdict for p in site.table.pairs.values()
                ).most_common()
                summary = ", ".join(f"{n} {v}" for v, n in verdicts)
                parts.append(f"[{site.config.site}] verdicts: {summary}")
                parts.append(format_status(doc, limit=budget))
                parts.append("")
            faults = self._site_faults()
            if faults:
                parts += [faults, ""]
            if self.events is not None and self.events.lines:
                parts.append("recent events:")
                parts.extend(f"  {line}" for line in self.events.lines)
            text = "\n".join(line[: size.columns] for line in "\n".join(parts).splitlines())
            self.out.write("\x1b[H\x1b[2J" + text + "\n")
            self.out.flush()
            await anyio.sleep(1.0)

    def _site_faults(self) -> str:
        """One line on the cut etcd links and the paused sites, or ""."""
        lab = self.lab
        if lab is None:
            return ""
        said = []
        if lab.links is not None and lab.links.cut_links():
            said.append(
                "etcd links cut: " + ", ".join(f"{a}-{b}" for a, b in lab.links.cut_links())
            )
        paused = {name: c.paused_for() for name, c in lab.clocks.items() if c.paused_for() > 0}
        if paused:
            said.append("paused: " + ", ".join(f"{n} ({s:.0f} s left)" for n, s in paused.items()))
        return "[lab] " + "; ".join(said) if said else ""


def run_demo(opts: DemoOptions, *, live: bool) -> None:
    demo = Demo(opts)
    if live:
        demo.events = RecentEvents()
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(demo.events)
    anyio.run(demo.run)
