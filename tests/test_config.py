"""Site configuration: a full example, defaults, path resolution and every kind of error."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from hbmon.config import (
    DEFAULT_LISTEN,
    BeatConfig,
    NetworkConfig,
    Timing,
    WatchConfig,
    WatchGlobConfig,
    load_config,
    parse_config,
    parse_duration,
    parse_hostport,
)
from hbmon.errors import ConfigError

FULL = """\
site = "osaka"
state_dir = "/var/lib/hbmon"
listen = "127.0.0.1:9799"
interval = "1s"
miss_threshold = 3
recover_beats = 2
read_timeout = "2s"
grace = "10s"
method = "both"
io_threads = 16
log_changes = 0
reopen = "30s"

[network]
listen = "0.0.0.0:9798"
key_file = "/etc/hbmon/hb.key"

[webhook]
token_file = "/etc/hbmon/webhook.token"

[[beat]]
id = "db1"
volume = "/dev/disk/by-id/wwn-0x600a-part1"
slot = 0
interval = "500ms"
peers = ["192.0.2.20:9798", "192.0.2.21:9798"]

[[watch]]
id = "db1"
volume = "/dev/disk/by-id/wwn-0x600b-part1"
slot = 0
method = "both"
interval = "2s"
miss_threshold = 4
recover_beats = 3
read_timeout = "1.5s"
grace = "1m"
failover = ["/usr/local/sbin/promote-db1", "--now"]

[[watch]]
id = "db2"
volume = "/dev/disk/by-id/wwn-0x600b-part1"
slot = 1

[[watch_glob]]
pattern = "/srv/hb/*.vol"
slot = 2
method = "volume"
interval = "250ms"
miss_threshold = 5
recover_beats = 1
read_timeout = "100ms"
grace = "3s"
failover = ["/usr/local/sbin/promote", "--by-glob"]
rescan = "30s"
"""

MINIMAL = 'site = "osaka"\n'
WATCH = '[[watch]]\nid = "db1"\nvolume = "/srv/hb/db1.vol"\n'


def write(tmp_path: Path, text: str, name: str = "site.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def config_error(tmp_path: Path, text: str, key: str) -> ConfigError:
    """Load ``text`` and check that the error names this file and ``key``."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.source == str(path)
    assert err.key == key
    assert str(err).startswith(f"{path}: {key}: ")
    assert err.exit_code == 2
    return err


# -- valid configurations ------------------------------------------------------------------


