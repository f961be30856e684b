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
