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


# Seconds each slow module took in one `make test` run (junit times, setup to teardown, summed per
# module; 2026-12-07, two workers, 1,532 tests, 17.2 min on a two-core machine that another test
# run shared). Under `make test`'s two workers (--dist loadfile --no-loadscope-reorder) modules
# are handed out in collection order, so the longest go first and the short ones fill in at the
# end; otherwise a two-minute module drawn last leaves one core idle while it runs. Rough figures
# are enough: only the order matters, and a module missing here just runs after these.
SLOWEST_MODULES: dict[str, float] = {
    "test_fleet.py": 214,
    "test_mqtt.py": 177,
    "test_restart_faults.py": 138,
    "test_rollout_fleet.py": 104,
    "test_rollout_judge.py": 98,
    "test_systemd.py": 82,
    "test_experiments_fleet.py": 82,
    "test_signing_attacks.py": 72,
    "test_rollout_wait.py": 68,
    "test_serving_workers.py": 61,
    "test_retired_version.py": 61,
    "test_deployments_fleet.py": 56,
    "test_soak_smoke.py": 52,
    "test_statefile_fleet.py": 43,
    "test_backup.py": 43,
    "test_swap.py": 35,
    "test_alerts_fleet.py": 34,
    "test_capture_fleet.py": 34,
    "test_telemetry.py": 32,
    "test_outcomes_fleet.py": 30,
    "test_admin_roles.py": 26,
    "test_readme.py": 24,
    "test_telemetry_kill9.py": 23,
    "test_judge_split.py": 23,
    "test_hub_input_limits.py": 23,
    "test_jobs.py": 22,
    "test_inference_auth.py": 22,
    "test_cli_scripting.py": 22,
    "test_drift_fleet.py": 21,
    "test_perf_analyzer.py": 21,
    "test_cli_messages.py": 19,
    "test_protocol_grpc.py": 18,
    "test_guardrails.py": 17,
    "test_tracing.py": 15,
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
