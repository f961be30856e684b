"""The hub's edge conversions and its jobs core, without processes.

An agent's report is converted once at each edge (gRPC, MQTT) into kernel.reports types; the
registry stores their JSON and reads it back. These tests hold that chain lossless, so
`agents ls` shows what the agent sent and the rollout engine reads what it meant.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from modelfleet.hub.convert import (
    job_run_to_proto,
    job_runs_from_reports,
    job_spec_from_proto,
    job_spec_to_proto,
    job_to_proto,
)
from modelfleet.hub.jobs import Jobs
from modelfleet.hub.registry import Registry
from modelfleet.kernel.errors import BundleExistsError, InvalidRequestError, ModelNotFoundError
from modelfleet.kernel.jobs import JobRun, JobSpec
from modelfleet.kernel.reports import AgentReport, ModelReport, report_from_proto, report_to_proto
from modelfleet.protos import fleet_pb2 as pb


def full_report() -> pb.AgentReport:
    """Every field set, none to its default, so a field dropped anywhere shows."""
    return pb.AgentReport(
        models=[
            pb.ModelReport(
                name="fraud",
                active_version=3,
                previous_version=2,
                loading_version=4,
                desired_version=4,
                gate_version=4,
                gate_passed=True,
                gate_kind="mismatch",
                gate_reason="output 0 off by 0.3",
                error="signature does not verify",
                error_reason="verification",
                active_provider="CUDAExecutionProvider",
            ),
            pb.ModelReport(name="churn", active_version=7, desired_version=7),
        ],
        last_error="hub unreachable",
        desired_revision=12,
        cache_bytes=1 << 40,
        disk_free_bytes=(1 << 62) + 1,  # beyond a double's precision: kept exact
        agent_version="1.4.0",
        inference_address="10.0.0.7:8001",
        cert_expires_at=1767225600.25,
    )


def test_the_report_types_carry_every_field_of_the_messages() -> None:
    """A field added to or renamed in fleet.proto must be added here too, or this fails
    (instead of the rollout engine silently reading a default)."""
    for message, domain in ((pb.AgentReport, AgentReport), (pb.ModelReport, ModelReport)):
        proto_fields = [f.name for f in message.DESCRIPTOR.fields]
        assert proto_fields == [f.name for f in dataclasses.fields(domain)]


def test_a_report_round_trips_proto_dataclass_json_dataclass_proto() -> None:
    message = full_report()
    report = report_from_proto(message)
    assert report.models[0].error_reason == "verification"
    assert report.models[1] == ModelReport("churn", active_version=7, desired_version=7)
    stored = json.loads(json.dumps(report.to_json()))
    again = AgentReport.from_json(stored)
    assert again == report
    assert report_to_proto(again) == message
    assert report_from_proto(pb.AgentReport()) == AgentReport()


def test_reports_stored_by_earlier_hubs_still_read() -> None:
    """Hubs before typed reports stored MessageToDict output: 64-bit integers as strings,
    defaults left out. An upgraded hub reads those rows as the same reports."""
    message = full_report()
    legacy = json.loads(json.dumps(MessageToDict(message, preserving_proto_field_name=True)))
    assert legacy["desired_revision"] == "12" and "gate_passed" not in legacy["models"][1]
    assert AgentReport.from_json(legacy) == report_from_proto(message)
    assert AgentReport.from_json({}) == AgentReport()


def test_the_registry_keeps_the_report_across_a_restart(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.db")
    registry.add_agent("a0", "h0", {}, "fp")
    assert registry.agent("a0").report == AgentReport()  # never reported
    report = report_from_proto(full_report())
    registry.touch("a0", report)
    registry.flush_seen()
    registry.close()
    reopened = Registry(tmp_path / "r.db")
    try:
        assert reopened.agent("a0").report == report
        assert report_to_proto(reopened.agent("a0").report) == full_report()
    finally:
        reopened.close()


def test_jobs_core_validates_and_answers_typed_jobs(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.db")
    registry.add_agent("a0", "h0", {"site": "x"}, "fp")
    registry.add_agent("a1", "h1", {"site": "y"}, "fp")
    wakes: list[int] = []

    async def changed() -> None:
        wakes.append(1)

    jobs = Jobs(registry, changed)
    spec = job_spec_from_proto(
        pb.JobSpec(name="nightly", model="m", schedule="every 60s", input="/in", output="/out")
    )
    assert job_spec_to_proto(spec) == pb.JobSpec(
        name="nightly", model="m", schedule="every 60s", input="/in", output="/out"
    )

    async def scenario() -> None:
        with pytest.raises(InvalidRequestError, match="a job needs a name, a model"):
            await jobs.create(replace(spec, input=""), {})
        with pytest.raises(InvalidRequestError):
            await jobs.create(replace(spec, schedule="whenever"), {})
        with pytest.raises(ModelNotFoundError, match="no model named 'm'"):
            await jobs.create(replace(spec, version=3), {})
        job = await jobs.create(spec, {"site": "x"})
        assert (job.agents, job.selector) == (1, {"site": "x"})
        assert job_to_proto(job).spec == job_spec_to_proto(spec)
        with pytest.raises(BundleExistsError):
            await jobs.create(spec, {})
        assert (await jobs.control("nightly", "run-now")).spec.run_now == 1
        assert (await jobs.control("nightly", "pause")).spec.paused is True
        with pytest.raises(InvalidRequestError, match="unknown job action 'stop'"):
            await jobs.control("nightly", "stop")
        assert jobs.runs("nightly") == []
        await jobs.control("nightly", "delete")
        with pytest.raises(ModelNotFoundError, match="no job named 'nightly'"):
            jobs.runs("nightly")

    asyncio.run(scenario())
    assert len(wakes) == 4  # create, run-now, pause, delete: every change wakes the watchers
    assert jobs.all_jobs() == []
    registry.close()


def test_job_runs_are_typed_and_attributed_to_the_reporting_agent(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.db")
    jobs = Jobs(registry, _no_wake)
    spec = JobSpec("nightly", "m", 0, "every 60s", "/in", "/out")
    registry.put_job(spec, {}, create=True)
    sent = pb.JobRun(
        job="nightly",
        run_id="r1",
        model="m",
        version=2,
        status="succeeded",
        rows_in=5,
        rows_out=5,
        duration_s=0.5,
        finished_at=10.0,
        agent_id="someone-else",
    )
    runs = job_runs_from_reports([pb.TelemetryReport(job_runs=[sent])])
    jobs.record_runs("a0", runs)
    jobs.record_runs("a0", runs)  # a resent batch is stored once
    (stored,) = jobs.runs("nightly")
    assert stored == replace(runs[0], agent_id="a0")  # the caller's identity, not the report's
    assert job_run_to_proto(stored) == pb.JobRun(
        job="nightly",
        run_id="r1",
        model="m",
        version=2,
        status="succeeded",
        rows_in=5,
        rows_out=5,
        duration_s=0.5,
        finished_at=10.0,
        agent_id="a0",
    )
    # Older hubs stored protobuf's JSON mapping: int64 as strings, defaults left out.
    legacy = {"job": "nightly", "run_id": "r0", "model": "m", "version": "1", "rows_in": "7"}
    assert JobRun.from_record(legacy) == JobRun("nightly", "r0", "m", 1, "", rows_in=7)
    registry.close()


async def _no_wake() -> None:
    pass


def test_grpc_noise_of_a_peer_gone_at_shutdown_is_dropped_and_nothing_else() -> None:
    """A watch stream whose agent hung up while the hub drained logged a gRPC traceback."""
    import logging

    from modelfleet.hub.app import PeerGoneAtShutdown

    f = PeerGoneAtShutdown()

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "x", 1, msg, (), None)

    assert not f.filter(record("ExecuteBatchError raised in core by servicer method [/a/B]"))
    assert f.filter(record("Unexpected [ValueError] raised by servicer method [/a/B]"))
