"""Dynamic batching: concurrent requests to one model version are merged into one run.

Requests queue while the previous batch computes (at most ``max_inflight`` batches at once), so
under load batches form even with a zero queue delay; a positive ``max_queue_delay_us`` lets a
lone request wait that long for company. Requests whose non-batch dimensions or dtypes differ are
never merged with each other.

The queue has no bound of its own: the data plane admits a request only within the model's
limits on requests and rows in flight (agent/serving/admission.py), so it is bounded there.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from modelfleet.kernel.errors import InferenceError

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
# Called once per executed batch: (batch size in rows, compute seconds).
BatchObserver = Callable[[int, float], None]


@dataclass
class Timing:
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_rows: int = 0
    # perf_counter() when the run began (0: unknown); the trace's queue and inference spans.
    started: float = 0.0


@dataclass
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple
    future: asyncio.Future
    enqueued: float


def _timed(run: RunFn, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, float]:
    start = time.perf_counter()
    out = run(inputs)
    return out, start, time.perf_counter() - start


class DirectRunner:
    """No batching: each request is one run, on the executor or (tiny models) inline."""

    def __init__(
        self, run: RunFn, executor: Executor, observer: BatchObserver, *, inline: bool = False
    ) -> None:
        self._run = run
        self._executor = executor
        self._observer = observer
        # For models that compute in tens of microseconds, the hop to a worker thread and back
        # costs more than the model: run them on the event loop instead.
        self.inline = inline

    def run_inline(self, inputs: dict[str, np.ndarray], rows: int) -> tuple[dict, Timing]:
        """The run on the calling thread (the event loop): for ``inline`` runners, whose callers
        may skip the coroutine of :meth:`infer`."""
        out, started, compute = _timed(self._run, inputs)
        self._observer(rows, compute)
        # Positional: keywords cost twice as much here, and this runs for every request.
        return out, Timing(0.0, compute, rows, started)

    async def infer(self, inputs: dict[str, np.ndarray], rows: int) -> tuple[dict, Timing]:
        if self.inline:
            return self.run_inline(inputs, rows)
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter()
        out, started, compute = await loop.run_in_executor(
            self._executor, _timed, self._run, inputs
        )
        self._observer(rows, compute)
        return out, Timing(started - submitted, compute, rows, started)


# Queue delays end within this of their deadline on a thread instead of the event loop.
FINE_WAIT_S = 0.002
_fine_timer_pool: ThreadPoolExecutor | None = None
_fine_timer_lock = threading.Lock()


def _fine_timer() -> ThreadPoolExecutor:
    """Threads for the last sub-millisecond of queue delays, shared by all models (each wait
    is under FINE_WAIT_S, so a few threads serve many models), apart from the model executor."""
    global _fine_timer_pool
    with _fine_timer_lock:
        if _fine_timer_pool is None:
            _fine_timer_pool = ThreadPoolExecutor(4, thread_name_prefix="batch-delay")
        return _fine_timer_pool


class DynamicBatcher:
    def __init__(
        self,
        run: RunFn,
        executor: Executor,
        observer: BatchObserver,
        *,
        max_batch_size: int,
        max_queue_delay_us: int = 0,
        max_inflight: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run = run
        self._executor = executor
        self._observer = observer
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self._delay_s = max_queue_delay_us / 1e6
        self._slots = asyncio.Semaphore(max(1, max_inflight))
        self._pending: deque[_Item] = deque()
        self._pending_rows = 0
        self._arrived = asyncio.Event()
        self._wake = threading.Event()  # the same signal, for a wait on the fine timer
        self._draining = False

    async def infer(self, inputs: dict[str, np.ndarray], rows: int) -> tuple[dict, Timing]:
        key = tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in sorted(inputs.items()))
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Item(inputs, rows, key, fut, time.perf_counter()))
        self._pending_rows += rows
        self._arrived.set()
        self._wake.set()
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._pending:
                await self._slots.acquire()
                if self._delay_s > 0:
                    await self._wait_for_company()
                batch = self._take()
                asyncio.get_running_loop().create_task(self._execute(batch))
        finally:
            self._draining = False

    async def _wait_for_company(self) -> None:
        deadline = self._pending[0].enqueued + self._delay_s
        while self._pending_rows < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            if remaining > FINE_WAIT_S:
                # The bulk on the event loop, whose timers wake on whole milliseconds (epoll):
                # stop a millisecond short and wait out the rest precisely below.
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining - FINE_WAIT_S / 2)
                continue
            # The sub-millisecond rest on a thread: a futex wait with microsecond precision,
            # cut short by an arrival (infer() sets the event). Without this a 100 us delay
            # lasted a whole millisecond.
            self._wake.clear()
            if self._pending_rows >= self.max_batch_size:
                return
            await asyncio.get_running_loop().run_in_executor(
                _fine_timer(), self._wake.wait, remaining
            )

    def _take(self) -> list[_Item]:
        first = self._pending.popleft()
        batch, rows, held = [first], first.rows, []
        while self._pending and rows < self.max_batch_size:
            item = self._pending.popleft()
            if item.key == first.key and rows + item.rows <= self.max_batch_size:
                batch.append(item)
                rows += item.rows
            else:
                held.append(item)
                if item.key == first.key:
                    break
        # Anything skipped keeps its place at the head of the queue.
        self._pending.extendleft(reversed(held))
        self._pending_rows -= rows
        return batch

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if len(batch) == 1:
                merged = batch[0].inputs
            else:
                merged = {
                    name: np.concatenate([it.inputs[name] for it in batch])
                    for name in batch[0].inputs
                }
            total = sum(it.rows for it in batch)
            try:
                out, started, compute = await loop.run_in_executor(
                    self._executor, _timed, self._run, merged
                )
            except Exception as exc:
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(exc)
                return
            self._observer(total, compute)
            offset = 0
            for it in batch:
                if len(batch) == 1:
                    part = out
                else:
                    part = {}
                    for name, arr in out.items():
                        if arr.ndim == 0 or arr.shape[0] != total:
                            err = InferenceError(
                                f"output {name!r} has shape {list(arr.shape)} for a batch of "
                                f"{total} rows; the model does not batch along dimension 0"
                            )
                            for other in batch:
                                if not other.future.done():
                                    other.future.set_exception(err)
                            return
                        part[name] = arr[offset : offset + it.rows]
                offset += it.rows
                if not it.future.done():
                    it.future.set_result(
                        (part, Timing(started - it.enqueued, compute, total, started))
                    )
        finally:
            self._slots.release()
