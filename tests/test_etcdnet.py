"""The partition lab itself (tests/etcdnet.py): three namespaces, three veth pairs, a real
3-member etcd cluster, and faults that really partition it.

What the arbiter tests rely on, shown with ``etcdctl`` run inside the namespaces:

* the cluster forms, every site writes through its own member, the lab leaves nothing
  behind (namespaces, processes), even when the body fails;
* A-B cut (the WAN), W reachable from both: A and B both still write, the one whose own
  member lost the leader through W, and nothing crosses the cut link;
* A isolated (A-B and A-W down): a write through A's member fails within its timeout while
  B's succeeds, A's member serves stale data only to a serializable read, and A catches up
  after the heal;
* the leader killed and restarted: B writes again after one election, the member rejoins.

Measured figures are printed (``pytest -s``).  Raft timing is etcd's default.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etcdnet import (
    CLIENT_PORT,
    COMMAND_TIMEOUT,
    SITES,
    EtcdNet,
    address,
    etcd_cluster,
)

pytestmark = [pytest.mark.root, pytest.mark.tools]

FORM_TIMEOUT = 20.0  # the cluster forms in 0.4-2.6 s here
WRITE_WITHIN = 12.0  # a write that must succeed: an election plus retries over endpoints


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _write_eventually(net: EtcdNet, site: str, key: str, value: str) -> float:
    """Retry :meth:`EtcdNet.put` from ``site`` until one succeeds; seconds it took."""
    t0 = time.monotonic()
    while True:
        put = net.put(site, key, value)
        if put:
            return time.monotonic() - t0
        if time.monotonic() - t0 > WRITE_WITHIN:
            pytest.fail(f"{site} could not write {key} within {WRITE_WITHIN:g} s: {put.errors}")
        time.sleep(0.1)


_SERVE_ONCE = (
    "import socket, sys\n"
    "s = socket.create_server((sys.argv[1], 18080))\n"
    "print('ready', flush=True)\n"
    "c, _ = s.accept()\n"
    "c.sendall(b'hello from ' + sys.argv[2].encode())\n"
    "c.close()\n"
)


def _check_management_links(net: EtcdNet) -> None:
    """The test reaches a server inside A over A's management link, and A cannot use
    the management links to reach B (they join each site to the root namespace only)."""
    with net.run_in(
        "A",
        [sys.executable, "-I", "-c", _SERVE_ONCE, net.mgmt["A"], "A"],
        stdout=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready"
            with socket.create_connection((net.mgmt["A"], 18080), timeout=3) as conn:
                assert conn.recv(100) == b"hello from A"
        finally:
            server.kill()
    with net.run_in(
        "A",
        [sys.executable, "-I", "-c", "import socket, sys; socket.create_connection("
         "(sys.argv[1], 22), timeout=2)", net.mgmt["B"]],
        stderr=subprocess.PIPE,
        text=True,
    ) as probe:  # fmt: skip
        _, err = probe.communicate(timeout=10)
    assert probe.returncode != 0
    assert "unreachable" in err, err


def test_the_cluster_forms_and_the_lab_leaves_nothing_behind(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path, timeout=FORM_TIMEOUT) as net:
        print(f"\ncluster formed in {net.formed_in:.2f} s; leader {net.leader()}")
        assert net.leader() in SITES
        for site in SITES:
            put = net.put(site, f"/lab/{site}", f"from {site}")
            assert put, put.errors
            assert put.endpoint == net.member_url(site), "its own member took the write"
        for site in SITES:  # every member answers every write, linearizably
            assert [net.get(site, f"/lab/{s}") for s in SITES] == [f"from {s}" for s in SITES]
        # a member advertises both of its link addresses: W reaches A over A-W only
        members = net.etcdctl("W", "member", "list").stdout
        for site in SITES:
            for url in net.client_urls(site):
                assert url in members
        _check_management_links(net)
        pids = [p.pid for p in net.procs.values() if p is not None]
        names = set(net.ns.values())
        assert names <= _namespaces()
    assert not names & _namespaces(), "namespaces left behind"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"etcd {pid} left running"


def test_a_failure_inside_still_cleans_up_and_reports_the_logs(tmp_path: Path) -> None:
    names: set[str] = set()
    pids: list[int] = []

    def body() -> None:
        with etcd_cluster(tmp_path, start=False) as net:
            for site in SITES:
                net.start_member(site)
            names.update(net.ns.values())
            pids.extend(p.pid for p in net.procs.values() if p is not None)
            assert names <= _namespaces()
            raise RuntimeError("the test body failed")

    with pytest.raises(RuntimeError) as caught:
        body()
    assert len(names) == 3
    assert len(pids) == 3
    assert not names & _namespaces()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "--- etcd A" in notes
    assert "--- etcd W" in notes


def test_a_wan_cut_leaves_both_sites_writing_through_the_witness(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path, timeout=FORM_TIMEOUT) as net:
        leader = net.leader()
        net.cut("A", "B")
        assert not net.link_is_up("A", "B")
        assert not net.link_is_up("B", "A")
        assert net.link_is_up("A", "W")
        assert net.link_is_up("B", "W")
        # nothing crosses the cut: A cannot reach B's member, even for a local read
        direct = net.etcdctl(
            "A",
            "get",
            "x",
            "--consistency=s",
            endpoints=[f"http://{address('B', 'A')}:{CLIENT_PORT}"],
            timeout=1.0,
        )
        assert direct.returncode != 0
        took = {}
        for site in ("A", "B"):
            put = net.put(site, f"/wan/{site}", "written")
            assert put, f"{site} could not write with A-B down: {put.errors}"
            took[site] = put.endpoint
            other_site = "B" if site == "A" else "A"
            assert put.endpoint != f"http://{address(other_site, site)}:{CLIENT_PORT}"
        print(f"\nA-B cut, leader was {leader}: writes taken by {took}")
        if leader in ("A", "B"):
            # the other site's member lost the leader: its write went through W
            other = "B" if leader == "A" else "A"
            assert took[other] == f"http://{address('W', other)}:{CLIENT_PORT}"
        assert net.get("W", "/wan/A") == "written"
        assert net.get("W", "/wan/B") == "written"
        net.heal("A", "B")
        net.wait_healthy(FORM_TIMEOUT)
        assert net.get("A", "/wan/B") == "written"


def test_an_isolated_site_cannot_write_while_the_other_can(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path, timeout=FORM_TIMEOUT) as net:
        assert net.put("A", "/iso/k", "before")
        leader = net.leader()
        net.isolate("A")
        t0 = time.monotonic()
        own = net.etcdctl("A", "put", "/iso/k", "from A")
        failed_in = time.monotonic() - t0
        assert own.returncode != 0, "the isolated member took a write"
        assert failed_in < COMMAND_TIMEOUT + 2.0
        b_took = _write_eventually(net, "B", "/iso/k", "from B")
        assert not net.put("A", "/iso/k", "again from A", timeout=1.0), "A wrote somewhere"
        # a serializable read at A answers stale data; a linearizable one does not answer
        assert net.get("A", "/iso/k", serializable=True) == "before"
        with pytest.raises(AssertionError, match="failed"):
            net.get("A", "/iso/k", timeout=1.0)
        print(
            f"\nA isolated (leader was {leader}): A's write failed in {failed_in:.2f} s, "
            f"B wrote after {b_took:.2f} s"
        )
        net.rejoin("A")
        rejoined = net.wait_healthy(FORM_TIMEOUT)
        assert net.get("A", "/iso/k") == "from B"
        print(f"A rejoined and caught up in {rejoined:.2f} s")


def test_killing_and_restarting_the_leader_keeps_b_writing(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path, timeout=FORM_TIMEOUT) as net:
        leader = net.leader()
        assert leader is not None
        t0 = time.monotonic()
        net.kill_member(leader)
        new_leader, elected = net.wait_leader(WRITE_WITHIN, other_than=leader)
        _write_eventually(net, "B", "/kill/k", "after kill")
        b_wrote = time.monotonic() - t0
        net.start_member(leader)
        rejoined = net.wait_healthy(FORM_TIMEOUT, sites=SITES)
        assert net.get(leader, "/kill/k") == "after kill"
        assert net.put("B", "/kill/k", "after restart")
        print(
            f"\nleader {leader} killed: {new_leader} elected after {elected:.2f} s, B wrote "
            f"after {b_wrote:.2f} s; {leader} rejoined in {rejoined:.2f} s"
        )
