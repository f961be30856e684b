"""Inference capture on the hub, in process: settings in the registry reach desired states;
uploads resume, are stored once and checked; queries see the captured rows and nothing else."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.serving.capture import Capture, CaptureLimits, CaptureRule, complete_files
from modelfleet.hub.capture import CaptureService, CaptureStore, UploadHeader
from modelfleet.hub.registry import PermissionDeniedError, Registry
from modelfleet.kernel.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    ResourceExhaustedError,
    Status,
)


def _file(tmp_path: Path, rows: int = 30) -> Path:
    cap = Capture(CaptureLimits(tmp_path / "agent"), AgentMetrics(), tmp_path)
    cap.set_rule("m", CaptureRule(10_000))
    for i in range(rows):
        x = {"x": np.full((1, 3), i, np.float32)}
        cap.offer(f"r{i}", "m", 2, "candidate", x, {"y": np.array([[i]], np.int64)})
    cap.close()
    (f,) = complete_files(tmp_path / "agent")
    return f


def _header(f: Path, offset: int = 0) -> UploadHeader:
    data = f.read_bytes()
    return UploadHeader("m", f.stem, len(data), hashlib.sha256(data).hexdigest(), offset)


def test_upload_resumes_and_is_stored_once(tmp_path):
    f = _file(tmp_path)
    data = f.read_bytes()
    store = CaptureStore(tmp_path / "hub")
    h = _header(f)
    assert store.state("agent-1", h) == (0, False)
    sink = store.open_upload("agent-1", h)
    assert sink is not None
    sink.write(data[:100])
    assert sink.finish() == (100, False)
    # Resume from what the hub holds; a start beyond it is refused.
    assert store.state("agent-1", h) == (100, False)
    with pytest.raises(Exception, match="resume from 100"):
        store.open_upload("agent-1", _header(f, 150))
    sink = store.open_upload("agent-1", _header(f, 100))
    assert sink is not None
    sink.write(data[100:])
    assert sink.finish() == (len(data), True)
    # Stored: another upload of the same file writes nothing.
    assert store.state("agent-1", h) == (len(data), True)
    assert store.open_upload("agent-1", h) is None
    assert len(store.files("m")) == 1
    # Another agent's file of the same id is its own.
    assert store.state("agent-2", h) == (0, False)


def test_damaged_upload_is_dropped(tmp_path):
    f = _file(tmp_path)
    data = bytearray(f.read_bytes())
    store = CaptureStore(tmp_path / "hub")
    h = _header(f)
    sink = store.open_upload("a", h)
    assert sink is not None
    data[10] ^= 0xFF
    sink.write(bytes(data))
    with pytest.raises(InvalidRequestError, match="sha256 mismatch"):
        sink.finish()
    assert store.state("a", h) == (0, False)
    with pytest.raises(InvalidRequestError, match="not a valid name"):
        store.state("a", UploadHeader("../etc", "x", 1, "0" * 64, 0))


def test_query_sees_the_rows_and_nothing_else(tmp_path):
    f = _file(tmp_path)
    store = CaptureStore(tmp_path / "hub")
    sink = store.open_upload("edge-1", _header(f))
    assert sink is not None
    sink.write(f.read_bytes())
    assert sink.finish()[1]
    t = store.query("m", "SELECT agent_id, arm, version, count(*) AS n FROM capture GROUP BY ALL")
    assert t.to_pylist() == [{"agent_id": "edge-1", "arm": "candidate", "version": 2, "n": 30}]
    row = store.query("m", "SELECT in_x, out_y FROM capture WHERE request_id = 'r7'").to_pylist()
    assert row == [{"in_x": [7.0, 7.0, 7.0], "out_y": [7]}]
    with pytest.raises(InvalidRequestError, match="capture query"):
        store.query("m", "SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(ModelNotFoundError, match="no captured data"):
        store.query("other", "SELECT 1")
    assert store.locate("m", 2) is not None and store.locate("other", 1) is None


def test_settings_reach_the_desired_state(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    try:
        reg.add_version(
            name="m",
            version=1,
            sha256="0" * 64,
            size=1,
            notes="",
            target_path="m/1/bundle.tar",
            signed=True,
            manifest={"model": {"sha256": "1"}},
        )
        reg.deploy("m", 1, {})
        svc = CaptureService(reg, CaptureStore(tmp_path / "capture"))
        (d,) = reg.desired_for({"site": "berlin"})
        assert d.capture_rate_bp == 0
        svc.set("m", {}, 1000, (), ("card",), "admin")
        svc.set("m", {"site": "berlin"}, 5000, ("email",), (), "admin")
        (d,) = reg.desired_for({"site": "berlin"})
        assert (d.capture_rate_bp, d.capture_exclude, d.capture_hash) == (5000, ("email",), ())
        (d,) = reg.desired_for({"site": "paris"})
        assert (d.capture_rate_bp, d.capture_hash) == (1000, ("card",))
        # Setting the fleet-wide one again makes it the newest: it now wins everywhere.
        svc.set("m", {}, 200, (), (), "admin")
        (d,) = reg.desired_for({"site": "berlin"})
        assert d.capture_rate_bp == 200
        assert svc.remove("m", {"site": "berlin"}) == 1
        assert svc.remove("m", None) == 1
        (d,) = reg.desired_for({"site": "berlin"})
        assert d.capture_rate_bp == 0
        with pytest.raises(ModelNotFoundError, match="capture is not set"):
            svc.remove("m", None)
        with pytest.raises(InvalidRequestError, match="both excluded and hashed"):
            svc.set("m", {}, 100, ("a",), ("a",), "admin")
        with pytest.raises(InvalidRequestError, match="--rate"):
            svc.set("m", {}, 0, (), (), "admin")
    finally:
        reg.close()


class _HubPlane:
    """The capture half of the control plane, straight into a real hub store (what the gRPC
    edge does, without sockets); ``cut`` ends an upload after that many bytes, like a broken
    connection."""

    def __init__(self, store: CaptureStore, agent_id: str) -> None:
        self.store, self.agent_id = store, agent_id
        self.cut: int | None = None
        self.uploads = 0

    def _header(self, file, offset: int) -> UploadHeader:
        return UploadHeader(file.model, file.file_id, file.size, file.sha256, offset)

    async def capture_offset(self, file):
        return self.store.state(self.agent_id, self._header(file, 0))

    async def upload_capture(self, file, path: Path, offset: int):
        self.uploads += 1
        sink = self.store.open_upload(self.agent_id, self._header(file, offset))
        if sink is None:
            return self.store.state(self.agent_id, self._header(file, 0))
        data = path.read_bytes()[offset:]
        if self.cut is not None:
            sink.write(data[: self.cut])
            sink.finish()
            self.cut = None
            raise OSError("connection cut")
        sink.write(data)
        return sink.finish()


def test_shipper_resumes_and_never_ships_twice(tmp_path):
    import asyncio
    import shutil

    from modelfleet.agent.fleet.capture_ship import CaptureShipper

    f = _file(tmp_path)
    cap = Capture(CaptureLimits(tmp_path / "agent"), AgentMetrics(), tmp_path)
    store = CaptureStore(tmp_path / "hub")
    plane = _HubPlane(store, "edge-1")
    shipper = CaptureShipper(cap, plane, interval_s=0.01)  # type: ignore[arg-type]  # a fake
    keep = tmp_path / "copy.parquet"
    shutil.copy(f, keep)
    plane.cut = 200
    with pytest.raises(OSError, match="connection cut"):
        asyncio.run(shipper.ship_once())
    assert f.exists() and store.state("edge-1", _header(f)) == (200, False)
    # The next look resumes from the 200 bytes the hub holds and deletes the local file.
    assert asyncio.run(shipper.ship_once()) == 1
    assert not f.exists()
    # A crash between the hub's answer and the delete: the file is there again. The hub says
    # it has it; nothing is uploaded, and the hub still holds one copy.
    shutil.copy(keep, f)
    uploads = plane.uploads
    assert asyncio.run(shipper.ship_once()) == 1
    assert plane.uploads == uploads and not f.exists()
    assert len(store.files("m")) == 1
    assert store.query("m", "SELECT count(*) AS n FROM capture").to_pylist() == [{"n": 30}]


def test_chunk_messages_are_stored_once_whatever_the_broker_delivers(tmp_path):
    """MQTT uploads (CaptureStore.append): chunks replayed, duplicated, out of order or past a
    gap write nothing; the answer says where to go on; the file is stored once, intact."""
    f = _file(tmp_path, rows=300)
    data = f.read_bytes()
    store = CaptureStore(tmp_path / "hub")
    size = 64
    parts = [(o, data[o : o + size]) for o in range(0, len(data), size)]
    assert len(parts) > 4
    # A chunk ahead of what the hub holds (a gap) is not written.
    assert store.append("agent-1", _header(f, parts[2][0]), parts[2][1]) == (0, False, False)
    assert store.append("agent-1", _header(f, 0), parts[0][1]) == (size, False, True)
    # The same chunk again (the broker's redelivery), and a late copy of it after the next one.
    assert store.append("agent-1", _header(f, 0), parts[0][1]) == (size, False, False)
    assert store.append("agent-1", _header(f, size), parts[1][1]) == (2 * size, False, True)
    # A late copy whose bytes were altered cannot overwrite what is held either.
    assert store.append("agent-1", _header(f, 0), b"\0" * size) == (2 * size, False, False)
    for o, chunk in parts[2:]:
        have, stored, taken = store.append("agent-1", _header(f, o), chunk)
        assert taken
    assert (have, stored) == (len(data), True)
    # Everything replayed once more after the store: nothing is written, every answer "stored".
    for o, chunk in parts:
        assert store.append("agent-1", _header(f, o), chunk) == (len(data), True, False)
    (final,) = store.files("m")
    assert final.read_bytes() == data
    assert not list((tmp_path / "hub" / ".partial").rglob("*.part"))
    # Another agent's upload of the same file id is its own, and starts from nothing.
    assert store.append("agent-2", _header(f, size), parts[1][1]) == (0, False, False)


def test_chunk_messages_bounded_and_checked(tmp_path):
    from modelfleet.hub.capture import MAX_PART_BYTES

    f = _file(tmp_path)
    data = f.read_bytes()
    store = CaptureStore(tmp_path / "hub")
    with pytest.raises(InvalidRequestError, match="over the"):
        store.append("agent-1", _header(f, 0), b"x" * (MAX_PART_BYTES + 1))
    # More bytes than the file's size: refused, nothing kept beyond the size.
    with pytest.raises(InvalidRequestError, match="more bytes than its size"):
        store.append("agent-1", _header(f, 0), data + b"extra")
    # Bytes that do not match the SHA-256: the partial copy is dropped; the next starts over.
    bad = bytes(len(data))
    with pytest.raises(InvalidRequestError, match="sha256 mismatch"):
        store.append("agent-1", _header(f, 0), bad)
    assert store.state("agent-1", _header(f)) == (0, False)
    assert store.append("agent-1", _header(f, 0), data) == (len(data), True, True)
    # The agent id and names are checked as for gRPC uploads.
    with pytest.raises(InvalidRequestError):
        store.append("../agent", _header(f, 0), data)


def test_duplicate_chunks_on_several_threads_write_the_file_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    f = _file(tmp_path, rows=300)
    data = f.read_bytes()
    store = CaptureStore(tmp_path / "hub")
    size = 128
    parts = [(o, data[o : o + size]) for o in range(0, len(data), size)]
    # Every chunk four times, all at once, in rounds: whatever wins, the result is the file.
    with ThreadPoolExecutor(4) as pool:
        for _ in range(len(parts) + 1):
            have, _ = store.state("agent-1", _header(f))
            todo = [(o, c) for o, c in parts if o >= have][:2] or [(len(data), b"")]
            list(
                pool.map(
                    lambda oc: store.append("agent-1", _header(f, oc[0]), oc[1]),
                    [oc for oc in todo for _ in range(4)],
                )
            )
    assert store.state("agent-1", _header(f)) == (len(data), True)
    (final,) = store.files("m")
    assert final.read_bytes() == data


# -- attackers: who may upload what, and how much -------------------------------------------------


def _fleet(tmp_path: Path) -> tuple[Registry, CaptureService]:
    """Model m deployed to site a (agent edge-a), model victim to site b (agent edge-b)."""
    reg = Registry(tmp_path / "registry.db")
    for name in ("m", "victim"):
        reg.add_version(
            name=name,
            version=1,
            sha256="0" * 64,
            size=1,
            notes="",
            target_path=f"{name}/1/bundle.tar",
            signed=True,
            manifest={"model": {"sha256": "1"}},
        )
    reg.add_agent("edge-a", "edge-a", {"site": "a"}, "fp-a")
    reg.add_agent("edge-b", "edge-b", {"site": "b"}, "fp-b")
    reg.deploy("m", 1, {"site": "a"})
    reg.deploy("victim", 1, {"site": "b"})
    return reg, CaptureService(reg, CaptureStore(tmp_path / "capture"))


def _as(h: UploadHeader, model: str, file_id: str | None = None) -> UploadHeader:
    return UploadHeader(model, file_id or h.file_id, h.size, h.sha256, h.offset)


def test_an_agent_cannot_upload_capture_of_a_model_it_never_served(tmp_path):
    import asyncio

    from modelfleet.hub.outcomes import OutcomeRow, OutcomeService, OutcomeStore

    f = _file(tmp_path)
    data = f.read_bytes()
    reg, svc = _fleet(tmp_path)
    store = svc.store
    outcomes = OutcomeService(OutcomeStore(tmp_path / "o.sqlite"), store)
    try:
        forged = _as(_header(f), "victim")
        refused = "capture upload refused: model 'victim' was never deployed to agent edge-a"
        # gRPC edge (offset query, then the stream) and MQTT edge (chunk messages).
        with pytest.raises(PermissionDeniedError, match=refused) as err:
            store.state("edge-a", forged)
        assert err.value.status is Status.PERMISSION_DENIED
        with pytest.raises(PermissionDeniedError, match=refused):
            store.open_upload("edge-a", forged)
        with pytest.raises(PermissionDeniedError, match=refused):
            store.append("edge-a", forged, data)

        # MQTT chunks are handled on worker threads: the check hops to the hub's loop.
        async def from_a_worker_thread() -> None:
            svc.loop = asyncio.get_running_loop()
            with pytest.raises(PermissionDeniedError, match=refused):
                await asyncio.to_thread(store.append, "edge-a", forged, data)
            assert await asyncio.to_thread(store.append, "edge-a", _header(f), data) == (
                len(data),
                True,
                True,
            )

        asyncio.run(from_a_worker_thread())
        svc.loop = None  # that loop is closed; from here on, calls come on this thread
        # Nothing of the forged upload is on the hub's disk, partial or complete.
        assert store.files("victim") == []
        assert not list((tmp_path / "capture").glob(".partial/edge-a/victim/*"))
        # ... so victim's accuracy has no predictions to join the labels with.
        outcomes.report("victim", [OutcomeRow(f"r{i}", label=1) for i in range(30)])
        assert outcomes.accuracy("victim").groups == []
        # The agent serving it uploads the same bytes fine; an unknown agent is refused.
        assert store.append("edge-b", forged, data) == (len(data), True, True)
        with pytest.raises(PermissionDeniedError, match="unknown agent"):
            store.state("edge-x", _header(f))
    finally:
        reg.close()


def test_files_of_a_model_undeployed_since_are_still_accepted(tmp_path):
    f = _file(tmp_path)
    data = f.read_bytes()
    reg, svc = _fleet(tmp_path)
    try:
        (row,) = [r for r in reg.deployment_rows() if r.name == "m"]
        reg.remove_deployments([row.id])
        assert [d.name for d in reg.desired_for({"site": "a"}, "edge-a")] == []
        # edge-a served m until now: the files it finished meanwhile are its own predictions.
        assert svc.store.append("edge-a", _header(f), data) == (len(data), True, True)
        # A rollout's per-agent assignment counts like a fleet deployment.
        reg.deploy("victim", 1, {"_agent": "edge-a"})
        assert svc.store.append("edge-a", _as(_header(f), "victim"), data)[1]
    finally:
        reg.close()


def test_an_agent_over_its_quota_is_refused_with_the_setting_named(tmp_path):
    f = _file(tmp_path)
    data = f.read_bytes()
    reg, svc = _fleet(tmp_path)
    store = svc.store
    store.agent_quota_bytes = len(data) * 2
    try:
        h = _header(f)
        for n in range(2):
            assert store.append("edge-a", _as(h, "m", f"f{n}"), data)[1]
        with pytest.raises(ResourceExhaustedError, match="capture_agent_quota_bytes") as err:
            store.append("edge-a", _as(h, "m", "f2"), data)
        assert err.value.status is Status.RESOURCE_EXHAUSTED
        assert f"edge-a has {2 * len(data)} bytes" in str(err.value)
        assert not list((tmp_path / "capture").glob(".partial/edge-a/*/*"))
        # Another agent's quota is its own; stored files still answer "stored".
        assert store.append("edge-b", _as(h, "victim", "f2"), data)[1]
        assert store.state("edge-a", _as(h, "m", "f0")) == (len(data), True)
        # Room made by the operator: uploads go on.
        (tmp_path / "capture" / "m" / "edge-a" / "f0.parquet").unlink()
        assert store.append("edge-a", _as(h, "m", "f2"), data)[1]
    finally:
        reg.close()


def test_a_file_the_hub_refuses_does_not_block_the_next(tmp_path):
    import asyncio

    from modelfleet.agent.fleet.capture_ship import CaptureShipper

    reg, svc = _fleet(tmp_path)
    try:
        cap = Capture(CaptureLimits(tmp_path / "agent"), AgentMetrics(), tmp_path)
        # Oldest first: a file of victim (never deployed to edge-a), then one of m.
        for model in ("victim", "m"):
            cap.set_rule(model, CaptureRule(10_000))
            for i in range(5):
                x = {"x": np.full((1, 3), i, np.float32)}
                cap.offer(f"{model}{i}", model, 1, "active", x, {"y": np.array([[i]], np.int64)})
        cap.close()
        (old,) = [p for p in cap.files() if p.parent.name == "victim"]
        os.utime(old, (1, 1))
        assert [p.parent.name for p in cap.files()] == ["victim", "m"]
        plane = _HubPlane(svc.store, "edge-a")
        shipper = CaptureShipper(cap, plane, interval_s=0.01)  # type: ignore[arg-type]  # a fake
        assert asyncio.run(shipper.ship_once()) == 1
        assert shipper.refused == 1 and cap.files() == []
        assert len(svc.store.files("m")) == 1 and svc.store.files("victim") == []
        metric = cap.metrics.capture_files.labels("victim", "refused")._value.get()
        assert metric == 1
        # A transient refusal (quota) keeps the file for the next look.
        svc.store.agent_quota_bytes = 1
        cap2 = Capture(CaptureLimits(tmp_path / "agent2"), AgentMetrics(), tmp_path)
        cap2.set_rule("m", CaptureRule(10_000))
        cap2.offer("z", "m", 1, "active", {"x": np.zeros((1, 3), np.float32)}, {})
        cap2.close()
        shipper2 = CaptureShipper(cap2, plane, interval_s=0.01)  # type: ignore[arg-type]
        with pytest.raises(ResourceExhaustedError):
            asyncio.run(shipper2.ship_once())
        assert len(cap2.files()) == 1 and shipper2.refused == 0
    finally:
        reg.close()
