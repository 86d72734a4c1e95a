"""Network heartbeats: the same record over UDP, authenticated with HMAC-SHA256.

A datagram is ``b"HBN1"``, one kind byte, the 128-byte record and an HMAC-SHA256 of
everything before it under a shared key (the key file must not be world-readable).
Kinds: ``1`` beat, ``2`` activation (a pair was installed: expect its first beat, do not
alert meanwhile), ``3`` retirement (de-installed: stop expecting beats).

The listener never crashes on what arrives: a datagram that fails authentication,
replays an old serial or incarnation, is malformed, names a pair this site does not
watch, or carries a writer time outside the accepted window is dropped and counted by
reason in ``hbmon_network_rejected_total{reason}``; it never counts as a beat.

A flood costs little: the listener takes waiting datagrams in batches (one wake-up of the
event loop per batch), turns away those of the wrong size or magic and those whose MAC
does not verify before decoding anything, and logs rejections at most once a minute.
Datagrams the kernel had to drop because the receive buffer was full (the listener fell
behind) are counted in ``hbmon_network_receive_dropped_total``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from hbmon.clock import Clock
from hbmon.config import check_private, parse_hostport
from hbmon.errors import ConfigError, RecordError
from hbmon.record import RECORD_SIZE, Record, decode
from hbmon.status import PathRow, StatusTable

log = logging.getLogger(__name__)

MAGIC = b"HBN1"
BEAT, ACTIVATE, RETIRE = 1, 2, 3
KINDS = {BEAT: "beat", ACTIVATE: "activate", RETIRE: "retire"}
MAC_SIZE = 32
DATAGRAM_SIZE = len(MAGIC) + 1 + RECORD_SIZE + MAC_SIZE
MIN_KEY_BYTES = 16
RECEIVE_BUFFER = 4 << 20
REJECT_REASONS = ("malformed", "bad_mac", "replay", "unknown_pair", "out_of_window")
BATCH = 256  # datagrams taken per wake-up of the listener
RECEIVE_SIZE = 2048  # larger datagrams are cut to this and rejected as malformed
REJECT_LOG_EVERY = 60.0  # seconds between two log lines about rejected datagrams
SO_MEMINFO, MEMINFO_DROPS, MEMINFO_SIZE = 55, 8, 9 * 4  # Linux <linux/sock_diag.h>

try:
    from anyio import wait_readable as _wait_readable
except ImportError:  # anyio < 4.7
    from anyio import wait_socket_readable as _wait_readable  # type: ignore[assignment]


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def load_secret(path: Path, key_name: str = "network.key_file") -> bytes:
    """Read a shared secret (the HMAC key, the webhook token); refuse one that others may
    read or rewrite (:func:`hbmon.config.check_private`) or that is too short."""
    check_private(path, key_name)
    try:
        key = path.read_bytes().strip()
    except OSError as err:
        raise ConfigError(str(path), key_name, f"cannot read key file: {err.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            str(path),
            key_name,
            f"key is {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            "(e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
        )
    return key


def encode_datagram(key: bytes, kind: int, record: Record) -> bytes:
    body = MAGIC + bytes([kind]) + record.encode()
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decode_datagram(key: bytes, data: bytes) -> tuple[int, Record]:
    """Authenticate and decode; raises :class:`Rejected` with the reason."""
    if len(data) != DATAGRAM_SIZE or not data.startswith(MAGIC):
        raise Rejected("malformed", f"{len(data)} bytes, not an hbmon datagram")
    body, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise Rejected("bad_mac", "authentication failed (wrong key or altered datagram)")
    return decode_authenticated(data)


def decode_authenticated(data: bytes) -> tuple[int, Record]:
    """Decode a datagram whose size, magic and MAC the caller has already checked (as
    :func:`decode_datagram` does); raises :class:`Rejected` ("malformed") with the reason."""
    body = data[:-MAC_SIZE]
    kind = body[len(MAGIC)]
    if kind not in KINDS:
        raise Rejected("malformed", f"unknown kind {kind}")
    try:
        record = decode(body[len(MAGIC) + 1 :])
    except RecordError as err:
        raise Rejected("malformed", str(err)) from None
    return kind, record


def resolve_peers(peers: Iterable[str]) -> list[tuple[str, int]]:
    """``HOST:PORT`` strings to socket addresses (blocking: resolves names)."""
    out = []
    for peer in peers:
        host, port = parse_hostport(peer)
        info = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        out.append((str(info[0][4][0]), int(info[0][4][1])))
    return out


def socket_drops(sock: socket.socket, default: int = 0) -> int:
    """Datagrams the kernel dropped for this socket (receive buffer full), from
    ``SO_MEMINFO``; ``default`` where the kernel does not say."""
    try:
        info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, MEMINFO_SIZE)
    except OSError:
        return default
    return int.from_bytes(info[MEMINFO_DROPS * 4 : MEMINFO_DROPS * 4 + 4], sys.byteorder)


class NetSender:
    """Sends records to peers from one non-blocking UDP socket (never waits)."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.drop: Callable[[Record], bool] = lambda record: False  # fault injection hook

    def send(self, kind: int, record: Record, peers: Iterable[tuple[str, int]]) -> list[str]:
        """Send to every peer; returns the errors (empty when all went out)."""
        if self.drop(record):
            return []
        data = encode_datagram(self.key, kind, record)
        errors = []
        for addr in peers:
            try:
                self.sock.sendto(data, addr)
            except OSError as err:
                errors.append(f"{addr[0]}:{addr[1]}: {err.strerror or err}")
        return errors

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True, slots=True)
class NetStatistics:
    """What the network listener tells about itself."""

    rejected: Mapping[str, int] = field(default_factory=dict)  # by reason
    dropped: int = 0  # by the kernel: the receive buffer was full


