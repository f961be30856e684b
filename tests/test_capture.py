"""Inference capture on the agent: the writer, rotation, quota, privacy and crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.serving.capture import (
    TEMP_SUFFIX,
    Capture,
    CaptureLimits,
    CaptureRule,
    LocalRules,
    complete_files,
    keyed_hash,
    load_key,
)
from modelfleet.kernel.errors import InvalidRequestError


def _capture(tmp_path: Path, **limits) -> Capture:
    cap = Capture(CaptureLimits(tmp_path / "capture", **limits), AgentMetrics(), load_key(tmp_path))
    cap.recover()
    return cap


def _offer(cap: Capture, n: int, model: str = "m", version: int = 1) -> None:
    for i in range(n):
        x = np.full((1, 4), i, dtype=np.float32)
        card = np.array([[f"card-{i}".encode()]], dtype=object)
        secret = np.array([[i]], dtype=np.int64)
        y = np.array([[i * 2.0]], dtype=np.float32)
        feed = {"x": x, "card": card, "secret": secret}
        assert cap.offer(f"r{i}", model, version, "active", feed, {"y": y})


def _rows(root: Path) -> list[dict]:
    rows: list[dict] = []
    for f in complete_files(root):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def test_sampled_rows_written_with_exclude_and_hash(tmp_path):
    cap = _capture(tmp_path)
    cap.set_rule("m", CaptureRule(10_000, exclude=("secret",), hash=("card",)))
    _offer(cap, 20)
    cap.close()
    rows = _rows(tmp_path / "capture")
    assert len(rows) == 20
    first = next(r for r in rows if r["request_id"] == "r0")
    assert first["model"] == "m" and first["version"] == 1 and first["arm"] == "active"
    assert first["in_x"] == [0.0] * 4 and first["out_y"] == [0.0]
    # Excluded: no column at all. Hashed: a keyed hash, never the raw bytes.
    assert all("in_secret" not in r for r in rows)
    assert first["in_card"] != "card-0" and len(first["in_card"]) == 64
    key = (tmp_path / "capture.key").read_bytes()
    assert first["in_card"] == keyed_hash(key, np.array([[b"card-0"]], dtype=object))
    assert oct((tmp_path / "capture.key").stat().st_mode & 0o777) == "0o600"


def test_sampling_rate_and_off(tmp_path):
    cap = _capture(tmp_path)
    cap.set_rule("m", CaptureRule(1000))
    x = {"x": np.zeros((1, 4), np.float32)}
    taken = sum(cap.offer(str(i), "m", 1, "active", x, x) for i in range(5000))
    # 10% of 5000: 500, with a wide margin for chance (the bound is ~6 sigma).
    assert 380 < taken < 620
    cap.set_rule("m", None)
    assert not cap.offer("z", "m", 1, "active", x, x)
    assert not cap.offer("z", "other", 1, "active", x, x)
    cap.close()


def test_rule_checks():
    with pytest.raises(InvalidRequestError, match="both excluded and hashed"):
        CaptureRule(100, exclude=("a",), hash=("a",))
    with pytest.raises(InvalidRequestError, match="basis points"):
        CaptureRule(10_001)


def test_rotation_by_size_and_time(tmp_path):
    cap = _capture(tmp_path, rotate_bytes=2000, flush_rows=5, flush_s=0.05)
    cap.set_rule("m", CaptureRule(10_000))
    _offer(cap, 60)
    cap.close()
    files = complete_files(tmp_path / "capture")
    assert len(files) > 2, "rotated by size"
    assert len(_rows(tmp_path / "capture")) == 60
    cap2 = _capture(tmp_path / "t", rotate_s=0.2, flush_s=0.05)
    cap2.set_rule("m", CaptureRule(10_000))
    _offer(cap2, 3)
    deadline = time.monotonic() + 10
    while not complete_files(tmp_path / "t" / "capture") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(complete_files(tmp_path / "t" / "capture")) == 1, "finished by age"
    cap2.close()


def test_new_signature_starts_a_new_file(tmp_path):
    cap = _capture(tmp_path, flush_rows=1)
    cap.set_rule("m", CaptureRule(10_000))
    x = {"x": np.zeros((1, 4), np.float32)}
    cap.offer("a", "m", 1, "active", x, x)
    time.sleep(0.2)
    cap.offer("b", "m", 2, "active", {"z": np.zeros((1, 2), np.int64)}, x)
    cap.close()
    assert len(complete_files(tmp_path / "capture")) == 2


def test_quota_deletes_oldest_first(tmp_path):
    cap = _capture(tmp_path, rotate_bytes=1, flush_rows=1)
    cap.set_rule("m", CaptureRule(10_000))
    x = {"x": np.zeros((1, 64), np.float32)}
    for i in range(4):
        cap.offer(f"r{i}", "m", 1, "active", x, x)
        time.sleep(0.05)
    cap.close()
    files = complete_files(tmp_path / "capture")
    assert len(files) == 4
    size = files[0].stat().st_size
    cap.limits.quota_bytes = size * 2 + size // 2
    assert cap.enforce_quota() == 2
    left = complete_files(tmp_path / "capture")
    assert left == files[2:], "the oldest went first"
    assert {r["request_id"] for r in _rows(tmp_path / "capture")} == {"r2", "r3"}
    got = cap.metrics.capture_files.labels("m", "deleted_quota")._value.get()
    assert got == 2


def test_full_queue_drops_and_counts(tmp_path):
    cap = _capture(tmp_path, queue_max=1)
    cap.set_rule("m", CaptureRule(10_000))
    # The writer is not started until the first offer; stop it taking anything by filling.
    x = {"x": np.zeros((1, 4), np.float32)}
    results = [cap.offer(str(i), "m", 1, "active", x, x) for i in range(2000)]
    cap.close()
    assert not all(results)
    assert cap.dropped["m"] == results.count(False)
    assert cap.metrics.capture_requests.labels("m", "dropped")._value.get() == cap.dropped["m"]


def test_local_rules_survive(tmp_path):
    rules = LocalRules(tmp_path)
    rules.save({"m": CaptureRule(250, ("a",), ("b",))})
    assert rules.load() == {"m": CaptureRule(250, ("a",), ("b",))}


_WRITER = """
import sys, time
import numpy as np
from pathlib import Path
from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.serving.capture import Capture, CaptureLimits, CaptureRule, load_key
root = Path(sys.argv[1])
cap = Capture(CaptureLimits(root / "capture", rotate_bytes=20_000, flush_rows=8, flush_s=0.01),
              AgentMetrics(), load_key(root))
