"""Shared fixtures: a temporary model repository and real agent processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modelfleet.kernel.bundle import Bundle, create_bundle
from tests import models, process_guard
from tests.procs import AgentProcess


def pytest_configure(config: pytest.Config) -> None:
    process_guard.register(config)


# Seconds each slow module took in one `make test` run (pytest --durations=0, summed per module;
# 2026-12-07, two workers, 1,440 tests, 13.6 min on a busy two-core machine).
# Under `make test`'s two workers (--dist loadfile --no-loadscope-reorder) modules are handed
# out in collection order, so the longest go first and the short ones fill in at the end;
# otherwise a two-minute module drawn last leaves one core idle while it runs. Rough figures
# are enough: only the order matters, and a module missing here just runs after these.
SLOWEST_MODULES: dict[str, float] = {
    "test_mqtt.py": 218,
    "test_fleet.py": 133,
    "test_restart_faults.py": 125,
    "test_systemd.py": 120,
    "test_rollout_fleet.py": 90,
    "test_rollout_judge.py": 87,
    "test_signing_attacks.py": 55,
    "test_soak_smoke.py": 54,
    "test_serving_workers.py": 52,
    "test_rollout_wait.py": 53,
    "test_retired_version.py": 50,
    "test_experiments_fleet.py": 49,
    "test_telemetry.py": 40,
    "test_swap.py": 35,
    "test_backup.py": 33,
    "test_alerts_fleet.py": 31,
    "test_deployments_fleet.py": 28,
    "test_statefile_fleet.py": 26,
    "test_traffic_process.py": 22,
    "test_telemetry_kill9.py": 21,
    "test_capture_fleet.py": 21,
    "test_outcomes_fleet.py": 17,
    "test_jobs.py": 16,
    "test_judge_split.py": 15,
    "test_cli_messages.py": 15,
    "test_unknown_names.py": 15,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def weight(item: pytest.Item) -> float:
        return -SLOWEST_MODULES.get(item.path.name, 0.0)

    items.sort(key=weight)  # stable: tests keep their order within a module


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    return path


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    """Bundles are built here and renamed into the repository, as a deployer would."""
    path = tmp_path / "staging"
    path.mkdir()
    return path


def mlp_samples(rows: int = 4, width: int = 4, seed: int = 7) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)}


def make_mlp_bundle(out: Path, version: int, seed: int = 0, **kwargs: object) -> Bundle:
    model = models.mlp(out.parent / f"onnx-src/mlp-s{seed}-v{version}.onnx", seed=seed)
    return create_bundle(
        model, name="mlp", version=version, samples=mlp_samples(), out_dir=out, **kwargs
    )


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator:
    started: list[AgentProcess] = []

    def start(models_dir: Path, *extra: str) -> AgentProcess:
        agent = AgentProcess(models_dir, *extra, log_path=tmp_path / f"agent{len(started)}.log")
        started.append(agent)
        agent.start()
        return agent

    yield start
    for agent in started:
        agent.stop()
