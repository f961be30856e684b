"""OpenTelemetry tracing, received over OTLP: a real collector (the OTLP/gRPC TraceService, from
opentelemetry-proto's generated classes) on a loopback port, real agent and hub processes.

Off by default, and then not even imported: the agent runs with ``PYTHONPROFILEIMPORTTIME``,
so Python itself writes every module the process imports (also later, on the request path)
into its log; the traced agent's log, read the same way, shows the SDK, so the check can see it.
"""

from __future__ import annotations

import queue
import secrets
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from opentelemetry.proto.trace.v1 import trace_pb2

from modelfleet.kernel.bundle import create_bundle
from tests import models
from tests.otlp_collector import Collector, attributes
from tests.procs import AgentProcess, HubProcess, wait_for

pytestmark = pytest.mark.process

WIDTH = 4
REQUEST = "inference.GRPCInferenceService/ModelInfer"
# The SDK's batch processor waits this long (ms) before an export: short, so tests are quick.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    samples = {"x": np.random.default_rng(7).standard_normal((4, WIDTH)).astype(np.float32)}
    for version, seed in ((1, 0), (2, 5)):
        create_bundle(
            models.classifier(root / "src" / f"clf-{version}.onnx", seed=seed),
            name="clf",
            version=version,
            samples=samples,
            out_dir=repo,
        )
    return repo


def infer(client, header: str, model: str = "clf") -> None:
    inp = grpcclient.InferInput("x", [1, WIDTH], "FP32")
    inp.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
    client.infer(model, [inp], headers={"traceparent": header})


def by_name(spans: list[tuple[str, trace_pb2.Span]]) -> dict[str, trace_pb2.Span]:
    return {s.name: s for _, s in spans}


