"""The heartbeat record: encoding, every decode failure reason, pair ids, slot descriptions."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from hbmon.errors import HbmonError, RecordError
from hbmon.record import (
    MAGIC,
    MAX_ID_BYTES,
    REASONS,
    RECORD_SIZE,
    SLOT_SIZE,
    VERSION,
    Record,
    State,
    check_pair_id,
    decode,
    describe_slot,
)

INC = 0x0123_4567_89AB_CDEF
T0 = 1_700_000_000.5  # exactly representable, survives the nanosecond round trip


def rec(
    pair_id: str = "db1",
    incarnation: int = INC,
    serial: int = 42,
    writer_time: float = T0,
    interval: float = 1.0,
    state: State = State.ACTIVE,
) -> Record:
    return Record(pair_id, incarnation, serial, writer_time, interval, state)


def reseal(raw: bytes | bytearray) -> bytes:
    """Recompute the CRC of a (patched) record so that only the patch is wrong."""
    body = bytes(raw[:124])
    return body + struct.pack("<I", zlib.crc32(body)) + bytes(raw[RECORD_SIZE:])


def patched(offset: int, value: bytes, base: Record | None = None) -> bytes:
    raw = bytearray((base or rec()).encode())
    raw[offset : offset + len(value)] = value
    return reseal(raw)


def reason_of(data: bytes | bytearray, expected_id: str | None = None) -> str:
    with pytest.raises(RecordError) as info:
        decode(data, expected_id)
    assert info.value.reason in REASONS
    return info.value.reason


# -- encoding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        rec(),
        rec(serial=0, incarnation=0),
        rec(serial=1, interval=0.25, state=State.STOPPING),
        rec(serial=2**64 - 1, incarnation=2**64 - 1, state=State.RETIRED),
        rec(pair_id="x" * MAX_ID_BYTES),
        rec(pair_id="データベース-1"),
        rec(writer_time=0.0, interval=3600.0),
    ],
    ids=["plain", "install", "stopping", "max-ints", "longest-id", "utf8-id", "epoch"],
)
def test_round_trip(record: Record) -> None:
    raw = record.encode()
    assert len(raw) == RECORD_SIZE
    assert decode(raw) == record
    assert decode(raw, expected_id=record.pair_id) == record


def test_layout_fields_at_documented_offsets() -> None:
    raw = rec(serial=7, interval=0.5, state=State.STOPPING).encode()
    assert raw[0:8] == MAGIC
    assert struct.unpack_from("<H", raw, 8) == (VERSION,)
    assert raw[10] == 2  # stopping
    assert raw[11] == 0
    assert struct.unpack_from("<I", raw, 12) == (500,)
    assert struct.unpack_from("<Q", raw, 16) == (INC,)
    assert struct.unpack_from("<Q", raw, 24) == (7,)
    assert struct.unpack_from("<q", raw, 32) == (1_700_000_000_500_000_000,)
    assert raw[40] == 3
    assert raw[41:44] == b"db1"
    assert not any(raw[44:124])
    assert struct.unpack_from("<I", raw, 124) == (zlib.crc32(raw[:124]),)


def test_writer_time_keeps_nanoseconds() -> None:
    t = 1_700_000_000.123456
    assert decode(rec(writer_time=t).encode()).writer_time == pytest.approx(t, abs=1e-6)


def test_decode_ignores_bytes_after_the_record() -> None:
    raw = rec().encode() + b"\xff" * 100
    assert decode(raw) == rec()
    assert decode(memoryview(bytearray(raw))) == rec()


@pytest.mark.parametrize("size", [RECORD_SIZE, 512, 4096])
def test_encode_block_pads_with_zeros(size: int) -> None:
    block = rec().encode_block(size)
    assert len(block) == size
    assert block[:RECORD_SIZE] == rec().encode()
    assert not any(block[RECORD_SIZE:])
    assert decode(block) == rec()


@pytest.mark.parametrize("size", [0, RECORD_SIZE - 1, SLOT_SIZE + 1, 8192])
def test_encode_block_rejects_sizes_outside_record_and_slot(size: int) -> None:
    with pytest.raises(ValueError, match="block size"):
        rec().encode_block(size)


def test_encode_refuses_an_invalid_pair_id() -> None:
    with pytest.raises(ValueError, match="pair id"):
        rec(pair_id="x" * (MAX_ID_BYTES + 1)).encode()
    with pytest.raises(ValueError, match="pair id"):
        rec(pair_id="").encode()


# -- decode failures: one reason each ------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 64, RECORD_SIZE - 1])
def test_truncated(length: int) -> None:
    assert reason_of(rec().encode()[:length]) == "truncated"


@pytest.mark.parametrize("length", [RECORD_SIZE, 512, SLOT_SIZE])
def test_zeroed(length: int) -> None:
    assert reason_of(bytes(length)) == "zeroed"


def _xfs_superblock() -> bytes:
    # XFS puts its superblock ("XFSB", block size, block count ...) at byte 0.
    return b"XFSB" + struct.pack(">IQ", 4096, 262144) + bytes(SLOT_SIZE - 16)


def _boot_sector() -> bytes:
    # An MBR with boot code: jump instruction first, 0x55AA signature at 510.
    sector = bytearray(512)
    sector[0:3] = b"\xeb\x63\x90"
    sector[3:11] = b"GRUB    "
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


@pytest.mark.parametrize(
    "data",
    [
        _xfs_superblock(),
        _boot_sector(),
        random.Random(7).randbytes(SLOT_SIZE),
        b"#!/bin/sh\necho hello\n".ljust(RECORD_SIZE, b" "),
        b"\x00" + rec().encode(),  # a record one byte off: wrong offset
        b"HBMONREX" + rec().encode()[8:],
    ],
    ids=["xfs-superblock", "boot-sector", "random", "text", "shifted-record", "near-magic"],
)
def test_bad_magic(data: bytes) -> None:
    assert reason_of(data) == "bad_magic"


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_unsupported_version(version: int) -> None:
    data = patched(8, struct.pack("<H", version))
    # Only the version is wrong: the CRC over the patched bytes is valid.
    assert struct.unpack_from("<I", data, 124) == (zlib.crc32(data[:124]),)
    with pytest.raises(RecordError) as info:
        decode(data)
    assert info.value.reason == "unsupported_version"
    assert str(version) in info.value.detail


# Bytes 0..9 (magic, version) are checked before the CRC, so flips there are reported as
# bad_magic / unsupported_version (see test_every_single_bit_flip_is_rejected).
CRC_COVERED_OFFSETS = [10, 11, 12, 14, 16, 20, 24, 31, 32, 39, 40, 41, 43, 60, 103, 104, 118, 123]


@pytest.mark.parametrize("bit", [0, 7])
@pytest.mark.parametrize("offset", CRC_COVERED_OFFSETS)
def test_checksum_mismatch_on_a_flipped_bit(offset: int, bit: int) -> None:
    raw = bytearray(rec().encode())
    raw[offset] ^= 1 << bit
    assert reason_of(raw) == "checksum_mismatch"


@pytest.mark.parametrize("offset", [124, 125, 126, 127])
def test_checksum_mismatch_on_a_damaged_crc(offset: int) -> None:
    raw = bytearray(rec().encode())
    raw[offset] ^= 0x10
    assert reason_of(raw) == "checksum_mismatch"


def test_checksum_mismatch_on_a_torn_record() -> None:
    # First half of a new record, second half of the old one.
    new, old = rec(serial=43).encode(), rec(serial=42).encode()
    torn = new[:64] + old[64:]
    assert reason_of(torn) == "checksum_mismatch"


def test_every_single_bit_flip_is_rejected() -> None:
    good = rec().encode()
    seen = set()
    for offset in range(RECORD_SIZE):
        for bit in range(8):
            raw = bytearray(good)
            raw[offset] ^= 1 << bit
            reason = reason_of(raw, expected_id="db1")
            seen.add(reason)
            if offset < 8:
                assert reason == "bad_magic"
            elif offset < 10:
                assert reason == "unsupported_version"
            else:
                assert reason == "checksum_mismatch"
    assert seen == {"bad_magic", "unsupported_version", "checksum_mismatch"}


@pytest.mark.parametrize("state", [0, 5, 255])
def test_malformed_state(state: int) -> None:
    data = patched(10, bytes([state]))
    with pytest.raises(RecordError) as info:
        decode(data)
    assert info.value.reason == "malformed"
    assert f"state {state}" in info.value.detail


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (11, b"\x01"),  # reserved byte after the state
        (12, struct.pack("<I", 0)),  # interval 0 ms
        (40, b"\x00"),  # id length 0
        (40, bytes([MAX_ID_BYTES + 1])),  # id length past the id field
        (50, b"x"),  # garbage after the id in its padding
        (104, b"\x01"),  # reserved tail
        (123, b"\x01"),  # last reserved byte
        (41, b"\xff\xfe\xfd"),  # id is not UTF-8
    ],
    ids=[
        "reserved-11",
        "interval-0",
        "id-len-0",
        "id-len-64",
        "id-padding",
        "reserved-104",
        "reserved-123",
        "id-not-utf8",
    ],
)
def test_malformed_fields(offset: int, value: bytes) -> None:
    assert reason_of(patched(offset, value)) == "malformed"


def test_identity_mismatch() -> None:
    data = rec(pair_id="db2").encode()
    with pytest.raises(RecordError) as info:
        decode(data, expected_id="db1")
    err = info.value
    assert err.reason == "identity_mismatch"
    assert "'db2'" in err.detail
    assert "'db1'" in err.detail
    assert isinstance(err, HbmonError)
    assert str(err).startswith("identity_mismatch: ")
    # Without an expectation the same bytes are a perfectly valid record of db2.
    assert decode(data).pair_id == "db2"


def test_identity_is_exact() -> None:
    assert reason_of(rec(pair_id="db1").encode(), expected_id="db10") == "identity_mismatch"
    assert reason_of(rec(pair_id="DB1").encode(), expected_id="db1") == "identity_mismatch"


def test_damage_is_reported_before_identity() -> None:
    raw = bytearray(rec(pair_id="db2").encode())
    raw[30] ^= 1
    assert reason_of(raw, expected_id="db1") == "checksum_mismatch"


def test_every_reason_is_reachable() -> None:
    samples = {
        "truncated": rec().encode()[:10],
        "zeroed": bytes(RECORD_SIZE),
        "bad_magic": _xfs_superblock(),
        "unsupported_version": patched(8, struct.pack("<H", 2)),
        "checksum_mismatch": rec().encode()[:-1] + b"\x00",
        "malformed": patched(10, b"\x09"),
        "identity_mismatch": rec(pair_id="db2").encode(),
    }
    assert set(samples) == set(REASONS)
    for reason, data in samples.items():
        assert reason_of(data, expected_id="db1") == reason


# -- pair ids ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pair_id",
    ["a", "db1", "x" * 63, "é" * 31 + "a", "site-a/db_1.prod", "データ"],
    ids=["one-byte", "plain", "63-bytes", "63-bytes-utf8", "punctuation", "japanese"],
)
def test_check_pair_id_accepts(pair_id: str) -> None:
    check_pair_id(pair_id)


@pytest.mark.parametrize(
    "pair_id",
    ["", "x" * 64, "é" * 32, "db\x001", "db\n1", "db\t1"],
    ids=["empty", "64-bytes", "64-bytes-utf8", "nul", "newline", "tab"],
)
def test_check_pair_id_rejects(pair_id: str) -> None:
    with pytest.raises(ValueError, match="pair id"):
        check_pair_id(pair_id)


# -- describe_slot -------------------------------------------------------------------------


NOT_A_RECORD = "data that is not a valid hbmon record"


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (bytes(SLOT_SIZE), "nothing (zeroed)"),
        (b"", "nothing (past the end of the volume)"),
        (_xfs_superblock(), f"{NOT_A_RECORD} (bad_magic)"),
        (rec().encode()[:-1] + b"\x00", f"{NOT_A_RECORD} (checksum_mismatch)"),
        (patched(10, b"\x00"), f"{NOT_A_RECORD} (malformed)"),
        (rec(serial=5).encode(), "the record of pair 'db1' (active, serial 5)"),
        (
            rec(serial=0, incarnation=0).encode_block(512),
            "the record of pair 'db1' (active, serial 0)",
        ),
        (
            rec(pair_id="db2", state=State.STOPPING).encode(),
            "the record of pair 'db2' (stopping, serial 42)",
        ),
        (
            rec(state=State.RETIRED, serial=9).encode(),
            "the record of pair 'db1' (retired, serial 9)",
        ),
    ],
    ids=[
        "zeroed",
        "empty",
        "foreign",
        "corrupt",
        "malformed",
        "active",
        "installed",
        "stopping",
        "retired",
    ],
)
def test_describe_slot(data: bytes, text: str) -> None:
    assert describe_slot(data) == text


def _ext4_start() -> bytes:
    # ext4 leaves bytes 0..1023 zero and keeps its superblock at 1024 (magic 0xEF53 at 1080),
    # inside the first 4096-byte slot.
    slot = bytearray(SLOT_SIZE)
    slot[1024:1028] = struct.pack("<I", 65536)  # s_inodes_count
    slot[1080:1082] = b"\x53\xef"  # s_magic
    return bytes(slot)


def test_ext4_start_reads_as_a_zeroed_record_area() -> None:
    # decode() only judges the 128-byte record area; callers must look at the rest.
    assert reason_of(_ext4_start()) == "zeroed"


@pytest.mark.parametrize(
    "data",
    [_ext4_start(), b"HBMONREC", b"#!/bin/sh\n"],
    ids=["ext4-in-a-4096-byte-block", "short-record", "short-text"],
)
def test_describe_slot_does_not_call_data_nothing(data: bytes) -> None:
    """BUG: describe_slot() says "nothing" about slots that hold data.

    It judges only the 128-byte record area: a 4096-byte block whose record area is zero
    but which holds an ext4 superblock at byte 1080 is "nothing (zeroed)", and a file
    that ends after a few bytes of text is "nothing (past the end of the volume)".
    volume.claim_slot() checks ``any(data)`` itself and refuses such slots, but then
    builds its refusal from describe_slot(), so the operator reads
    "slot 0 holds nothing (zeroed); refusing to overwrite it".
    """
    text = describe_slot(data)
    assert not text.startswith("nothing"), text


def test_the_hot_decoder_agrees_with_decode() -> None:
    """Decoder.active (the poller's inline reads) gives the fields of exactly the active
    records of its pair that decode() accepts; everything else is None."""
    import random

    from hbmon.record import Decoder, State

    dec = Decoder("pair-1")
    good = Record("pair-1", 0xABC, 42, 1.7e9 + 0.5, 0.25).encode_block(512)
    cases = [
        good,
        Record("pair-1", 1, 1, 1.7e9, 1.0, State.STOPPING).encode_block(512),
        Record("pair-2", 1, 1, 1.7e9, 1.0).encode_block(512),
        bytes(512),
    ]
    rng = random.Random(7)
    for _ in range(300):
        damaged = bytearray(good)
        damaged[rng.randrange(128)] ^= 1 << rng.randrange(8)
        cases.append(bytes(damaged))
    for data in cases:
        buffer = bytearray(data)
        fields = dec.active(buffer, memoryview(buffer)[:124])
        try:
            rec = decode(data, "pair-1")
        except RecordError:
            assert fields is None
            continue
        if rec.state is not State.ACTIVE:
            assert fields is None
        else:
            assert fields == (rec.incarnation, rec.serial, rec.writer_time, rec.interval)