def test_full_example(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    assert config.site == "osaka"
    assert config.source == str(tmp_path / "site.toml")
    assert config.state_dir == Path("/var/lib/hbmon")
    assert config.listen == "127.0.0.1:9799"
    assert config.method == "both"
    assert config.io_threads == 16
    assert config.log_changes == 0
    assert config.reopen == 30.0
    top = Timing(interval=1.0, miss_threshold=3, recover_beats=2, read_timeout=2.0, grace=10.0)
    assert config.timing == top
    assert config.network == NetworkConfig("0.0.0.0:9798", Path("/etc/hbmon/hb.key"))
    assert config.webhook_token_file == Path("/etc/hbmon/webhook.token")
    assert config.beats == (
        BeatConfig(
            id="db1",
            volume=Path("/dev/disk/by-id/wwn-0x600a-part1"),
            slot=0,
            interval=0.5,
            peers=("192.0.2.20:9798", "192.0.2.21:9798"),
        ),
    )
    assert config.watches == (
        WatchConfig(
            id="db1",
            volume=Path("/dev/disk/by-id/wwn-0x600b-part1"),
            slot=0,
            method="both",
            timing=Timing(
                interval=2.0, miss_threshold=4, recover_beats=3, read_timeout=1.5, grace=60.0
            ),
            failover=("/usr/local/sbin/promote-db1", "--now"),
        ),
        # Everything not given is inherited from the top level.
        WatchConfig(
            id="db2",
            volume=Path("/dev/disk/by-id/wwn-0x600b-part1"),
            slot=1,
            method="both",
            timing=top,
            failover=(),
        ),
    )
    assert config.watch_globs == (
        WatchGlobConfig(
            pattern="/srv/hb/*.vol",
            slot=2,
            method="volume",
            timing=Timing(
                interval=0.25, miss_threshold=5, recover_beats=1, read_timeout=0.1, grace=3.0
            ),
            failover=("/usr/local/sbin/promote", "--by-glob"),
            rescan=30.0,
        ),
    )


def test_design_example_parses(tmp_path: Path) -> None:
    """The configuration example of DESIGN.md, verbatim apart from the volume names."""
    text = """\
        site = "osaka"
        state_dir = "/var/lib/hbmon"
        listen = "127.0.0.1:9799"
        interval = "1s"
        miss_threshold = 3
        method = "both"

        [network]
        listen = "0.0.0.0:9798"
        key_file = "/etc/hbmon/hb.key"

        [webhook]
        token_file = "/etc/hbmon/webhook.token"

        [[beat]]
        id = "db1"
        volume = "/dev/disk/by-id/wwn-0x600a-part1"
        slot = 0
        peers = ["192.0.2.20:9798"]

        [[watch]]
        id = "db1"
        volume = "/dev/disk/by-id/wwn-0x600b-part1"
        slot = 0
        method = "both"
        failover = ["/usr/local/sbin/promote-db1"]

        [[watch_glob]]
        pattern = "/srv/hb/*.vol"
    """
    config = load_config(write(tmp_path, text))
    assert [w.id for w in config.watches] == ["db1"]
    assert config.beats[0].interval == 1.0
    assert config.watch_globs[0].rescan == 10.0
    assert config.watch_globs[0].timing == Timing()


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.state_dir == Path("/var/lib/hbmon")
    assert config.listen == DEFAULT_LISTEN
    assert config.timing == Timing()
    assert config.timing.startup_grace == 4.0  # (miss_threshold + 1) * interval
    assert config.method == "both"
    assert config.io_threads == 8
    assert config.log_changes == 50
    assert config.reopen == 60.0
    assert config.network == NetworkConfig()
    assert config.webhook_token_file is None
    assert config.beats == config.watches == config.watch_globs == ()


def test_watch_defaults_follow_the_top_level(tmp_path: Path) -> None:
    text = MINIMAL + 'interval = "5s"\nmethod = "volume"\nmiss_threshold = 6\n' + WATCH
    (watch,) = load_config(write(tmp_path, text)).watches
    assert watch.slot == 0
    assert watch.method == "volume"
    assert watch.timing == Timing(interval=5.0, miss_threshold=6)
    assert watch.timing.startup_grace == 35.0


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = """\
        site = "osaka"
        state_dir = "state"
        [network]
        key_file = "keys/hb.key"
        [webhook]
        token_file = "webhook.token"
        [[beat]]
        id = "db1"
        volume = "vols/pvol.img"
        [[watch]]
        id = "db1"
        volume = "../svol.img"
        [[watch]]
        id = "db2"
        volume = "/abs/svol.img"
        [[watch_glob]]
        pattern = "hb/*.vol"
    """
    path = write(tmp_path, text, "etc/site.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    base = (tmp_path / "etc").resolve()
    config = load_config(Path("..") / "etc" / "site.toml")
    assert config.state_dir == base / "state"
    assert config.network.key_file == base / "keys/hb.key"
    assert config.webhook_token_file == base / "webhook.token"
    assert config.beats[0].volume == base / "vols/pvol.img"
    assert config.watches[0].volume == base / "../svol.img"
    assert config.watches[1].volume == Path("/abs/svol.img")
    assert config.watch_globs[0].pattern == str(base / "hb/*.vol")
    assert load_config(path).watches == config.watches


def test_parse_config_without_base_uses_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = {"site": "x", "watch": [{"id": "a", "volume": "a.vol", "method": "volume"}]}
    config = parse_config(data, "mem")
    assert config.watches[0].volume == tmp_path / "a.vol"
    assert config.source == "mem"


def test_parse_config_with_base() -> None:
    data = {"site": "x", "watch": [{"id": "a", "volume": "a.vol", "method": "volume"}]}
    config = parse_config(data, "mem", Path("/etc/hbmon"))
    assert config.watches[0].volume == Path("/etc/hbmon/a.vol")


# -- errors name the file and the key ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (MINIMAL + "intervall = 1\n", "intervall"),
        (MINIMAL + WATCH + 'methd = "both"\n', "watch[0].methd"),
        (MINIMAL + WATCH + WATCH.replace("db1", "db2") + "slots = 1\n", "watch[1].slots"),
        (MINIMAL + '[[beat]]\nid = "a"\nvolume = "/v"\npeer = []\n', "beat[0].peer"),
        (MINIMAL + '[[watch_glob]]\npattern = "/v/*"\nid = "x"\n', "watch_glob[0].id"),
        (MINIMAL + '[network]\nlisen = ":1"\n', "network.lisen"),
        (MINIMAL + '[webhook]\ntoken = "x"\n', "webhook.token"),
    ],
    ids=["top", "watch", "second-watch", "beat", "watch_glob", "network", "webhook"],
)
def test_unknown_key(tmp_path: Path, text: str, key: str) -> None:
    err = config_error(tmp_path, text, key)
    assert "unknown key" in err.problem


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('listen = ":9799"\n', "site"),
        (MINIMAL + '[[watch]]\nvolume = "/v"\n', "watch[0].id"),
        (MINIMAL + '[[watch]]\nid = "db1"\n', "watch[0].volume"),
        (MINIMAL + WATCH + '[[watch]]\nid = "db2"\n', "watch[1].volume"),
        (MINIMAL + '[[beat]]\nvolume = "/v"\n', "beat[0].id"),
        (MINIMAL + '[[beat]]\nid = "db1"\n', "beat[0].volume"),
        (MINIMAL + "[[watch_glob]]\nslot = 1\n", "watch_glob[0].pattern"),
    ],
    ids=["site", "watch.id", "watch.volume", "second-watch", "beat.id", "beat.volume", "pattern"],
)
def test_missing_required_key(tmp_path: Path, text: str, key: str) -> None:
    assert config_error(tmp_path, text, key).problem.startswith("is required")


