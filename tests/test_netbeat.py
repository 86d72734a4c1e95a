"""Network beats: datagram authentication, every rejection reason, the listener's rows."""

from __future__ import annotations

import hmac
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from hbmon.clock import FakeClock
from hbmon.config import Timing
from hbmon.errors import ConfigError
from hbmon.netbeat import (
    ACTIVATE,
    BEAT,
    RETIRE,
    NetListener,
    Rejected,
    decode_datagram,
    encode_datagram,
    load_secret,
)
from hbmon.record import Record, State
from hbmon.status import StatusTable

KEY = b"k" * 32
TIMING = Timing(interval=1.0, miss_threshold=3, recover_beats=2)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(clock: FakeClock) -> StatusTable:
    t = StatusTable(clock, site="b")
    t.add_pair("db1", "both", TIMING)
    return t


@pytest.fixture
def listener(table: StatusTable, clock: FakeClock) -> NetListener:
    return NetListener(table, clock, KEY, "127.0.0.1:0", max_skew=3600)


def rec(clock: FakeClock, serial: int, inc: int = 7, state: State = State.ACTIVE) -> Record:
    return Record("db1", inc, serial, clock.wall(), 1.0, state)


def test_round_trip() -> None:
    r = Record("db1", 7, 3, 1.7e9, 1.0)
    assert decode_datagram(KEY, encode_datagram(KEY, BEAT, r)) == (BEAT, r)


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: d[:-1], "malformed"),
        (lambda d: b"XXXX" + d[4:], "malformed"),
        (lambda d: os.urandom(len(d)), "malformed"),
        (lambda d: b"", "malformed"),
        (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], "bad_mac"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "bad_mac"),
    ],
)
def test_damaged_datagrams_are_rejected(mangle: object, reason: str) -> None:
    data = encode_datagram(KEY, BEAT, Record("db1", 7, 3, 1.7e9, 1.0))
    with pytest.raises(Rejected) as err:
        decode_datagram(KEY, mangle(data))  # type: ignore[operator]
    assert err.value.reason == reason


def test_forged_with_another_key_is_bad_mac() -> None:
    data = encode_datagram(b"x" * 32, BEAT, Record("db1", 7, 3, 1.7e9, 1.0))
    with pytest.raises(Rejected, match="bad_mac"):
        decode_datagram(KEY, data)


def test_first_network_beat_is_a_beat(
    listener: NetListener, table: StatusTable, clock: FakeClock
) -> None:
    assert listener.handle(encode_datagram(KEY, BEAT, rec(clock, 1))) == "beat"
    row = table.row("db1", "network")
    assert row is not None
    assert row.evaluate(clock.monotonic()) == "alive"


def test_replays_are_rejected_and_do_not_count(
    listener: NetListener, table: StatusTable, clock: FakeClock
) -> None:
    old = encode_datagram(KEY, BEAT, rec(clock, 1))
    listener.handle(old)
    clock.advance(1)
    listener.handle(encode_datagram(KEY, BEAT, rec(clock, 2)))
    clock.advance(2.5)
    for data in (old, encode_datagram(KEY, BEAT, rec(clock, 2))):
        with pytest.raises(Rejected, match="replay"):
            listener.handle(data)
    row = table.row("db1", "network")
    assert row is not None
    assert row.serial == 2
    assert row.age(clock.monotonic()) == pytest.approx(2.5)


def test_an_incarnation_that_was_replaced_is_a_replay(
    listener: NetListener, clock: FakeClock
) -> None:
    listener.handle(encode_datagram(KEY, BEAT, rec(clock, 5, inc=1)))
    listener.handle(encode_datagram(KEY, BEAT, rec(clock, 1, inc=2)))
    with pytest.raises(Rejected, match="replay"):
        listener.handle(encode_datagram(KEY, BEAT, rec(clock, 6, inc=1)))


def test_unknown_pair_and_time_window(listener: NetListener, clock: FakeClock) -> None:
    with pytest.raises(Rejected, match="unknown_pair"):
        listener.handle(encode_datagram(KEY, BEAT, Record("db9", 1, 1, clock.wall(), 1.0)))
    far = Record("db1", 1, 1, clock.wall() - 7200, 1.0)
    with pytest.raises(Rejected, match="out_of_window"):
        listener.handle(encode_datagram(KEY, BEAT, far))


