"""A timer wheel: things kept by due time in buckets of ``grain`` seconds.

The poller and the status table each keep one thing per volume or row due once a
second or so; at 10,000 of them a heap of (time, item) costs two dozen tuple
comparisons per push and pop.  Here a push is a dict lookup and a list append, and a
small heap orders only the bucket numbers in use (a few dozen, whatever the items).
Items are not ordered within a bucket, and an item pushed twice is there twice: the
owner knows which entry is current (see :meth:`StatusTable.run_due`).
"""

from __future__ import annotations

import heapq
from typing import Generic, TypeVar

T = TypeVar("T")


class Wheel(Generic[T]):
    __slots__ = ("_buckets", "_keys", "grain")

    def __init__(self, grain: float) -> None:
        if grain <= 0:
            raise ValueError(f"grain must be positive, not {grain!r}")
        self.grain = grain
        self._buckets: dict[int, list[T]] = {}
        self._keys: list[int] = []  # a heap of the bucket numbers in use

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def key(self, when: float) -> int:
        """The number of the bucket that holds what is due at ``when``."""
        return int(when // self.grain)

    def push(self, when: float, item: T) -> int:
        """Keep ``item`` in the bucket of ``when``; returns that bucket's number."""
        key = int(when // self.grain)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = bucket = []
            heapq.heappush(self._keys, key)
        bucket.append(item)
        return key

    def first(self) -> float | None:
        """When the earliest bucket in use begins (None if the wheel is empty)."""
        return self._keys[0] * self.grain if self._keys else None

    def take(self, now: float) -> tuple[int, list[T]] | None:
        """The earliest bucket, and its number, if it has begun by ``now`` (it may hold
        items due up to ``grain`` later); None if no bucket has begun."""
        keys = self._keys
        if keys and keys[0] * self.grain <= now:
            key = heapq.heappop(keys)
            return key, self._buckets.pop(key)
        return None
