"""Dynamic batcher with a fake model: merging, splitting, isolation of incompatible shapes."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from modelfleet.agent.serving import batcher
from modelfleet.agent.serving.batcher import DirectRunner, DynamicBatcher
from modelfleet.kernel.errors import InferenceError


class FakeModel:
    """Doubles its input; records each batch it saw; optionally slow or broken."""

    def __init__(self, delay_s: float = 0.0, rows_out: int | None = None) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.rows_out = rows_out
        self.lock = threading.Lock()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            self.batches.append(inputs["x"].shape[0])
        time.sleep(self.delay_s)
        y = inputs["x"] * 2
        if self.rows_out is not None:
            y = y[: self.rows_out]
        return {"y": y}


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_merge_and_split_back() -> None:
    model = FakeModel(delay_s=0.02)
    observed: list[int] = []

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            b = DynamicBatcher(
                model.run,
                pool,
                lambda r, s: observed.append(r),
                max_batch_size=8,
                max_queue_delay_us=0,
            )
            reqs = [np.full((1, 2), i, np.float32) for i in range(17)]
            results = await asyncio.gather(*(b.infer({"x": x}, 1) for x in reqs))
            for x, (out, timing) in zip(reqs, results, strict=True):
                np.testing.assert_array_equal(out["y"], x * 2)
                assert timing.batch_rows >= 1

    run(main())
    assert sum(model.batches) == 17
    assert max(model.batches) == 8  # requests queued behind the first batch were merged
    assert observed == model.batches


def test_queue_delay_gathers_a_lone_trickle() -> None:
    model = FakeModel()

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher(
                model.run, pool, lambda r, s: None, max_batch_size=4, max_queue_delay_us=200_000
            )

            async def later(i: int):
                await asyncio.sleep(0.01 * i)
                return await b.infer({"x": np.ones((1, 2), np.float32)}, 1)

            await asyncio.gather(*(later(i) for i in range(4)))

    run(main())
    assert model.batches == [4]


def test_sub_millisecond_delays_are_waited_on_the_fine_timer() -> None:
    """A lone request waits its whole delay (not less), also below the event loop's 1 ms timer
    granularity. (How close to the deadline the wait ends is a benchmark figure.)"""
    model = FakeModel()

    async def main() -> float:
        with ThreadPoolExecutor(1) as pool:
            lone = DynamicBatcher(
                model.run, pool, lambda r, s: None, max_batch_size=4, max_queue_delay_us=300
            )
            _, timing = await lone.infer({"x": np.ones((1, 2), np.float32)}, 1)
            return timing.queue_s

    assert 300e-6 <= run(main()) < 0.5  # honoured, and nothing hung
    assert model.batches == [1]


def test_an_arrival_ends_a_fine_timer_wait_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The whole 5 s delay on the fine timer: only the wake-up can end it early.
    monkeypatch.setattr(batcher, "FINE_WAIT_S", 10.0)
    model = FakeModel()

    async def main() -> float:
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher(
                model.run, pool, lambda r, s: None, max_batch_size=2, max_queue_delay_us=5_000_000
            )
            first = asyncio.ensure_future(b.infer({"x": np.ones((1, 2), np.float32)}, 1))
            await asyncio.sleep(0.05)  # the first request is waiting for company
            await b.infer({"x": np.ones((1, 2), np.float32)}, 1)
            _, timing = await first
            return timing.queue_s

    assert run(main()) < 2.5
    assert model.batches == [2]


def test_different_inner_shapes_never_merge() -> None:
    model = FakeModel(delay_s=0.01)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher(
                model.run, pool, lambda r, s: None, max_batch_size=16, max_queue_delay_us=50_000
            )
            a = [b.infer({"x": np.ones((1, 2), np.float32)}, 1) for _ in range(3)]
            c = [b.infer({"x": np.ones((1, 5), np.float32)}, 1) for _ in range(3)]
            outs = await asyncio.gather(*a, *c)
            assert [o["y"].shape for o, _ in outs] == [(1, 2)] * 3 + [(1, 5)] * 3

    run(main())
    assert sorted(model.batches) == [3, 3]


def test_batch_never_exceeds_max_rows() -> None:
    model = FakeModel(delay_s=0.01)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher(model.run, pool, lambda r, s: None, max_batch_size=5)
            await asyncio.gather(
                *(b.infer({"x": np.ones((3, 2), np.float32)}, 3) for _ in range(6))
            )

    run(main())
    assert all(n <= 5 for n in model.batches) and sum(model.batches) == 18


def test_a_model_that_does_not_batch_fails_every_request_clearly() -> None:
    model = FakeModel(delay_s=0.01, rows_out=1)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher(
                model.run, pool, lambda r, s: None, max_batch_size=8, max_queue_delay_us=50_000
            )
            results = await asyncio.gather(
                *(b.infer({"x": np.ones((1, 2), np.float32)}, 1) for _ in range(3)),
                return_exceptions=True,
            )
            assert all(isinstance(r, InferenceError) for r in results)
            assert "does not batch along dimension 0" in str(results[0])

    run(main())


def test_errors_reach_every_request_in_the_batch() -> None:
    def broken(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise InferenceError("boom")

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher(broken, pool, lambda r, s: None, max_batch_size=4)
            d = DirectRunner(broken, pool, lambda r, s: None)
            for runner in (b, d):
                with pytest.raises(InferenceError, match="boom"):
                    await runner.infer({"x": np.ones((1, 2), np.float32)}, 1)

    run(main())