class NetListener:
    """Receives network beats into the ``network`` rows of the status table."""

    def __init__(
        self,
        table: StatusTable,
        clock: Clock,
        key: bytes,
        listen: str,
        *,
        max_skew: float = 3600.0,
    ) -> None:
        self.table = table
        self.clock = clock
        self.key = key
        self.host, self.port = parse_hostport(listen, default_host="0.0.0.0")
        self.max_skew = max_skew
        self.drop: Callable[[Record], bool] = lambda record: False  # fault injection hook
        self.rejected: Counter[str] = Counter()  # datagrams turned away, by reason
        self.dropped = 0  # datagrams the kernel dropped for the UDP socket (buffer full)
        self._logged: dict[str, int] = {}  # rejection counts at the last log line
        self._logged_at: float | None = None

    def statistics(self) -> NetStatistics:
        return NetStatistics(dict(self.rejected), self.dropped)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            # Thousands of pairs beat within each interval: a small default receive
            # buffer drops datagrams while the loop is busy.  The kernel caps this at
            # net.core.rmem_max.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.bind((self.host, self.port))
            port = int(sock.getsockname()[1])
            log.info("network beats on udp %s:%d", self.host, port)
            task_status.started(port)
            while True:
                await _wait_readable(sock)
                self.drain(sock)

    def drain(self, sock: socket.socket) -> int:
        """Take up to :data:`BATCH` waiting datagrams; returns how many were taken.

        One wake-up per batch, not per datagram, and the two commonest kinds of junk
        (not an hbmon datagram; a MAC that does not verify) are turned away before any
        decoding: a flood costs a few microseconds per datagram and never holds the loop
        for more than one batch.
        """
        rejected = self.rejected
        key, size, magic = self.key, DATAGRAM_SIZE, MAGIC
        last: tuple[str, tuple[str, int]] | None = None
        taken = 0
        while taken < BATCH:
            try:
                data, addr = sock.recvfrom(RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:  # e.g. ICMP errors reported on the socket
                log.debug("udp receive: %s", err)
                break
            taken += 1
            if len(data) != size or not data.startswith(magic):
                rejected["malformed"] += 1
                last = (f"malformed: {len(data)} bytes, not an hbmon datagram", addr)
                continue
            mac = hmac.digest(key, data[:-MAC_SIZE], "sha256")
            if not hmac.compare_digest(mac, data[-MAC_SIZE:]):
                rejected["bad_mac"] += 1
                last = ("bad_mac: authentication failed (wrong key or altered datagram)", addr)
                continue
            try:
                self.handle(data, authenticated=True)
            except Rejected as rej:
                rejected[rej.reason] += 1
                last = (str(rej), addr)
            except Exception:  # never let one datagram stop the listener
                rejected["malformed"] += 1
                log.exception("datagram from %s could not be handled", addr)
        self.dropped = socket_drops(sock, self.dropped)
        if last is not None:
            self._log_rejections(*last)
        return taken

    def _log_rejections(self, what: str, addr: tuple[str, int]) -> None:
        """Log rejections without letting a flood flood the log: the first one, then
        one summary line at most every :data:`REJECT_LOG_EVERY` seconds."""
        now = self.clock.monotonic()
        if self._logged_at is not None and now - self._logged_at < REJECT_LOG_EVERY:
            return
        counts = self.rejected
        new = {
            r: n - self._logged.get(r, 0) for r, n in counts.items() if n > self._logged.get(r, 0)
        }
        since = "" if self._logged_at is None else f" in the last {now - self._logged_at:.0f} s"
        log.warning(
            "network datagrams rejected%s: %s (last from %s:%d: %s)",
            since,
            ", ".join(f"{n} {reason}" for reason, n in sorted(new.items())),
            addr[0],
            addr[1],
            what,
        )
        self._logged = dict(counts)
        self._logged_at = now

    def _in_window(self, record: Record, row: PathRow, now: float, wall: float) -> bool:
        """Whether a writer not seen before (first contact, a new incarnation) carries a
        plausible time: within ``max_skew`` of our wall clock, or of the writer's own
        clock as last seen, advanced on our monotonic clock.

        A captured datagram replayed later fails both.  The datagrams of the writer
        already beating are not judged by time at all (a higher serial of the current
        incarnation proves them new), so a step of either wall clock changes nothing.
        """
        if abs(record.writer_time - wall) <= self.max_skew:
            return True
        if row.writer_time is None or row.last_read is None:
            return False
        theirs = row.writer_time + (now - row.last_read)
        return abs(record.writer_time - theirs) <= self.max_skew

    def handle(self, data: bytes, *, authenticated: bool = False) -> str:
        """Take one datagram; returns what it was (raises :class:`Rejected`).

        ``authenticated``: the caller has checked its size, magic and MAC already
        (:meth:`drain` does, before anything else), so the MAC is not computed again."""
        if authenticated:
            kind, record = decode_authenticated(data)
        else:
            kind, record = decode_datagram(self.key, data)
        row = self.table.row(record.pair_id, "network")
        if row is None:
            raise Rejected("unknown_pair", f"pair {record.pair_id!r} is not watched here")
        if self.drop(record):
            return "dropped"
        now, wall = self.clock.monotonic(), self.clock.wall()
        if record.incarnation != row.incarnation and not self._in_window(record, row, now, wall):
            raise Rejected(
                "out_of_window",
                f"writer time {record.writer_time - wall:+.0f} s from ours (max {self.max_skew:g})",
            )
        if record.incarnation in row.old_incarnations or (
            record.incarnation == row.incarnation
            and row.serial is not None
            # an older serial, or the same serial without a change of state (a stopping
            # or retired record may keep the serial); never an older serial whatever its
            # state: a beat arriving after the stopping record must not revive the row
            and (
                record.serial < row.serial
                or (record.serial == row.serial and record.state == row.record_state)
            )
        ):
            raise Rejected("replay", f"serial {record.serial} of {record.incarnation:#x} seen")
        pair = self.table.pairs[record.pair_id]
        if kind == ACTIVATE:
            changed = [r.observe_install(now) for r in pair.rows.values()]
            if any(changed):
                log.info("pair %s: installed (activation received), awaiting a beat", pair.id)
            for r in pair.rows.values():
                self.table.touch(r, now)
            return "activate"
        result = row.observe_record(record, now, wall, sent=True)
        self.table.touch(row, now)
        return result
