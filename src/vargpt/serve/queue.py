"""One worker thread owns the engine; requests reach it through a bounded queue and come back as futures.

The model never runs two calls at once (the engine's KV caches and the CPU's cores are not shared), so every
model call of the server goes through ``EngineWorker``:

- ``submit(fn)`` runs ``fn(engine)`` on the worker, in arrival order;
- ``submit_generate(prompts, params, seeds)`` is a text-to-image request. When the worker picks one up it waits up
  to ``batch_window_s`` for more requests with the same parameters except the seed and runs them all in one
  ``engine.generate_images`` call (at most ``max_batch`` images; every image keeps its own seed, so results do not
  depend on who it was batched with). Requests that cannot join wait, in order, for the next turn.

A full queue raises ``queue.Full`` at submission (the server answers 503) instead of growing without bound.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from vargpt.generation.params import ImageParams

__all__ = ["EngineWorker"]

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Job:
    future: Future = field(default_factory=Future)
    fn: Callable[[Any], Any] | None = None  # a plain call
    prompts: Sequence = ()  # a generation request ...
    params: ImageParams | None = None
    seeds: Sequence[int] = ()

    @property
    def key(self) -> tuple | None:
        """Requests with equal keys can share one ``generate_images`` call (None: never batched)."""
        if self.params is None:
            return None
        return tuple(sorted((k, v) for k, v in dataclasses.asdict(self.params).items() if k != "seed"))


class EngineWorker:
    """Runs every engine call on one thread (see the module docstring).

    Args:
        engine: an ``Engine`` (or any object with its ``generate_images``).
        max_batch: the most images in one batched ``generate_images`` call.
        batch_window_s: how long the worker waits for requests to join a generation batch.
        max_queue: the most requests waiting; ``submit*`` raises ``queue.Full`` past it.
    """

    def __init__(self, engine, *, max_batch: int = 8, batch_window_s: float = 0.005, max_queue: int = 64) -> None:
        if max_batch < 1 or batch_window_s < 0 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch}, batch_window_s={batch_window_s}, max_queue={max_queue}: "
                             "expected max_batch >= 1, batch_window_s >= 0, max_queue >= 1")
        self.engine = engine
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue()  # bounded by ``_put`` (so that ``close`` never blocks)
        self._deferred: collections.deque[_Job] = collections.deque()  # taken from the queue, not yet run
        self._thread = threading.Thread(target=self._run, name="vargpt-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- clients
    def submit(self, fn: Callable[[Any], Any]) -> Future:
        """Run ``fn(engine)`` on the worker; the future holds its return value or exception."""
        return self._put(_Job(fn=fn))

    def submit_generate(self, prompts: Sequence, params: ImageParams, seeds: Sequence[int]) -> Future:
        """Generate one image per prompt (``seeds[i]`` for prompt i), possibly batched with other requests; the
        future holds the list of ``GeneratedImage``."""
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError(f"{len(prompts)} prompts and {len(seeds)} seeds: expected as many, at least one")
        return self._put(_Job(prompts=list(prompts), params=params, seeds=list(seeds)))

    @property
    def pending(self) -> int:
        """Requests waiting (approximate)."""
        return self._queue.qsize() + len(self._deferred)

    def close(self, timeout: float | None = None) -> None:
        """Finish the requests already queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _put(self, job: _Job) -> Future:
        if not self._thread.is_alive():
            raise RuntimeError("the engine worker is closed")
        if self.pending >= self.max_queue:
            raise queue.Full
        self._queue.put(job)
        return job.future

    # -------------------------------------------------------------------------------------------- worker
    def _run(self) -> None:
        while True:
            job = self._deferred.popleft() if self._deferred else self._queue.get()
            if job is _STOP:
                return
            if job.fn is not None:
                self._call(job)
            else:
                self._generate(self._collect(job))

    def _call(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # the client went away
        try:
            job.future.set_result(job.fn(self.engine))
        except BaseException as e:  # noqa: BLE001 -- handed to the waiting request
            job.future.set_exception(e)

    def _collect(self, first: _Job) -> list[_Job]:
        """``first`` plus the waiting or arriving requests with its key, within the window and ``max_batch``."""
        batch, n = [first], len(first.prompts)

        def fits(job) -> bool:
            return job is not _STOP and job.key == first.key and n + len(job.prompts) <= self.max_batch

        for job in list(self._deferred):
            if fits(job):
                self._deferred.remove(job)
                batch.append(job)
                n += len(job.prompts)
        deadline = time.monotonic() + self.batch_window_s
        while n < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                job = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if fits(job):
                batch.append(job)
                n += len(job.prompts)
            else:
                self._deferred.append(job)
                if job is _STOP:
                    break
        return batch

    def _generate(self, batch: list[_Job]) -> None:
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            return
        prompts = [p for job in batch for p in job.prompts]
        seeds = [s for job in batch for s in job.seeds]
        try:
            images = self.engine.generate_images(prompts, batch[0].params, seeds=seeds)
        except BaseException as e:  # noqa: BLE001
            for job in batch:
                job.future.set_exception(e)
            return
        i = 0
        for job in batch:
            job.future.set_result(images[i:i + len(job.prompts)])
            i += len(job.prompts)
