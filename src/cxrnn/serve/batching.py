"""Micro-batching: requests that arrive together share one forward pass, run by one worker thread.

The single worker is also what makes the server safe under concurrency: only it touches the model for
predictions (Grad-CAM, which hooks the model, takes the same lock). ``max_batch=1`` turns grouping off.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

BatchFn = Callable[[Sequence[Any]], Sequence[Any]]


class QueueFullError(RuntimeError):
    """More requests are waiting than the server accepts; the client should retry later."""


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items, "largest_batch": self.largest_batch,
                "mean_batch": self.items / self.batches if self.batches else 0.0,
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class MicroBatcher:
    """Collects up to ``max_batch`` items, waiting at most ``max_wait_ms`` after the first, then calls ``fn``.

    ``fn`` gets the list of items and returns one result per item, in order. If it raises, every item of
    that batch gets the exception.
    """

    def __init__(self, fn: BatchFn, max_batch: int = 8, max_wait_ms: float = 10.0, max_queue: int = 256,
                 lock: threading.Lock | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.lock = lock or threading.Lock()
        self.stats = BatcherStats()
        self._queue: queue.Queue[tuple[Any, Future] | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="cxrnn-batcher", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, item: Any) -> Future:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        fut: Future = Future()
        try:
            self._queue.put_nowait((item, fut))
        except queue.Full:
            raise QueueFullError(f"server busy: {self._queue.maxsize} requests already waiting") from None
        return fut

    def close(self, timeout: float = 5.0) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout)

    def _collect(self, first: tuple[Any, Future]) -> tuple[list[tuple[Any, Future]], bool]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is None:
                return batch, True
            batch.append(entry)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            # A request that already timed out (its future cancelled) is not worth computing.
            batch = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                with self.lock:
                    results = self.fn([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            n = len(batch)
            self.stats.batches += 1
            self.stats.items += n
            self.stats.largest_batch = max(self.stats.largest_batch, n)
            self.stats.sizes[n] = self.stats.sizes.get(n, 0) + 1
            for (_, fut), result in zip(batch, results):
                fut.set_result(result)
