"""``[arbiter]``: parsing, the timing rule that keeps a demote ahead of the lease, warnings."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hbmon.arbiter.lease import MARGIN, LeaseTiming
from hbmon.config import load_config, warnings
from hbmon.errors import ConfigError

#: The Arbiter example of DESIGN.md, verbatim apart from the volume names.
DESIGN = """\
    site = "osaka"
    state_dir = "/var/lib/hbmon"
    method = "volume"

    [arbiter]
    endpoints = ["https://192.0.2.10:2379", "https://198.51.100.10:2379", "https://203.0.113.10:2379"]
    prefix = "/hbmon"               # keys under PREFIX/...
    lease_ttl = "15s"
    request_timeout = "2s"
    demote_budget = "5s"            # how long a demote command may take
    ca_file = "/etc/hbmon/etcd-ca.crt"              # optional TLS and client certificate
    cert_file = "/etc/hbmon/etcd.crt"
    key_file = "/etc/hbmon/etcd.key"

    [[beat]]
    id = "db1"
    volume = "/srv/hb/pvol"
    demote = ["/usr/local/sbin/demote-db1"]   # this site can no longer prove it owns db1: stop it

    [[watch]]
    id = "db1"
    volume = "/srv/hb/svol"
    failover = ["/usr/local/sbin/promote-db1"]  # gets HBMON_FENCING_TOKEN
    demote = ["/usr/local/sbin/demote-db1"]   # after a failover here, when it is lost again
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(textwrap.dedent(text))
    return path


def arbiter(tmp_path: Path, body: str) -> Path:
    return write(
        tmp_path,
        'site = "osaka"\nstate_dir = "/tmp/x"\n[arbiter]\n' + textwrap.dedent(body),
    )


def fails(path: Path, key: str, *words: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.key == key, str(err)
    for word in words:
        assert word in str(err), str(err)
    assert err.exit_code == 2
    return err


def test_the_design_example_parses(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, DESIGN))
    assert config.arbiter is not None
    assert config.arbiter.endpoints == (
        "https://192.0.2.10:2379",
        "https://198.51.100.10:2379",
        "https://203.0.113.10:2379",
    )
    assert config.arbiter.prefix == "/hbmon"
    assert config.arbiter.timing == LeaseTiming(15.0, 2.0, 5.0)
    assert config.arbiter.ca_file == Path("/etc/hbmon/etcd-ca.crt")
    assert config.beats[0].demote == ("/usr/local/sbin/demote-db1",)
    assert config.watches[0].failover_without_arbiter is False
    assert warnings(config) == []


def test_defaults_and_the_shipped_timing_is_exactly_safe(tmp_path: Path) -> None:
    config = load_config(arbiter(tmp_path, 'endpoints = ["http://127.0.0.1:2379/"]\n'))
    assert config.arbiter is not None
    timing = config.arbiter.timing
    assert (timing.lease_ttl, timing.request_timeout, timing.demote_budget) == (15, 2, 5)
    assert config.arbiter.endpoints == ("http://127.0.0.1:2379",)  # the slash is dropped
    assert timing.needed == 15 / 3 + 2 * 2 + 5 + MARGIN == 15
    assert timing.problem() is None
    assert timing.takeover_wait == 17


@pytest.mark.parametrize(
    ("ttl", "timeout", "budget"),
    [("15s", "2s", "5.5s"), ("6s", "1.5s", "2s"), ("10s", "2s", "5s"), ("1h", "20m", "20m")],
)
def test_a_timing_that_cannot_be_safe_is_refused_naming_the_keys(
    tmp_path: Path, ttl: str, timeout: str, budget: str
) -> None:
    body = f"""\
        endpoints = ["http://127.0.0.1:2379"]
        lease_ttl = "{ttl}"
        request_timeout = "{timeout}"
        demote_budget = "{budget}"
    """
    err = fails(
        arbiter(tmp_path, body),
        "arbiter.lease_ttl, request_timeout, demote_budget",
        "exceeds lease_ttl",
        "raise lease_ttl or lower request_timeout or demote_budget",
    )
    assert "2 x request_timeout" in str(err)


def test_a_lease_shorter_than_etcds_minimum_is_refused(tmp_path: Path) -> None:
    body = 'endpoints = ["http://127.0.0.1:2379"]\nlease_ttl = "1.5s"\n'
    fails(arbiter(tmp_path, body), "arbiter.lease_ttl", "at least 2 s")