cap.recover()
cap.set_rule("m", CaptureRule(10_000))
x = {"x": np.random.rand(1, 64).astype(np.float32)}
i = 0
print("writing", flush=True)
while True:
    if cap.offer(f"r{i}", "m", 1, "active", x, x):
        i += 1
    if i % 64 == 0:
        time.sleep(0.001)
"""


def test_kill_9_while_writing_leaves_readable_files(tmp_path):
    """A kill -9 mid-write: every .parquet left reads; start-up clears the temp file."""
    temps = seen = 0
    for attempt in range(3):
        root = tmp_path / f"a{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "writing"
            deadline = time.monotonic() + 30
            while len(complete_files(root / "capture")) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.05 * attempt)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        files = complete_files(root / "capture")
        assert len(files) >= 3
        for f in files:
            assert pq.read_table(f).num_rows > 0
        temps += len(list((root / "capture").rglob("*" + TEMP_SUFFIX)))
        cap = Capture(CaptureLimits(root / "capture"), AgentMetrics(), load_key(root))
        salvaged, deleted = cap.recover()
        assert salvaged + deleted == temps - seen
        seen = temps
        assert not list((root / "capture").rglob("*" + TEMP_SUFFIX))
        for f in complete_files(root / "capture"):
            assert pq.read_table(f).num_rows > 0
    assert temps >= 1, "no kill landed while a file was being written"