def imported(log: str) -> set[str]:
    """Modules in PYTHONPROFILEIMPORTTIME's lines ("import time: self | cumulative | name")."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in log.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def test_agent_continues_the_callers_trace_with_queue_inference_and_shadow_spans(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path)
    with Collector() as collector:
        env = {
            "MODELFLEET_AGENT_TRACING_ENDPOINT": collector.endpoint,
            "PYTHONPROFILEIMPORTTIME": "1",
            **FAST_EXPORT,
        }
        with AgentProcess(repo, log_path=tmp_path / "agent.log", env=env) as agent:
            agent.wait_model("clf", "2", timeout=60)
            client = agent.client()
            try:
                header, trace_id, caller_span = traceparent()
                infer(client, header)
                wait_for(
                    lambda: (
                        {REQUEST, "modelfleet.queue", "modelfleet.inference"}
                        <= set(by_name(collector.spans(trace_id)))
                    ),
                    20,
                    "request, queue and inference spans of the trace",
                )
                got = collector.spans(trace_id)
                assert {svc for svc, _ in got} == {"modelfleet-agent"}
                spans = by_name(got)
                request = spans[REQUEST]
                # The caller's span is the parent: the agent continued its trace.
                assert request.parent_span_id.hex() == caller_span
                assert request.kind == trace_pb2.Span.SPAN_KIND_SERVER
                attrs = attributes(request.attributes)
                assert attrs["modelfleet.model"] == "clf"
                assert attrs["modelfleet.version"] == 2
                assert attrs["modelfleet.arm"] == "active"
                assert attrs["modelfleet.batch_size"] >= 1
                assert attrs["modelfleet.outcome"] == "success"
                assert attrs["rpc.method"] == "ModelInfer"
                for name in ("modelfleet.queue", "modelfleet.inference"):
                    child = spans[name]
                    assert child.parent_span_id == request.span_id, name
                    assert attributes(child.attributes)["modelfleet.version"] == 2
                    # Recorded afterwards with the batcher's times: inside the request.
                    assert request.start_time_unix_nano <= child.start_time_unix_nano
                    assert child.end_time_unix_nano <= request.end_time_unix_nano
                assert (
                    spans["modelfleet.queue"].end_time_unix_nano
                    <= spans["modelfleet.inference"].start_time_unix_nano
                )

                # A failed request: its span says why.
                header, trace_id, _ = traceparent()
                with pytest.raises(Exception, match="not loaded"):
                    infer(client, header, model="nope")
                wait_for(lambda: collector.spans(trace_id), 20, "the failed request's span")
                failed = by_name(collector.spans(trace_id))[REQUEST]
                assert failed.status.code == trace_pb2.Status.STATUS_CODE_ERROR
                fattrs = attributes(failed.attributes)
                assert fattrs["modelfleet.outcome"] == "failure"
                assert fattrs["modelfleet.error_reason"] == "model_not_found"

                # The caller did not sample: parent-based sampling records nothing.
                unsampled, unsampled_id, _ = traceparent(sampled=False)
                infer(client, unsampled)

                # A shadow run: v2 answers, a copy goes to v1 after the response.
                r = agent.cli("compare", "clf", "--candidate", "1", "--shadow", "100")
                assert r.returncode == 0, r.stderr
                header, trace_id, _ = traceparent()
                infer(client, header)
                wait_for(
                    lambda: "modelfleet.shadow" in by_name(collector.spans(trace_id)),
                    20,
                    "the shadow span",
                )
                spans = by_name(collector.spans(trace_id))
                shadow = spans["modelfleet.shadow"]
                assert shadow.parent_span_id == spans[REQUEST].span_id
                sattrs = attributes(shadow.attributes)
                assert sattrs["modelfleet.shadow_version"] == 1
                assert sattrs["modelfleet.version"] == 2
                assert sattrs["modelfleet.outcome"] in ("compared", "failed")
                assert attributes(spans[REQUEST].attributes)["modelfleet.arm"] == "active"
            finally:
                client.close()
            # Stopping flushes what is left; the unsampled request never shows.
            assert agent.stop() == 0
        assert collector.spans(unsampled_id) == []
        # The import log can see the SDK when it is loaded (the check below relies on that).
        assert "opentelemetry.sdk.trace" in imported(agent.logs())


STREAM = "inference.GRPCInferenceService/ModelStreamInfer"


def test_streamed_requests_get_the_spans_of_unary_ones(tmp_path: Path) -> None:
    """ModelStreamInfer: one server span per request message (a stream may carry thousands,
    one span for the whole call would say nothing about any of them), each continuing the
    trace of the stream's metadata and with the same queue and inference children as
    ModelInfer's; a failed message's span says why, and the stream goes on."""
    repo = make_repo(tmp_path)
    with Collector() as collector:
        env = {"MODELFLEET_AGENT_TRACING_ENDPOINT": collector.endpoint, **FAST_EXPORT}
        with AgentProcess(repo, log_path=tmp_path / "agent.log", env=env) as agent:
            agent.wait_model("clf", "2", timeout=60)
            header, trace_id, caller_span = traceparent()
            answers: queue.Queue = queue.Queue()
            client = agent.client()
            try:
                client.start_stream(
                    callback=lambda result, error: answers.put((result, error)),
                    headers={"traceparent": header},
                )
                inp = grpcclient.InferInput("x", [1, WIDTH], "FP32")
                inp.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
                for i, model in enumerate(("clf", "nope", "clf")):
                    client.async_stream_infer(model, [inp], request_id=f"r{i}")
                got = [answers.get(timeout=20) for _ in range(3)]
                client.stop_stream()
            finally:
                client.close()
            assert [e is None for _, e in got] == [True, False, True], got

            def streamed() -> list[trace_pb2.Span]:
                return [sp for _, sp in collector.spans(trace_id) if sp.name == STREAM]

            wait_for(lambda: len(streamed()) == 3, 20, "three ModelStreamInfer spans")
            spans = [sp for _, sp in collector.spans(trace_id)]
            requests = sorted(streamed(), key=lambda sp: sp.start_time_unix_nano)
            for request in requests:
                assert request.parent_span_id.hex() == caller_span
                assert request.kind == trace_pb2.Span.SPAN_KIND_SERVER
                attrs = attributes(request.attributes)
                assert attrs["rpc.method"] == "ModelStreamInfer"
                assert attrs["rpc.service"] == "inference.GRPCInferenceService"
            ok = [
                r for r in requests if attributes(r.attributes)["modelfleet.outcome"] == "success"
            ]
            assert len(ok) == 2
            for request in ok:
                attrs = attributes(request.attributes)
                assert (attrs["modelfleet.model"], attrs["modelfleet.version"]) == ("clf", 2)
                children = {sp.name for sp in spans if sp.parent_span_id == request.span_id}
                assert children == {"modelfleet.queue", "modelfleet.inference"}
            (bad,) = [r for r in requests if r not in ok]
            assert bad.status.code == trace_pb2.Status.STATUS_CODE_ERROR
            battrs = attributes(bad.attributes)
            assert battrs["modelfleet.outcome"] == "failure"
            assert battrs["modelfleet.error_reason"] == "model_not_found"
            assert battrs["modelfleet.model"] == "nope"


def test_tracing_off_exports_nothing_and_imports_no_opentelemetry(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    with Collector() as collector:
        env = {
            # The SDK's own variables do not turn it on: only tracing_endpoint does.
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_TRACES_EXPORTER": "otlp",
            "PYTHONPROFILEIMPORTTIME": "1",
            **FAST_EXPORT,
        }
        with AgentProcess(repo, log_path=tmp_path / "agent.log", env=env) as agent:
            agent.wait_model("clf", "2", timeout=60)
            client = agent.client()
            try:
                for _ in range(5):
                    infer(client, traceparent()[0])
            finally:
                client.close()
            assert agent.stop() == 0
        modules = imported(agent.logs())
        # The log has the process's imports, up to and after the requests it served.
        assert "modelfleet.agent.serving.grpc_server" in modules
        assert "modelfleet.kernel.tracing" in modules
        assert not {m for m in modules if m.startswith("opentelemetry")}
        assert collector.spans() == []


def test_hub_publish_span_continues_the_admin_clis_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Collector() as collector:
        monkeypatch.setenv("MODELFLEET_HUB_TRACING_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        hub = HubProcess(tmp_path / "hub-data", log_path=tmp_path / "hub.log").start()
        try:
            header, trace_id, cli_span = traceparent()
            # The CLI takes its trace context from the environment, as OpenTelemetry suggests.
            monkeypatch.setenv("TRACEPARENT", header)
            hub.cli("publish", "mlp", str(models.mlp(tmp_path / "v1.onnx", seed=0)))
            wait_for(
                lambda: "hub.publish" in by_name(collector.spans(trace_id)), 20, "publish span"
            )
            services = {svc for svc, _ in collector.spans(trace_id)}
            assert services == {"modelfleet-hub"}
            publish = by_name(collector.spans(trace_id))["hub.publish"]
            assert publish.parent_span_id.hex() == cli_span
            attrs = attributes(publish.attributes)
            assert attrs["modelfleet.model"] == "mlp"
            assert attrs["modelfleet.version"] == 1
            assert attrs["modelfleet.bytes"] > 0
            assert publish.status.code != trace_pb2.Status.STATUS_CODE_ERROR
        finally:
            assert hub.stop() == 0
        assert "tracing: OTLP to" in hub.logs()


def test_hub_with_tracing_off_imports_no_opentelemetry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Collector() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
        hub = HubProcess(tmp_path / "hub-data", log_path=tmp_path / "hub.log").start()
        try:
            monkeypatch.delenv("PYTHONPROFILEIMPORTTIME")  # the CLI's imports are not the hub's
            monkeypatch.setenv("TRACEPARENT", traceparent()[0])
            hub.cli("publish", "mlp", str(models.mlp(tmp_path / "v1.onnx", seed=0)))
        finally:
            assert hub.stop() == 0
        modules = imported(hub.logs())
        assert "modelfleet.hub.server" in modules and "modelfleet.kernel.tracing" in modules
        assert not {m for m in modules if m.startswith("opentelemetry")}
        assert collector.spans() == []
