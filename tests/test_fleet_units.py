"""Fleet pieces without processes: backoff, cache collection, registry rules, desired state."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from modelfleet.agent.fleet.backoff import Backoff
from modelfleet.agent.fleet.cache import BundleCache
from modelfleet.hub.registry import FailedPreconditionError, PermissionDeniedError, Registry
from modelfleet.kernel.errors import BundleExistsError, InvalidRequestError
from modelfleet.kernel.reports import AgentReport, ModelReport


def test_backoff_is_bounded_jittered_and_resets() -> None:
    b = Backoff(base=0.5, cap=4.0, rng=random.Random(1))
    delays = [b.next() for _ in range(50)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 40  # jitter: agents do not retry in lockstep
    assert max(delays[:2]) <= 1.0  # starts small
    b.reset()
    assert b.next() <= 0.5


def test_cache_collects_what_is_neither_desired_nor_loaded(tmp_path: Path) -> None:
    cache = BundleCache(tmp_path, max_bytes=10_000)
    for name, version in (("a", 1), ("a", 2), ("a", 3), ("b", 1)):
        p = cache.path(name, version)
        p.mkdir(parents=True)
        (p / "manifest.json").write_text("{}")
        (p / "model.onnx").write_bytes(b"x" * 1000)
    removed = cache.collect({("a", 3), ("a", 2)})
    assert sorted(removed) == [("a", 1), ("b", 1)]
    assert cache.has("a", 3) and cache.has("a", 2) and not cache.has("b", 1)
    assert cache.size() == 2 * (1000 + 2)


def test_cache_removes_abandoned_partial_downloads_only(tmp_path: Path) -> None:
    cache = BundleCache(tmp_path, max_bytes=10_000)
    hour_ago = time.time() - 3601
    for sha, age in (("desired", hour_ago), ("abandoned", hour_ago), ("in-progress", None)):
        files = cache.partial / sha / "files"
        files.mkdir(parents=True)
        (files / "model.onnx").write_bytes(b"x" * 100)
        if age is not None:
            for path in (files / "model.onnx", files, cache.partial / sha):
                os.utime(path, (age, age))
    assert cache.collect_partials({"desired"}) == ["abandoned"]
    assert sorted(p.name for p in cache.partial.iterdir()) == ["desired", "in-progress"]


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    now = [1000.0]
    reg = Registry(tmp_path / "r.db", clock=lambda: now[0])
    reg.now = now  # type: ignore[attr-defined]
    return reg


def add(reg: Registry, name: str, version: int, signed: bool = True, model: str = "m") -> None:
    reg.add_version(
        name=name,
        version=version,
        sha256=f"{version:064x}",
        size=10,
        notes="",
        target_path=f"{name}/{version}/bundle.tar",
        signed=signed,
        manifest={"model": {"sha256": model}},
    )


def test_versions_increase_and_are_immutable(registry: Registry) -> None:
    add(registry, "m", 1)
    add(registry, "m", 3)
    with pytest.raises(BundleExistsError):
        add(registry, "m", 3)
    with pytest.raises(InvalidRequestError, match="greater than the latest published version 3"):
        add(registry, "m", 2)
    add(registry, "m", 4, model="m")
    assert registry.get_version("m", 4).same_content_as == 1  # type: ignore[union-attr]


def test_stages(registry: Registry) -> None:
    add(registry, "m", 1)
    add(registry, "m", 2)
    registry.set_stage("m", 1, "production")
    registry.set_stage("m", 2, "production")
    assert registry.get_version("m", 1).stage == "deprecated"  # type: ignore[union-attr]
    registry.set_stage("m", 1, "retired")
    with pytest.raises(FailedPreconditionError, match="retired for good"):
        registry.set_stage("m", 1, "staged")
    with pytest.raises(FailedPreconditionError, match="not deployable"):
        registry.deploy("m", 1, {})
    with pytest.raises(InvalidRequestError, match="unknown stage"):
        registry.set_stage("m", 2, "golden")


def test_desired_is_the_latest_matching_deployment_per_model(registry: Registry) -> None:
    for v in (1, 2, 3):
        add(registry, "m", v)
    add(registry, "other", 1)
    add(registry, "unsigned", 1, signed=False)
    registry.deploy("m", 1, {})
    registry.deploy("m", 2, {"site": "berlin"})
    registry.deploy("other", 1, {"hw": "gpu"})
    berlin_gpu = {"site": "berlin", "hw": "gpu"}
    assert [(d.name, d.version) for d in registry.desired_for(berlin_gpu)] == [
        ("m", 2),
        ("other", 1),
    ]
    assert [(d.name, d.version) for d in registry.desired_for({"site": "paris"})] == [("m", 1)]
    registry.deploy("m", 3, {})  # a later fleet-wide deployment overrides the site one
    assert registry.desired_for(berlin_gpu)[0].version == 3
    # The refusal names the command that signs it later (not "publish again").
    with pytest.raises(
        FailedPreconditionError,
        match="not signed yet: sign it with `modelfleet-hub sign unsigned 1 ",
    ):
        registry.deploy("unsigned", 1, {})
    assert registry.revision() == 4


def test_tokens_are_one_time_and_expire(registry: Registry) -> None:
    registry.add_token("t1", "h1", {"site": "x"}, expires_at=2000.0)
    with pytest.raises(PermissionDeniedError, match="not valid"):
        registry.consume_token("t1", "wrong", "a1")
    assert registry.consume_token("t1", "h1", "a1") == {"site": "x"}
    with pytest.raises(PermissionDeniedError, match="already used"):
        registry.consume_token("t1", "h1", "a2")
    registry.add_token("t2", "h2", {}, expires_at=1500.0)
    registry.now[0] = 1600.0  # type: ignore[attr-defined]
    with pytest.raises(PermissionDeniedError, match="expired"):
        registry.consume_token("t2", "h2", "a3")


def test_agent_reports_are_buffered_and_written_together(
    tmp_path: Path, registry: Registry
) -> None:
    """One transaction per flush, not per report; reads see the buffered values at once."""
    import sqlite3

    for i in range(3):
        registry.add_agent(f"a{i}", f"h{i}", {"site": "x"}, "fp")
    registry.now[0] = 2000.0  # type: ignore[attr-defined]
    registry.touch("a0", AgentReport(models=(ModelReport("m", active_version=2),)))
    registry.touch("a1")
    registry.now[0] = 2001.0  # type: ignore[attr-defined]
    registry.touch("a0")  # a keepalive keeps the last report
    seen = {a.agent_id: a for a in registry.agents()}
    assert (seen["a0"].last_seen, seen["a0"].report.models[0].active_version) == (2001, 2)
    assert registry.agent("a1").last_seen == 2000 and registry.agent("a2").last_seen == 0

    def on_disk() -> dict[str, float]:
        con = sqlite3.connect(tmp_path / "r.db")
        try:
            return dict(con.execute("SELECT agent_id, last_seen FROM agents").fetchall())
        finally:
            con.close()

    assert on_disk() == {"a0": 0, "a1": 0, "a2": 0}
    assert registry.flush_seen() == 2
    assert on_disk() == {"a0": 2001, "a1": 2000, "a2": 0}
    assert registry.agent("a0").report.models[0].active_version == 2
    assert registry.flush_seen() == 0  # nothing new: no transaction at all

    # A failed write keeps what it could not store for the next flush; newer touches win.
    registry.touch("a2")
    registry.db.execute("BEGIN IMMEDIATE")  # the flush's own BEGIN now fails
    with pytest.raises(sqlite3.OperationalError):
        registry.flush_seen()
    registry.db.execute("ROLLBACK")
    assert registry.flush_seen() == 1 and on_disk()["a2"] == 2001


def test_try_lock_is_exclusive_and_released_on_close(tmp_path: Path) -> None:
    from modelfleet.kernel.atomic import try_lock

    first = try_lock(tmp_path / "x.lock")
    assert first is not None
    assert try_lock(tmp_path / "x.lock") is None  # another open file description: refused
    os.close(first)
    again = try_lock(tmp_path / "x.lock")
    assert again is not None
    os.close(again)


def test_a_batch_run_being_written_is_not_opened_twice(tmp_path: Path) -> None:
    from modelfleet.batch.checkpoint import RunConflictError, RunDir

    first = RunDir(tmp_path / "out", "r1")
    first.open({"fingerprint": "f"})
    with pytest.raises(RunConflictError, match="being written by another process"):
        RunDir(tmp_path / "out", "r1").open({"fingerprint": "f"})
