"""hbmon runs as an unprivileged user given only its volumes, its journal and its port.

As root, the test starts ``hbmon run`` through ``setpriv`` as ``nobody:nogroup`` with no
supplementary groups, no capabilities (none inherited, an empty bounding set) and
``no_new_privs`` -- what ``deploy/systemd/hbmon.service`` gives it (``User=hbmon``, an
empty ``CapabilityBoundingSet=``, ``NoNewPrivileges=yes``).  It is given one loop device
(owned by nobody), its state directory and its token file.  It beats and polls that
volume, serves /metrics, writes its journal, and stops cleanly; a second loop device that
it was not given shows ``io_error`` with reason ``permission``; a journal, a token or a
port it was not given stop it at start with a message that names them.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import LoopdevFactory, need, require_root
from helpers import (
    free_port,
    http_get,
    metric_value,
    pwrite_sync,
    record_block,
    stop_process,
    wait_for,
)

pytestmark = [pytest.mark.root]

READY = 20.0
TOKEN = "privileges-test-token-0123456789"
SETPRIV = [
    "setpriv",
    "--reuid=nobody",
    "--regid=nogroup",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
    "--",
]


def as_nobody(*args: str) -> list[str]:
    return [*SETPRIV, sys.executable, "-m", "hbmon.cli", *args]


CLEAN_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    require_root("dropping privileges")
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) missing")
    names = {entry.pw_name for entry in pwd.getpwall()}
    need("nobody" in names, "no user nobody (setpriv --reuid=nobody needs it)")
    need(
        "nogroup" in {entry.gr_name for entry in grp.getgrall()},
        "no group nogroup (setpriv --regid=nogroup needs it)",
    )
    user = pwd.getpwnam("nobody")
    probe = subprocess.run(
        [*SETPRIV, sys.executable, "-c", "import hbmon.cli"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=CLEAN_ENV,
        cwd="/",
    )
    need(
        probe.returncode == 0,
        f"user nobody cannot import hbmon from this checkout ({probe.stderr.strip()[-300:]}); "
        "the checkout and its virtual environment must be world-readable",
    )
    return user


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder nobody can enter (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="hbmon-priv-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def give(path: Path | str, user: pwd.struct_passwd, mode: int) -> None:
    os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)


def write_config(work: Path, mine: str, other: str, state: Path, token: Path) -> Path:
    config = work / "site.toml"
    config.write_text(
        f"""
site = "unprivileged"
state_dir = "{state}"
method = "volume"
interval = "200ms"

[webhook]
token_file = "{token}"

[[beat]]
id = "db1"
volume = "{mine}"

[[watch]]
id = "db1"
volume = "{mine}"
failover = ["/bin/true"]
failover_without_arbiter = true

