"""The repository policy as a pure function: what is on disk + what is loaded -> actions."""

from __future__ import annotations

from pathlib import Path

from modelfleet.agent.repository import Deploy, Unload, VersionOnDisk, plan, scan
from modelfleet.agent.slots import ModelStatus


def disk(*versions: int, fp: int = 0) -> dict[int, VersionOnDisk]:
    return {v: VersionOnDisk(v, Path(f"/r/m/{v}"), (v, fp, 0)) for v in versions}


def loaded(
    active: int | None,
    previous: int | None = None,
    hold: int | None = None,
    loading: int | None = None,
) -> ModelStatus:
    return ModelStatus("m", active, previous, loading, active is not None, None, {}, hold)


def test_new_model_deploys_its_highest_version() -> None:
    actions = plan({"m": disk(1, 3, 2)}, {}, {})
    assert actions == [Deploy("m", disk(3)[3])]


def test_nothing_to_do_when_in_line() -> None:
    assert plan({"m": disk(1, 2)}, {"m": loaded(2, 1)}, {}) == []


def test_failed_version_is_skipped_until_its_bytes_change() -> None:
    failed = {("m", 3): (3, 0, 0)}
    assert plan({"m": disk(1, 2, 3)}, {"m": loaded(2, 1)}, failed) == []
    changed = disk(1, 2, 3, fp=7)
    assert plan({"m": changed}, {"m": loaded(2, 1)}, failed) == [Deploy("m", changed[3])]


def test_rollback_hold_stops_redeploys_until_a_newer_version() -> None:
    assert plan({"m": disk(1, 2)}, {"m": loaded(1, 2, hold=2)}, {}) == []
    assert plan({"m": disk(1, 2, 3)}, {"m": loaded(1, 2, hold=2)}, {}) == [Deploy("m", disk(3)[3])]


def test_removed_versions_and_models_are_unloaded() -> None:
    assert plan({"m": disk(1, 2)}, {"m": loaded(2)}, {}) == []
    assert plan({"m": disk(2)}, {"m": loaded(2, 1)}, {}) == [Unload("m", 1)]
    # Active removed: unload it; the previous (still on disk) takes over without a deploy.
    assert plan({"m": disk(1)}, {"m": loaded(2, 1)}, {}) == [Unload("m", 2)]
    assert plan({}, {"m": loaded(2, 1)}, {}) == [Unload("m", None)]


def test_active_removed_without_previous_deploys_the_next_best() -> None:
    assert plan({"m": disk(1)}, {"m": loaded(2)}, {}) == [Unload("m", 2), Deploy("m", disk(1)[1])]


def test_no_second_deploy_while_one_is_loading() -> None:
    assert plan({"m": disk(1, 2, 3)}, {"m": loaded(1, loading=2)}, {}) == []


def test_scan_ignores_temporary_and_incomplete_directories(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    for f in ("manifest.json", "model.onnx", "health.npz"):
        (tmp_path / "m" / "1" / f).write_text("{}")
    (tmp_path / "m" / "2").mkdir()
    (tmp_path / "m" / "2" / "manifest.json").write_text("{}")  # copy still in progress
    (tmp_path / "m" / "²").mkdir()  # isdigit() but not a number
    (tmp_path / "m" / ".2.tmp-abc").mkdir()
    (tmp_path / "m" / "3").mkdir()  # no manifest yet
    (tmp_path / ".hidden" / "1").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("x")
    found = scan(tmp_path)
    assert list(found) == ["m"] and list(found["m"]) == [1]
    assert scan(tmp_path / "missing") == {}
