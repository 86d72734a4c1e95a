"""Site configuration (TOML): parsing and validation.

Every problem is reported as one :class:`ConfigError` naming the file and the key
(``site.toml: watch[2].slot: ...``).  Unknown keys are errors too, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hbmon.arbiter.lease import LeaseTiming
from hbmon.errors import ConfigError
from hbmon.record import check_pair_id

METHODS = ("volume", "network", "both")
DEFAULT_LISTEN = "127.0.0.1:9799"

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str | int | float) -> float:
    """``"250ms"``, ``"1s"``, ``"1.5s"``, ``"2m"`` or a number of seconds."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration")
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = _DURATION.match(text)
        if not match:
            raise ValueError(f"{text!r} is not a duration (examples: 250ms, 1s, 2m)")
        value = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(value) or value < 0.001:
        raise ValueError(f"{text!r} must be a finite duration of at least 1ms")
    return value


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"{text!r} is not HOST:PORT (write an IPv6 address as [addr]:port)")
    return host or default_host, int(port)


@dataclass(frozen=True)
class Timing:
    """How one pair is judged; defaults come from the top level of the file."""

    interval: float = 1.0
    miss_threshold: int = 3
    recover_beats: int = 2
    read_timeout: float = 2.0
    grace: float | None = None  # None: miss_threshold * interval + interval

    @property
    def startup_grace(self) -> float:
        return self.grace if self.grace is not None else (self.miss_threshold + 1) * self.interval


@dataclass(frozen=True)
class BeatConfig:
    id: str
    volume: Path | None  # None: network beats only (``peers``)
    slot: int = 0
    interval: float = 1.0
    peers: tuple[str, ...] = ()
    demote: tuple[str, ...] = ()  # run when this site can no longer prove it owns the pair


@dataclass(frozen=True)
class WatchConfig:
    id: str
    volume: Path | None  # None: a network-only pair (``method = "network"``)
    slot: int = 0
    method: str = "both"
    timing: Timing = field(default_factory=Timing)
    failover: tuple[str, ...] = ()
    failover_single_path: bool = False
    failover_without_arbiter: bool = False
    demote: tuple[str, ...] = ()  # after a failover here: run when this site loses the pair


@dataclass(frozen=True)
class WatchGlobConfig:
    pattern: str
    slot: int = 0
    method: str = "both"
    timing: Timing = field(default_factory=Timing)
    failover: tuple[str, ...] = ()
    failover_single_path: bool = False
    failover_without_arbiter: bool = False
    demote: tuple[str, ...] = ()
    rescan: float = 10.0


@dataclass(frozen=True)
class NetworkConfig:
    listen: str = "0.0.0.0:9798"
    key_file: Path | None = None


@dataclass(frozen=True)
class ArbiterConfig:
    """``[arbiter]``: the etcd cluster that holds ownership (DESIGN.md, "Arbiter")."""

    endpoints: tuple[str, ...]
    prefix: str = "/hbmon"
    timing: LeaseTiming = field(default_factory=LeaseTiming)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    user: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class SiteConfig:
    site: str
    source: str = "<memory>"
    state_dir: Path = Path("/var/lib/hbmon")
    listen: str = DEFAULT_LISTEN
    timing: Timing = field(default_factory=Timing)
    method: str = "both"
    io_threads: int = 8
    log_changes: int = 50  # state changes logged one by one per second (0: all)
    log_format: str = "text"  # "text" | "json" | "logfmt" (hbmon.logs); --log-format wins
    reopen: float = 60.0  # a kept-open volume is opened afresh this often
    network: NetworkConfig = field(default_factory=NetworkConfig)
    webhook_token_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    failover_hold_down: float = 600.0
    failover_timeout: float = 60.0
    failover_without_arbiter: bool = False
    arbiter: ArbiterConfig | None = None
    beats: tuple[BeatConfig, ...] = ()
    watches: tuple[WatchConfig, ...] = ()
    watch_globs: tuple[WatchGlobConfig, ...] = ()