[[watch]]
id = "db2"
volume = "{other}"
"""
    )
    config.chmod(0o644)
    return config


@contextlib.contextmanager
def unprivileged_site(config: Path, port: int, work: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = work / "site.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            as_nobody("run", "-c", str(config), "--listen", f"127.0.0.1:{port}"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=CLEAN_ENV,
            cwd=work,
        )
    try:
        yield proc
    except BaseException as exc:
        exc.add_note(log.read_text(errors="replace")[-3000:])
        raise
    finally:
        stop_process(proc)


def test_the_shipped_unit_drops_what_this_test_drops() -> None:
    """The privileges taken away here are the ones ``hbmon.service`` takes away."""
    unit = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "hbmon.service"
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["User"] == ["hbmon"]  # not root (here: nobody)
    assert settings["CapabilityBoundingSet"] == [""]  # --bounding-set=-all
    assert settings["AmbientCapabilities"] == [""]  # --inh-caps=-all
    assert settings["NoNewPrivileges"] == ["yes"]  # --no-new-privs
    assert settings["ReadWritePaths"] == ["/var/lib/hbmon"]  # its journal only


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@pytest.fixture
def keep_owners() -> Iterator[Callable[..., None]]:
    """``keep(path, ...)``: give these back their owner and mode at the end of the test
    (device nodes keep an owner across detach and attach)."""
    before: dict[str, os.stat_result] = {}

    def keep(*paths: str) -> None:
        for path in paths:
            before.setdefault(path, os.stat(path))

    yield keep
    for path, st in before.items():
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, stat.S_IMODE(st.st_mode))


def test_runs_unprivileged_with_only_its_volume_journal_and_port(
    nobody: pwd.struct_passwd,
    workdir: Path,
    loopdev_factory: LoopdevFactory,
    keep_owners: Callable[..., None],
) -> None:
    _, mine = loopdev_factory()
    other_image, other = loopdev_factory()
    pwrite_sync(other_image, 0, record_block("db2", 0x22, 1, 0.2, size=4096))
    # Device nodes keep their owner across detach and attach: set both explicitly.
    disk_gid = grp.getgrnam("disk").gr_gid if "disk" in {g.gr_name for g in grp.getgrall()} else 0
    keep_owners(mine, other)
    give(mine, nobody, 0o600)  # its volume
    os.chown(other, 0, disk_gid)  # not its volume: root:disk 0660
    os.chmod(other, 0o660)
    state = workdir / "state"
    state.mkdir()
    give(state, nobody, 0o700)
    token = workdir / "webhook.token"
    token.write_text(TOKEN + "\n")
    give(token, nobody, 0o600)
    config = write_config(workdir, mine, other, state, token)
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    with unprivileged_site(config, port, workdir) as proc:

        def rows() -> dict[str, dict[str, object]] | None:
            assert proc.poll() is None, "hbmon exited"
            try:
                code, body = http_get(url + "/status.json", timeout=2)
            except OSError:
                return None
            if code != 200:
                return None
            found = {str(r["pair"]): r for r in json.loads(body)["rows"]}
            settled = (
                found.get("db1", {}).get("state") == "alive"
                and found.get("db2", {}).get("state") == "io_error"
            )
            return found if settled else None

        found = wait_for(rows, READY, "db1 alive and db2 io_error, as nobody")
        assert found["db2"]["reason"] == "permission", found["db2"]
        assert "Permission denied" in str(found["db2"]["detail"]), found["db2"]

        # who it runs as: nobody, no groups, no capabilities, no way to gain any
        fields = status_fields(proc.pid)
        assert fields["Uid"].split() == [str(nobody.pw_uid)] * 4, fields["Uid"]
        assert fields["Gid"].split() == [str(nobody.pw_gid)] * 4, fields["Gid"]
        assert fields["Groups"] == "", fields["Groups"]
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(fields[caps], 16) == 0, (caps, fields[caps])
        assert fields["NoNewPrivs"] == "1"

        metrics = http_get(url + "/metrics")[1]
        assert (metric_value(metrics, "hbmon_beats_written_total", pair="db1") or 0) > 0
        assert (
            metric_value(metrics, "hbmon_volume_read_errors_total", pair="db2", reason="permission")
            or 0
        ) >= 1, "the refused volume is counted"

        # its journal: an alert for db1 (alive) is refused and journaled as nobody
        body = json.dumps(
            {
                "version": "4",
                "alerts": [
                    {"status": "firing", "labels": {"alertname": "HbmonHostDown", "pair": "db1"}}
                ],
            }
        ).encode()
        request = urllib.request.Request(
            url + "/api/v1/alerts",
            data=body,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            decision = json.loads(resp.read())["decisions"][0]
        assert decision["action"] == "none"
        assert "disagrees" in decision["reason"]
        journal = state / "failover.jsonl"
        assert os.stat(journal).st_uid == nobody.pw_uid
        assert json.loads(journal.read_text().splitlines()[-1])["event"] == "refused"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    # the volume it was given carries its planned stop
    shown = subprocess.run(
        [sys.executable, "-m", "hbmon.cli", "volume", "show", mine, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert '"stopping"' in shown.stdout, shown.stdout + shown.stderr


# A fresh network namespace (entered as root, before privileges are dropped) with its
# loopback up and ports below 1024 privileged, whatever the host's own setting is.
PRIVILEGED_BELOW = 1024
IN_FRESH_NETNS = [
    "unshare",
    "--net",
    "--",
    "sh",
    "-ec",
    "ip link set lo up\n"
    f"echo {PRIVILEGED_BELOW} > /proc/sys/net/ipv4/ip_unprivileged_port_start\n"
    'exec "$@"',
    "sh",
]


def run_nobody(
    config: Path, work: Path, *extra: str, fresh_netns: bool = False
) -> subprocess.CompletedProcess[str]:
    command = as_nobody("run", "-c", str(config), *extra)
    if fresh_netns:
        need(
            shutil.which("unshare") is not None and shutil.which("ip") is not None,
            "a fresh network namespace needs unshare (util-linux) and ip (iproute2)",
        )
        command = [*IN_FRESH_NETNS, *command]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=CLEAN_ENV,
        cwd=work,
    )


def test_what_it_was_not_given_stops_it_at_start(
    nobody: pwd.struct_passwd,
    workdir: Path,
    loopdev_factory: LoopdevFactory,
    keep_owners: Callable[..., None],
) -> None:
    _, mine = loopdev_factory()
    _, other = loopdev_factory()
    keep_owners(mine)
    give(mine, nobody, 0o600)
    token = workdir / "webhook.token"
    token.write_text(TOKEN + "\n")
    give(token, nobody, 0o600)
    state = workdir / "state"
    state.mkdir()
    give(state, nobody, 0o700)

    # a journal elsewhere: root's directory
    root_state = workdir / "root-state"
    root_state.mkdir(mode=0o755)
    config = write_config(workdir, mine, other, root_state, token)
    result = run_nobody(config, workdir)
    assert result.returncode == 2, result.stderr
    assert (
        f"hbmon: error: {config}: state_dir: the failover journal cannot be written by this "
        f"user (uid {nobody.pw_uid}): cannot create {root_state / 'failover.jsonl'}: "
        f"{root_state} is not a writable directory"
    ) in result.stderr
    assert not (root_state / "failover.jsonl").exists()

    # a token it may not read (root's, mode 0600)
    root_token = workdir / "root.token"
    root_token.write_text(TOKEN + "\n")
    root_token.chmod(0o600)
    config = write_config(workdir, mine, other, state, root_token)
    result = run_nobody(config, workdir)
    assert result.returncode == 2, result.stderr
    assert (
        f"hbmon: error: {root_token}: webhook.token_file: cannot read key file: Permission denied"
    ) in result.stderr

    # a port it was not given (privileged: below 1024, in a network namespace of its own
    # where that holds even on a host that set ip_unprivileged_port_start to 0)
    config = write_config(workdir, mine, other, state, token)
    port = PRIVILEGED_BELOW - 1
    result = run_nobody(config, workdir, "--listen", f"127.0.0.1:{port}", fresh_netns=True)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hbmon: error: cannot start site 'unprivileged': [Errno 13] "), last
    assert f"('127.0.0.1', {port}): permission denied" in last, last
