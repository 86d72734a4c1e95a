"""The per-pair verdict from the states of its configured paths (DESIGN.md principle 5)."""

from __future__ import annotations

import pytest

from hbmon.verdict import single_path_note, verdict


@pytest.mark.parametrize(
    ("volume", "network", "expected"),
    [
        ("alive", "alive", "alive"),
        ("late", "alive", "alive"),
        ("stale", "stale", "host_down"),
        ("alive", "stale", "network_partition"),
        ("late", "stale", "network_partition"),
        ("stale", "alive", "link_down"),
        ("alive", "invalid", "degraded"),
        ("io_hung", "alive", "degraded"),
        ("io_hung", "stale", "unknown"),
        ("invalid", "stale", "unknown"),
        ("io_error", "io_error", "unknown"),
        ("awaiting", "awaiting", "awaiting"),
        ("awaiting", "alive", "degraded"),
        ("retired", "stale", "retired"),
        ("alive", "retired", "retired"),
        ("stopped", "stale", "stopped"),
        ("stopped", "stopped", "stopped"),
        ("stopped", "alive", "degraded"),
    ],
)
def test_both_paths(volume: str, network: str, expected: str) -> None:
    assert verdict({"volume": volume, "network": network}) == expected


@pytest.mark.parametrize("path", ["volume", "network"])
@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("alive", "alive"),
        ("late", "alive"),
        ("stale", "host_down"),
        ("invalid", "unknown"),
        ("io_hung", "unknown"),
        ("awaiting", "awaiting"),
        ("retired", "retired"),
    ],
)
def test_one_path(path: str, state: str, expected: str) -> None:
    assert verdict({path: state}) == expected


def test_a_partition_is_never_host_down() -> None:
    """One path stale, the other in each of seven states: host_down only when both are
    stale; a fresh other path is a partition (or a broken link), anything else unknown."""
    # other path's state: (verdict with the network stale, verdict with the volume stale)
    expected = {
        "awaiting": ("unknown", "unknown"),
        "alive": ("network_partition", "link_down"),
        "late": ("network_partition", "link_down"),
        "stale": ("host_down", "host_down"),
        "invalid": ("unknown", "unknown"),
        "io_error": ("unknown", "unknown"),
        "io_hung": ("unknown", "unknown"),
    }
    seen = {
        v: (
            verdict({"volume": v, "network": "stale"}),
            verdict({"volume": "stale", "network": v}),
        )
        for v in expected
    }
    assert seen == expected


def test_one_path_host_down_says_what_it_cannot_tell() -> None:
    assert "stopped remote copy" in single_path_note("volume", "host_down")
    assert "network partition" in single_path_note("network", "host_down")
    assert single_path_note("both", "host_down") == ""
    assert single_path_note("volume", "alive") == ""


def test_a_partition_needs_the_volume_to_be_ahead() -> None:
    # A dying host: the network goes quiet first while the volume still shows the same
    # last beat.  That is not yet evidence of a partition.
    states = {"volume": "alive", "network": "stale"}
    assert verdict(states, ahead=set()) == "degraded"
    assert verdict(states, ahead={"network"}) == "degraded"
    assert verdict(states, ahead={"volume"}) == "network_partition"


def test_a_broken_link_needs_the_network_to_be_ahead() -> None:
    states = {"volume": "stale", "network": "alive"}
    assert verdict(states, ahead=set()) == "degraded"
    assert verdict(states, ahead={"network"}) == "link_down"
