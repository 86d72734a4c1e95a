"""Integration: a live scrape of the real daemon passes ``promtool check metrics``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import parse_metrics, record_block, running_site, wait_for

FAMILIES = (
    "hbmon_heartbeat_age_seconds",
    "hbmon_heartbeat_last_timestamp_seconds",
    "hbmon_heartbeat_serial",
    "hbmon_heartbeat_missed_total",
    "hbmon_heartbeat_up",
    "hbmon_heartbeat_state",
    "hbmon_volume_read_errors_total",
    "hbmon_volume_read_duration_seconds_bucket",
    "hbmon_poll_lag_seconds",
    "hbmon_poll_tick_lag_seconds_bucket",
    "hbmon_workers_stuck",
    "hbmon_beats_written_total",
    "hbmon_beat_write_errors_total",
    "hbmon_build_info",
)


@pytest.mark.tools
def test_live_scrape_passes_promtool(tmp_path: Path, promtool: str) -> None:
    mismatch = tmp_path / "mismatch.vol"
    mismatch.write_bytes(record_block("intruder", 0xABC, 5, 0.2))
    config = f"""
site = "scrape"
state_dir = "{tmp_path / "state"}"
method = "volume"
interval = "200ms"

[[beat]]
id = "web"
volume = "{tmp_path / "web.vol"}"
[[beat]]
id = "blocked"
volume = "{mismatch}"
slot = 0

[[watch]]
id = "web"
volume = "{tmp_path / "web.vol"}"
[[watch]]
id = "ghost"
volume = "{tmp_path / "missing.vol"}"
[[watch]]
id = "imposter"
volume = "{mismatch}"
"""
    with running_site(config, tmp_path) as site:

        def settled() -> bool:
            rows = site.rows()
            return bool(
                rows["web", "volume"]["state"] == "alive"
                and rows["ghost", "volume"]["state"] == "io_error"
                and rows["imposter", "volume"]["reason"] == "identity_mismatch"
            )

        wait_for(settled, 5.0, "web alive, ghost io_error, imposter identity_mismatch")
        text = site.metrics()
    (tmp_path / "scrape.txt").write_text(text)  # kept for a failing run

    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""

    names = {name for name, _, _ in parse_metrics(text)}
    missing = [f for f in FAMILIES if f not in names]
    assert not missing, f"families missing from /metrics: {missing}"
