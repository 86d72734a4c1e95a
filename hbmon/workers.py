"""Batched blocking I/O on worker threads, with stalled work detached.

The poller and the beater hand a whole batch of jobs to one worker thread in one
``anyio.to_thread.run_sync`` call (a thread hop per read would cost ~100x more), under a
dedicated :class:`anyio.CapacityLimiter`.  A job that has run longer than
``stall_after`` (a FIFO that never opens, a FUSE file that never answers, a device in D
state) is *detached*: its thread is abandoned to finish that one job whenever it can,
and the jobs behind it in the batch move to a fresh batch, so one hung volume never
delays another.  A detached job's result is delivered by :meth:`WorkerPool.harvest`
when it finally arrives; the caller decides when a job counts as hung (its own deadline)
and must not submit new work for that job's target meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import anyio
import anyio.to_thread

from hbmon.clock import Clock

Item = TypeVar("Item")
Result = TypeVar("Result")
Deliver = Callable[[Item, Result], None]
Finish = Callable[[list[tuple[Item, Result]]], None]


class _Batch(Generic[Item, Result]):
    """Jobs one thread runs in order; ``stop`` lets the loop take back the tail.

    The thread and the loop share one lock, taken once per job: the thread checks
    ``stop`` and marks the job it starts; the loop, to detach a stalled job, sets
    ``stop`` under it.  Results go to an append-only list the loop reads up to its length.
    """

    __slots__ = (
        "clock",
        "done",
        "finish",
        "finished",
        "fn",
        "items",
        "lock",
        "pos",
        "results",
        "started",
        "stop",
        "taken",
    )

    def __init__(
        self,
        items: Sequence[Item],
        fn: Callable[[Item], Result],
        clock: Clock,
        finish: Finish[Item, Result] | None = None,
    ) -> None:
        self.items = items
        self.fn = fn
        self.finish = finish
        self.clock = clock
        self.lock = threading.Lock()
        self.results: list[tuple[Item, Result]] = []
        self.taken = 0
        self.pos = -1  # index of the job running now, -1 between jobs
        self.started = 0.0  # monotonic start of the running job
        self.stop = len(items)
        self.done = anyio.Event()
        self.finished = False  # set last of all: every result is in ``results``

    def run(self) -> None:  # on a worker thread
        lock, fn, items, finish = self.lock, self.fn, self.items, self.finish
        monotonic = self.clock.monotonic
        out = [] if finish is not None else self.results
        try:
            for i, item in enumerate(items):
                with lock:
                    if i >= self.stop:
                        return
                    self.pos, self.started = i, monotonic()
                out.append((item, fn(item)))
                self.pos = -1
        finally:
            try:
                if finish is not None:
                    # Results are handed over only once the batch is finished (made durable).
                    finish(out)
                    self.results.extend(out)
                    self.pos = -1
            finally:
                self.finished = True

    def take(self) -> list[tuple[Item, Result]]:
        end = len(self.results)
        out = self.results[self.taken : end]
        self.taken = end
        return out


class WorkerPool(Generic[Item, Result]):
    """Runs batches of ``fn(item)`` on threads; see the module docstring."""

    def __init__(
        self,
        fn: Callable[[Item], Result],
        deliver: Deliver[Item, Result],
        *,
        clock: Clock,
        threads: int = 8,
        stall_after: float = 0.2,
        finish: Finish[Item, Result] | None = None,
    ) -> None:
        self.fn = fn
        self.finish = finish
        self.deliver = deliver
        self.clock = clock
        self.limiter = anyio.CapacityLimiter(threads)
        self.stall_after = stall_after
        self.detached: list[_Batch[Item, Result]] = []

    async def run(self, items: Sequence[Item]) -> None:
        """Run ``items`` and deliver each result; stalled ones are detached, not awaited."""
        while items:
            batch = _Batch(items, self.fn, self.clock, self.finish)
            stalled = await self._run_batch(batch)
            for item, result in batch.take():
                self.deliver(item, result)
            if stalled is None:
                return
            self.detached.append(batch)
            items = items[stalled + 1 :]

    async def _run_batch(self, batch: _Batch[Item, Result]) -> int | None:
        """Wait for ``batch``; returns the index of a job that stalled, or None."""
        check = self.stall_after / 2
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._call, batch)
            while True:
                with anyio.move_on_after(check):
                    await batch.done.wait()
                if batch.done.is_set():
                    return None
                with batch.lock:
                    pos = batch.pos
                    if pos >= 0 and self.clock.monotonic() - batch.started > self.stall_after:
                        batch.stop = pos + 1  # the thread finishes this job, then returns
                        tg.cancel_scope.cancel()  # abandon the thread, free the limiter
                        return pos
        return None  # not reached: the loop above only returns

    async def _call(self, batch: _Batch[Item, Result]) -> None:
        await anyio.to_thread.run_sync(batch.run, limiter=self.limiter, abandon_on_cancel=True)
        batch.done.set()

    def harvest(self) -> None:
        """Deliver results of detached jobs that have finished since the last call."""
        if not self.detached:
            return
        keep = []
        for batch in self.detached:
            # Read before taking: once set, every result is there to take.  (``pos < 0``
            # is not enough: between jobs, or during ``finish``, results are still due.)
            finished = batch.finished
            for item, result in batch.take():
                self.deliver(item, result)
            if not finished:
                keep.append(batch)
        self.detached = keep

    def stuck(self, older_than: float) -> list[Item]:
        """Detached jobs still running after ``older_than`` seconds."""
        now = self.clock.monotonic()
        out = []
        for batch in self.detached:
            with batch.lock:
                if batch.pos >= 0 and now - batch.started > older_than:
                    out.append(batch.items[batch.pos])
        return out
