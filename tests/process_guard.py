"""Unit tests cannot start processes: a test not marked ``process`` fails when it tries.

`make test-unit` (``pytest -m "not process"``) is the inner loop and must stay fast and
independent of Mosquitto, perf_analyzer and the packaging tools. A marker someone forgot would
silently put a real-process test into that lane, so instead of trusting the markers this plugin
refuses every process start (subprocess, fork, posix_spawn, multiprocessing, os.system) while an
unmarked test's setup, call or teardown runs, in every lane. The refusal is also recorded, so a
test that swallows the exception still fails.

tests/conftest.py registers it; tests/test_process_guard.py proves it.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import _posixsubprocess
import pytest

MARKER = "process"

HINT = (
    "mark it `@pytest.mark.process` (or `pytestmark = pytest.mark.process` for the whole module) "
    "so it runs in `make test` and stays out of `make test-unit`"
)


class ProcessInUnitTestError(RuntimeError):
    """A test not marked ``process`` tried to start a process."""


class ProcessGuard:
    """Wraps the process-starting primitives once; they refuse only while ``active`` is set."""

    def __init__(self) -> None:
        self.active: str | None = None  # node id of the unmarked test now running
        self.attempts: list[str] = []
        self._originals: list[tuple[Any, str, Any]] = []

    # Every way CPython starts a process ends in one of these: subprocess (run, Popen, asyncio's
    # subprocesses) goes through Popen._execute_child, multiprocessing through os.fork or
    # _posixsubprocess.fork_exec, and the rest are the os functions themselves.
    TARGETS: tuple[tuple[Any, str], ...] = (
        (subprocess.Popen, "_execute_child"),
        (_posixsubprocess, "fork_exec"),
        (os, "fork"),
        (os, "forkpty"),
        (os, "posix_spawn"),
        (os, "posix_spawnp"),
        (os, "system"),
    )

    def install(self) -> None:
        for owner, name in self.TARGETS:
            original = getattr(owner, name, None)
            if original is None:
                continue
            self._originals.append((owner, name, original))
            setattr(owner, name, self._refusing(f"{getattr(owner, '__name__', owner)}.{name}",
                                                original))  # fmt: skip

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals.clear()

    def _refusing(self, what: str, original: Callable[..., Any]) -> Callable[..., Any]:
        guard = self

        def refuse(*args: Any, **kwargs: Any) -> Any:
            if guard.active is None:
                return original(*args, **kwargs)
            message = f"{guard.active} started a process ({what}) but is not marked `{MARKER}`: "
            guard.attempts.append(message + HINT)
            raise ProcessInUnitTestError(message + HINT)

        refuse.__wrapped__ = original  # type: ignore[attr-defined]
        return refuse

    def forget(self) -> None:
        """Drop the recorded attempts: for a test that starts one on purpose to prove the guard."""
        self.attempts.clear()

    @contextmanager
    def watching(self, item: pytest.Item) -> Iterator[None]:
        self.attempts = []
        if item.get_closest_marker(MARKER) is not None:
            yield
            return
        self.active = item.nodeid
        try:
            yield
        finally:
            self.active = None

    # pytest hooks: every phase of an unmarked test runs under the guard, fixtures included.
    def _phase(self, item: pytest.Item) -> Iterator[None]:
        with self.watching(item):
            try:
                result = yield
            except BaseException as exc:
                if self.attempts:
                    raise ProcessInUnitTestError(self.attempts[0]) from exc
                raise
        if self.attempts:
            # The test caught the refusal and went on; it still started (tried to) a process.
            raise ProcessInUnitTestError(self.attempts[0])
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Iterator[None]:
        return (yield from self._phase(item))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        return (yield from self._phase(item))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        return (yield from self._phase(item))

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        mark_process_tests(items)

    def pytest_unconfigure(self) -> None:
        self.uninstall()


# Names that start a process when code refers to them: the stdlib ways in, plus the helpers in
# tests/ reached from them are followed (below), so tests.procs.AgentProcess counts by its code.
STARTERS = frozenset(
    {"subprocess", "Popen", "multiprocessing", "fork", "forkpty", "posix_spawn", "posix_spawnp"}
)


def starts_processes(obj: object, seen: set[int] | None = None) -> bool:
    """Whether a test, fixture or helper refers to a way of starting a process, following the
    functions and classes of tests/ it names. A static reading: code it cannot see (a method
    called on an object it was handed, an eval) is what the module's own marker and the guard
    are for."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if inspect.isclass(obj):
        return any(starts_processes(member, seen) for member in vars(obj).values()
                   if _ours(member))  # fmt: skip
    func = inspect.unwrap(obj.__func__ if inspect.ismethod(obj) else obj)  # type: ignore[arg-type]
    if isinstance(func, (staticmethod, classmethod)):
        func = func.__func__
    if isinstance(func, property):
        return any(starts_processes(f, seen) for f in (func.fget, func.fset) if f is not None)
    if not isinstance(func, types.FunctionType):
        return False
    return _code_starts(func.__code__, func.__globals__, seen)


def _code_starts(code: types.CodeType, globals_: dict[str, Any], seen: set[int]) -> bool:
    for name in code.co_names:
        if name in STARTERS:
            return True
        target = globals_.get(name)
        if target is not None and _ours(target) and starts_processes(target, seen):
            return True
    # Nested functions, lambdas and comprehensions are separate code objects.
    return any(_code_starts(const, globals_, seen) for const in code.co_consts
               if isinstance(const, types.CodeType))  # fmt: skip


def _ours(obj: object) -> bool:
    """Functions and classes defined in tests/: the only code worth following (the product's
    own modules start no processes, and the stdlib's are named by STARTERS)."""
    if isinstance(obj, (staticmethod, classmethod, property)):
        return True
    module = getattr(obj, "__module__", None) or ""
    return (inspect.isfunction(obj) or inspect.isclass(obj)) and (
        module == "tests" or module.startswith("tests.")
    )


def mark_process_tests(items: list[pytest.Item]) -> None:
    """Marks ``process`` every test whose function or fixtures (all the way up) start one."""
    for item in items:
        if item.get_closest_marker(MARKER) is not None or not isinstance(item, pytest.Function):
            continue
        fixtures = [
            fixturedef.func
            for defs in item._fixtureinfo.name2fixturedefs.values()
            for fixturedef in defs
        ]
        if any(starts_processes(f) for f in [item.function, *fixtures]):
            item.add_marker(MARKER)


GUARD = ProcessGuard()


def register(config: pytest.Config) -> None:
    if config.pluginmanager.has_plugin("process-guard"):
        return
    GUARD.install()
    config.pluginmanager.register(GUARD, "process-guard")
