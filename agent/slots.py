"""Blue/green slots: per model, an active version that serves and a previous one kept for rollback.

A candidate is verified, loaded and put through the health gate on the loader thread while the
active version keeps serving on the serving threads; only a candidate that passes becomes active,
in one assignment on the event loop. A request holds a reference to the version it started on, so
a switch never cuts it short. At most two versions of a model are loaded at any time: the
previous version is let go before a candidate loads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from modelfleet.agent.gate import GateResult, evaluate, runs_inline
from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.serving.batcher import DirectRunner, DynamicBatcher, Timing
from modelfleet.agent.serving.drift import DriftSampler
from modelfleet.agent.serving.routing import (
    ARM_ACTIVE,
    ARM_CANDIDATE,
    ARM_SHADOW,
    Comparison,
    ready_candidate,
)
from modelfleet.agent.telemetry import ShadowCells
from modelfleet.kernel.bundle import Bundle, Manifest, load_bundle
from modelfleet.kernel.errors import (
    BundleError,
    GateFailedError,
    ModelfleetError,
    ModelNotFoundError,
    ModelNotReadyError,
    Status,
)
from modelfleet.kernel.runtime import OnnxModel, ProviderUnavailableError, RuntimeOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingConfig:
    enabled: bool = True
    # None: take the bundle's hint (manifest execution.max_queue_delay_us).
    max_queue_delay_us: int | None = None
    # Batches computing at once per model version; more overlaps splitting with computing.
    max_inflight: int = 1
    # Models whose fastest health-gate run is below this run on the event loop, unbatched
    # (0: never).
    inline_max_us: int = 200


def batch_tail(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    if shape and shape[0] == -1 and -1 not in shape[1:]:
        return tuple(shape[1:])
    return None


@dataclass
class VersionStats:
    """Counters behind Triton's ModelStatistics, kept per loaded version."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    # batch rows -> [executions, compute ns]
    batches: dict[int, list[int]] = field(default_factory=dict)


class LoadedVersion:
    def __init__(
        self,
        bundle: Bundle,
        model: OnnxModel,
        executor: ThreadPoolExecutor,
        batching: BatchingConfig,
        metrics: AgentMetrics,
        gate: GateResult | None = None,
    ) -> None:
        self.bundle = bundle
        self.model = model
        self.name = bundle.name
        self.version = bundle.version
        self.loaded_at = time.time()
        # The health gate's verdict; serving workers take the same serving path from it.
        self.gate = gate
        self.stats = VersionStats()
        # Every request of this version counts here, and /metrics reads it (agent/metrics.py).
        self.telemetry = metrics.serving(self.name, self.version)
        # The signature by input name, looked up by every request's validation.
        self.input_specs = {t.name: t for t in bundle.manifest.inputs}
        # Per input, its shape after the batch dimension when that is its only -1 (else None).
        self.input_tails = {t.name: batch_tail(t.shape) for t in bundle.manifest.inputs}
        # One-input signatures validate_inputs accepted, and their rows (serving/dataplane.py).
        self.accepted: dict[tuple[str, str, tuple[int, ...], tuple[int, ...]], int] = {}
        self.max_batch_size = bundle.manifest.max_batch_size
        self._aggregator = metrics.telemetry
        # Set by SlotManager.drift_attach when the bundle has a reference (agent/serving/drift.py).
        self.drift: DriftSampler | None = None
        max_batch = bundle.manifest.max_batch_size
        delay = batching.max_queue_delay_us
        if delay is None:
            delay = bundle.manifest.max_queue_delay_us
        inline = gate is not None and runs_inline(gate, batching.inline_max_us)
        self.batching = batching.enabled and max_batch > 1 and not inline
        if self.batching:
            self.runner: DirectRunner | DynamicBatcher = DynamicBatcher(
                model.run_prepared,
                executor,
                self._observe_batch,
                max_batch_size=max_batch,
                max_queue_delay_us=delay,
                max_inflight=batching.max_inflight,
            )
        else:
            self.runner = DirectRunner(
                model.run_prepared, executor, self._observe_batch, inline=inline
            )
        # How requests run, for status: inline (on the event loop), batched or executor.
        self.path = "batched" if self.batching else ("inline" if inline else "executor")
        self.inline = not self.batching and inline

    def _observe_batch(self, rows: int, compute_s: float) -> None:
        # Runs on the event loop (after the executor future resolves), so no lock is needed.
        s = self.stats
        s.execution_count += 1
        s.inference_count += rows
        ns = int(compute_s * 1e9)
        s.compute_ns += ns
        entry = s.batches.get(rows)
        if entry is None:
            entry = s.batches[rows] = [0, 0]
        entry[0] += 1
        entry[1] += ns
        self.telemetry.batch_done(rows, compute_s)

    async def infer(
        self, inputs: dict[str, np.ndarray], rows: int
    ) -> tuple[dict[str, np.ndarray], Timing]:
        return await self.runner.infer(self.model.prepare(inputs), rows)

    def run_inline(
        self, inputs: dict[str, np.ndarray], rows: int
    ) -> tuple[dict[str, np.ndarray], Timing]:
        """What :meth:`infer` does for an ``inline`` version, without its coroutines (the data
        plane calls this for every request to such a version)."""
        runner = self.runner
        assert isinstance(runner, DirectRunner)
        return runner.run_inline(self.model.prepare(inputs), rows)

    def telemetry_shadow(self, shadow_version: int, outputs: list[str]) -> ShadowCells:
        """Where this version's outputs are compared with ``shadow_version``'s."""
        return self._aggregator.shadow(self.name, self.version, shadow_version, outputs)

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest


