"""The worker pool: batches on threads, stalled jobs detached, late results harvested."""

from __future__ import annotations

import threading
import time

import anyio

from hbmon.clock import SystemClock
from hbmon.workers import WorkerPool


class Jobs:
    """``run(n)`` returns n*10; the item in ``block`` waits for ``release``."""

    def __init__(self, block: int | None = None) -> None:
        self.block = block
        self.release = threading.Event()
        self.delivered: list[tuple[int, int, float]] = []
        self.threads: set[str] = set()

    def run(self, item: int) -> int:
        self.threads.add(threading.current_thread().name)
        if item == self.block:
            self.release.wait(10)
        return item * 10

    def deliver(self, item: int, result: int) -> None:
        self.delivered.append((item, result, time.monotonic()))


async def test_a_batch_runs_on_one_worker_thread_and_delivers_everything() -> None:
    jobs = Jobs()
    pool = WorkerPool(jobs.run, jobs.deliver, clock=SystemClock(), threads=2)
    await pool.run(list(range(500)))
    assert [(i, r) for i, r, _ in jobs.delivered] == [(i, i * 10) for i in range(500)]
    assert len(jobs.threads) == 1
    assert threading.current_thread().name not in jobs.threads
    assert not pool.detached


async def test_a_stalled_job_is_detached_and_the_rest_go_on() -> None:
    jobs = Jobs(block=3)
    pool = WorkerPool(jobs.run, jobs.deliver, clock=SystemClock(), threads=1, stall_after=0.1)
    start = time.monotonic()
    try:
        with anyio.fail_after(2):
            await pool.run(list(range(10)))
        elapsed = time.monotonic() - start
        done = [i for i, _, _ in jobs.delivered]
        assert done == [0, 1, 2, 4, 5, 6, 7, 8, 9]
        assert elapsed < 0.5, f"the batch waited {elapsed:.2f} s for the stalled job"
        # the stalled job holds no limiter token: a new batch still runs with threads=1
        await pool.run([20, 21])
        assert [i for i, _, _ in jobs.delivered[-2:]] == [20, 21]
        assert pool.stuck(0.05) == [3]
        pool.harvest()
        assert 3 not in [i for i, _, _ in jobs.delivered]
    finally:
        jobs.release.set()
    with anyio.fail_after(2):
        while pool.detached:
            await anyio.sleep(0.01)
            pool.harvest()
    assert (3, 30) in [(i, r) for i, r, _ in jobs.delivered]
    assert pool.stuck(0.0) == []
