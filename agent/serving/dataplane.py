"""The inference core, shared by every transport: validate, run, account.

Transports convert their messages into :class:`InferRequest` (numpy arrays, no protobuf) and
call :meth:`DataPlane.infer`; errors are :mod:`kernel.errors` types that each edge maps once.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.serving import tracing as spans
from modelfleet.agent.serving.admission import Admission, ShedError
from modelfleet.agent.serving.capture import Capture
from modelfleet.agent.serving.routing import (
    ARM_ACTIVE,
    ARM_PINNED,
    ROUTING_KEY_HEADER,
    ROUTING_KEY_MAX_BYTES,
    ROUTING_KEY_PARAMETER,
    Route,
    choose,
)
from modelfleet.agent.serving.shadow import ShadowRunner
from modelfleet.agent.slots import LoadedVersion, SlotManager
from modelfleet.agent.telemetry import UNKNOWN_MODEL
from modelfleet.kernel.bundle import TensorSpec
from modelfleet.kernel.datatypes import datatype_of
from modelfleet.kernel.errors import InvalidRequestError, ModelfleetError


@dataclass
class InferInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class InferRequest:
    model_name: str
    model_version: str
    id: str
    inputs: list[InferInput]
    # Requested output names; empty means all of them.
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    # Sticky split (agent/serving/routing.py): the request parameter `routing_key`, or the
    # gRPC metadata header `x-routing-key`; empty: none.
    routing_key: str = ""
    # The request's span when tracing is on (agent/serving/tracing.py); None: not traced.
    trace: Any = None
    # Per requested output, its parameters (e.g. ``classification``: N for the top N classes).
    output_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Who sent it, the per-client rate limit's key (admission.client_key): the certificate
    # identity under mutual TLS, else the address; empty: the edge did not say.
    client: str = ""


@dataclass
class InferOutput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[InferOutput]


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _where(version: LoadedVersion) -> str:
    return f"model {version.manifest.name!r} version {version.manifest.version}"


def validate_inputs(
    version: LoadedVersion, inputs: list[InferInput]
) -> tuple[dict[str, np.ndarray], int]:
    """Check inputs against the signature; return the feed and the batch size in rows."""
    if len(inputs) == 1:
        # One input of a name, datatype and shape already accepted: the checks below depend on
        # nothing else, so they would pass again with the same number of rows.
        inp = inputs[0]
        data = inp.data
        rows = version.accepted.get((inp.name, inp.datatype, inp.shape, data.shape))
        if rows is not None:
            return {inp.name: data}, rows
    feed, rows = _validate(version, inputs)
    if len(inputs) == 1:
        accepted = version.accepted
        if len(accepted) >= ACCEPTED_MAX:
            accepted.clear()
        inp = inputs[0]
        accepted[(inp.name, inp.datatype, inp.shape, inp.data.shape)] = rows
    return feed, rows


# Input signatures a version remembers as accepted (validate_inputs): a few batch sizes, most
# often; emptied when a client's many shapes fill it.
ACCEPTED_MAX = 64


def _validate(
    version: LoadedVersion, inputs: list[InferInput]
) -> tuple[dict[str, np.ndarray], int]:
    specs: dict[str, TensorSpec] = version.input_specs
    seen: dict[str, np.ndarray] = {}
    for inp in inputs:
        spec = specs.get(inp.name)
        if spec is None:
            raise InvalidRequestError(
                f"{_where(version)} has no input {inp.name!r} (inputs: {', '.join(specs)})",
                reason="unknown_input",
            )
        if inp.name in seen:
            raise InvalidRequestError(f"input {inp.name!r} is given twice", reason="duplicate")
        if inp.datatype != spec.datatype:
            raise InvalidRequestError(
                f"input {inp.name!r}: expected datatype {spec.datatype}, got {inp.datatype}",
                reason="datatype",
            )
        shape = inp.shape
        if shape != spec.shape and not _fits(shape, spec.shape, version.input_tails[inp.name]):
            raise InvalidRequestError(
                f"input {inp.name!r}: expected shape {_fmt_shape(spec.shape)}, "
                f"got {_fmt_shape(shape)}",
                reason="shape",
            )
        seen[inp.name] = inp.data
    if len(seen) != len(specs):
        missing = [name for name in specs if name not in seen]
        raise InvalidRequestError(
            f"{_where(version)}: missing input(s) {', '.join(repr(m) for m in missing)}",
            reason="missing_input",
        )
    max_batch = version.max_batch_size
    if max_batch <= 0:
        return seen, 1
    # A plain loop: any() over a generator costs more than the check, on every request.
    rows = -1
    agree = bool(seen)
    for arr in seen.values():
        if rows == -1:
            rows = arr.shape[0]
        elif arr.shape[0] != rows:
            agree = False
    if not agree:
        raise InvalidRequestError(
            "inputs disagree on the batch dimension: "
            f"{sorted({arr.shape[0] for arr in seen.values()})}",
            reason="shape",
        )
    if rows > max_batch:
        raise InvalidRequestError(
            f"batch of {rows} exceeds the max batch size {max_batch} of {_where(version)}",
            reason="batch_size",
        )
    if rows < 1:
        raise InvalidRequestError("batch dimension must be at least 1", reason="shape")
    return seen, rows


def _fits(shape: tuple[int, ...], spec: tuple[int, ...], tail: tuple[int, ...] | None) -> bool:
    """Whether ``shape`` matches ``spec``, where -1 in the spec takes any size. ``tail``: the
    spec after its first dimension when that is its only -1 (a batch dimension, the usual
    case), compared in one step."""
    if len(shape) != len(spec):
        return False
    if tail is not None:
        return shape[1:] == tail
    return all(d == -1 or d == s for d, s in zip(spec, shape, strict=True))


def check_routing_key(key: str) -> str:
    if len(key.encode()) > ROUTING_KEY_MAX_BYTES:
        raise InvalidRequestError(
            f"routing key ({ROUTING_KEY_PARAMETER} parameter or {ROUTING_KEY_HEADER} header) is "
            f"{len(key.encode())} bytes; at most {ROUTING_KEY_MAX_BYTES} are accepted: send a "
            "shorter identifier (a user or session id, or a hash of one)",
            reason="routing_key",
        )
    return key


# The protocol's sequence-batcher parameters. No bundle declares state today, so every model
# is stateless and these are refused: running each request alone would give a stateful client
# wrong numbers without a word.
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
CLASSIFICATION_PARAMETER = "classification"


def check_stateless(version: LoadedVersion, parameters: dict[str, Any]) -> None:
    given = [p for p in SEQUENCE_PARAMETERS if p in parameters]
    if given:
        raise InvalidRequestError(
            f"request parameter {given[0]!r} is for stateful (sequence) models, but model "
            f"{version.name!r} version {version.version} is stateless: it declares no sequence "
            "state, so each request is answered on its own; send the request without "
            f"{', '.join(given)}",
            reason="sequence",
        )


def class_count(output: str, parameters: dict[str, Any]) -> int:
    """N from an output's ``classification`` parameter (0: not requested)."""
    if CLASSIFICATION_PARAMETER not in parameters:
        return 0
    value = parameters[CLASSIFICATION_PARAMETER]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(
            f"output {output!r}: parameter {CLASSIFICATION_PARAMETER!r} must be a positive "
            f"integer (the number of top classes to return), got {value!r}",
            reason="classification",
        )
    return value