@dataclass
class ModelSlot:
    name: str
    active: LoadedVersion | None = None
    previous: LoadedVersion | None = None
    loading: int | None = None
    last_gate: GateResult | None = None
    # version -> (fingerprint of what failed, result); the same bytes are not retried.
    failed: dict[int, tuple[object, GateResult]] = field(default_factory=dict)
    # After a rollback, versions up to this one are not re-deployed automatically.
    hold_at_or_below: int | None = None
    # Live comparison of a candidate (loaded beside the active version as ``previous``) with
    # the active version: split and shadow shares (agent/serving/routing.py).
    comparison: Comparison | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Serving workers only: (version, switch epoch) to become active once the leader's epoch
    # reaches it (agent/workers.py); checked by the request path.
    pending: tuple[LoadedVersion, int] | None = None

    def loaded(self) -> list[LoadedVersion]:
        return [v for v in (self.active, self.previous) if v is not None]


@dataclass(frozen=True)
class ModelStatus:
    name: str
    active: int | None
    previous: int | None
    loading: int | None
    ready: bool
    last_gate: GateResult | None
    failed: dict[int, GateResult]
    held_at_or_below: int | None
    comparison: Comparison | None = None
    # The comparison's candidate is loaded and gated, so the shares apply now.
    comparing: bool = False
    # Execution providers the active and previous versions serve on ("" when not loaded).
    active_provider: str = ""
    previous_provider: str = ""
    # How the active / previous version runs requests: inline, batched or executor ("": none).
    active_path: str = ""
    previous_path: str = ""


ChangeListener = Callable[[str], None]


class Replicas(Protocol):
    """Other processes that serve what this one serves (agent/workers.py)."""

    async def prepare(self, candidate: LoadedVersion) -> None:
        """Load and check ``candidate`` everywhere before it may serve; raises on refusal."""

    async def arm(self, name: str, version: int) -> None:
        """Every process holds ``version`` ready to switch to at the next epoch (after prepare)."""

    def flip(self) -> None:
        """The epoch every armed process switches at: one store, seen by the next request of
        every process."""

    async def commit(self, name: str, version: int) -> None:
        """After a switch here: the same switch everywhere."""

    def release(self, name: str, version: int) -> None:
        """Done with a prepared version (switched to, kept as previous, or given up)."""

    async def sync(self) -> None:
        """Every process serves what this one serves now (after an unload, a rollback)."""


