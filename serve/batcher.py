"""Dynamic batching for a model replica: requests queue while the model works; when it is free, the next batch takes
every queued request (up to `max_batch_size`).

Why not `@serve.batch`: its loop forms the next batch as soon as it has handed the previous one over, not when the
model is free, so under load most batches were formed while one was still running and held the few requests that
had arrived by then (measured, `benchmarks/serve_load.py`, c=32, one replica, max_batch_size 32: mean batch size
4.2 on a 1.6 ms model and 7.8 on a 17 ms one, a third of the batches of size 1). Here one consumer forms a batch only
after the previous one has finished, so a batch holds everything that arrived meanwhile.

The batch function is synchronous (a model forward: it holds the CPU or the GPU, not the event loop) and runs in
the batcher's own one-thread executor (`in_thread: true`, the default): the replica's event loop keeps taking
requests, health checks and `describe()` while the model computes (torch releases the GIL), and one batch runs at
a time. `in_thread: false` runs it on the event loop (a thread hop less per batch; the loop stalls while the model
runs). Even with `in_thread: true`, a lone request (nothing else queued) runs on the loop when the last lone request
took under `LONE_ON_LOOP_BELOW_S` (10 ms): with nothing to take in meanwhile, the hop to the thread only adds latency
(measured at concurrency 1 by `benchmarks/serve_load.py`: `tiny` against `x_tiny_loop`), while a slower model (whose
lone request took longer) always runs in the thread, so the loop is never held up by it for long.

`batch_wait_timeout_s` > 0 holds a batch that is not full for up to that long after the model became free,
waiting for more requests; 0 (the default) never waits: a lone request runs at once, and under load batches fill
by themselves while the model is busy.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

logger = logging.getLogger("ray.serve")


class BatchStats:
    """What batching really does: how many batches of each size ran and how long the batch function took."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}
        self.batches = self.requests = 0
        self.busy_s = self.cpu_s = 0.0

    def add(self, size: int, seconds: float, cpu_seconds: float = 0.0) -> None:
        self.sizes[size] = self.sizes.get(size, 0) + 1
        self.batches += 1
        self.requests += size
        self.busy_s += seconds
        self.cpu_s += cpu_seconds

    def snapshot(self) -> dict[str, Any]:
        return {"batches": self.batches, "requests": self.requests, "busy_s": round(self.busy_s, 6),
                "cpu_s": round(self.cpu_s, 6),
                "mean_size": round(self.requests / self.batches, 3) if self.batches else None,
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class Batcher:
    """`await batcher(item)` -> the batch function's result for that item. `fn(items) -> results`, one each, in
    order; if it raises, every request of the batch gets the exception. The queue lives on the event loop that
    first uses the batcher (a new loop, as in tests, starts a new queue)."""

    LONE_ON_LOOP_BELOW_S = 0.010

    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.0, in_thread: bool = True, name: str = "batch",
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.fn, self.name, self.on_batch = fn, name, on_batch
        self.max_batch_size, self.batch_wait_timeout_s, self.in_thread = 1, 0.0, bool(in_thread)
        self.configure(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        self.stats = BatchStats()
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._lone_s: float | None = None            # wall time of the last batch of one request
        self._ran_on_loop = False

    def configure(self, max_batch_size: int | None = None, batch_wait_timeout_s: float | None = None,
                  in_thread: bool | None = None) -> None:
        """New settings apply from the next batch on."""
        if max_batch_size is not None:
            if int(max_batch_size) < 1:
                raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
            self.max_batch_size = int(max_batch_size)
        if batch_wait_timeout_s is not None:
            if float(batch_wait_timeout_s) < 0:
                raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
            self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        if in_thread is not None:
            self.in_thread = bool(in_thread)

    def settings(self) -> dict[str, Any]:
        return {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s,
                "in_thread": self.in_thread}

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            if self._loop is loop:      # the consumer stopped: what it left queued is answered, not abandoned
                for _, fut in self._queue:
                    if not fut.done():
                        fut.set_exception(RuntimeError(f"[{self.name}] the batcher stopped; retry the request"))
            self._loop, self._queue, self._wake = loop, collections.deque(), asyncio.Event()
            self._task = loop.create_task(self._consume(), name=f"{self.name}-batcher")
        fut = loop.create_future()
        self._queue.append((item, fut))
        self._wake.set()
        return await fut

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, fut = self._queue.popleft()
            if not fut.done():                   # a caller that went away (cancelled) takes no room
                batch.append((item, fut))
        return batch

    def _timed(self, items: list[Any]) -> tuple[list[Any], float]:
        t = time.thread_time()
        try:
            results = self.fn(items)
        except StopIteration as err:    # a future refuses StopIteration: the batch's requests would wait for ever
            raise RuntimeError(f"the batch function raised StopIteration: {err!r}") from err
        return results, time.thread_time() - t

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._ran_on_loop:
                # The model ran on this loop: requests that arrived meanwhile are callbacks not yet run; let them
                # reach the queue before the batch is formed.
                for _ in range(2):
                    await asyncio.sleep(0)
            wait = self.batch_wait_timeout_s
            if wait > 0 and 0 < len(self._queue) < self.max_batch_size:
                deadline = loop.time() + wait
                while len(self._queue) < self.max_batch_size and (left := deadline - loop.time()) > 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except asyncio.TimeoutError:
                        break
                    self._wake.clear()
            batch = self._take()
            if self._queue:
                self._wake.set()                 # more than one batch's worth: the next round starts at once
            if not batch:
                continue
            items = [item for item, _ in batch]
            lone = len(items) == 1 and not self._queue
            on_loop = not self.in_thread or (lone and self._lone_s is not None
                                             and self._lone_s < self.LONE_ON_LOOP_BELOW_S)
            self._ran_on_loop = on_loop
            t0 = time.perf_counter()
            try:
                if not on_loop:
                    if self._executor is None:
                        self._executor = ThreadPoolExecutor(1, thread_name_prefix=self.name)
                    results, cpu = await loop.run_in_executor(self._executor, self._timed, items)
                else:
                    results, cpu = self._timed(items)
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            except Exception as err:  # noqa: BLE001 - every request of the batch gets it, the loop goes on
                logger.exception("[%s] batch of %d failed", self.name, len(items))
                results, cpu = [err] * len(items), 0.0
                failed = True
            except BaseException:     # cancelled (close), or the process is exiting: no request waits for ever
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(RuntimeError(f"[{self.name}] the batcher stopped; retry the request"))
                raise
            else:
                failed = False
            seconds = time.perf_counter() - t0
            if len(items) == 1:
                self._lone_s = seconds
            self.stats.add(len(items), seconds, cpu)
            if self.on_batch is not None:
                try:
                    self.on_batch(len(items), seconds)
                except Exception:  # noqa: BLE001 - observability must never fail a batch
                    self.on_batch = None
            for (_, fut), r in zip(batch, results):
                if fut.done():
                    continue
                if failed:
                    fut.set_exception(r)
                else:
                    fut.set_result(r)

    def close(self) -> None:
        if self._task is not None and not self._task.done() and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
