"""The command line: exit codes, volume init/show/retire, config check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hbmon.cli import main
from hbmon.record import SLOT_SIZE, Record, State, decode

GOOD = """
site = "osaka"
method = "volume"
interval = "1s"
[[watch]]
id = "db1"
volume = "svol.img"
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_config_check_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(GOOD)
    code, out, _ = run(capsys, "config", "check", str(cfg))
    assert code == 0
    assert "valid" in out
    assert "1 watch" in out


def test_config_check_names_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(GOOD.replace('interval = "1s"', 'interval = "soon"'))
    code, out, err = run(capsys, "config", "check", str(cfg))
    assert code == 2
    assert out == ""
    assert str(cfg) in err
    assert "interval" in err
    assert "soon" in err
    assert err.count("\n") == 1  # one message


def test_run_with_invalid_config_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(GOOD + "\n[[beat]]\nid = 'x'\nvolume = 'p.img'\nslot = -1\n")
    code, _, err = run(capsys, "run", "-c", str(cfg))
    assert code == 2
    assert "beat[0].slot" in err
    assert not (tmp_path / "p.img").exists()


def test_bad_usage_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "volume", "frobnicate")
    assert code == 2
    assert "invalid choice" in err


def test_volume_init_show_retire(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vol = tmp_path / "hb.vol"
    code, out, _ = run(capsys, "volume", "init", str(vol), "--id", "db1", "--slot", "2")
    assert code == 0, out
    rec = decode(vol.read_bytes()[2 * SLOT_SIZE :], "db1")
    assert (rec.serial, rec.incarnation, rec.state) == (0, 0, State.ACTIVE)
    assert vol.stat().st_size == 2 * SLOT_SIZE + 512  # nothing beyond the slot's first block

    code, out, _ = run(capsys, "volume", "show", str(vol), "--json")
    assert code == 0
    shown = json.loads(out)["records"]
    assert [r["slot"] for r in shown] == [2]
    assert shown[0]["pair"] == "db1"
    assert shown[0]["valid"]

    code, out, _ = run(capsys, "volume", "retire", str(vol), "--id", "db1", "--slot", "2")
    assert code == 0, out
    rec = decode(vol.read_bytes()[2 * SLOT_SIZE :], "db1")
    assert (rec.state, rec.serial) == (State.RETIRED, 1)


def test_volume_init_refuses_foreign_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vol = tmp_path / "hb.vol"
    vol.write_bytes(b"\x53\xef" + b"filesystem superblock" + bytes(4000))
    code, _, err = run(capsys, "volume", "init", str(vol), "--id", "db1")
    assert code == 1
    assert "refusing to overwrite" in err
    assert "not a valid hbmon record" in err
    assert vol.read_bytes().startswith(b"\x53\xef")
    code, _, _ = run(capsys, "volume", "init", str(vol), "--id", "db1", "--force")
    assert code == 0
    assert decode(vol.read_bytes(), "db1").pair_id == "db1"


def test_volume_init_refuses_another_pairs_slot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vol = tmp_path / "hb.vol"
    assert run(capsys, "volume", "init", str(vol), "--id", "db1")[0] == 0
    code, _, err = run(capsys, "volume", "init", str(vol), "--id", "db2")
    assert code == 1
    assert "pair 'db1'" in err
    assert run(capsys, "volume", "init", str(vol), "--id", "db1")[0] == 0  # re-init is fine


def test_volume_show_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vol = tmp_path / "hb.vol"
    good = Record("db1", 7, 3, 1.7e9, 1.0).encode_block(512)
    bad = bytearray(Record("db2", 7, 3, 1.7e9, 1.0).encode_block(512))
    bad[60] ^= 0xFF
    vol.write_bytes(good + bytes(SLOT_SIZE - 512) + bytes(bad))

    code, out, _ = run(capsys, "volume", "show", str(vol), "--slot", "0")
    assert code == 0
    assert "pair db1" in out
    code, out, _ = run(capsys, "volume", "show", str(vol))
    assert code == 1
    assert "slot 1: INVALID checksum_mismatch" in out
    code, out, _ = run(capsys, "volume", "show", str(vol), "--slot", "0", "--id", "db9")
    assert code == 1
    assert "identity_mismatch" in out
    code, out, _ = run(capsys, "volume", "show", str(vol), "--slot", "5")
    assert code == 1
    assert "truncated" in out


def test_volume_show_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "volume", "show", str(tmp_path / "nope"))
    assert code == 1
    assert "nope: does not exist" in err


def test_status_without_daemon_says_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "status", "--url", "http://127.0.0.1:9")
    assert code == 1
    assert "is `hbmon run` or `hbmon demo` running" in err


def test_volume_show_on_a_hung_volume_gives_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "hung.vol"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer appears: a hung device
    try:
        code, _, err = run(capsys, "volume", "show", str(fifo), "--timeout", "0.3")
        assert code == 1
        assert "no answer within 0.3 s" in err
    finally:
        fd = os.open(fifo, os.O_WRONLY)  # lets the abandoned thread finish
        os.close(fd)