class SlotManager:
    """All models the agent knows, and the only place that changes what serves."""

    def __init__(
        self,
        *,
        runtime: RuntimeOptions,
        batching: BatchingConfig,
        metrics: AgentMetrics,
        serving_threads: int = 2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.batching = batching
        self.metrics = metrics
        self.clock = clock
        self.serving_executor = ThreadPoolExecutor(serving_threads, thread_name_prefix="serve")
        # One loader thread: loads never compete with each other, only with nothing on the
        # serving threads.
        self.loader_executor = ThreadPoolExecutor(1, thread_name_prefix="load")
        self.slots: dict[str, ModelSlot] = {}
        # Models unloaded on request (the protocol's model control), name -> why: the
        # repository watcher leaves them alone, and requests for them say so.
        self.unloaded: dict[str, str] = {}
        self.listeners: list[ChangeListener] = []
        metrics.telemetry.arms = self.arms
        # Called on the loader thread for every version that passed its gate, before it can
        # serve: the drift monitor gives it a sampler (agent/serving/drift.py).
        self.drift_attach: Callable[[LoadedVersion], None] | None = None
        # Serving workers: a version serves only once every process has it (two phases).
        self.replicas: Replicas | None = None
        # In a serving worker: the leader's switch epoch (agent/workers.py).
        self.switch_epoch: Callable[[], int] | None = None

    # -- lookups on the request path ------------------------------------------------------------

    def settle(self, slot: ModelSlot) -> None:
        """A worker's armed switch, made once the leader's epoch reached it."""
        pending, epoch = slot.pending, self.switch_epoch
        if pending is not None and epoch is not None and epoch() >= pending[1]:
            slot.pending = None
            if slot.active is not pending[0]:
                slot.previous, slot.active = slot.active, pending[0]

    def resolve(self, name: str, version: str = "") -> LoadedVersion:
        slot = self.slots.get(name)
        if slot is not None and slot.pending is not None:
            self.settle(slot)
        if slot is None or (slot.active is None and slot.previous is None):
            if slot is not None and slot.loading is not None:
                raise ModelNotReadyError(f"model {name!r} is still loading")
            if slot is None and name in self.unloaded:
                raise ModelNotFoundError(f"model {name!r} is not loaded: {self.unloaded[name]}")
            raise ModelNotFoundError(f"model {name!r} is not loaded")
        if not version:
            if slot.active is None:
                raise ModelNotReadyError(f"model {name!r} has no active version")
            return slot.active
        for v in slot.loaded():
            if str(v.version) == version:
                return v
        loaded = ", ".join(str(v.version) for v in slot.loaded())
        raise ModelNotFoundError(
            f"model {name!r} version {version!r} is not loaded (loaded: {loaded or 'none'})"
        )

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except ModelfleetError:
            return False
        return True

    def all_ready(self) -> bool:
        """Every known model has an active version (and at least one model is known)."""
        return bool(self.slots) and all(s.active is not None for s in self.slots.values())

    # -- the update path ------------------------------------------------------------------------

    def slot(self, name: str) -> ModelSlot:
        if name not in self.slots:
            self.slots[name] = ModelSlot(name)
        return self.slots[name]

    async def deploy(
        self,
        bundle_dir: Path,
        fingerprint: object = None,
        expect: tuple[str, int] | None = None,
        *,
        switch: bool = True,
    ) -> GateResult:
        """Verify, load and gate ``bundle_dir``, then make it active. Raises on refusal.

        ``expect`` is the (name, version) the caller found the bundle under; a manifest that
        claims otherwise is refused. With ``switch=False`` (blue/green preparation) the gated
        version is kept loaded beside the active one, as the instant-switch target, instead of
        taking over. Whatever goes wrong, the active version keeps serving.
        """
        bundle_dir = Path(bundle_dir)
        loop = asyncio.get_running_loop()
        try:
            bundle = await loop.run_in_executor(self.loader_executor, load_bundle, bundle_dir)
            if expect is not None and (bundle.name, bundle.version) != expect:
                raise BundleError(
                    f"{bundle_dir}: manifest says {bundle.name!r} version {bundle.version}, "
                    f"but the bundle sits at {expect[0]!r} version {expect[1]}"
                )
        except BundleError as exc:
            name, version = expect or _name_version_from_path(bundle_dir)
            result = GateResult(version, False, str(exc), "bundle", None, self.clock())
            self._record_failure(self.slot(name), result, fingerprint)
            self.metrics.telemetry.gate(name, version, False)
            raise
        slot = self.slot(bundle.name)
        async with slot.lock:
            if slot.active is not None and slot.active.version == bundle.version:
                return slot.last_gate or GateResult(bundle.version, True, "", "ok")
            if slot.previous is not None and slot.previous.version == bundle.version:
                if switch:
                    if self.replicas is not None:
                        await self.replicas.arm(slot.name, bundle.version)
                        self.replicas.flip()
                    self._switch(slot, slot.previous, rollback=False)
                    if self.replicas is not None:
                        await self.replicas.commit(slot.name, bundle.version)
                return GateResult(bundle.version, True, "", "ok", None, self.clock())
            # At most two versions loaded: the rollback target makes room for the candidate,
            # and is loaded back (from its bundle, through the gate) if the candidate fails.
            dropped = slot.previous
            if dropped is not None:
                self._drop(slot, dropped)
                slot.previous = None
                self._publish_roles(slot)
            slot.loading = bundle.version
            self._notify(slot.name)
            try:
                return await self._load_gate_switch(slot, bundle, dropped, fingerprint, switch)
            finally:
                if self.replicas is not None:
                    self.replicas.release(slot.name, bundle.version)

    async def _load_gate_switch(
        self,
        slot: ModelSlot,
        bundle: Bundle,
        dropped: LoadedVersion | None,
        fingerprint: object,
        switch: bool,
    ) -> GateResult:
        """deploy()'s part under the slot's lock: load, gate (here and in serving workers),
        then switch or keep beside the active version."""
        loop = asyncio.get_running_loop()
        try:
            candidate, result = await loop.run_in_executor(
                self.loader_executor, self._load_and_gate, bundle
            )
        except ModelfleetError as exc:
            kind = "load" if isinstance(exc, BundleError) else "runtime"
            if isinstance(exc, ProviderUnavailableError):
                kind = "provider"
            result = GateResult(bundle.version, False, str(exc), kind, None, self.clock())
            candidate = None
        else:
            # Two phases (agent/workers.py): every serving process has it before it serves.
            if candidate is not None and result.passed and self.replicas is not None:
                try:
                    await self.replicas.prepare(candidate)
                except ModelfleetError as exc:
                    result = GateResult(
                        bundle.version,
                        False,
                        str(exc),
                        "worker",
                        result.p99_ms,
                        self.clock(),
                        result.min_ms,
                    )
                    candidate = None
        finally:
            slot.loading = None
        slot.last_gate = result
        labels = (slot.name, str(bundle.version))
        self.metrics.gate_results.labels(*labels, result.kind).inc()
        self.metrics.telemetry.gate(
            slot.name, bundle.version, candidate is not None and result.passed
        )
        if candidate is None or not result.passed:
            self._record_failure(slot, result, fingerprint)
            if dropped is not None:
                await self._restore_previous(slot, dropped.bundle)
            raise GateFailedError(
                f"model {slot.name!r} version {bundle.version} refused by the health gate: "
                f"{result.reason}"
            )
        slot.failed.pop(bundle.version, None)
        if not switch and slot.active is not None:
            slot.previous = candidate
            self._publish_roles(slot)
            log.info(
                "model %s version %d passed the gate on %s (p99 %.3f ms, fastest %.3f ms; "
                "serves %s) and is ready beside v%d",
                slot.name,
                bundle.version,
                candidate.model.provider,
                result.p99_ms or 0.0,
                result.min_ms or 0.0,
                candidate.path,
                slot.active.version,
            )
            self._notify(slot.name)
            if self.replicas is not None:
                await self.replicas.commit(slot.name, bundle.version)
            return result
        if self.replicas is not None:
            await self.replicas.arm(slot.name, bundle.version)
            # The epoch and the switch here in one turn of the loop: no request of any
            # process is answered by v-old after one was answered by v-new.
            self.replicas.flip()
        self._switch(slot, candidate, rollback=False)
        if self.replicas is not None:
            await self.replicas.commit(slot.name, bundle.version)
        log.info(
            "model %s version %d passed the gate on %s (p99 %.3f ms, fastest %.3f ms; "
            "serves %s) and is active",
            slot.name,
            bundle.version,
            candidate.model.provider,
            result.p99_ms or 0.0,
            result.min_ms or 0.0,
            candidate.path,
        )
        return result

    async def _restore_previous(self, slot: ModelSlot, bundle: Bundle) -> None:
        loop = asyncio.get_running_loop()
        try:
            fresh = await loop.run_in_executor(self.loader_executor, load_bundle, bundle.path)
            restored, result = await loop.run_in_executor(
                self.loader_executor, self._load_and_gate, fresh
            )
        except ModelfleetError as exc:
            log.warning(
                "model %s: cannot reload version %d for rollback: %s",
                slot.name,
                bundle.version,
                exc,
            )
            return
        if restored is None:
            log.warning(
                "model %s: version %d no longer passes the gate (%s); no rollback target",
                slot.name,
                bundle.version,
                result.reason,
            )
            return
        if self.replicas is not None:
            try:
                await self.replicas.prepare(restored)
            except ModelfleetError as exc:
                log.warning("model %s: no rollback target: %s", slot.name, exc)
                return
        if slot.active is None or slot.active.version != bundle.version:
            slot.previous = restored
            self._publish_roles(slot)
            log.info("model %s: version %d reloaded as rollback target", slot.name, bundle.version)
        if self.replicas is not None:
            await self.replicas.commit(slot.name, bundle.version)

    def _load_and_gate(self, bundle: Bundle) -> tuple[LoadedVersion | None, GateResult]:
        """Runs on the loader thread."""
        # The gate runs on this very session, so it measures the provider that will serve.
        model = OnnxModel(bundle, self.runtime)
        labels = (bundle.name, str(bundle.version))
        if model.fallback is not None:
            self.metrics.provider_fallbacks.labels(*labels, model.fallback[0]).inc()
        samples = bundle.health_samples()
        missing = [t.name for t in bundle.manifest.inputs if t.name not in samples.inputs]
        if missing:
            raise BundleError(f"health samples lack input(s) {missing}")
        runs = bundle.manifest.health.warmup_runs
        # The first run pays for lazy initialisation; it warms up and is not measured.
        observed = model.run(samples.inputs)
        latencies = []
        for _ in range(runs):
            start = time.perf_counter()
            model.run(samples.inputs)
            latencies.append(time.perf_counter() - start)
        result = evaluate(bundle.manifest, samples.expected, observed, latencies, at=self.clock())
        if not result.passed:
            return None, result
        loaded = LoadedVersion(
            bundle,
            model,
            self.serving_executor,
            self.batching,
            self.metrics,
            gate=result,
        )
        if self.drift_attach is not None:
            self.drift_attach(loaded)
        self.metrics.execution_provider.labels(*labels, model.provider).set(1)
        return loaded, result

    def _record_failure(self, slot: ModelSlot, result: GateResult, fingerprint: object) -> None:
        slot.failed[result.version] = (fingerprint, result)
        slot.last_gate = result
        self.metrics.gate_failures.labels(slot.name, str(result.version), result.kind).inc()
        log.warning(
            "model %s version %d refused (%s): %s",
            slot.name,
            result.version,
            result.kind,
            result.reason,
        )
        self._notify(slot.name)

    def remember_failure(
        self, name: str, version: int, fingerprint: object, result: GateResult
    ) -> None:
        """A refusal from before a restart: not retried, like one seen in this process."""
        self.slot(name).failed[version] = (fingerprint, result)

    def forget_failures(self, name: str, version: int | None = None) -> None:
        """Allow a refused version (or every refused version of ``name``) to be tried again."""
        slot = self.slots.get(name)
        if slot is None:
            return
        if version is None:
            if not slot.failed:
                return
            slot.failed.clear()
        elif slot.failed.pop(version, None) is None:
            return
        self._notify(name)

    def has_failed(self, name: str, version: int, fingerprint: object) -> bool:
        slot = self.slots.get(name)
        if slot is None or version not in slot.failed:
            return False
        return slot.failed[version][0] == fingerprint

    def _switch(self, slot: ModelSlot, to: LoadedVersion, *, rollback: bool) -> None:
        old = slot.active
        if old is to:
            return
        if slot.previous is to:
            slot.previous = None
        if old is not None:
            slot.previous = old
        slot.active = to
        counter = self.metrics.rollbacks if rollback else self.metrics.swaps
        counter.labels(slot.name).inc()
        self.metrics.telemetry.switched(slot.name, to.version, rollback=rollback)
        self._publish_roles(slot)
        why = " (rollback)" if rollback else ""
        log.info(
            "model %s: version %s -> %d%s",
            slot.name,
            old.version if old else "none",
            to.version,
            why,
        )
        self._notify(slot.name)

    def _drop(self, slot: ModelSlot, version: LoadedVersion) -> None:
        # In-flight requests still hold a reference; the session is freed when they finish.
        self.metrics.forget_version(slot.name, str(version.version))
        log.info("model %s: unloaded version %d", slot.name, version.version)

    def _publish_roles(self, slot: ModelSlot) -> None:
        for labels in list(_label_sets(self.metrics)):
            if labels[0] == slot.name:
                self.metrics.loaded.remove(*labels)
        if slot.active is not None:
            self.metrics.loaded.labels(slot.name, str(slot.active.version), "active").set(1)
        if slot.previous is not None:
            role = _candidate_arm(slot) or "previous"
            self.metrics.loaded.labels(slot.name, str(slot.previous.version), role).set(1)

    # -- live comparison ------------------------------------------------------------------------

    def set_comparison(self, name: str, comparison: Comparison | None) -> bool:
        """Compare ``comparison.candidate`` with the active version (None: stop comparing).

        Takes effect with the next request; nothing is loaded or unloaded here (the candidate is
        prepared like any blue/green version). Returns whether anything changed.
        """
        if comparison is not None and not comparison.active:
            comparison = None
        slot = self.slots.get(name)
        if slot is None:
            # Nothing of the model is known yet: the caller sets it again once it is (an empty
            # slot made here would read as a model that is not ready).
            return False
        if slot.comparison == comparison:
            return False
        slot.comparison = comparison
        if comparison is None:
            log.info("model %s: comparison off", name)
        else:
            log.info("model %s: comparing %s", name, comparison.describe())
        self._publish_roles(slot)
        self._notify(name)
        return True

    def arms(self) -> dict[tuple[str, int], str]:
        """(model, version) -> arm, for telemetry: every active version, and candidates."""
        out: dict[tuple[str, int], str] = {}
        for slot in self.slots.values():
            if slot.active is not None:
                out[(slot.name, slot.active.version)] = ARM_ACTIVE
            arm = _candidate_arm(slot)
            if arm and slot.previous is not None:
                out[(slot.name, slot.previous.version)] = arm
        return out

    def rollback(self, name: str) -> tuple[int, int]:
        """Switch back to the previous version at once. Returns (from, to)."""
        slot = self.slots.get(name)
        if slot is None or slot.active is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded")
        if slot.previous is None:
            raise _NoPrevious(f"model {name!r} has no previous version loaded to roll back to")
        frm, to = slot.active, slot.previous
        self._switch(slot, to, rollback=True)
        slot.hold_at_or_below = max(frm.version, slot.hold_at_or_below or 0)
        return frm.version, to.version

    async def unload(self, name: str, version: int | None = None) -> None:
        """Unload one version, or the whole model when ``version`` is None; returns once no
        serving process serves it any more."""
        await self._unload(name, version)
        await self.sync_replicas()

    async def sync_replicas(self) -> None:
        """Wait until every serving worker serves what this process serves (a no-op without
        workers): for changes whose caller answers someone, such as an unload or a rollback."""
        if self.replicas is not None:
            await self.replicas.sync()

    async def _unload(self, name: str, version: int | None) -> None:
        slot = self.slots.get(name)
        if slot is None:
            return
        async with slot.lock:
            if version is None:
                for v in slot.loaded():
                    self._drop(slot, v)
                del self.slots[name]
                self._publish_roles(slot)
                log.info("model %s removed", name)
                self._notify(name)
                return
            if slot.previous is not None and slot.previous.version == version:
                self._drop(slot, slot.previous)
                slot.previous = None
            elif slot.active is not None and slot.active.version == version:
                self._drop(slot, slot.active)
                slot.active, slot.previous = slot.previous, None
            slot.failed.pop(version, None)
            self._publish_roles(slot)
            self._notify(name)

    def status(self) -> list[ModelStatus]:
        out = []
        for slot in sorted(self.slots.values(), key=lambda s: s.name):
            out.append(
                ModelStatus(
                    name=slot.name,
                    active=slot.active.version if slot.active else None,
                    previous=slot.previous.version if slot.previous else None,
                    loading=slot.loading,
                    ready=slot.active is not None,
                    last_gate=slot.last_gate,
                    failed={v: r for v, (_, r) in slot.failed.items()},
                    held_at_or_below=slot.hold_at_or_below,
                    comparison=slot.comparison,
                    comparing=ready_candidate(slot) is not None,
                    active_provider=slot.active.model.provider if slot.active else "",
                    previous_provider=slot.previous.model.provider if slot.previous else "",
                    active_path=slot.active.path if slot.active else "",
                    previous_path=slot.previous.path if slot.previous else "",
                )
            )
        return out

    def _notify(self, name: str) -> None:
        for listener in self.listeners:
            try:
                listener(name)
            except Exception:  # a broken listener must not break a swap
                log.exception("state listener failed")

    def close(self) -> None:
        self.loader_executor.shutdown(wait=False, cancel_futures=True)
        self.serving_executor.shutdown(wait=True)


class _NoPrevious(ModelfleetError):
    status = Status.FAILED_PRECONDITION
    reason = "no_previous"


def _candidate_arm(slot: ModelSlot) -> str:
    """``candidate`` (answers a split's share), ``shadow`` (copies only) or "" (no role)."""
    c = slot.comparison
    if c is None or ready_candidate(slot) is None:
        return ""
    return ARM_CANDIDATE if c.split_bp else ARM_SHADOW


def _label_sets(metrics: AgentMetrics) -> set[tuple[str, ...]]:
    return {
        (s.labels["model"], s.labels["version"], s.labels["role"])
        for fam in metrics.loaded.collect()
        for s in fam.samples
    }


def _name_version_from_path(bundle_dir: Path) -> tuple[str, int]:
    try:
        version = int(bundle_dir.name)
    except ValueError:
        version = 0
    return bundle_dir.parent.name, version


__all__ = [
    "BatchingConfig",
    "LoadedVersion",
    "ModelSlot",
    "ModelStatus",
    "SlotManager",
]
