"""The ``process`` marker keeps `make test-unit` free of processes (tests/process_guard.py):
the static rule marks what it can read, and the guard fails any unmarked test that starts one
anyway, including one that swallows the refusal."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests import process_guard
from tests.conftest import make_mlp_bundle
from tests.procs import ROOT, AgentProcess, BrokerProcess, HubProcess, enroll_agent, free_port


def _reap(pid: int) -> None:
    if pid == 0:  # the child of a fork the guard let through: leave at once
        os._exit(0)
    os.waitpid(pid, 0)


def _spawn_true() -> None:
    _reap(os.posix_spawn("/bin/true", ["true"], dict(os.environ)))


def _multiprocessing_child() -> None:
    process = multiprocessing.get_context("spawn").Process(target=os.getpid)
    process.start()
    process.join(30)


# Data, not code the rule follows: the test below reaches these through a dict, which is exactly
# the blind spot of a static reading, so it stays unmarked and the guard alone must refuse them.
WAYS_IN = {
    "subprocess.run": lambda: subprocess.run(["true"], check=True, timeout=30),
    "os.system": lambda: os.system("true"),
    "os.fork": lambda: _reap(os.fork()),
    "os.posix_spawn": _spawn_true,
    "multiprocessing (spawn)": _multiprocessing_child,
}


@pytest.mark.parametrize("way", list(WAYS_IN))
def test_an_unmarked_test_cannot_start_a_process(way: str, request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("process") is None, "this test must run unmarked"
    with pytest.raises(process_guard.ProcessInUnitTestError) as err:
        WAYS_IN[way]()
    assert request.node.nodeid in str(err.value)
    assert "not marked `process`" in str(err.value) and "@pytest.mark.process" in str(err.value)
    # Started on purpose: without this the guard fails the test after the call, as it should.
    process_guard.GUARD.forget()


@pytest.mark.process
def test_a_marked_test_may_start_a_process() -> None:
    assert subprocess.run(["true"], timeout=30).returncode == 0


def _helper_that_starts() -> None:
    _deeper()


def _deeper() -> None:
    subprocess.run(["true"], check=True, timeout=30)


def _lazy_fork():
    return lambda: os.fork()


def _ping() -> None:
    _pong()


def _pong() -> None:
    _ping()


class _Server:
    def start(self) -> None:
        subprocess.Popen(["true"]).wait(30)


@pytest.mark.parametrize(
    ("obj", "starts"),
    [
        (AgentProcess, True),
        (HubProcess, True),
        (BrokerProcess, True),
        (enroll_agent, True),
        (_helper_that_starts, True),
        (_lazy_fork, True),
        (_Server, True),
        (make_mlp_bundle, False),
        (free_port, False),
        (_ping, False),  # a cycle ends, and finds nothing
        (subprocess.run, False),  # outside the test tree: only names in it count
    ],
    ids=lambda v: getattr(v, "__qualname__", str(v)),
)
def test_the_rule_reads_through_helpers_classes_and_nested_code(obj: object, starts: bool) -> None:
    roots = (process_guard.TESTS_DIR,)
    assert process_guard.starts_processes(obj, roots) is starts


def test_markers_are_strict_and_process_is_registered() -> None:
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in ini["addopts"].split()
    assert any(m.startswith("process:") for m in ini["markers"])


INNER_CONFTEST = """
from tests import process_guard


def pytest_configure(config):
    process_guard.register(config)
"""

INNER_TESTS = """
import subprocess

import pytest

HIDDEN = {"start": lambda: subprocess.run(["true"], check=True, timeout=30)}


def _start():
    subprocess.run(["true"], check=True, timeout=30)


def test_helper_starts():
    _start()


@pytest.fixture(scope="module")
def server():
    HIDDEN["start"]()


def test_hidden_in_a_fixture(server):
    pass


def test_hidden_and_swallowed():
    try:
        HIDDEN["start"]()
    except Exception:
        pass


def test_pure():
    assert sum([1, 1]) == 2


@pytest.fixture(scope="module")
def cleaned_up_by_a_process():
    yield
    subprocess.run(["true"], check=True, timeout=30)


def test_sets_up_a_fixture_that_starts_at_teardown(cleaned_up_by_a_process):
    pass


def test_last_and_pure_tears_it_down():
    assert sum([2, 2]) == 4
"""

INNER_TYPO = """
import pytest


@pytest.mark.proces
def test_misspelt():
    pass
"""


def _inner_project(tmp_path: Path) -> Path:
    """A project of its own that uses this plugin and this repository's pytest settings."""
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    project = tmp_path / "inner"
    project.mkdir()
    markers = "".join(f"\n    {m}" for m in ini["markers"])
    ini_text = f"[pytest]\naddopts = {ini['addopts']}\nmarkers ={markers}\n"
    (project / "pytest.ini").write_text(ini_text)
    (project / "conftest.py").write_text(INNER_CONFTEST)
    (project / "test_inner.py").write_text(INNER_TESTS)
    (project / "test_typo.py").write_text(INNER_TYPO)
    return project


def _pytest(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_real_run_marks_refuses_and_rejects_typos(tmp_path: Path) -> None:
    project = _inner_project(tmp_path)
    full = _pytest(project, "test_inner.py")
    out = full.stdout + full.stderr
    assert "PASSED test_inner.py::test_helper_starts" in out, out
    assert "PASSED test_inner.py::test_pure" in out, out
    # A fixture of a marked test may start a process as it is torn down, even when the last
    # test of the module, unmarked, is the one whose teardown runs it.
    assert "PASSED test_inner.py::test_sets_up_a_fixture_that_starts_at_teardown" in out, out
    assert "PASSED test_inner.py::test_last_and_pure_tears_it_down" in out, out
    assert "ERROR at teardown" not in out, out
    assert "ERROR test_inner.py::test_hidden_in_a_fixture" in out, out
    # The refusal was caught by the test; the guard fails it all the same.
    assert "FAILED test_inner.py::test_hidden_and_swallowed" in out, out
    assert out.count("started a process (Popen._execute_child) but is not marked") >= 2, out
    assert full.returncode == 1, out

    unit = _pytest(project, "-m", "not process", "test_inner.py")
    out = unit.stdout + unit.stderr
    assert "2 deselected" in out and "test_helper_starts" not in out, out

    typo = _pytest(project, "test_typo.py")
    out = typo.stdout + typo.stderr
    assert "'proces' not found in `markers`" in out, out
    assert typo.returncode != 0, out