@pytest.mark.parametrize(
    "value",
    [
        '"1 sec"',
        '"-1s"',
        '"0s"',
        "0",
        "-2",
        '"fast"',
        '"1.s"',
        '".5s"',
        '"1d"',
        '"s"',
        '""',
        "true",
        "[1]",
    ],
)
def test_bad_duration_at_top_level(tmp_path: Path, value: str) -> None:
    config_error(tmp_path, f"{MINIMAL}interval = {value}\n", "interval")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (MINIMAL + WATCH + 'interval = "1x"\n', "watch[0].interval"),
        (MINIMAL + WATCH + 'read_timeout = "0ms"\n', "watch[0].read_timeout"),
        (MINIMAL + WATCH + 'grace = "soon"\n', "watch[0].grace"),
        (MINIMAL + 'read_timeout = "-1s"\n', "read_timeout"),
        (MINIMAL + 'grace = "1 minute"\n', "grace"),
        (MINIMAL + '[[beat]]\nid = "a"\nvolume = "/v"\ninterval = "1w"\n', "beat[0].interval"),
        (MINIMAL + '[[watch_glob]]\npattern = "/v/*"\nrescan = "0s"\n', "watch_glob[0].rescan"),
        (MINIMAL + '[[watch_glob]]\npattern = "/v/*"\ninterval = 0\n', "watch_glob[0].interval"),
    ],
)
def test_bad_duration_in_tables(tmp_path: Path, text: str, key: str) -> None:
    config_error(tmp_path, text, key)


