"""The heartbeat record: one per 4096-byte slot, 128 bytes of it used.

Layout (little-endian), documented for operators in ``docs/format.md``::

    off size field
      0    8 magic           b"HBMONREC"
      8    2 version         1
     10    1 state           1 active, 2 stopping, 3 retired, 4 standby (not the owner)
     11    1 reserved        0
     12    4 interval_ms     the writer's declared beat interval
     16    8 incarnation     random per writer start (never 0 for a writer)
     24    8 serial          0 = installed, first beat of an incarnation is 1
     32    8 writer_time_ns  writer's wall clock, Unix nanoseconds (diagnostic only)
     40    1 id_length       bytes of the pair identifier (1..63)
     41   63 pair_id         UTF-8, zero padded
    104   20 reserved        0
    124    4 crc32           CRC-32 (zlib) of bytes 0..123

Slot K starts at byte K * 4096, so one LUN can carry many pairs.  The record sits in
the first 128 bytes of its slot; the rest of the slot is left as it is.
"""

from __future__ import annotations

import enum
import functools
import math
import struct
import zlib
from typing import NamedTuple

from hbmon.errors import RecordError

MAGIC = b"HBMONREC"
VERSION = 1
SLOT_SIZE = 4096
RECORD_SIZE = 128
MAX_ID_BYTES = 63

_LAYOUT = struct.Struct("<8sHBBIQQqB63s20s")
_CRC = struct.Struct("<I")
_CRC_OFFSET = _LAYOUT.size  # 124
assert _CRC_OFFSET + _CRC.size == RECORD_SIZE
_ZERO = bytes(RECORD_SIZE)
_U32 = 2**32 - 1
_U64 = 2**64 - 1
_MAX_TIME = 2**63 / 1e9  # seconds: the float nearest to the largest int64 of nanoseconds

#: Every way a slot can fail to hold the record a reader expects.
REASONS = (
    "truncated",  # fewer than 128 bytes could be read at the slot
    "zeroed",  # the record area is all zero: never initialised, or wiped
    "bad_magic",  # not an hbmon record (foreign data, wrong slot or offset)
    "unsupported_version",  # written by a newer or older hbmon format
    "checksum_mismatch",  # torn or corrupted record
    "malformed",  # checksum fine but a field is out of range (writer bug)
    "identity_mismatch",  # a valid record, but of another pair
)


class State(enum.IntEnum):
    """What the writer says about itself."""

    ACTIVE = 1
    STOPPING = 2
    RETIRED = 3
    STANDBY = 4  # the writer runs but does not own the pair (the arbiter says so)

    @property
    def label(self) -> str:
        return self.name.lower()


class Record(NamedTuple):
    """One heartbeat record (immutable; a named tuple because readers build 10,000 a
    second)."""

    pair_id: str
    incarnation: int
    serial: int
    writer_time: float  # Unix seconds, writer's wall clock
    interval: float  # seconds
    state: State = State.ACTIVE

    def encode(self) -> bytes:
        """The 128 bytes of this record, checksum included.

        Raises ValueError, naming the field, for a value the format cannot carry: a
        record that readers would reject is never produced.
        """
        ident = self.pair_id.encode()
        check_pair_id(self.pair_id)
        scaled = self.interval * 1000
        interval_ms = round(scaled) if math.isfinite(scaled) else 0
        if not 1 <= interval_ms <= _U32:
            raise ValueError(
                f"interval {self.interval!r} s must be 0.001 to {_U32 / 1000:.0f} s "
                "(whole milliseconds)"
            )
        if not (0 <= self.incarnation <= _U64 and 0 <= self.serial <= _U64):
            raise ValueError(
                f"incarnation {self.incarnation} and serial {self.serial} must be "
                "unsigned 64-bit integers"
            )
        if not abs(self.writer_time) <= _MAX_TIME:  # NaN fails this too
            raise ValueError(
                f"writer_time {self.writer_time!r} s is outside the record's range "
                f"(±{_MAX_TIME} s from 1970, years 1677 to 2262)"
            )
        # The float nearest to the last nanosecond rounds one past it: clamp.
        time_ns = min(max(round(self.writer_time * 1e9), -(2**63)), 2**63 - 1)
        body = _LAYOUT.pack(
            MAGIC,
            VERSION,
            int(self.state),
            0,
            interval_ms,
            self.incarnation,
            self.serial,
            time_ns,
            len(ident),
            ident,
            b"",
        )
        return body + _CRC.pack(zlib.crc32(body))

    def encode_block(self, size: int) -> bytes:
        """The record padded with zeros to ``size`` bytes (one aligned block)."""
        if size < RECORD_SIZE or size > SLOT_SIZE:
            raise ValueError(f"block size {size} must be between {RECORD_SIZE} and {SLOT_SIZE}")
        return self.encode() + bytes(size - RECORD_SIZE)