def test_the_smallest_safe_timing_passes(tmp_path: Path) -> None:
    body = """\
        endpoints = ["http://127.0.0.1:2379"]
        lease_ttl = "3s"
        request_timeout = "0.25s"
        demote_budget = "0.5s"
    """
    config = load_config(arbiter(tmp_path, body))
    assert config.arbiter is not None
    assert config.arbiter.timing.needed == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("line", "key", "word"),
    [
        ('endpoints = []', "arbiter.endpoints", "list of etcd client URLs"),
        ('endpoints = "http://a:2379"', "arbiter.endpoints", "list of etcd client URLs"),
        ('endpoints = ["a:2379"]', "arbiter.endpoints", "not an etcd client URL"),
        ('endpoints = ["ftp://a:2379"]', "arbiter.endpoints", "not an etcd client URL"),
        ('endpoints = ["http://a"]', "arbiter.endpoints", "not an etcd client URL"),
        ('endpoints = ["http://a:2379/v3"]', "arbiter.endpoints", "without a path"),
        ('endpoints = ["http://a:1", "http://a:1"]', "arbiter.endpoints", "listed twice"),
    ],
)
def test_bad_endpoints(tmp_path: Path, line: str, key: str, word: str) -> None:
    fails(arbiter(tmp_path, line + "\n"), key, word)


@pytest.mark.parametrize(
    ("lines", "key", "word"),
    [
        ('prefix = "hbmon"', "arbiter.prefix", "not a key prefix"),
        ('prefix = "/"', "arbiter.prefix", "not a key prefix"),
        ('cert_file = "/c.crt"', "arbiter.cert_file", "go together"),
        ('user = "hbmon"', "arbiter.user", "go together"),
        ('ca_file = "/ca.crt"', "arbiter.ca_file", "https://"),
        ('lease = "15s"', "arbiter.lease", "unknown key"),
    ],
)
def test_bad_arbiter_keys(tmp_path: Path, lines: str, key: str, word: str) -> None:
    fails(arbiter(tmp_path, 'endpoints = ["http://127.0.0.1:2379"]\n' + lines + "\n"), key, word)


def test_endpoints_are_required(tmp_path: Path) -> None:
    fails(arbiter(tmp_path, 'prefix = "/x"\n'), "arbiter.endpoints", "is required")


NO_ARBITER = """\
    site = "tokyo"
    method = "volume"
    {top}
    [[watch]]
    id = "db1"
    volume = "/srv/hb/svol"
    failover = ["/usr/local/sbin/promote-db1"]
    {watch}
"""


def test_config_check_warns_of_a_failover_without_an_arbiter(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, NO_ARBITER.format(top="", watch="")))
    (warning,) = warnings(config)
    assert "no_arbiter" in warning
    assert "watch[0] ('db1')" in warning
    opted = load_config(
        write(tmp_path, NO_ARBITER.format(top="failover_without_arbiter = true", watch=""))
    )
    assert opted.watches[0].failover_without_arbiter  # the top level is the default
    (risk,) = warnings(opted)
    assert "two primaries" in risk
    per_watch = load_config(
        write(tmp_path, NO_ARBITER.format(top="", watch="failover_without_arbiter = true"))
    )
    assert per_watch.watches[0].failover_without_arbiter
    assert not per_watch.failover_without_arbiter


def test_config_check_warns_of_a_beat_without_demote(tmp_path: Path) -> None:
    line = '    demote = ["/usr/local/sbin/demote-db1"]   # this site can no longer prove'
    assert line in DESIGN
    text = DESIGN.replace(line, "    # (no demote)")
    (warning,) = warnings(load_config(write(tmp_path, text)))
    assert "beat[0] ('db1'): no demote command" in warning


def test_config_check_warns_of_a_watch_without_demote(tmp_path: Path) -> None:
    text = """\
        site = "tokyo"
        method = "volume"
        [arbiter]
        endpoints = ["http://127.0.0.1:2379"]
        [[watch]]
        id = "db1"
        volume = "/srv/hb/svol"
        failover = ["/usr/local/sbin/promote-db1"]
    """
    config = load_config(write(tmp_path, text))
    assert config.watches[0].demote == ()
    (warning,) = warnings(config)
    assert "watch[0] ('db1'): no demote command" in warning
