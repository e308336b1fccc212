"""A micro-batcher: concurrent requests are queued, merged into one model call, and their results routed back.

Every model call of the server runs on **one** worker thread, so a model is never used by two threads at once and the
event loop never blocks on torch. A job carries a *batch key*; the worker takes the oldest job, then waits up to
``max_wait_s`` for more jobs with the **same** key (up to ``max_batch_size``, and within ``max_batch_cost``: each
job may carry a cost, e.g. its pixels and frames) and runs them as one call of the key's function. Jobs with other
keys, or that do not fit, wait their turn in arrival order.

One bad job never fails its neighbours: when a merged call raises, each of its jobs is run again alone, so only the
jobs that fail alone get an exception (their own), never a partial or default result.

Example:
    >>> batcher = MicroBatcher(max_batch_size=8, max_wait_s=0.001)
    >>> future = batcher.submit(("double",), lambda payloads: [2 * p for p in payloads], 21)
    >>> future.result(timeout=5)
    42
    >>> batcher.close()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchFunction", "MicroBatcher"]

logger = logging.getLogger(__name__)

# A batch function maps the payloads of one batch to one result per payload, in the same order.
BatchFunction = Callable[[Sequence[Any]], Sequence[Any]]


@dataclass
class _Job:
    key: Hashable
    fn: BatchFunction
    payload: Any
    cost: tuple[float, ...] = ()
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Queue jobs and run same-key jobs together on one worker thread.

    Args:
        max_batch_size: jobs per call at most.
        max_wait_s: how long to wait for more same-key jobs after the first one arrives.
        max_batch_cost: per cost component, the most one call may sum (a job whose cost alone exceeds it runs alone).

    Attributes:
        batch_sizes: the size of every call made so far, retries of single jobs included (for tests and logs).
        retried_batches: merged calls that failed and were run again job by job.
    """

    def __init__(
        self, max_batch_size: int = 16, max_wait_s: float = 0.005, max_batch_cost: Sequence[float] = ()
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s={max_wait_s} must be >= 0")
        if any(limit <= 0 for limit in max_batch_cost):
            raise ValueError(f"max_batch_cost={tuple(max_batch_cost)} must be positive")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_batch_cost = tuple(max_batch_cost)
        self.batch_sizes: list[int] = []
        self.retried_batches = 0
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="embedrl-batcher", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, fn: BatchFunction, payload: Any, cost: Sequence[float] = ()) -> Future:
        """Queue one job; its future resolves to ``fn([... payload ...])[its position]``.

        Jobs are merged only when their keys are equal, so the key must capture everything that makes two payloads
        incompatible in one call (model, mode, decoding...). ``fn`` is the one of the batch's first job. ``cost``
        has one entry per ``max_batch_cost`` component (missing entries count 0).
        """
        job = _Job(key, fn, payload, tuple(cost))
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker after the queued jobs; jobs submitted afterwards are refused."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _take_batch(self) -> list[_Job] | None:
        """The next batch: the oldest job plus same-key jobs arriving within ``max_wait_s``; None once closed."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch = [first]
            total = [self._cost(first, i) for i in range(len(self.max_batch_cost))]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                for job in [job for job in self._queue if job.key == first.key]:
                    if len(batch) >= self.max_batch_size:
                        break
                    cost = [self._cost(job, i) for i in range(len(total))]
                    if any(t + c > limit for t, c, limit in zip(total, cost, self.max_batch_cost, strict=True)):
                        continue  # does not fit this call: it waits for a later one
                    self._queue.remove(job)
                    batch.append(job)
                    total = [t + c for t, c in zip(total, cost, strict=True)]
                remaining = deadline - time.monotonic()
                if len(batch) >= self.max_batch_size or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    @staticmethod
    def _cost(job: _Job, i: int) -> float:
        return job.cost[i] if i < len(job.cost) else 0.0

    def _call(self, batch: list[_Job]) -> Sequence[Any]:
        self.batch_sizes.append(len(batch))
        results = batch[0].fn([job.payload for job in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} jobs")
        return results

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                results = self._call(batch)
            except Exception as err:
                if len(batch) == 1:  # the job learns why it failed; the worker keeps going
                    logger.debug("job failed: %r", err)
                    batch[0].future.set_exception(err)
                    continue
                # Which job broke the call? Each runs again alone: only the ones that fail alone fail.
                logger.warning("a batch of %d failed (%r); running its jobs one by one", len(batch), err)
                self.retried_batches += 1
                for job in batch:
                    try:
                        job.future.set_result(self._call([job])[0])
                    except Exception as alone:
                        job.future.set_exception(alone)
                continue
            for job, result in zip(batch, results, strict=True):
                job.future.set_result(result)
