"""Inference capture on the hub, in process: settings in the registry reach desired states;
uploads resume, are stored once and checked; queries see the captured rows and nothing else."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.serving.capture import Capture, CaptureLimits, CaptureRule, complete_files
from modelfleet.hub.capture import CaptureService, CaptureStore, UploadHeader
from modelfleet.hub.registry import Registry
from modelfleet.kernel.errors import InvalidRequestError, ModelNotFoundError


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
