"""Request batching: concurrent requests of many users share one steered generate call.

One thread owns the model.  It waits for the first queued request, then up to
``window_s`` (counted from that request's arrival, so under load there is no wait at
all) for more, takes up to ``max_batch`` of them, prepares each one alone (a request
whose prompt or settings fail gets its own error and leaves the batch), groups the rows
by :meth:`serve.engine.Row.batch_key` and runs each group as one batch.  If a batch
raises, its rows are retried one by one, so only the row that fails gets the error.

The queue is bounded (``submit`` raises a 503 when it is full) and every request carries a
deadline: one still queued at its deadline is dropped without running.  Results travel
through ``concurrent.futures.Future`` objects, which the HTTP layer awaits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from serve.requests import ApiError

log = logging.getLogger(__name__)


@dataclass
class Job:
    request: object
    deadline: float
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class Scheduler:
    """Batches jobs for ``runtime`` (``prepare(request)`` and ``generate(rows)``) on one thread."""

    def __init__(self, runtime, max_batch: int, window_s: float, max_queue: int):
        self.runtime, self.max_batch, self.window_s, self.max_queue = runtime, max_batch, window_s, max_queue
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.batches = 0          # generate calls made (exposed on /health)
        self.rows = 0             # rows they carried
        self._thread = threading.Thread(target=self._loop, name="fints-batcher", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, request, timeout_s: float) -> Future:
        """Queue one request; its future gets ``(Result, notes)`` or an exception."""
        with self._cv:
            if len(self._queue) >= self.max_queue:
                raise ApiError(503, f"the server is busy: {self.max_queue} requests are already waiting "
                                    "(--max-queue); retry shortly", code="queue_full", headers={"Retry-After": "1"})
            job = Job(request, time.monotonic() + timeout_s)
            self._queue.append(job)
            self._cv.notify()
        return job.future

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._queue:
                if self._stopping:
                    return None
                self._cv.wait()
            close = self._queue[0].arrived + self.window_s
            while len(self._queue) < self.max_batch and (left := close - time.monotonic()) > 0:
                self._cv.wait(left)
            jobs = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        now = time.monotonic()
        taken = []
        for job in jobs:  # a job that timed out (its client got 504) or was cancelled is not run
            if now < job.deadline and job.future.set_running_or_notify_cancel():
                taken.append(job)
            elif not job.future.done():
                job.future.cancel()
        return taken

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                self._run(jobs)
            except BaseException as err:  # noqa: BLE001 -- the batching thread must survive anything
                log.exception("[serve] batch failed")
                for job in jobs:
                    _fail(job, err)

    def _run(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[tuple[Job, object]]] = {}
        for job in jobs:
            try:
                prepared = self.runtime.prepare(job.request)
            except Exception as err:  # noqa: BLE001 -- one request's failure is its own
                _fail(job, err)
                continue
            groups.setdefault(prepared.row.batch_key(), []).append((job, prepared))
        for group in groups.values():
            try:
                results = self.runtime.generate([p.row for _, p in group])
            except Exception:  # noqa: BLE001 -- find the row that fails; the others still get answers
                log.exception("[serve] a batch of %d failed; retrying its rows one by one", len(group))
                results = [self._alone(p.row) for _, p in group]
            self.batches += 1
            self.rows += len(group)
            for (job, prepared), result in zip(group, results, strict=True):
                if isinstance(result, BaseException):
                    _fail(job, result)
                else:
                    job.future.set_result((result, prepared.notes))

    def _alone(self, row):
        try:
            return self.runtime.generate([row])[0]
        except Exception as err:  # noqa: BLE001
            return err


def _fail(job: Job, err: BaseException) -> None:
    if not job.future.done():
        if not isinstance(err, ApiError):
            log.error("[serve] request failed: %r", err)
            err = ApiError(500, f"generation failed: {type(err).__name__}: {err}", code="internal_error")
        job.future.set_exception(err)
