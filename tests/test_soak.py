"""Issue 8, item 6: the soak in its short mode (``bench/soak.py --quick``).

400 pairs in a real ``hbmon demo`` process for 45 s, scraped every second on both sites,
with the lab's faults applied and healed in turn (kill hosts, cut the link, partition
the network, corrupt, hang a read, truncate an SVOL).  The script itself checks what the
issue asks (no exception in the log, no stuck worker after each heal, every pair alive
again, every scrape answered, exit 0 on SIGTERM) and exits 1 when one fails; this test
also checks that its summary says the faults really happened.  The RSS bound is only
judged by the full 10-minute, 2,000-pair run (``python bench/soak.py``); here the growth
is printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_soak_passes() -> None:
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--quick"],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    print(proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SOAK-JSON ")]
    assert lines, f"no summary from the soak (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr}"
    summary = json.loads(lines[-1].removeprefix("SOAK-JSON "))
    assert proc.returncode == 0, summary["failures"]
    assert summary["failures"] == []
    assert summary["fault_cycles"] >= 4, summary
    assert summary["scrapes"] >= 40, summary
    assert summary["scrape_errors"] == 0
    assert summary["bad_log_lines"] == 0
    assert summary["exit_code"] == 0
    # The faults were seen, not just sent: a hung read shows a stuck worker.
    assert summary["faults"].get("hang-read") == 1, summary["faults"]
    assert summary["workers_stuck_max"] >= 1
    assert summary["detect_s_max"] is not None
    assert summary["recover_s_max"] is not None