def test_minutes_of_skew_change_no_verdict(
    listener: NetListener, table: StatusTable, clock: FakeClock
) -> None:
    clock.jump_wall(-300)  # the reader's wall clock is five minutes behind the writer's
    for serial in range(1, 5):
        writer_time = clock.wall() + 300
        listener.handle(encode_datagram(KEY, BEAT, Record("db1", 7, serial, writer_time, 1.0)))
        clock.advance(1)
    row = table.row("db1", "network")
    assert row is not None
    assert row.evaluate(clock.monotonic()) == "alive"
    assert row.skew == pytest.approx(300, abs=0.01)


def test_activation_then_retire(
    listener: NetListener, table: StatusTable, clock: FakeClock
) -> None:
    clock.advance(60)  # long past the start-up grace: an unannounced pair would be stale
    pair = table.pairs["db1"]
    assert pair.judge(clock.monotonic()) == "host_down"
    listener.handle(encode_datagram(KEY, ACTIVATE, Record("db1", 0, 0, clock.wall(), 1.0)))
    clock.advance(600)
    assert pair.judge(clock.monotonic()) == "awaiting"
    listener.handle(encode_datagram(KEY, BEAT, rec(clock, 1)))
    assert table.row("db1", "network").evaluate(clock.monotonic()) == "alive"  # type: ignore[union-attr]
    listener.handle(encode_datagram(KEY, RETIRE, rec(clock, 2, state=State.RETIRED)))
    clock.advance(600)
    assert pair.judge(clock.monotonic()) == "retired"


def test_key_file_rules(tmp_path: Path) -> None:
    key = tmp_path / "hb.key"
    key.write_bytes(b"s" * 32)
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="world-readable"):
        load_secret(key)
    key.chmod(0o600)
    assert load_secret(key) == b"s" * 32
    key.write_bytes(b"short")
    with pytest.raises(ConfigError, match="at least 16"):
        load_secret(key)
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(tmp_path / "missing.key")


def test_a_dying_host_is_never_a_partition_on_the_way_to_host_down(
    listener: NetListener, table: StatusTable, clock: FakeClock
) -> None:
    """Both paths carry serial 1..5; the volume is seen 0.9 s after the network."""
    vol = table.row("db1", "volume")
    assert vol is not None
    for serial in range(1, 6):
        listener.handle(encode_datagram(KEY, BEAT, rec(clock, serial)))
        clock.advance(0.9)
        vol.observe_record(rec(clock, serial), clock.monotonic(), clock.wall())
        clock.advance(0.1)
    seen = set()
    for _ in range(60):  # the host is dead: six seconds of 0.1 s steps
        clock.advance(0.1)
        seen.add(table.pairs["db1"].judge(clock.monotonic()))
    assert "network_partition" not in seen
    assert table.pairs["db1"].verdict == "host_down"


def test_a_partition_is_seen_when_the_volume_runs_ahead(
    listener: NetListener, table: StatusTable, clock: FakeClock
) -> None:
    vol = table.row("db1", "volume")
    assert vol is not None
    vol.observe_record(rec(clock, 1), clock.monotonic(), clock.wall())
    for serial in range(2, 12):  # network beats stop after serial 3
        if serial <= 3:
            listener.handle(encode_datagram(KEY, BEAT, rec(clock, serial)))
        clock.advance(0.5)
        vol.observe_record(rec(clock, serial), clock.monotonic(), clock.wall())
        clock.advance(0.5)
    assert table.pairs["db1"].judge(clock.monotonic()) == "network_partition"


def test_drain_computes_each_datagrams_mac_once(
    listener: NetListener, table: StatusTable, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the receive path an accepted datagram costs one HMAC, and what the MAC check
    let through is still checked for its kind and record (rejected as malformed)."""
    computed: list[int] = []
    digest, new = hmac.digest, hmac.new

    def counting_digest(*args: Any, **kw: Any) -> bytes:
        computed.append(1)
        return digest(*args, **kw)

    def counting_new(*args: Any, **kw: Any) -> hmac.HMAC:
        computed.append(1)
        return new(*args, **kw)

    sent = [encode_datagram(KEY, BEAT, rec(clock, serial)) for serial in (1, 2, 3)]
    odd_kind = encode_datagram(KEY, 99, rec(clock, 4))
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        tx.connect(rx.getsockname())
        for data in [*sent, odd_kind]:
            tx.send(data)
        monkeypatch.setattr(hmac, "digest", counting_digest)
        monkeypatch.setattr(hmac, "new", counting_new)
        taken = 0
        deadline = time.monotonic() + 5
        while taken < 4 and time.monotonic() < deadline:
            taken += listener.drain(rx)
        monkeypatch.undo()
    assert taken == 4
    assert len(computed) == 4  # one per datagram
    assert table.row("db1", "network").serial == 3  # type: ignore[union-attr]
    assert listener.statistics().rejected == {"malformed": 1}