@pytest.mark.parametrize("value", ["-1", '"0"', "true", "1.0", str(1 << 20)])
def test_bad_slot(tmp_path: Path, value: str) -> None:
    err = config_error(tmp_path, f"{MINIMAL}{WATCH}slot = {value}\n", "watch[0].slot")
    assert "slot number" in err.problem


def test_bad_slot_in_beat_and_glob(tmp_path: Path) -> None:
    beat = '[[beat]]\nid = "a"\nvolume = "/v"\nslot = -1\n'
    config_error(tmp_path, MINIMAL + beat, "beat[0].slot")
    glob = '[[watch_glob]]\npattern = "/v"\nslot = "1"\n'
    config_error(tmp_path, MINIMAL + glob, "watch_glob[0].slot")


@pytest.mark.parametrize("value", ['"disk"', '"Both"', '""', "1", '["volume"]'])
def test_bad_method(tmp_path: Path, value: str) -> None:
    err = config_error(tmp_path, f"{MINIMAL}method = {value}\n", "method")
    assert "volume, network, both" in err.problem
    config_error(tmp_path, f"{MINIMAL}{WATCH}method = {value}\n", "watch[0].method")


@pytest.mark.parametrize("value", ["1", "0", "-3", '"3"', "3.0", "true"])
def test_bad_miss_threshold(tmp_path: Path, value: str) -> None:
    config_error(tmp_path, f"{MINIMAL}miss_threshold = {value}\n", "miss_threshold")
    text = f"{MINIMAL}{WATCH}miss_threshold = {value}\n"
    config_error(tmp_path, text, "watch[0].miss_threshold")


def test_miss_threshold_one_says_why(tmp_path: Path) -> None:
    err = config_error(tmp_path, MINIMAL + "miss_threshold = 1\n", "miss_threshold")
    assert "at least 2" in err.problem


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (MINIMAL + "recover_beats = 0\n", "recover_beats"),
        (MINIMAL + "io_threads = 0\n", "io_threads"),
        (MINIMAL + "log_changes = -1\n", "log_changes"),
        (MINIMAL + 'reopen = "500ms"\n', "reopen"),
        (MINIMAL + 'listen = "localhost"\n', "listen"),
        (MINIMAL + 'listen = "localhost:http"\n', "listen"),
        (MINIMAL + 'state_dir = ""\n', "state_dir"),
        ('site = ""\n', "site"),
        ("site = 3\n", "site"),
        (MINIMAL + '[network]\nlisten = "0.0.0.0:70000"\n', "network.listen"),
        (MINIMAL + "[network]\nkey_file = 1\n", "network.key_file"),
        (MINIMAL + '[[beat]]\nid = "a"\nvolume = "/v"\npeers = "h:1"\n', "beat[0].peers"),
        (MINIMAL + '[[beat]]\nid = "a"\nvolume = "/v"\npeers = ["h"]\n', "beat[0].peers"),
        (MINIMAL + WATCH + 'failover = "/sbin/promote"\n', "watch[0].failover"),
        (MINIMAL + WATCH + "failover = []\n", "watch[0].failover"),
        (MINIMAL + WATCH + 'failover = ["/sbin/promote", 1]\n', "watch[0].failover"),
        (MINIMAL + '[[watch]]\nid = "' + "x" * 64 + '"\nvolume = "/v"\n', "watch[0].id"),
        (MINIMAL + '[[watch]]\nid = ""\nvolume = "/v"\n', "watch[0].id"),
        (MINIMAL + '[[watch]]\nid = "db1"\nvolume = ""\n', "watch[0].volume"),
        (MINIMAL + 'network = "0.0.0.0:9798"\n', "network"),
        (MINIMAL + '[watch]\nid = "db1"\nvolume = "/v"\n', "watch"),
        (MINIMAL + "watch = [1]\n", "watch[0]"),
    ],
)
def test_other_bad_values(tmp_path: Path, text: str, key: str) -> None:
    config_error(tmp_path, text, key)


