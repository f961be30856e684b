"""Traffic split and shadow runs in the agent's data plane, in process, with real ONNX models.

The slots hold an active version and a candidate gated beside it (blue/green), as the fleet
sync and `modelfleet-agent compare` leave them; the tests drive DataPlane.infer directly.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.serving.dataplane import DataPlane, InferInput, InferRequest
from modelfleet.agent.serving.routing import BASIS_POINTS, Comparison, bucket
from modelfleet.agent.serving.shadow import (
    ShadowRunner,
    _observe_all,
    compare_batch,
    compare_output,
    js_divergence_bits,
)
from modelfleet.agent.slots import BatchingConfig, SlotManager
from modelfleet.kernel.bundle import create_bundle
from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.kernel.runtime import RuntimeOptions
from modelfleet.kernel.telemetry_bounds import DIFF_BOUNDS
from modelfleet.protos import fleet_pb2 as pb
from tests import models

WIDTH = 4
X = np.random.default_rng(3).standard_normal((1, WIDTH)).astype(np.float32)


def bundle(root: Path, name: str, version: int, build: Callable[[Path], Path]) -> Path:
    samples = {"x": np.random.default_rng(7).standard_normal((4, WIDTH)).astype(np.float32)}
    b = create_bundle(
        build(root / "src" / f"{name}-{version}.onnx"),
        name=name,
        version=version,
        samples=samples,
        out_dir=root / "repo",
        latency_budget_ms=5000,
    )
    return b.path


def request(model: str = "clf", key: str = "", version: str = "", x: np.ndarray = X):
    return InferRequest(
        model, version, "", [InferInput("x", "FP32", tuple(x.shape), x)], routing_key=key
    )


class Plane:
    """Slots, metrics and a data plane; ``v1`` active, ``v2`` gated beside it."""

    def __init__(self, metrics: AgentMetrics, slots: SlotManager, plane: DataPlane) -> None:
        self.metrics, self.slots, self.plane = metrics, slots, plane

    def compare(self, split_bp: int = 0, sticky: bool = False, shadow_bp: int = 0) -> None:
        self.slots.set_comparison("clf", Comparison(2, split_bp, sticky, shadow_bp))

    async def versions(self, n: int, key: str = "", version: str = "") -> list[str]:
        out = []
        for _ in range(n):
            resp = await self.plane.infer(request(key=key, version=version))
            out.append(resp.model_version)
        return out

    def report(self) -> dict[int, pb.VersionTelemetry]:
        snap = self.metrics.telemetry.snapshot()
        return {v.version: v for v in snap.versions if v.model == "clf"}


def run_plane(
    tmp_path: Path,
    scenario: Callable[[Plane], Awaitable[None]],
    *,
    v2: Callable[[Path], Path] | None = None,
    prepare: bool = True,
    queue_max: int = 64,
) -> None:
    v1_path = bundle(tmp_path, "clf", 1, lambda p: models.classifier(p, seed=0))
    v2_path = bundle(tmp_path, "clf", 2, v2 or (lambda p: models.classifier(p, seed=0)))

    async def main() -> None:
        metrics = AgentMetrics()
        slots = SlotManager(
            runtime=RuntimeOptions(1, 1, "cpu"),
            # Not inline: requests hop to the serving threads, as a real model's do, so the
            # event loop (and the shadow workers) run between them.
            batching=BatchingConfig(enabled=False, inline_max_us=0),
            metrics=metrics,
            serving_threads=2,
        )
        plane = DataPlane(slots, metrics, ShadowRunner(metrics, queue_max=queue_max))
        plane.rng = random.Random(1)
        try:
            await slots.deploy(v1_path)
            if prepare:
                await slots.deploy(v2_path, switch=False)
            await asyncio.wait_for(scenario(Plane(metrics, slots, plane)), 120)
        finally:
            await plane.close()
            slots.close()

    asyncio.run(main())


async def drained(p: Plane, expected: int, timeout: float = 30.0) -> tuple[int, int, int]:
    """(compared, dropped, failed) once every sampled copy is accounted for."""
    deadline = time.monotonic() + timeout
    while True:
        cells = p.metrics.telemetry.shadow_cells("clf")
        totals = cells[0].totals()[:3] if cells else (0, 0, 0)
        if sum(totals) >= expected or time.monotonic() > deadline:
            return totals
        await asyncio.sleep(0.01)


# -- pure parts ----------------------------------------------------------------------------------


def test_buckets_are_stable_and_spread_evenly() -> None:
    # Pinned values: the hash must not change between releases or processes.
    assert bucket("user-1", "clf", 2) == bucket("user-1", "clf", 2)
    assert bucket("user-1", "clf", 2) != bucket("user-1", "clf", 3) or bucket(
        "user-2", "clf", 2
    ) != bucket("user-2", "clf", 3)
    counts = Counter(bucket(f"k{i}", "clf", 2) * 10 // BASIS_POINTS for i in range(20000))
    assert len(counts) == 10
    assert all(1800 < n < 2200 for n in counts.values()), counts


def test_comparison_refuses_shares_outside_basis_points() -> None:
    with pytest.raises(ValueError, match=r"split_bp must be 0\.\.10000"):
        Comparison(2, split_bp=10001)


def test_jensen_shannon_in_bits() -> None:
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    q = np.array([[0.0, 1.0], [0.5, 0.5]])
    assert js_divergence_bits(p, q).tolist() == pytest.approx([1.0, 0.0])


def test_compare_output_kinds() -> None:
    probs = np.array([[0.7, 0.2, 0.1]], np.float32)
    same = compare_output("p", probs, probs.copy())
    assert same.ok and same.abs_diff == 0 and same.top1_agree is True and same.js == (0.0,)
    flipped = compare_output("p", probs, probs[:, ::-1].copy())
    assert flipped.top1_agree is False and flipped.js[0] > 0.1
    assert flipped.abs_diff == pytest.approx(0.6)
    # A regression output (last dimension 1): differences, no top-1, no divergence.
    reg = compare_output("y", np.array([[2.0]]), np.array([[2.5]]))
    assert reg.top1_agree is None and reg.js == () and reg.rel_diff == pytest.approx(0.25)
    assert not compare_output("y", np.zeros((1, 2)), np.zeros((1, 3))).ok
    assert not compare_output("y", np.zeros((1, 2)), None).ok


def test_a_batch_compares_each_copy_as_it_would_alone() -> None:
    """The shadow threads compare copies stacked per shape and dtype; each copy's result is
    what comparing it alone gives, whatever shares its batch (NaN, other shapes, strings)."""
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(4), size=2).astype(np.float32)
    pairs: list[tuple[np.ndarray, np.ndarray | None]] = [
        (probs, probs.copy()),
        (probs, rng.dirichlet(np.ones(4), size=2).astype(np.float32)),
        (np.array([[0.2, 0.8]]), np.array([[0.8, 0.2]])),
        (np.array([[1.0, np.nan]]), np.array([[1.0, np.nan]])),
        (np.array([[np.nan, 2.0]]), np.array([[1.0, 2.0]])),
        (np.array([[0.5, np.inf]]), np.array([[0.5, 1.0]])),
        (np.zeros((1, 2)), np.zeros((1, 3))),
        (np.zeros((1, 2)), None),
        (np.array(["a", "b"]), np.array(["a", "c"])),
        (np.zeros((0, 4)), np.zeros((0, 4))),
        (probs.astype(np.float64), probs),
        (np.array([[3.0]]), np.array([[3.5]])),
        (np.array(7, np.int64), np.array(9, np.int64)),
    ]
    batch = compare_batch("y", [p for p, _ in pairs], [s for _, s in pairs])
    alone = [compare_output("y", p, s) for p, s in pairs]
    assert [batch.one(i) for i in range(len(pairs))] == alone
    assert alone[0].abs_diff == 0 and alone[0].top1_agree is True and alone[0].js == (0.0, 0.0)
    assert alone[1].ok and len(alone[1].js) == 2 and max(alone[1].js) > 0
    assert alone[2].top1_agree is False and alone[2].js[0] > 0.1
    # NaN on both sides agrees; on one side only, the difference is infinite and the copy's
    # top-1 and divergence are left out, not its batch's.
    assert alone[3].abs_diff == 0 and alone[3].top1_agree is None
    assert alone[4].abs_diff == np.inf and alone[4].top1_agree is None and alone[4].js == ()
    assert alone[5].abs_diff == np.inf
    assert not alone[6].ok and not alone[7].ok
    assert alone[8] == alone[8].__class__("y", True, 1.0, 1.0)
    assert alone[9].ok and alone[9].abs_diff == 0
    assert alone[10].abs_diff < 1e-6 and alone[10].top1_agree is True
    assert alone[11].rel_diff == pytest.approx(0.5 / 3) and alone[11].top1_agree is None
    assert alone[12].abs_diff == 2 and alone[12].top1_agree is None


def test_bulk_observation_exposes_what_observe_does() -> None:
    """The shadow threads count a batch into a Prometheus histogram bucket by bucket
    (prometheus_client's child layout); the exposition must be observe()'s, value by value."""
    values = np.array([0.0, 5e-7, 1e-6, 0.02, 0.02, 0.05, 0.0500001, 3.0, 10.0, 11.0, np.inf])
    exposed = []
    for bulk in (True, False):
        registry = CollectorRegistry()
        child = Histogram("d", "d", ["o"], buckets=DIFF_BOUNDS, registry=registry).labels("a")
        if bulk:

            def refuse(_: float) -> None:
                raise AssertionError("the bulk path fell back to observe()")

            child.observe = refuse  # type: ignore[method-assign]
            _observe_all(child, values)
            _observe_all(child, values[:0])
        else:
            for v in values.tolist():
                child.observe(v)
        exposed.append(generate_latest(registry).decode())
    assert exposed[0] == exposed[1]
    assert 'd_bucket{le="0.05",o="a"} 6.0' in exposed[0]

    class Other:  # another layout: observe() per value
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, v: float) -> None:
            self.seen.append(v)

    other = Other()
    _observe_all(other, values[:3])
    assert other.seen == [0.0, 5e-7, 1e-6]


# -- the split -------------------------------------------------------------------------------


def test_split_sends_the_configured_share_to_the_candidate(tmp_path: Path) -> None:
    async def scenario(p: Plane) -> None:
        assert set(await p.versions(50)) == {"1"}  # no comparison: the active version
        p.compare(split_bp=2500)
        got = Counter(await p.versions(4000))
        share = got["2"] / 4000
        assert 0.22 < share < 0.28, got
        rep = p.report()
        assert rep[2].requests == got["2"] and rep[1].requests == got["1"] + 50
        assert (rep[1].arm, rep[2].arm) == ("active", "candidate")
        metrics = p.metrics.registry.get_sample_value(
            "modelfleet_routed_requests_total",
            {"model": "clf", "version": "2", "arm": "candidate"},
        )
        assert metrics == got["2"]
        loaded = p.metrics.registry.get_sample_value(
            "modelfleet_loaded_versions", {"model": "clf", "version": "2", "role": "candidate"}
        )
        assert loaded == 1
        # A new share applies from the next request, without reloading anything.
        p.compare(split_bp=BASIS_POINTS)
        assert set(await p.versions(100)) == {"2"}
        p.slots.set_comparison("clf", None)
        assert set(await p.versions(100)) == {"1"}

    run_plane(tmp_path, scenario)


def test_sticky_keys_always_reach_one_version_and_stay_as_the_share_grows(
    tmp_path: Path,
) -> None:
    async def scenario(p: Plane) -> None:
        p.compare(split_bp=3000, sticky=True)
        keys = [f"user-{i}" for i in range(300)]
        first: dict[str, str] = {}
        for _ in range(3):
            for k in keys:
                (v,) = await p.versions(1, key=k)
                assert first.setdefault(k, v) == v, f"{k} moved from {first[k]} to {v}"
        on_candidate = {k for k, v in first.items() if v == "2"}
        assert 60 < len(on_candidate) < 120, len(on_candidate)
        # Exactly the keys whose bucket is below the share.
        assert on_candidate == {k for k in keys if bucket(k, "clf", 2) < 3000}
        p.compare(split_bp=6000, sticky=True)
        for k in keys:
            (v,) = await p.versions(1, key=k)
            if k in on_candidate:
                assert v == "2", f"{k} left the candidate when the share grew"
        # Requests without a key are drawn.
        got = Counter(await p.versions(1000))
        assert 0.55 < got["2"] / 1000 < 0.65, got

    run_plane(tmp_path, scenario)


def test_a_routing_key_too_long_is_refused_with_its_size(tmp_path: Path) -> None:
    async def scenario(p: Plane) -> None:
        p.compare(split_bp=5000, sticky=True)
        with pytest.raises(InvalidRequestError, match="2000 bytes; at most 1024"):
            await p.plane.infer(request(key="k" * 2000))

    run_plane(tmp_path, scenario)


def test_an_explicit_version_bypasses_the_split(tmp_path: Path) -> None:
    async def scenario(p: Plane) -> None:
        p.compare(split_bp=BASIS_POINTS)
        assert set(await p.versions(30, version="1")) == {"1"}
        assert set(await p.versions(30, version="2")) == {"2"}
        pinned = p.metrics.registry.get_sample_value(
            "modelfleet_routed_requests_total", {"model": "clf", "version": "1", "arm": "pinned"}
        )
        assert pinned == 30

    run_plane(tmp_path, scenario)


def test_a_candidate_not_loaded_sends_everything_to_the_active_version(tmp_path: Path) -> None:
    async def scenario(p: Plane) -> None:
        p.compare(split_bp=BASIS_POINTS, shadow_bp=BASIS_POINTS)
        assert set(await p.versions(50)) == {"1"}
        status = {s.name: s for s in p.slots.status()}["clf"]
        assert status.comparison is not None and not status.comparing
        assert p.report()[1].shadow == []
        # A comparison naming the active version itself compares nothing either.
        p.slots.set_comparison("clf", Comparison(1, split_bp=BASIS_POINTS))
        assert set(await p.versions(20)) == {"1"}

    run_plane(tmp_path, scenario, prepare=False)


# -- shadow runs -------------------------------------------------------------------------------


def test_identical_outputs_agree_fully_with_zero_difference(tmp_path: Path) -> None:
    async def scenario(p: Plane) -> None:
        p.compare(shadow_bp=BASIS_POINTS)
        assert set(await p.versions(40)) == {"1"}
        assert await drained(p, 40) == (40, 0, 0)
        rep = p.report()
        assert rep[2].arm == "shadow"
        # Copies are not served requests of the candidate.
        assert rep[2].requests == 0
        assert {s.output for s in rep[1].shadow} == {"logits", "probs"}
        for s in rep[1].shadow:
            assert (s.shadow_version, s.compared, s.dropped, s.shadow_failures) == (2, 40, 0, 0)
            assert s.top1_agree == s.top1_total == 40
            assert s.abs_diff.counts[0] == 40 and s.abs_diff.sum == 0  # the bucket le=0
            assert list(s.abs_diff.bounds) == list(DIFF_BOUNDS)
            assert s.shadow_latency.count == 40
        probs = next(s for s in rep[1].shadow if s.output == "probs")
        assert probs.js_divergence.count == 40 and probs.js_divergence.counts[0] == 40
        logits = next(s for s in rep[1].shadow if s.output == "logits")
        assert logits.js_divergence.count == 0  # logits are not probability vectors
        # The next report holds only what came since.
        assert p.report()[1].shadow == []

    run_plane(tmp_path, scenario)


def test_a_version_with_other_outputs_shows_its_divergence(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    xs = rng.standard_normal((200, 1, WIDTH)).astype(np.float32)

    async def scenario(p: Plane) -> None:
        p.compare(shadow_bp=BASIS_POINTS)
        for x in xs:
            await p.plane.infer(request(x=x))
        assert await drained(p, len(xs)) == (len(xs), 0, 0)
        probs = next(s for s in p.report()[1].shadow if s.output == "probs")
        assert probs.compared == len(xs)
        assert probs.top1_total == len(xs) and probs.top1_agree < len(xs)
        assert probs.abs_diff.counts[0] == 0 and probs.abs_diff.sum > 0
        assert probs.js_divergence.count == len(xs) and probs.js_divergence.sum > 0
        text = p.metrics.registry.get_sample_value(
            "modelfleet_shadow_requests_total",
            {"model": "clf", "version": "1", "shadow_version": "2", "outcome": "compared"},
        )
        assert text == len(xs)

    run_plane(tmp_path, scenario, v2=lambda p: models.classifier(p, seed=5), queue_max=1000)


def test_a_slow_shadow_drops_copies_and_never_holds_up_the_primary(tmp_path: Path) -> None:
    """The shadow is a far heavier model (same signature): the queue fills, copies are
    dropped and counted, and every primary request is answered at its own pace."""
    n = 300

    async def scenario(p: Plane) -> None:
        async def timed() -> list[float]:
            out = []
            for _ in range(n):
                start = time.perf_counter()
                resp = await p.plane.infer(request())
                out.append(time.perf_counter() - start)
                assert resp.model_version == "1"
            return out

        off = await timed()
        p.compare(shadow_bp=BASIS_POINTS)
        on = await timed()
        compared, dropped, failed = await drained(p, n, timeout=60)
        assert failed == 0 and dropped > 0 and compared + dropped == n
        # Generous: the exact ratio is the benchmark's job (tests/benchmarks/traffic_bench.py).
        assert np.median(on) < np.median(off) * 3 + 0.002, (np.median(off), np.median(on))
        rep = p.report()
        assert rep[1].shadow[0].dropped == dropped
        assert rep[2].requests == 0

    run_plane(
        tmp_path,
        scenario,
        v2=lambda p: models.classifier(p, seed=0, hidden=512, layers=6),
        queue_max=4,
    )


def test_a_shadow_that_fails_is_counted_not_raised(tmp_path: Path) -> None:
    async def scenario(p: Plane) -> None:
        p.compare(shadow_bp=BASIS_POINTS)
        # Outputs of another shape (more classes): a failed comparison, the client unaffected.
        assert set(await p.versions(10)) == {"1"}
        assert await drained(p, 10) == (0, 0, 10)

    run_plane(tmp_path, scenario, v2=lambda p: models.classifier(p, seed=0, classes=6))


def test_a_batch_with_failed_copies_counts_only_the_compared_ones(tmp_path: Path) -> None:
    """Copies offered back to back share a batch; the ones whose outputs the shadow cannot
    match are failures, and the rest are counted as if they had come alone."""

    async def scenario(p: Plane) -> None:
        slot = p.slots.slots["clf"]
        primary, shadow = slot.active, slot.previous
        assert primary is not None and shadow is not None
        good = primary.model.run({"x": X})
        two = np.concatenate([X, X])
        good_two = primary.model.run({"x": two})
        bad = {"logits": np.zeros((1, 6), np.float32), "probs": good["probs"]}
        runner = p.plane.shadow
        offered = [
            runner.offer(primary, shadow, {"x": X}, good),
            runner.offer(primary, shadow, {"x": X}, bad),
            runner.offer(primary, shadow, {"x": two}, good_two),
            runner.offer(primary, shadow, {"x": X}, good),
        ]
        assert offered == [True] * 4
        assert await drained(p, 4) == (3, 0, 1)
        rows = p.report()[1].shadow
        assert {s.output for s in rows} == {"logits", "probs"}
        for s in rows:
            assert (s.compared, s.shadow_failures) == (3, 1)
            # Identical models: every compared copy agrees, with no difference at all.
            assert s.top1_agree == s.top1_total == 3
            assert s.abs_diff.counts[0] == 3 and s.shadow_latency.count == 3
        probs = next(s for s in rows if s.output == "probs")
        # Two rows in the third copy: four divergences.
        assert probs.js_divergence.count == 4 and probs.js_divergence.counts[0] == 4
        failed = p.metrics.registry.get_sample_value(
            "modelfleet_shadow_requests_total",
            {"model": "clf", "version": "1", "shadow_version": "2", "outcome": "failed"},
        )
        assert failed == 1

    run_plane(tmp_path, scenario)