def check_pair_id(pair_id: str) -> None:
    """Raise ValueError unless ``pair_id`` fits a record."""
    raw = pair_id.encode()
    if not 1 <= len(raw) <= MAX_ID_BYTES:
        raise ValueError(f"pair id {pair_id!r} must be 1..{MAX_ID_BYTES} bytes of UTF-8")
    if "\x00" in pair_id or not pair_id.isprintable():
        raise ValueError(f"pair id {pair_id!r} must be printable text")


def decode(data: bytes | bytearray | memoryview, expected_id: str | None = None) -> Record:
    """Decode the record at the start of ``data``.

    Raises :class:`RecordError` whose ``reason`` is one of :data:`REASONS`.  With
    ``expected_id`` a valid record of another pair is an ``identity_mismatch``: the SVOL
    is a byte copy of the PVOL, so who a record should belong to comes from
    configuration, never from the disk.
    """
    if len(data) < RECORD_SIZE:
        raise RecordError("truncated", f"only {len(data)} of {RECORD_SIZE} record bytes present")
    head = bytes(data[:RECORD_SIZE])
    if head[:8] != MAGIC:
        if head == _ZERO:
            raise RecordError("zeroed", "the record area is all zero bytes")
        raise RecordError("bad_magic", f"magic is {head[:8]!r}, expected {MAGIC!r}")
    (
        version,
        state,
        reserved,
        interval_ms,
        incarnation,
        serial,
        time_ns,
        id_len,
        ident,
        tail,
    ) = _BODY.unpack_from(head, 8)
    if version != VERSION:
        raise RecordError(
            "unsupported_version", f"format version {version}; this hbmon reads {VERSION}"
        )
    crc = int.from_bytes(head[_CRC_OFFSET:], "little")
    actual = zlib.crc32(memoryview(head)[:_CRC_OFFSET])
    if crc != actual:
        raise RecordError("checksum_mismatch", f"stored crc {crc:#010x}, computed {actual:#010x}")
    record_state = _STATES.get(state)
    if record_state is None:
        raise RecordError("malformed", f"state {state} is not 1, 2, 3 or 4")
    if (
        not 1 <= id_len <= MAX_ID_BYTES
        or reserved
        or tail != _ZERO_TAIL
        or ident[id_len:] != _ZERO_PAD[id_len]
    ):
        raise RecordError("malformed", f"pair id length {id_len} or reserved bytes out of range")
    raw_id = ident[:id_len]
    if expected_id is not None and raw_id == _encoded(expected_id):
        pair_id = expected_id  # the common case: no need to decode the text
    else:
        try:
            pair_id = raw_id.decode()
        except UnicodeDecodeError:
            raise RecordError("malformed", "pair id is not UTF-8") from None
        if not pair_id.isprintable():  # no writer writes it (check_pair_id); no terminal shows it
            raise RecordError("malformed", f"pair id {pair_id!r} is not printable text")
    if interval_ms == 0:
        raise RecordError("malformed", "declared interval is 0 ms")
    if expected_id is not None and pair_id != expected_id:
        raise RecordError(
            "identity_mismatch", f"record belongs to pair {pair_id!r}, expected {expected_id!r}"
        )
    return Record(pair_id, incarnation, serial, time_ns / 1e9, interval_ms / 1000, record_state)