def test_duplicate_watch_ids(tmp_path: Path) -> None:
    text = MINIMAL + WATCH + WATCH.replace("db1.vol", "other.vol")
    err = config_error(tmp_path, text, "watch[1].id")
    assert "'db1' repeated" in err.problem


def test_duplicate_beat_ids(tmp_path: Path) -> None:
    beat = '[[beat]]\nid = "db1"\nvolume = "/v{}"\n'
    config_error(tmp_path, MINIMAL + beat.format(1) + beat.format(2), "beat[1].id")


def test_duplicate_volume_and_slot(tmp_path: Path) -> None:
    text = MINIMAL + WATCH + WATCH.replace('"db1"', '"db2"')
    err = config_error(tmp_path, text, "watch[1].slot")
    assert "/srv/hb/db1.vol slot 0 is already used by watch 'db1'" in err.problem


def test_duplicate_volume_and_slot_in_two_spellings(tmp_path: Path) -> None:
    text = """\
        site = "osaka"
        [[watch]]
        id = "db1"
        volume = "hb/a.vol"
        slot = 3
        [[watch]]
        id = "db2"
        volume = "./hb/a.vol"
        slot = 3
    """
    config_error(tmp_path, text, "watch[1].slot")


def test_same_volume_other_slot_and_same_slot_other_volume_are_fine(tmp_path: Path) -> None:
    text = """\
        site = "osaka"
        method = "volume"
        [[watch]]
        id = "db1"
        volume = "/v/a"
        [[watch]]
        id = "db2"
        volume = "/v/a"
        slot = 1
        [[watch]]
        id = "db3"
        volume = "/v/b"
        [[beat]]
        id = "db1"
        volume = "/v/a"
    """
    config = load_config(write(tmp_path, text))
    assert [(w.id, str(w.volume), w.slot) for w in config.watches] == [
        ("db1", "/v/a", 0),
        ("db2", "/v/a", 1),
        ("db3", "/v/b", 0),
    ]


@pytest.mark.parametrize(
    "text",
    ['site = "osaka\n', "site = osaka\n", 'site = "a"\nsite = "b"\n', "[[watch]\n", "= 1\n"],
    ids=["unterminated", "bare-word", "duplicate-key", "bad-header", "no-key"],
)
def test_toml_syntax_error(tmp_path: Path, text: str) -> None:
    config_error(tmp_path, text, "(syntax)")


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_bytes(b'site = "\xff\xfe"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.source, info.value.key) == (str(path), "(syntax)")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.source, info.value.key) == (str(path), "(file)")
    assert "cannot be read" in info.value.problem
    assert "No such file" in info.value.problem


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file, whoever we run as (root ignores file modes).
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert (info.value.source, info.value.key) == (str(tmp_path), "(file)")
    assert "cannot be read" in info.value.problem


def test_load_config_accepts_str(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + WATCH + 'method = "volume"\n')
    assert load_config(str(path)) == load_config(path)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (MINIMAL + WATCH, "watch[0]"),
        (MINIMAL + WATCH + 'method = "network"\n', "watch[0]"),
        (MINIMAL + 'method = "volume"\n' + WATCH + 'method = "both"\n', "watch[0]"),
        (MINIMAL + '[[watch_glob]]\npattern = "/srv/hb/*.vol"\n', "watch_glob[0]"),
        (MINIMAL + '[[beat]]\nid = "a"\nvolume = "/v"\npeers = ["192.0.2.1:9798"]\n', "beat[0]"),
    ],
    ids=["watch-default-both", "watch-network", "watch-both", "glob-default-both", "beat-peers"],
)
def test_network_path_needs_a_key_file(tmp_path: Path, text: str, where: str) -> None:
    err = config_error(tmp_path, text, "network.key_file")
    assert err.problem.startswith("is required")
    assert where in err.problem
    # with a key file the same configuration is valid
    load_config(write(tmp_path, text + '[network]\nkey_file = "hb.key"\n', "with-key.toml"))


