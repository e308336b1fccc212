"""A micro-batcher: concurrent requests are queued, merged into one model call, and their results routed back.

Every model call of the server runs on **one** worker thread, so a model is never used by two threads at once and the
event loop never blocks on torch. A job carries a *batch key*; the worker takes the oldest job, then waits up to
``max_wait_s`` for more jobs with the **same** key (up to ``max_batch_size``) and runs them as one call of the
key's function. Jobs with other keys wait their turn in arrival order. A failing call fails each of its jobs with
the same exception (never a partial or default result).

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
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Queue jobs and run same-key jobs together on one worker thread.

    Args:
        max_batch_size: jobs per call at most.
        max_wait_s: how long to wait for more same-key jobs after the first one arrives.

    Attributes:
        batch_sizes: the size of every call made so far (for tests and logs).
    """

    def __init__(self, max_batch_size: int = 16, max_wait_s: float = 0.005) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s={max_wait_s} must be >= 0")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.batch_sizes: list[int] = []
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="embedrl-batcher", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, fn: BatchFunction, payload: Any) -> Future:
        """Queue one job; its future resolves to ``fn([... payload ...])[its position]``.

        Jobs are merged only when their keys are equal, so the key must capture everything that makes two payloads
        incompatible in one call (model, mode, decoding...). ``fn`` is the one of the batch's first job.
        """
        job = _Job(key, fn, payload)
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
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                same = [job for job in self._queue if job.key == first.key]
                for job in same[: self.max_batch_size - len(batch)]:
                    self._queue.remove(job)
                    batch.append(job)
                remaining = deadline - time.monotonic()
                if len(batch) >= self.max_batch_size or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            self.batch_sizes.append(len(batch))
            try:
                results = batch[0].fn([job.payload for job in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} jobs")
            except Exception as err:  # every job of the call learns why it failed; the worker keeps going
                logger.debug("batch of %d failed: %r", len(batch), err)
                for job in batch:
                    job.future.set_exception(err)
                continue
            for job, result in zip(batch, results, strict=True):
                job.future.set_result(result)
