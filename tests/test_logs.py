"""Log formats (hbmon/logs.py): text, json, logfmt; journald priority prefixes; every
state change one structured line with ``pair``, ``path``, ``state`` and ``verdict``."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, wait_for

from hbmon.clock import FakeClock
from hbmon.config import Timing, parse_config
from hbmon.errors import ConfigError
from hbmon.logs import formatter, logfmt_value, on_journal, priority, setup
from hbmon.record import Record
from hbmon.status import StatusTable

_PAIR = re.compile(r'([A-Za-z0-9_.]+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, str]:
    """A logfmt line as a dict; fails on anything that is not ``key=value`` pairs."""
    out: dict[str, str] = {}
    pos = 0
    for m in _PAIR.finditer(line):
        assert line[pos : m.start()].strip() == "", f"not logfmt at {pos}: {line!r}"
        key, value = m.group(1), m.group(2)
        if value.startswith('"'):
            value = json.loads(value)  # (the escapes logfmt uses are JSON's)
        out[key] = value
        pos = m.end()
    assert line[pos:].strip() == "", f"not logfmt at {pos}: {line!r}"
    return out


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own with one handler writing to a buffer (formatter set by the test)."""
    buf = io.StringIO()
    log = logging.getLogger("test.logs")
    handler = logging.StreamHandler(buf)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield log, buf
    finally:
        log.removeHandler(handler)
        log.propagate = True


def _use(log: logging.Logger, fmt: str, **kw: Any) -> None:
    log.handlers[0].setFormatter(formatter(fmt, **kw))


# -- the formats -------------------------------------------------------------------------


