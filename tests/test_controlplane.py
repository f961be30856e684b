"""FleetSync driven through its port, the ControlPlane, with an in-memory test double.

The double implements the real interface (agent/fleet/controlplane.py): the test pushes desired
states and reads what the agent reported; bundle bytes and TUF metadata come from a real TUF
repository on disk (tests/test_tuf.py's FakeHub), so fetch, verification, slots and gate are the
real ones. The gRPC and MQTT adapters are covered by the real-process tests (test_fleet.py,
test_mqtt.py, test_rollout_fleet.py).
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import hashlib
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from modelfleet.agent.config import ServeConfig
from modelfleet.agent.fleet import convert
from modelfleet.agent.fleet.controlplane import (
    AgentReport,
    ControlPlane,
    DesiredModel,
    DesiredState,
    ModelReport,
    OnDesired,
    OnLateAcks,
    OnTrouble,
    SplitControlPlane,
)
from modelfleet.agent.fleet.sync import FleetSync
from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.serving.routing import Comparison
from modelfleet.agent.slots import BatchingConfig, SlotManager
from modelfleet.hub.ca import CertificateAuthority
from modelfleet.hub.signing import TufRepository, init_keys
from modelfleet.kernel.identity import (
    agent_common_name,
    generate_key,
    load_certificate,
    make_csr,
    write_pem,
    write_private_key,
)
from modelfleet.kernel.jobs import JobSpec
from modelfleet.kernel.reports import report_to_proto
from modelfleet.kernel.runtime import RuntimeOptions
from modelfleet.protos import fleet_pb2 as pb
from tests.test_tuf import FakeHub

AGENT = "a1"
ROOT = Path(__file__).resolve().parent.parent


class FakeControlPlane:
    """The ControlPlane test double: nothing on the wire, everything observable."""

    def __init__(self, hub: FakeHub, ca: CertificateAuthority) -> None:
        self.hub = hub
        self.ca = ca
        self.on_desired: OnDesired | None = None
        self.on_trouble: OnTrouble | None = None
        self.on_late: OnLateAcks | None = None
        self.reports: list[AgentReport] = []
        self.final_reports: list[AgentReport] = []
        self.batches: list[pb.TelemetryBatch] = []
        self.ack_telemetry = True
        self.csrs: list[bytes] = []
        self.identity_uses = 0
        self.closed = False
        self.final_telemetry_timeout_s = 2.0
        # target path fragment -> event the fetch waits for (set by the test to let it go on)
        self.held: dict[str, threading.Event] = {}
        self.fetching: dict[str, threading.Event] = {}
        self.calls: list[str] = []

    async def watch_desired(
        self, on_desired: OnDesired, on_trouble: OnTrouble, stop: asyncio.Event
    ) -> None:
        self.calls.append("watch_desired")
        self.on_desired, self.on_trouble = on_desired, on_trouble
        await stop.wait()

    def push(self, state: DesiredState) -> None:
        assert self.on_desired is not None, "FleetSync is not watching the desired state"
        self.on_desired(state)

    async def send_report(self, report: AgentReport) -> None:
        self.calls.append("send_report")
        self.reports.append(report)

    async def send_final_report(self, report: AgentReport) -> None:
        self.calls.append("send_final_report")
        self.final_reports.append(report)

    async def send_telemetry(self, batch: pb.TelemetryBatch) -> Sequence[int]:
        self.calls.append("send_telemetry")
        self.batches.append(batch)
        return [r.seq for r in batch.reports] if self.ack_telemetry else []

    def set_late_ack_handler(self, handler: OnLateAcks) -> None:
        self.on_late = handler

    async def renew_certificate(self, csr_pem: bytes) -> bytes:
        self.calls.append("renew_certificate")
        self.csrs.append(csr_pem)
        return self.ca.sign_csr(csr_pem, agent_common_name(AGENT))

    async def use_identity(self) -> None:
        self.calls.append("use_identity")
        self.identity_uses += 1

    def fetch_metadata(self, filename: str) -> Iterator[bytes]:
        return self.hub.fetch_metadata(filename)

    def fetch_target(self, path: str, offset: int) -> Iterator[bytes | memoryview]:
        for fragment, release in self.held.items():
            if fragment in path:
                self.fetching.setdefault(fragment, threading.Event()).set()
                if not release.wait(60):
                    raise ConnectionError(f"test: the fetch of {path} was never released")
        yield from self.hub.fetch_target(path, offset)

    async def close(self) -> None:
        self.calls.append("close")
        self.closed = True


def _conforms(plane: ControlPlane) -> ControlPlane:
    return plane


async def until(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


@pytest.fixture
def hub(tmp_path: Path) -> FakeHub:
    init_keys(tmp_path / "keys")
    return FakeHub(TufRepository.create(tmp_path / "metadata", tmp_path / "keys"))


@pytest.fixture
def agent_data(tmp_path: Path, hub: FakeHub, ca: CertificateAuthority) -> Path:
    """An agent data directory as `modelfleet-agent enroll` leaves it."""
    data = tmp_path / "agent"
    ident = data / "identity"
    ident.mkdir(parents=True, mode=0o700)
    key = generate_key()
    write_private_key(ident / "agent.key", key)
    write_pem(ident / "agent.crt", ca.sign_csr(make_csr(key, "x"), agent_common_name(AGENT)))
    write_pem(ident / "ca.crt", ca.cert_pem)
    (data / "tuf").mkdir(mode=0o700)
    (data / "tuf" / "root.json").write_bytes(hub.repo.root_bytes())
    return data


def desired(hub: FakeHub, *versions: int, revision: int) -> DesiredState:
    """A desired state for model "mlp" at the newest of ``versions`` (all published)."""
    models = []
    for version in versions:
        data = hub.publish("mlp", version)
        models = [
            DesiredModel(
                "mlp",
                version,
                f"mlp/{version}/bundle.tar",
                hashlib.sha256(data).hexdigest(),
                len(data),
            )
        ]
    return DesiredState(revision=revision, models=models)


Scenario = Callable[[FleetSync, FakeControlPlane], Awaitable[None]]


def drive(agent_data: Path, plane: FakeControlPlane, scenario: Scenario, **settings: float) -> None:
    """Run FleetSync (all its loops) over ``plane`` while ``scenario`` runs, then stop it."""
    cfg = ServeConfig(hub="fake-hub:1", agent_id=AGENT, data=agent_data, **settings)  # type: ignore[arg-type]
    # Not agent.app.build_slots: that imports the inference protos, which cannot share a
    # process with tritonclient (other test modules in the same run import it).
    slots = SlotManager(
        runtime=RuntimeOptions(intra_op_threads=1),
        batching=BatchingConfig(enabled=False),
        metrics=AgentMetrics(),
    )

    async def main() -> None:
        sync = FleetSync(cfg, slots, "127.0.0.1:8001", _conforms(plane))
        stop = asyncio.Event()
        running = asyncio.ensure_future(sync.run(stop))
        try:
            await until("FleetSync watches the desired state", lambda: plane.on_desired is not None)
            await asyncio.wait_for(scenario(sync, plane), 120)
        finally:
            for release in plane.held.values():
                release.set()
            stop.set()
            await asyncio.wait_for(running, 30)

    try:
        asyncio.run(main())
    finally:
        slots.close()


def active(sync: FleetSync, name: str) -> int | None:
    slot = sync.slots.slots.get(name)
    return slot.active.version if slot is not None and slot.active is not None else None


def test_desired_state_through_the_port_is_fetched_verified_served_and_reported(
    agent_data: Path, hub: FakeHub, ca: CertificateAuthority
) -> None:
    plane = FakeControlPlane(hub, ca)

    async def scenario(sync: FleetSync, plane: FakeControlPlane) -> None:
        plane.push(desired(hub, 1, revision=7))
        await until("mlp v1 serves", lambda: active(sync, "mlp") == 1)
        await until(
            "a report says so",
            lambda: any(
                r.desired_revision == 7
                and [(m.name, m.active_version, m.desired_version) for m in r.models]
                == [("mlp", 1, 1)]
                for r in plane.reports
            ),
        )

    drive(agent_data, plane, scenario)
    assert plane.closed and plane.calls[-2:] == ["send_final_report", "close"]
    (last,) = plane.final_reports
    assert last.models[0].active_version == 1
    assert last.models[0].gate_version == 1 and last.models[0].gate_passed
    assert last.last_error == "" and last.cert_expires_at > time.time()


def test_a_desired_state_arriving_during_a_reconcile_gets_its_own_pass(
    agent_data: Path, hub: FakeHub, ca: CertificateAuthority
) -> None:
    """Lost wakeup: v2 arrives while the pass for v1 is fetching. Nothing else will wake the
    loop (no resync, no error to retry), so the pass that follows must come from v2's arrival.
    """
    plane = FakeControlPlane(hub, ca)
    plane.held["mlp/1/"] = threading.Event()

    async def scenario(sync: FleetSync, plane: FakeControlPlane) -> None:
        plane.push(desired(hub, 1, revision=1))
        await until(
            "the pass for v1 is fetching",
            lambda: "mlp/1/" in plane.fetching and plane.fetching["mlp/1/"].is_set(),
        )
        plane.push(desired(hub, 1, 2, revision=2))
        plane.held["mlp/1/"].set()
        await until("mlp v2 serves without another message", lambda: active(sync, "mlp") == 2)

    drive(agent_data, plane, scenario)


def test_split_and_shadow_shares_from_the_desired_state_apply_without_reloading(
    agent_data: Path, hub: FakeHub, ca: CertificateAuthority
) -> None:
    """Issue 15: a prepared version with shares becomes the candidate of a comparison; a new
    share is applied from the next desired state, with the same loaded sessions."""
    plane = FakeControlPlane(hub, ca)
    blobs = {v: hub.publish("mlp", v) for v in (1, 2)}

    def state(revision: int, **shares: object) -> DesiredState:
        d = DesiredModel(
            "mlp",
            1,
            "mlp/1/bundle.tar",
            hashlib.sha256(blobs[1]).hexdigest(),
            len(blobs[1]),
            prepare_version=2,
            prepare_size=len(blobs[2]),
            **shares,  # type: ignore[arg-type]  # the comparison fields, by name
        )
        return DesiredState(revision=revision, models=[d])

    async def scenario(sync: FleetSync, plane: FakeControlPlane) -> None:
        plane.push(state(1, split_bp=2500, sticky=True, comparison="rollout 7"))

        def candidate() -> object:
            slot = sync.slots.slots.get("mlp")
            return slot.previous if slot is not None and slot.previous is not None else None

        await until("v2 is gated beside v1", lambda: candidate() is not None)
        await until("the split applies", lambda: sync.slots.arms().get(("mlp", 2)) == "candidate")
        slot = sync.slots.slots["mlp"]
        assert slot.comparison == Comparison(2, 2500, True, 0, "rollout 7")
        loaded = (slot.active, slot.previous)
        plane.push(state(2, shadow_bp=10000, comparison="experiment 3"))
        await until("the shadow applies", lambda: sync.slots.arms().get(("mlp", 2)) == "shadow")
        assert slot.comparison == Comparison(2, 0, False, 10000, "experiment 3")
        assert (slot.active, slot.previous) == loaded  # nothing reloaded
        plane.push(state(3))
        await until("the comparison ends", lambda: slot.comparison is None)
        assert sync.slots.arms() == {("mlp", 1): "active"}
        assert (slot.active, slot.previous) == loaded

    drive(agent_data, plane, scenario)


def test_hub_trouble_shows_until_the_next_desired_state(
    agent_data: Path, hub: FakeHub, ca: CertificateAuthority
) -> None:
    plane = FakeControlPlane(hub, ca)

    async def scenario(sync: FleetSync, plane: FakeControlPlane) -> None:
        assert plane.on_trouble is not None
        plane.on_trouble("hub: hub unreachable (UNAVAILABLE: connection refused)")
        assert sync.build_report().last_error.startswith("hub: hub unreachable")
        plane.push(DesiredState(revision=3))
        assert sync.build_report().last_error == ""
        assert sync.build_report().desired_revision == 3

    drive(agent_data, plane, scenario)


def test_telemetry_goes_through_the_port_and_late_acks_empty_the_outbox(
    agent_data: Path, hub: FakeHub, ca: CertificateAuthority
) -> None:
    plane = FakeControlPlane(hub, ca)

    async def scenario(sync: FleetSync, plane: FakeControlPlane) -> None:
        outbox = sync.telemetry.outbox
        plane.ack_telemetry = False  # the ack will come late (as over MQTT after a timeout)
        seq = await sync.telemetry.cut()
        assert seq is not None
        with pytest.raises(ConnectionError, match="acknowledged none"):
            await sync.telemetry.send_once()
        assert outbox.count() == 1 and plane.batches[-1].reports[0].seq == seq
        assert plane.on_late is not None
        plane.on_late([seq])
        await until("the late ack empties the outbox", lambda: outbox.count() == 0)

    drive(agent_data, plane, scenario)


@pytest.mark.parametrize("timeout_s", [2.0, 0.0], ids=["grpc-like", "mqtt-like"])
def test_shutdown_sends_the_last_interval_only_when_the_plane_allows(
    agent_data: Path, hub: FakeHub, ca: CertificateAuthority, timeout_s: float
) -> None:
    """The interval cut while stopping is sent at once over a plane that allows it (gRPC) and
    stays in the outbox for the next start otherwise (MQTT)."""
    plane = FakeControlPlane(hub, ca)
    plane.final_telemetry_timeout_s = timeout_s
    last = []

    async def scenario(sync: FleetSync, plane: FakeControlPlane) -> None:
        sync.slots.metrics.telemetry.version("mlp", 1).ok(0.001, 0.0)  # one request served
        last.append(sync.telemetry.outbox.next_seq())  # the seq the shutdown cut will get

    # No interval ends during the test: the only cut is the one made while stopping.
    drive(agent_data, plane, scenario, telemetry_interval_s=3600.0)
    sent = {r.seq for b in plane.batches for r in b.reports}
    assert (last[0] in sent) == (timeout_s > 0)


def test_renewal_asks_through_the_port_then_reconnects(
    agent_data: Path, hub: FakeHub, ca: CertificateAuthority
) -> None:
    plane = FakeControlPlane(hub, ca)

    async def scenario(sync: FleetSync, plane: FakeControlPlane) -> None:
        before = (agent_data / "identity" / "agent.crt").read_bytes()
        await sync.renew_certificate()
        after = (agent_data / "identity" / "agent.crt").read_bytes()
        assert after != before and len(plane.csrs) == 1
        assert plane.identity_uses == 1 and not sync._identity_stale
        assert sync.cert_expires_at == load_certificate(after).not_valid_after_utc.timestamp()
        assert sync.report_now.is_set()

    drive(agent_data, plane, scenario)


def test_split_plane_takes_desired_state_from_one_and_the_rest_from_the_other(
    hub: FakeHub, ca: CertificateAuthority
) -> None:
    pushes, rest = FakeControlPlane(hub, ca), FakeControlPlane(hub, ca)
    split = SplitControlPlane(desired=_conforms(pushes), rest=_conforms(rest))
    report = AgentReport([], "", 1, 0, 0, "0", "127.0.0.1:8001", 0.0)
    batch = pb.TelemetryBatch(reports=[pb.TelemetryReport(seq=5)])

    async def main() -> None:
        stop = asyncio.Event()
        stop.set()
        await split.watch_desired(lambda _s: None, lambda _e: None, stop)
        await split.send_report(report)
        assert await split.send_telemetry(batch) == [5]
        await split.renew_certificate(make_csr(generate_key(), AGENT))
        await split.use_identity()
        await split.send_final_report(report)
        await split.close()

    asyncio.run(main())
    split.set_late_ack_handler(lambda _seqs: None)
    assert split.final_telemetry_timeout_s == rest.final_telemetry_timeout_s
    assert pushes.calls == ["watch_desired", "use_identity", "send_final_report", "close"]
    assert rest.calls == [
        "send_report",
        "send_telemetry",
        "renew_certificate",
        "use_identity",
        "send_final_report",
        "close",
    ]
    assert rest.on_late is not None and pushes.on_late is None
    assert list(split.fetch_metadata("root.json"))  # bytes from the rest: the real repository


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(
    ("message", "domain"),
    [
        (pb.AgentReport, AgentReport),
        (pb.ModelReport, ModelReport),
        (pb.DesiredState, DesiredState),
        (pb.DesiredModel, DesiredModel),
        (pb.JobSpec, JobSpec),
    ],
)
def test_every_message_field_has_a_domain_counterpart(message: type, domain: type) -> None:
    """A field added to fleet.proto fails here until the port's types carry it too."""
    assert {f.name for f in message.DESCRIPTOR.fields} == _fields(domain)