def classify(version: LoadedVersion, output: str, arr: np.ndarray, count: int) -> InferOutput:
    """Top ``count`` classes per row as BYTES ``value:index[:label]``, as Triton's extension.

    With a batch dimension each row is ranked on its own ([rows, k]); without one the whole
    tensor is ([k]). ``count`` above the number of classes returns them all (Triton does too).
    """
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InvalidRequestError(
            f"output {output!r} is {datatype_of(arr)}: classification needs a numeric output",
            reason="classification",
        )
    labels = version.manifest.labels.get(output, ())
    batched = version.manifest.max_batch_size > 0
    rows = arr.reshape(arr.shape[0], -1) if batched and arr.ndim > 0 else arr.reshape(1, -1)
    k = min(count, rows.shape[1])
    # A stable sort on the negated values keeps the lower index first among equal scores.
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    out: np.ndarray = np.empty((rows.shape[0], k), dtype=object)
    for r in range(rows.shape[0]):
        for j, idx in enumerate(order[r]):
            value = rows[r, idx]
            text = f"{value:f}" if rows.dtype.kind == "f" else str(int(value))
            text = f"{text}:{idx}"
            if idx < len(labels):
                text = f"{text}:{labels[idx]}"
            out[r, j] = text.encode()
    if not batched:
        out = out.reshape(k)
    return InferOutput(output, "BYTES", tuple(out.shape), out)


_NO_COUNTS: dict[str, int] = {}