def test_volume_only_needs_no_key_file(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + 'method = "volume"\n'
        + WATCH
        + '[[watch_glob]]\npattern = "/srv/hb/*.vol"\n'
        + '[[beat]]\nid = "db9"\nvolume = "/srv/hb/pvol"\n'
    )
    config = load_config(write(tmp_path, text))
    assert config.network.key_file is None
    assert config.watches[0].method == config.watch_globs[0].method == "volume"


def test_nan_and_inf_durations_are_rejected(tmp_path: Path) -> None:
    """BUG: TOML has nan and inf, and parse_duration lets both through.

    ``nan <= 0`` is False, so ``interval = nan`` is accepted; PathRow.missed() then calls
    math.floor(nan) and raises ValueError on every evaluation.  ``interval = inf`` is
    accepted too (and "9" * 400 + "s" becomes inf via float()).
    """
    config_error(tmp_path, MINIMAL + "interval = nan\n", "interval")
    config_error(tmp_path, MINIMAL + WATCH + "grace = inf\n", "watch[0].grace")


# -- parse_duration / parse_hostport -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("5", 5.0),
        (" 2 s ", 2.0),
        ("1.5ms", 0.0015),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["0", "0s", 0, 0.0, -1, "-1s", "", "s", "1d", "1e3", "1.", ".5", "1 s s", "one", True, False],
)
def test_parse_duration_rejects(text: str | float) -> None:
    with pytest.raises(ValueError, match=r"duration|greater than zero"):
        parse_duration(text)


@pytest.mark.parametrize("value", [math.nan, math.inf, "9" * 400 + "s"], ids=["nan", "inf", "huge"])
def test_parse_duration_rejects_non_finite(value: str | float) -> None:
    """BUG: see test_nan_and_inf_durations_are_rejected."""
    with pytest.raises(ValueError, match=r"duration|greater than zero|finite"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9799", ("127.0.0.1", 9799)),
        ("0.0.0.0:9798", ("0.0.0.0", 9798)),
        ("hbmon.example.net:80", ("hbmon.example.net", 80)),
        ("[::1]:9799", ("::1", 9799)),
        ("[2001:db8::20]:9798", ("2001:db8::20", 9798)),
        (":9799", ("127.0.0.1", 9799)),
        ("[]:9799", ("127.0.0.1", 9799)),
        ("localhost:0", ("localhost", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


def test_parse_hostport_default_host() -> None:
    assert parse_hostport(":9798", default_host="0.0.0.0") == ("0.0.0.0", 9798)
    assert parse_hostport("h:1", default_host="0.0.0.0") == ("h", 1)


@pytest.mark.parametrize(
    "text", ["", "9799", "localhost", "localhost:", "localhost:http", "h:65536", "h:-1", "h: 80"]
)
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_hostport(text)


@pytest.mark.parametrize("text", ["::1", "fe80::1", "::ffff:1"])
def test_parse_hostport_rejects_a_bare_ipv6_address(text: str) -> None:
    """BUG: an IPv6 address without brackets and port is split at its last colon.

    parse_hostport("::1") returns (":", 1) and "fe80::1" gives ("fe80:", 1): a host that
    is not an address and a port the operator never wrote, instead of an error saying
    to write [v6]:PORT.
    """
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_hostport(text)


def test_startup_grace() -> None:
    assert Timing().startup_grace == 4.0
    assert Timing(interval=2.0, miss_threshold=5).startup_grace == 12.0
    assert Timing(grace=30.0).startup_grace == 30.0


def test_ipv6_peers_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"beat\[0\]\.peers: .*IPv4 only"):
        parse_config(
            {
                "site": "a",
                "network": {"key_file": "k"},
                "beat": [{"id": "db1", "volume": "p", "peers": ["[2001:db8::20]:9798"]}],
            },
            "site.toml",
            tmp_path,
        )


def test_durations_below_one_millisecond_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1ms"):
        parse_duration("0.5ms")