def test_conversion_carries_every_field() -> None:
    model = ModelReport(
        "m", 2, 1, 3, 4, 2, True, "outputs", "nan in y", "slow", "gate", "CPUExecutionProvider"
    )
    report = AgentReport((model,), "e", 9, 10, 11, "1.2", "10.0.0.1:8001", 12.5)
    wire = MessageToDict(report_to_proto(report), preserving_proto_field_name=True)
    assert wire["models"] == [
        {k: v for k, v in dataclasses.asdict(model).items()}
        | {"active_version": "2", "previous_version": "1", "loading_version": "3"}
        | {"desired_version": "4", "gate_version": "2"}
    ]
    assert {k for k in wire if k != "models"} == _fields(AgentReport) - {"models"}
    message = pb.DesiredState(
        revision=4,
        models=[pb.DesiredModel(name="m", version=2, target_path="m/2/bundle.tar", sha256="ab")],
        jobs=[pb.JobSpec(name="j", model="m", version=2, schedule="every 5s", keys="id")],
    )
    state = convert.desired_state(message)
    assert state.revision == 4
    assert state.models == [DesiredModel("m", 2, "m/2/bundle.tar", "ab")]
    assert state.jobs == [JobSpec("j", "m", 2, "every 5s", "", "", keys="id")]


def test_reconciliation_has_no_transport_in_it() -> None:
    """sync.py reaches the hub only through the port: no gRPC, MQTT or protobuf in it."""
    path = ROOT / "agent" / "fleet" / "sync.py"
    source = path.read_text()
    assert re.findall(r"grpc|mqtt|fleet_pb2", source, re.IGNORECASE) == []
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    transports = ("grpc", "paho", "modelfleet.protos", "modelfleet.agent.fleet.grpc_plane")
    transports += ("modelfleet.agent.fleet.mqtt_plane", "modelfleet.agent.fleet.mqtt")
    assert [m for m in imported for t in transports if m == t or m.startswith(t + ".")] == []