_BODY = struct.Struct("<HBBIQQqB63s20s")  # the layout after the magic
_ZERO_TAIL = bytes(20)
_ZERO_PAD = [bytes(MAX_ID_BYTES - n) for n in range(MAX_ID_BYTES + 1)]


_MAGIC_VERSION = MAGIC + VERSION.to_bytes(2, "little")
# The whole record in one call: magic+version, state, reserved, interval_ms, incarnation,
# serial, writer_time_ns, id length+id+padding+reserved, crc32.
_HOT = struct.Struct("<10sBBIQQq84sI")
assert _HOT.size == RECORD_SIZE
_ACTIVE = 1


class Decoder:
    """Decodes the records of one pair, fast: the poller's hot path.

    A valid record of the expected pair is recognised with a few byte comparisons and
    one checksum; anything else goes through :func:`decode`, which names what is wrong.
    """

    __slots__ = ("id_field", "pair_id")

    def __init__(self, pair_id: str) -> None:
        raw = pair_id.encode()
        self.pair_id = pair_id
        # bytes 40..123: id length, the id, zero padding, the reserved zeros
        self.id_field = bytes([len(raw)]) + raw.ljust(MAX_ID_BYTES, b"\0") + _ZERO_TAIL

    def __call__(self, data: bytes | bytearray) -> Record:
        if len(data) >= RECORD_SIZE:
            (magic, state, reserved, interval_ms, incarnation, serial, time_ns, ident, crc) = (
                _HOT.unpack_from(data)
            )
            record_state = _STATES.get(state)
            if (
                magic == _MAGIC_VERSION
                and ident == self.id_field
                and record_state is not None
                and not reserved
                and interval_ms
                and crc == zlib.crc32(memoryview(data)[:_CRC_OFFSET])
            ):
                return Record(
                    self.pair_id,
                    incarnation,
                    serial,
                    time_ns / 1e9,
                    interval_ms / 1000,
                    record_state,
                )
        return decode(data, self.pair_id)

    def active(
        self, data: bytes | bytearray | memoryview, head: memoryview
    ) -> tuple[int, int, float, float] | None:
        """(incarnation, serial, writer_time, interval) of an *active* record of this
        pair at the start of ``data`` (at least 128 bytes; ``head`` is a view of its first
        124, which the checksum covers); None for anything else, which the caller then
        hands to :meth:`__call__` to be decoded and named.  The poller's inline reads use
        this: one unpack, two comparisons and a checksum, no Record built."""
        (magic, state, reserved, interval_ms, incarnation, serial, time_ns, ident, crc) = (
            _HOT.unpack_from(data)
        )
        if (
            magic == _MAGIC_VERSION
            and ident == self.id_field
            and state == _ACTIVE
            and not reserved
            and interval_ms
            and crc == zlib.crc32(head)
        ):
            return incarnation, serial, time_ns / 1e9, interval_ms / 1000
        return None


@functools.lru_cache(maxsize=65536)
def _encoded(pair_id: str) -> bytes:
    return pair_id.encode()


_STATES = {s.value: s for s in State}


def describe_slot(data: bytes | bytearray | memoryview) -> str:
    """A short human description of what a slot holds (for refusals and `volume show`)."""
    try:
        rec = decode(data)
    except RecordError as err:
        if not any(data) and err.reason == "zeroed":
            return "nothing (zeroed)"
        if not any(data) and err.reason == "truncated":
            return "nothing (past the end of the volume)"
        return f"data that is not a valid hbmon record ({err.reason})"
    return f"the record of pair {rec.pair_id!r} ({rec.state.label}, serial {rec.serial})"
