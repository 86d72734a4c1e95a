"""What the arbiter costs a site: requests per second and CPU, at 100 and 10,000 pairs.

One lease per site, renewed every lease_ttl / 3, and one idle watch: the steady-state
traffic must not grow with the number of pairs, and the CPU it adds must stay within 1 %
of a core.  For each size the same site (``hbmon run`` beating N pairs into LUN files,
250 slots each) runs twice, without ``[arbiter]`` (the baseline) and with it against a
real single-member etcd on localhost; the two runs alternate, and both are measured from
the same time after serving (``--settle``; and 3 s after the start claims are done: the
start-up of 10,000 beats costs seconds of CPU, and a baseline measured sooner than the
arbiter's side counts it).  Prints requests/s at the arbiter (hbmon_arbiter_requests_total
over the window), CPU % of one core with and without, the difference, and how long the
start claims took.

    .venv/bin/python bench/arbiter_cost.py [--quick] [--runs N] [--window S] [--settle S]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Hbmon,
    free_port,
    info,
    machine_line,
    measure_cpu,
    median,
    metric_value,
    site_config,
)

from hbmon.record import SLOT_SIZE, Record

SLOTS = 250  # pairs per LUN file


def start_etcd(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    proc = subprocess.Popen(
        [
            "etcd",
            "--name", "bench",
            "--data-dir", str(folder / "etcd"),
            "--listen-client-urls", url,
            "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"bench=http://127.0.0.1:{peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "etcd.log").open("wb"),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["etcdctl", "--endpoints", url, "endpoint", "health"],
            capture_output=True,
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
            check=False,
        )
        if done.returncode == 0:
            return proc, url
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("etcd did not become healthy within 30 s")


def make_luns(folder: Path, pairs: int) -> list[tuple[str, Path, int]]:
    """``pairs`` slots over LUN files of SLOTS slots, each installed with its pair id."""
    folder.mkdir(parents=True, exist_ok=True)
    beats = []
    for lun in range((pairs + SLOTS - 1) // SLOTS):
        path = folder / f"lun{lun:03d}.vol"
        count = min(SLOTS, pairs - lun * SLOTS)
        data = bytearray(count * SLOT_SIZE)
        for slot in range(count):
            pair = f"p{lun * SLOTS + slot:05d}"
            data[slot * SLOT_SIZE : slot * SLOT_SIZE + 512] = Record(
                pair, 0, 0, time.time(), 1.0
            ).encode_block(512)
            beats.append((pair, path, slot))
        path.write_bytes(bytes(data))
    return beats


def config_body(beats: list[tuple[str, Path, int]], etcd: str | None) -> str:
    parts = []
    if etcd is not None:
        parts.append(
            f'[arbiter]\nendpoints = ["{etcd}"]\nprefix = "/bench-{time.monotonic_ns()}"\n'
        )
    for pair, path, slot in beats:
        demote = '\ndemote = ["/bin/true"]' if etcd is not None else ""
        parts.append(f'[[beat]]\nid = "{pair}"\nvolume = "{path}"\nslot = {slot}{demote}\n')
    return "\n".join(parts)


def run_once(
    folder: Path,
    beats: list[tuple[str, Path, int]],
    etcd: str | None,
    window: float,
    settle: float,
) -> tuple[float, float | None, float | None]:
    """CPU % of one core over ``window`` s, arbiter requests/s and the seconds from
    serving to every pair owned (start-up claims); None without an arbiter."""
    port = free_port()
    case = folder / ("arbiter" if etcd else "plain") / str(time.monotonic_ns())
    config = site_config(case, port, config_body(beats, etcd), site="osaka")
    site = Hbmon(config, case / "hbmon.log", port)
    try:
        site.wait_serving(120)
        serving = time.monotonic()
        deadline = serving + 300
        claimed = None
        while etcd is not None:  # start-up claims done: every pair owned
            lines = site.metrics().splitlines()
            owned = sum(1 for x in lines if x.startswith("hbmon_pair_owned{") and x[-4:] == " 1.0")
            if owned == len(beats):
                claimed = time.monotonic() - serving
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {owned} of {len(beats)} pairs owned after 300 s")
            time.sleep(0.2)
        # both sides measured as long after serving (the start-up of 10,000 beats is
        # seconds of CPU): at least `settle` s after serving, and 3 s after the claims
        time.sleep(max(3.0, serving + settle - time.monotonic()))
        before = metric_value(site.metrics(), "hbmon_arbiter_requests_total")
        started = time.monotonic()
        cpu = measure_cpu(site.pid, window)
        after = metric_value(site.metrics(), "hbmon_arbiter_requests_total")
        elapsed = time.monotonic() - started
        rate = None if before is None or after is None else (after - before) / elapsed
        site.check()
        return cpu, rate, claimed
    finally:
        site.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="100 and 1,000 pairs, 1 run, 10 s window and settle"
    )
    parser.add_argument("--runs", type=int, default=2, help="runs of each case (median)")
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured per run")
    parser.add_argument(
        "--settle", type=float, default=40.0, help="seconds after serving before measuring"
    )
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
        print("arbiter cost: skipped, etcd/etcdctl not found (Debian etcd-server, etcd-client)")
        return
    sizes = (100, 1000) if args.quick else (100, 10_000)
    window = 10.0 if args.quick else args.window
    settle = 10.0 if args.quick else args.settle
    runs = 1 if args.quick else args.runs
    print(machine_line())
    folder = Path(tempfile.mkdtemp(prefix="hbmon-arbiter-cost-"))
    etcd_proc, etcd = start_etcd(folder)
    try:
        print(
            f"etcd 3.4 single member at {etcd}; window {window:g} s, settle {settle:g} s, "
            f"{runs} run(s) each"
        )
        for pairs in sizes:
            beats = make_luns(folder / f"luns{pairs}", pairs)
            plain, armed, rates, claims = [], [], [], []
            for _ in range(runs):  # alternate: drift in the machine hits both
                plain.append(run_once(folder, beats, None, window, settle)[0])
                cpu, rate, claimed = run_once(folder, beats, etcd, window, settle)
                armed.append(cpu)
                if rate is not None:
                    rates.append(rate)
                if claimed is not None:
                    claims.append(claimed)
            info(f"{pairs} pairs: cpu without {plain}, with {armed}; requests/s {rates}")
            without, with_ = median(plain), median(armed)
            print(
                f"{pairs:>6} pairs: arbiter requests {median(rates):.2f}/s; CPU % of one core "
                f"without {without:.2f}, with {with_:.2f}: added {with_ - without:+.2f} "
                f"(target <= 1); start-up claims done {median(claims):.1f} s after serving"
            )
    finally:
        etcd_proc.kill()
        etcd_proc.wait()
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