def test_json_lines_parse_and_carry_the_fields(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, buf = logger
    _use(log, "json", static={"site": "osaka"})
    log.warning("pair %s: %s", "db1", 'odd "text"\nsecond line', extra={"pair": "db1", "n": 3})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2  # a traceback stays inside its one line
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "warning"
    assert first["logger"] == "test.logs"
    assert first["message"] == 'pair db1: odd "text"\nsecond line'
    assert (first["site"], first["pair"], first["n"]) == ("osaka", "db1", 3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert second["level"] == "error"
    assert "ValueError: boom" in second["exception"]


def test_logfmt_lines_parse_and_quote_what_needs_it(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, buf = logger
    _use(log, "logfmt")
    log.info(
        "pair db1 volume /v/db1: alive -> late",
        extra={"pair": "db1", "detail": 'a "b"=c\\d', "empty": "", "none": None, "ok": True},
    )
    (line,) = buf.getvalue().splitlines()
    fields = parse_logfmt(line)
    assert fields["level"] == "info"
    assert fields["msg"] == "pair db1 volume /v/db1: alive -> late"
    assert fields["pair"] == "db1"
    assert fields["detail"] == 'a "b"=c\\d'
    assert (fields["empty"], fields["none"], fields["ok"]) == ("", "", "true")
    assert " pair=db1 " in line  # bare when it can be
    assert logfmt_value("two\nlines") == '"two\\nlines"'


def test_journal_prefixes_carry_the_priority(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, buf = logger
    _use(log, "text", journal=True)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    try:
        raise RuntimeError("deep")
    except RuntimeError:
        log.exception("x")
    lines = buf.getvalue().splitlines()
    assert lines[:5] == [
        "<7>DEBUG test.logs: d",
        "<6>INFO test.logs: i",
        "<4>WARNING test.logs: w",
        "<3>ERROR test.logs: e",
        "<2>CRITICAL test.logs: c",
    ]
    # every line of a traceback keeps its priority (journald reads line by line)
    assert all(line.startswith("<3>") for line in lines[5:]), lines[5:]
    assert lines[-1] == "<3>RuntimeError: deep"
    assert [priority(n) for n in (5, 15, 25, 35, 45, 55)] == [7, 7, 6, 4, 3, 2]


def test_plain_text_has_the_time_and_no_prefix(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, buf = logger
    _use(log, "text")
    log.info("hello")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO test.logs: hello\n", buf.getvalue()
    )


def test_the_journal_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    """JOURNAL_STREAM must name the very file: a child whose stderr was redirected
    inherits the variable but is not on the journal."""
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert on_journal(a, env)
        assert not on_journal(b, env)
        assert not on_journal(a, {})
        assert not on_journal(a, {"JOURNAL_STREAM": "garbage"})
        assert not on_journal(io.StringIO(), env)  # (no file descriptor)


def test_setup_replaces_its_own_handler_and_leaves_others_alone() -> None:
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        assert setup("json", "info") is None  # (pytest's handlers are there: like basicConfig)
        first = setup("json", "debug", stream=io.StringIO(), force=True)
        second = setup("logfmt", "info", stream=io.StringIO(), force=True)
        assert first is not None
        assert second is not None
        assert first not in root.handlers
        assert second in root.handlers
    finally:
        for handler in list(root.handlers):
            if getattr(handler, "hbmon", False):
                root.removeHandler(handler)
        root.setLevel(saved[1])
    assert root.handlers == saved[0]


def test_log_format_is_a_config_key() -> None:
    def parse(extra: str) -> Any:
        return parse_config(tomllib.loads('site = "s"\n' + extra), "site.toml")

    assert parse("").log_format == "text"
    assert parse('log_format = "json"\n').log_format == "json"
    with pytest.raises(ConfigError) as err:
        parse('log_format = "xml"\n')
    assert err.value.key == "log_format"
    assert "text, json, logfmt" in str(err.value)


# -- state changes as structured lines ---------------------------------------------------


def test_every_state_change_is_one_line_with_pair_path_state_verdict(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    """The status table's change log, in JSON: a row's change names the pair, the path,
    the new and old state and the verdict they give; the verdict's change follows as
    its own line with the pair's paths and states."""
    log, buf = logger
    _use(log, "json")
    clock = FakeClock()
    table = StatusTable(clock, site="s")
    table.changes.logger = log
    table.add_pair("db1", "volume", Timing(interval=1.0, miss_threshold=3), volume="/v/db1")
    row = table.row("db1", "volume")
    assert row is not None
    for serial in (1, 2):
        row.observe_record(Record("db1", 7, serial, clock.wall(), 1.0), clock.mono, clock.wall())
        clock.advance(0.001)
    table.touch(row, clock.monotonic())
    clock.advance(10.0)
    table.run_due(clock.monotonic())
    docs = [json.loads(line) for line in buf.getvalue().splitlines()]
    changes = [(d["event"], d["pair"], d["path"], d["state"], d["verdict"]) for d in docs]
    assert changes == [
        ("verdict", "db1", "volume", "awaiting", "awaiting"),  # (added)
        ("state", "db1", "volume", "alive", "alive"),
        ("verdict", "db1", "volume", "alive", "alive"),
        ("state", "db1", "volume", "stale", "host_down"),
        ("verdict", "db1", "volume", "stale", "host_down"),
    ], docs
    stale = docs[3]
    assert (stale["previous_state"], stale["volume"]) == ("alive", "/v/db1")
    assert stale["message"] == "pair db1 volume /v/db1: alive -> stale"
    assert docs[4]["previous_verdict"] == "alive"


# -- the daemon -------------------------------------------------------------------------


def _daemon(
    tmp_path: Path, name: str, head: str, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    """``hbmon [ARGS] run``: one site beating into a file volume and watching it (so its
    pair goes awaiting -> alive); returns the process and its stderr file."""
    vol = tmp_path / f"{name}.vol"
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'site = "{name}"\nstate_dir = "{tmp_path / name}"\ninterval = "100ms"\n'
        f'method = "volume"\n{head}'
        f'[[beat]]\nid = "db1"\nvolume = "{vol}"\n[[watch]]\nid = "db1"\nvolume = "{vol}"\n'
    )
    err_path = tmp_path / f"{name}.stderr"
    listen = f"127.0.0.1:{free_port()}"
    err = err_path.open("wb")
    full_env = {**os.environ, **(env or {})}
    if env is None:
        full_env.pop("JOURNAL_STREAM", None)
    if "JOURNAL_STREAM" in full_env and full_env["JOURNAL_STREAM"] == "SELF":
        st = os.fstat(err.fileno())
        full_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hbmon.cli", *args, "run", "-c", str(config), "--listen", listen],
        stdin=subprocess.DEVNULL,
        stdout=err,
        stderr=err,
        env=full_env,
    )
    err.close()
    return proc, err_path


def _until_alive(proc: subprocess.Popen[bytes], err_path: Path, marker: str) -> list[str]:
    try:
        wait_for(lambda: marker in err_path.read_text(), 15.0, "the pair alive in the log")
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0, err_path.read_text()
    return err_path.read_text().splitlines()


@pytest.mark.timeout(60)
def test_the_daemon_logs_json_from_its_config_and_logfmt_from_the_command_line(
    tmp_path: Path,
) -> None:
    proc, err = _daemon(tmp_path, "j", 'log_format = "json"\n')
    lines = _until_alive(proc, err, '"verdict": "alive"')
    docs = [json.loads(line) for line in lines]  # every line, start to stop
    assert {d["site"] for d in docs if d["logger"] != "hbmon"} == {"j"}
    verdicts = [d for d in docs if d.get("event") == "verdict" and d["verdict"] == "alive"]
    assert verdicts
    assert (verdicts[0]["pair"], verdicts[0]["path"]) == ("db1", "volume")
    assert any(d["message"].startswith("site j:") for d in docs)

    proc, err = _daemon(tmp_path, "l", 'log_format = "json"\n', "--log-format", "logfmt")
    lines = _until_alive(proc, err, "verdict=alive")
    parsed = [parse_logfmt(line) for line in lines]
    states = [p for p in parsed if p.get("event") == "state"]
    assert states
    assert {"pair", "path", "state", "verdict"} <= set(states[0])
    assert all(p["site"] == "l" for p in parsed if "site" in p)


@pytest.mark.timeout(60)
def test_on_the_journal_text_lines_carry_priority_prefixes(tmp_path: Path) -> None:
    """JOURNAL_STREAM names the daemon's stderr (as systemd sets it): every line starts
    with ``<N>``; the same variable naming another file changes nothing."""
    proc, err = _daemon(tmp_path, "t", "", env={"JOURNAL_STREAM": "SELF"})
    lines = _until_alive(proc, err, "verdict awaiting -> alive")
    assert lines
    assert all(re.match(r"<[2-7]>", line) for line in lines), lines[:5]
    assert any(line.startswith("<6>INFO hbmon.status: pair db1: verdict") for line in lines)
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    proc, err = _daemon(tmp_path, "u", "", env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    lines = _until_alive(proc, err, "verdict awaiting -> alive")
    assert not any(line.startswith("<") for line in lines)


def test_a_fatal_error_on_the_journal_is_an_error(tmp_path: Path) -> None:
    """``hbmon run`` with a configuration that does not validate, under systemd: the one
    line it prints is priority 3, so ``journalctl -p err`` shows why it did not start."""
    bad = tmp_path / "bad.toml"
    bad.write_text('site = "s"\n[[watch]]\nid = "db1"\n')
    err_path = tmp_path / "err"
    with err_path.open("wb") as err:
        st = os.fstat(err.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        done = subprocess.run(
            [sys.executable, "-m", "hbmon.cli", "run", "-c", str(bad)],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            env=env,
            check=False,
        )
    assert done.returncode == 2
    (line,) = err_path.read_text().splitlines()
    assert line.startswith("<3>hbmon: error: ")
    assert "watch[0].volume: is required" in line
