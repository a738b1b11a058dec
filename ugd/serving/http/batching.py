"""Dynamic batching: concurrent requests for the same head become one forward, run off the event loop.

    batcher = DynamicBatcher(run, max_batch_size=32, max_wait_ms=5, max_queue=256)
    batcher.start()
    results = await batcher.submit(("single_tower",), [(q, d), ...])   # one result per item, in order
    batcher.stop()                                                      # after the last submit has returned

``run(head, items) -> results`` does the work (``engine.ModelEngine.run``); ``head`` is any hashable key:
requests are only grouped with requests of an equal head (the same forward, the same generation
length). One worker thread runs every batch, because one model on one device gains nothing from two
forwards at once, and the event loop stays free: ``/health`` answers while a batch runs.

A batch starts when the oldest waiting request has waited ``max_wait_ms``, or when the waiting items of
its head reach ``max_batch_size``; it takes that head's requests in arrival order while they fit (a
request larger than ``max_batch_size`` runs alone, unsplit). At most ``max_queue`` requests wait: one
more raises ``QueueFull`` at once (the server answers 503 with Retry-After), so an overload never
piles up unbounded. If a batch of several requests fails, each request is run again alone, so that an
error is reported to the request that caused it and not to its neighbours.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable


class QueueFull(Exception):
    """The bounded queue is full; the message says how many requests wait."""


class ShuttingDown(Exception):
    """The batcher was stopped: no new work is taken."""


@dataclass
class _Job:
    head: Hashable
    items: list
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(self, run: Callable[[Hashable, list], list], *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 256, on_batch: Callable[[Hashable, int, float], None] | None = None):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch  # (head, items, seconds) after each forward: the metrics
        self._pending: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ state

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not the one running)."""
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._worker, name="ugd-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Runs what is queued, then ends the worker (the server drains its requests before calling this)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ submitting

    async def submit(self, head: Hashable, items: list) -> list:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        job = _Job(head, list(items), loop, loop.create_future())
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the server is at capacity ({len(self._pending)} requests queued); retry later")
            self._pending.append(job)
            self._cond.notify_all()
        return await job.future

    # ------------------------------------------------------------------ the worker

    def _take(self) -> list[_Job] | None:
        """The next batch (jobs of one head), or None when stopping with nothing left. Holds the lock."""
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._pending[0]
            deadline = first.enqueued + self.max_wait
            while not self._stopping:
                waiting = sum(len(j.items) for j in self._pending if j.head == first.head)
                left = deadline - time.monotonic()
                if waiting >= self.max_batch_size or left <= 0:
                    break
                self._cond.wait(left)
            batch, total = [], 0
            for job in list(self._pending):
                if job.head != first.head:
                    continue
                if batch and total + len(job.items) > self.max_batch_size:
                    break
                batch.append(job)
                total += len(job.items)
            for job in batch:
                self._pending.remove(job)
            self._busy = True
            return batch

    def _worker(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._execute(batch)
            finally:
                self._busy = False

    def _execute(self, batch: list[_Job]) -> None:
        head = batch[0].head
        items = [it for job in batch for it in job.items]
        t0 = time.perf_counter()
        try:
            results = self._run(head, items)
            if len(results) != len(items):
                raise RuntimeError(f"batch runner returned {len(results)} results for {len(items)} items")
        except BaseException as e:  # noqa: BLE001 -- passed to the awaiting requests, never lost
            if len(batch) > 1:
                for job in batch:  # alone, so that the error goes to the request that caused it
                    self._execute([job])
                return
            _resolve(batch[0], error=e)
            return
        if self._on_batch is not None:
            self._on_batch(head, len(items), time.perf_counter() - t0)
        start = 0
        for job in batch:
            _resolve(job, result=results[start: start + len(job.items)])
            start += len(job.items)


def _resolve(job: _Job, *, result: Any = None, error: BaseException | None = None) -> None:
    def settle():
        if job.future.done():  # the client went away and its request was cancelled
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


__all__ = ["DynamicBatcher", "QueueFull", "ShuttingDown"]