class DataPlane:
    def __init__(
        self,
        slots: SlotManager,
        metrics: AgentMetrics,
        shadow: ShadowRunner | None = None,
        capture: Capture | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.slots = slots
        self.admission = admission or Admission()
        self.metrics = metrics
        self.shadow = shadow or ShadowRunner(metrics)
        self.capture = capture
        # Draws for unkeyed requests: not security relevant, only a fair share.
        self.rng = random.Random()

    def _route(self, request: InferRequest) -> tuple[LoadedVersion, Route | None]:
        slot = self.slots.slots.get(request.model_name)
        if slot is None or slot.comparison is None:
            # resolve() makes a serving worker's armed switch (agent/workers.py).
            return self.slots.resolve(request.model_name, request.model_version), None
        if slot.pending is not None:
            self.slots.settle(slot)
        if request.model_version:
            # An explicit version is outside the comparison, whichever version it names.
            version = self.slots.resolve(request.model_name, request.model_version)
            return version, Route(version, ARM_PINNED)
        route = choose(slot, check_routing_key(request.routing_key), self.rng)
        if route is None:
            return self.slots.resolve(request.model_name, ""), None
        return route.version, route

    async def infer(self, request: InferRequest) -> InferResponse:
        start = time.perf_counter()
        version = None
        admission = self.admission
        try:
            if admission.clients is not None:
                admission.check_rate(request.client)
            version, route = self._route(request)
            if request.parameters:
                check_stateless(version, request.parameters)
            feed, rows = validate_inputs(version, request.inputs)
            admission.check_size(version.name, feed)
            names = version.model.output_names
            wanted = request.outputs or names
            if request.outputs:
                unknown = [o for o in wanted if o not in names]
                if unknown:
                    raise InvalidRequestError(
                        f"model {request.model_name!r} has no output(s) {unknown} "
                        f"(outputs: {', '.join(names)})",
                        reason="unknown_output",
                    )
            counts = (
                {o: class_count(o, p) for o, p in request.output_parameters.items()}
                if request.output_parameters
                else _NO_COUNTS
            )
            load = admission.enter(version.name, rows, version.max_batch_size)
            try:
                if version.inline:
                    # On the event loop either way; without the two coroutines between.
                    results, timing = version.run_inline(feed, rows)
                else:
                    results, timing = await version.infer(feed, rows)
            finally:
                admission.leave(load, rows)
            outputs = []
            for name in wanted:
                arr = results[name]
                if counts and counts.get(name):
                    outputs.append(classify(version, name, arr, counts[name]))
                    continue
                outputs.append(InferOutput(name, datatype_of(arr), tuple(arr.shape), arr))
        except ModelfleetError as exc:
            elapsed = time.perf_counter() - start
            self._account_failure(request, version, exc, elapsed)
            if request.trace is not None:
                spans.failed(request.trace, version)
            raise
        elapsed = time.perf_counter() - start
        s = version.stats
        s.success_count += 1
        s.success_ns += int(elapsed * 1e9)
        queue_s = timing.queue_s
        if queue_s:  # 0 for a model run inline
            s.queue_ns += int(queue_s * 1e9)
        s.last_inference_ms = int(time.time() * 1000)
        version.telemetry.ok(elapsed, queue_s)
        if request.trace is not None:
            spans.served(request.trace, version, route, timing, rows)
        if version.drift is not None:
            # Decides at once, counts after the response is sent (agent/serving/drift.py).
            version.drift.offer(feed, results)
        if route is not None:
            self.metrics.routed.labels(version.name, str(version.version), route.arm).inc()
            if route.shadow is not None:
                # The response is complete; the copy waits in the shadow queue, or is dropped.
                self.shadow.offer(version, route.shadow, feed, results, request.trace)
        if self.capture is not None and self.capture.rules:
            # Like the shadow copy: after the response is built, a draw and a put_nowait.
            self.capture.offer(
                request.id,
                version.name,
                version.version,
                route.arm if route is not None else ARM_ACTIVE,
                feed,
                results,
            )
        return InferResponse(version.name, str(version.version), request.id, outputs)

    async def close(self) -> None:
        await self.shadow.close()
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)

    def _account_failure(
        self,
        request: InferRequest,
        version: LoadedVersion | None,
        exc: ModelfleetError,
        elapsed: float,
    ) -> None:
        if isinstance(exc, ShedError):
            self._account_shed(request, version, exc)
            return
        if version is not None:
            version.stats.fail_count += 1
            version.stats.fail_ns += int(elapsed * 1e9)
            version.telemetry.failed(exc.reason)
        else:
            # Names from clients are unbounded; only known models get their own series.
            known = request.model_name in self.slots.slots
            self.metrics.telemetry.failed(
                request.model_name if known else UNKNOWN_MODEL, 0, exc.reason
            )

    def _account_shed(
        self, request: InferRequest, version: LoadedVersion | None, exc: ShedError
    ) -> None:
        """A shed request is counted apart from failures: it says the node is busy, nothing
        about the version, so it stays out of the version's statistics and fleet telemetry
        (a rollout must not judge a canary on the load it happened to get)."""
        if version is not None:
            model, ver = version.name, str(version.version)
        else:
            model = request.model_name if request.model_name in self.slots.slots else "_unknown"
            ver = ""
        self.metrics.shed.labels(model, exc.reason).inc()
        key = (model, ver, exc.reason)
        shed = self.metrics.shed_requests
        shed[key] = shed.get(key, 0) + 1