class _Table:
    """A TOML table being read: remembers its key path and which keys were used."""

    def __init__(self, source: str, path: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(source, path or "(top level)", "must be a table")
        self.source = source
        self.path = path
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def get(self, name: str, kind: Callable[[Any], T], default: T) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        return self._convert(name, kind)

    def require(self, name: str, kind: Callable[[Any], T]) -> T:
        self.used.add(name)
        if name not in self.data:
            raise self.fail(name, "is required")
        return self._convert(name, kind)

    def _convert(self, name: str, kind: Callable[[Any], T]) -> T:
        try:
            return kind(self.data[name])
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise self.fail(name, str(err)) from None

    def table(self, name: str) -> _Table:
        self.used.add(name)
        return _Table(self.source, self.key(name), self.data.get(name, {}))

    def tables(self, name: str) -> list[_Table]:
        self.used.add(name)
        items = self.data.get(name, [])
        if not isinstance(items, list):
            raise self.fail(name, f"must be an array of tables ([[{name}]])")
        return [_Table(self.source, f"{self.key(name)}[{i}]", item) for i, item in enumerate(items)]

    def done(self) -> None:
        for name in self.data:
            if name not in self.used:
                raise self.fail(name, "unknown key (check the spelling against docs/config.md)")


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _slot(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 20:
        raise ValueError(f"expected a slot number 0..{(1 << 20) - 1}, got {value!r}")
    return value


def _whole_number(least: int) -> Callable[[Any], int]:
    """A validator of whole numbers (not booleans) of at least ``least``."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"expected a whole number of at least {least}, got {value!r}")
        return value

    return check


_positive_int = _whole_number(1)
_non_negative_int = _whole_number(0)


def _reopen_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < 1.0:
        raise ValueError(f"expected a duration of at least 1s, got {value!r}")
    return seconds


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _method(value: Any) -> str:
    if value not in METHODS:
        raise ValueError(f"expected one of {', '.join(METHODS)}, got {value!r}")
    return str(value)


def _log_format(value: Any) -> str:
    from hbmon.logs import FORMATS

    if value not in FORMATS:
        raise ValueError(f"expected one of {', '.join(FORMATS)}, got {value!r}")
    return str(value)


def _pair_id(value: Any) -> str:
    text = _text(value)
    check_pair_id(text)
    return text


def _hostport(value: Any) -> str:
    parse_hostport(_text(value))
    return str(value)


def _command(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a command as a list of strings, got {value!r}")
    return tuple(value)


def _peers(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of HOST:PORT strings, got {value!r}")
    peers = tuple(_hostport(v) for v in value)
    for peer in peers:
        if peer.startswith("["):
            raise ValueError(f"{peer!r}: network beats go over IPv4 only (use an IPv4 address)")
    return peers


def _path(base: Path) -> Callable[[Any], Path]:
    def convert(value: Any) -> Path:
        path = Path(_text(value))
        return path if path.is_absolute() else base / path

    return convert


def _timing(table: _Table, defaults: Timing) -> Timing:
    timing = Timing(
        interval=table.get("interval", parse_duration, defaults.interval),
        miss_threshold=table.get("miss_threshold", _positive_int, defaults.miss_threshold),
        recover_beats=table.get("recover_beats", _positive_int, defaults.recover_beats),
        read_timeout=table.get("read_timeout", parse_duration, defaults.read_timeout),
        grace=table.get("grace", parse_duration, defaults.grace),
    )
    if timing.miss_threshold < 2:
        raise table.fail("miss_threshold", "must be at least 2 (one late beat is not a death)")
    return timing


def _endpoint(value: Any) -> str:
    text = _text(value)
    scheme, sep, rest = text.partition("://")
    if "/" in rest.rstrip("/"):
        raise ValueError(f"{text!r}: give the etcd client URL without a path")
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not sep or scheme not in ("http", "https") or not colon or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not an etcd client URL (example: https://192.0.2.10:2379)")
    return f"{scheme}://{rest.rstrip('/')}"


def _endpoints(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a list of etcd client URLs, got {value!r}")
    endpoints = tuple(_endpoint(v) for v in value)
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"an endpoint is listed twice: {list(endpoints)}")
    return endpoints


def _prefix(value: Any) -> str:
    text = _text(value)
    if not text.startswith("/") or text.rstrip("/") == "" or "//" in text:
        raise ValueError(f"{text!r} is not a key prefix like /hbmon")
    return text.rstrip("/")


def _arbiter(top: _Table, as_path: Callable[[Any], Path]) -> ArbiterConfig:
    t = top.table("arbiter")
    defaults = LeaseTiming()
    timing = LeaseTiming(
        lease_ttl=t.get("lease_ttl", parse_duration, defaults.lease_ttl),
        request_timeout=t.get("request_timeout", parse_duration, defaults.request_timeout),
        demote_budget=t.get("demote_budget", parse_duration, defaults.demote_budget),
    )
    config = ArbiterConfig(
        endpoints=t.require("endpoints", _endpoints),
        prefix=t.get("prefix", _prefix, "/hbmon"),
        timing=timing,
        ca_file=t.get("ca_file", as_path, None),
        cert_file=t.get("cert_file", as_path, None),
        key_file=t.get("key_file", as_path, None),
        user=t.get("user", _text, None),
        password_file=t.get("password_file", as_path, None),
    )
    t.done()
    problem = timing.problem()
    if problem is not None:
        key = "lease_ttl" if timing.lease_ttl < 2 else "lease_ttl, request_timeout, demote_budget"
        raise t.fail(key, problem)
    if (config.cert_file is None) != (config.key_file is None):
        raise t.fail("cert_file", "cert_file and key_file go together (a client certificate)")
    if (config.user is None) != (config.password_file is None):
        raise t.fail("user", "user and password_file go together (etcd authentication)")
    if any(e.startswith("http://") for e in config.endpoints) and config.ca_file is not None:
        raise t.fail("ca_file", "is set, but an endpoint is http://; write https:// endpoints")
    return config


def parse_config(data: dict[str, Any], source: str, base: Path | None = None) -> SiteConfig:
    """Validate a parsed TOML document; relative paths are taken from ``base``."""
    base = base if base is not None else Path.cwd()
    top = _Table(source, "", data)
    as_path = _path(base)
    timing = _timing(top, Timing())
    method = top.get("method", _method, "both")

    net = top.table("network")
    network = NetworkConfig(
        listen=net.get("listen", _hostport, "0.0.0.0:9798"),
        key_file=net.get("key_file", as_path, None),
    )
    net.done()
    hook = top.table("webhook")
    token_file = hook.get("token_file", as_path, None)
    hold_down = hook.get("hold_down", parse_duration, 600.0)
    failover_timeout = hook.get("failover_timeout", parse_duration, 60.0)
    hook.done()
    without_arbiter = top.get("failover_without_arbiter", _bool, False)
    arbiter = _arbiter(top, as_path) if "arbiter" in top.data else None

    beats = []
    for t in top.tables("beat"):
        beat = BeatConfig(
            id=t.require("id", _pair_id),
            volume=t.get("volume", as_path, None),
            slot=t.get("slot", _slot, 0),
            interval=t.get("interval", parse_duration, timing.interval),
            peers=t.get("peers", _peers, ()),
            demote=t.get("demote", _command, ()),
        )
        if beat.volume is None and not beat.peers:
            raise t.fail(
                "volume",
                "is required unless the beat goes over the network only: give the PVOL "
                'as volume = "...", or peers = ["HOST:PORT"] to send UDP beats',
            )
        if beat.volume is None and "slot" in t.data:
            raise t.fail("slot", "is set but there is no volume: give volume, or remove slot")
        beats.append(beat)
        t.done()

    watches = []
    for t in top.tables("watch"):
        pair_id = t.require("id", _pair_id)
        watch_method = t.get("method", _method, method)
        volume = t.get("volume", as_path, None)
        if volume is None and watch_method != "network":
            raise t.fail(
                "volume",
                f"is required with method = {watch_method!r} (the SVOL to read); "
                'set method = "network" to watch the UDP beats only',
            )
        watches.append(
            WatchConfig(
                id=pair_id,
                volume=volume,
                slot=t.get("slot", _slot, 0),
                method=watch_method,
                timing=_timing(t, timing),
                failover=t.get("failover", _command, ()),
                failover_single_path=t.get("failover_single_path", _bool, False),
                failover_without_arbiter=t.get(
                    "failover_without_arbiter", _bool, without_arbiter
                ),
                demote=t.get("demote", _command, ()),
            )
        )
        t.done()

    globs = []
    for t in top.tables("watch_glob"):
        pattern = t.require("pattern", _text)
        if not Path(pattern).is_absolute():
            pattern = str(base / pattern)
        globs.append(
            WatchGlobConfig(
                pattern=pattern,
                slot=t.get("slot", _slot, 0),
                method=t.get("method", _method, method),
                timing=_timing(t, timing),
                failover=t.get("failover", _command, ()),
                failover_single_path=t.get("failover_single_path", _bool, False),
                failover_without_arbiter=t.get(
                    "failover_without_arbiter", _bool, without_arbiter
                ),
                demote=t.get("demote", _command, ()),
                rescan=t.get("rescan", parse_duration, 10.0),
            )
        )
        t.done()

    config = SiteConfig(
        site=top.require("site", _text),
        source=source,
        state_dir=top.get("state_dir", as_path, Path("/var/lib/hbmon")),
        listen=top.get("listen", _hostport, DEFAULT_LISTEN),
        timing=timing,
        method=method,
        io_threads=top.get("io_threads", _positive_int, 8),
        log_changes=top.get("log_changes", _non_negative_int, 50),
        log_format=top.get("log_format", _log_format, "text"),
        reopen=top.get("reopen", _reopen_duration, 60.0),
        network=network,
        webhook_token_file=token_file,
        tls_cert_file=top.get("tls_cert_file", as_path, None),
        tls_key_file=top.get("tls_key_file", as_path, None),
        tls_client_ca_file=top.get("tls_client_ca_file", as_path, None),
        failover_hold_down=hold_down,
        failover_timeout=failover_timeout,
        failover_without_arbiter=without_arbiter,
        arbiter=arbiter,
        beats=tuple(beats),
        watches=tuple(watches),
        watch_globs=tuple(globs),
    )
    top.done()
    _check_unique(config)
    _check_network(config)
    _check_tls(config)
    return config


def _check_tls(config: SiteConfig) -> None:
    if (config.tls_cert_file is None) != (config.tls_key_file is None):
        given, missing = (
            ("tls_cert_file", "tls_key_file")
            if config.tls_key_file is None
            else ("tls_key_file", "tls_cert_file")
        )
        raise ConfigError(config.source, missing, f"is required with {given} (HTTPS needs both)")
    if config.tls_client_ca_file is not None and config.tls_cert_file is None:
        raise ConfigError(
            config.source,
            "tls_client_ca_file",
            "needs tls_cert_file and tls_key_file (client certificates are checked over HTTPS)",
        )


#: Mode bits a secret file must not have: readable or writable by others, or writable by
#: its group (anyone who can rewrite a key or token can impersonate its owner).
SECRET_MODE_FORBIDDEN = stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP


def check_private(path: Path, key: str) -> None:
    """Refuse a secret file (HMAC key, bearer token, TLS private key) others may read or
    rewrite: readable or writable by others, or writable by its group."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as err:
        raise ConfigError(str(path), key, f"cannot read the file: {err.strerror}") from None
    bad = mode & SECRET_MODE_FORBIDDEN
    if not bad:
        return
    if bad & stat.S_IROTH:
        what = "world-readable"
    elif bad & stat.S_IWOTH:
        what = "world-writable"
    else:
        what = "group-writable"
    raise ConfigError(
        str(path),
        key,
        f"secret file is {what} (mode {mode:04o}); run `chmod 600 {path}` "
        "(or 640 to let the service's group read it)",
    )


def _check_network(config: SiteConfig) -> None:
    if config.network.key_file is not None:
        return
    for i, beat in enumerate(config.beats):
        if beat.peers:
            raise ConfigError(
                config.source,
                "network.key_file",
                f"is required: beat[{i}] ({beat.id!r}) sends network beats to its peers",
            )
    methods = [(f"watch[{i}]", w.method) for i, w in enumerate(config.watches)]
    methods += [(f"watch_glob[{i}]", g.method) for i, g in enumerate(config.watch_globs)]
    for where, method in methods:
        if method != "volume":
            raise ConfigError(
                config.source,
                "network.key_file",
                f"is required: {where} checks the network path (method {method!r}); "
                'set method = "volume" to watch the volume only',
            )


def _check_unique(config: SiteConfig) -> None:
    groups: tuple[tuple[str, tuple[BeatConfig | WatchConfig, ...]], ...] = (
        ("beat", config.beats),
        ("watch", config.watches),
    )
    for kind, items in groups:
        ids: set[str] = set()
        seen: dict[tuple[str, int], str] = {}
        for i, item in enumerate(items):
            if item.id in ids:
                raise ConfigError(config.source, f"{kind}[{i}].id", f"pair {item.id!r} repeated")
            ids.add(item.id)
            if item.volume is None or (isinstance(item, WatchConfig) and item.method == "network"):
                continue  # (network only: no slot to share)
            where = (str(item.volume), item.slot)
            if where in seen:
                raise ConfigError(
                    config.source,
                    f"{kind}[{i}].slot",
                    f"{item.volume} slot {item.slot} is already used by {seen[where]}",
                )
            seen[where] = f"{kind} {item.id!r}"


def warnings(config: SiteConfig) -> list[str]:
    """What ``hbmon config check`` warns of: valid, but probably not what is meant."""
    out = []
    for i, w in enumerate(config.watches):
        if w.method == "network" and w.volume is not None:
            out.append(
                f'watch[{i}] ({w.id!r}): method = "network" never reads volume {w.volume}; '
                'remove volume (and slot), or set method = "both" to check it too'
            )
    watches: list[tuple[str, tuple[str, ...], bool]] = [
        (f"watch[{i}] ({w.id!r})", w.failover, w.failover_without_arbiter)
        for i, w in enumerate(config.watches)
    ]
    watches += [
        (f"watch_glob[{i}] ({g.pattern!r})", g.failover, g.failover_without_arbiter)
        for i, g in enumerate(config.watch_globs)
    ]
    for where, failover, without in watches:
        if not failover:
            continue
        if config.arbiter is None and not without:
            out.append(
                f"{where}: has a failover command but there is no [arbiter]: every host_down "
                "failover will be refused as no_arbiter (configure [arbiter], or set "
                "failover_without_arbiter = true to accept the risk of two primaries)"
            )
        elif config.arbiter is None:
            out.append(
                f"{where}: failover_without_arbiter = true: a cut between the sites looks "
                "exactly like a dead site and will end in two primaries"
            )
    if config.arbiter is not None:
        for i, w in enumerate(config.watches):
            if w.failover and not w.demote and w.id not in {b.id for b in config.beats}:
                out.append(
                    f"watch[{i}] ({w.id!r}): no demote command: once this site has taken the "
                    "pair over, nothing stops the service here if it loses the pair again"
                )
        for i, beat in enumerate(config.beats):
            if not beat.demote:
                out.append(
                    f"beat[{i}] ({beat.id!r}): no demote command: when this site loses its "
                    "lease, nothing stops the service here before another site takes it over"
                )
    return out


def demote_command(config: SiteConfig, pair: str, volume: str | None) -> tuple[str, ...]:
    """The command that stops ``pair`` here when this site loses it: its ``[[beat]]``'s,
    else (a pair this site took over) its ``[[watch]]``'s or matching ``[[watch_glob]]``'s."""
    for beat in config.beats:
        if beat.id == pair and beat.demote:
            return beat.demote
    for watch in config.watches:
        if watch.id == pair:
            return watch.demote
    for glob in config.watch_globs:
        if volume is not None and fnmatch.fnmatch(volume, glob.pattern):
            return glob.demote
    return ()


def load_config(path: str | Path) -> SiteConfig:
    """Read and validate a configuration file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(str(path), "(file)", f"cannot be read: {err.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), "(syntax)", str(err)) from None
    return parse_config(data, str(path), path.parent.resolve())
