"""The ``process`` marker: set by reading the tests, enforced by refusing process starts.

`make test-unit` (``pytest -m "not process"``) is the inner loop: it must stay fast and must not
need Mosquitto, perf_analyzer or the packaging tools. So

- every test whose function or fixtures (all the way up, through the helpers and classes of the
  test tree they name, tests/procs.py included) refer to a way of starting a process is marked
  ``process`` at collection, and
- while an unmarked test's setup, call or teardown runs, every process start (subprocess, fork,
  posix_spawn, multiprocessing, os.system) raises ProcessInUnitTestError, in every lane. The
  refusal is also recorded, so a test that swallows the exception still fails.

The reading is static and can miss a start it cannot see (a method called on an object the test
was handed, a name built at run time); the guard turns such a miss into a failing test that names
itself, to be fixed with ``@pytest.mark.process`` or a module's ``pytestmark``.

tests/conftest.py registers this plugin; tests/test_process_guard.py proves it.
"""

from __future__ import annotations

import _posixsubprocess
import functools
import inspect
import os
import subprocess
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

MARKER = "process"

HINT = (
    "the automatic rule in tests/process_guard.py could not see it; mark the test "
    "`@pytest.mark.process` (or the module `pytestmark = pytest.mark.process`) so it runs in "
    "`make test` and stays out of `make test-unit`"
)

# Names that start a process when code refers to them. Helpers of the test tree are followed
# rather than listed, so tests.procs.AgentProcess counts because its start() names subprocess.
STARTERS = frozenset(
    {
        "subprocess",
        "Popen",
        "multiprocessing",
        "fork",
        "forkpty",
        "posix_spawn",
        "posix_spawnp",
        "spawnv",
        "spawnvp",
        "execv",
        "execvp",
    }
)

TESTS_DIR = Path(__file__).resolve().parent


class ProcessInUnitTestError(RuntimeError):
    """A test not marked ``process`` tried to start a process."""


class ProcessGuard:
    """Wraps the process-starting primitives once; they refuse only while ``active`` is set."""

    # Every way CPython starts a process ends in one of these: subprocess (run, Popen, asyncio's
    # subprocesses) in Popen._execute_child, multiprocessing in os.fork or
    # _posixsubprocess.fork_exec, the rest in the os functions themselves.
    TARGETS: tuple[tuple[Any, str], ...] = (
        (subprocess.Popen, "_execute_child"),
        (_posixsubprocess, "fork_exec"),
        (os, "fork"),
        (os, "forkpty"),
        (os, "posix_spawn"),
        (os, "posix_spawnp"),
        (os, "system"),
    )

    def __init__(self) -> None:
        self.active: str | None = None  # node id of the unmarked test now running
        self.attempts: list[str] = []
        self._suspended: list[str | None] = []
        self._originals: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        for owner, name in self.TARGETS:
            original = getattr(owner, name, None)
            if original is None:
                continue
            self._originals.append((owner, name, original))
            what = f"{getattr(owner, '__name__', owner)}.{name}"
            setattr(owner, name, self._refusing(what, original))

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

    def _phase(self, item: pytest.Item) -> Iterator[None]:
        with self.watching(item):
            try:
                result = yield
            except BaseException as exc:
                if self.attempts:
                    raise ProcessInUnitTestError(self.attempts[0]) from exc
                raise
        if self.attempts:
            # The test caught the refusal and went on: it still tried to start a process.
            raise ProcessInUnitTestError(self.attempts[0])
        return result

    # Fixtures run in setup and teardown, so all three phases are watched.
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Iterator[None]:
        return (yield from self._phase(item))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        return (yield from self._phase(item))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        return (yield from self._phase(item))

    # A module or session fixture set up by a marked test is torn down by whichever test comes
    # last, marked or not; its teardown may start processes (a CLI that cleans up), so it runs
    # unwatched. Finalizers run last-in first-out: the one added after setup runs just before
    # the fixture's own teardown, the one added before setup just after it.
    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef) -> Iterator[object]:
        if self.active is not None:
            return (yield)
        fixturedef.addfinalizer(self._resume)
        try:
            return (yield)
        finally:
            fixturedef.addfinalizer(self._suspend)

    def _suspend(self) -> None:
        self._suspended.append(self.active)
        self.active = None

    def _resume(self) -> None:
        self.active = self._suspended.pop()

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        mark_process_tests(items)

    def pytest_unconfigure(self) -> None:
        self.uninstall()


GUARD = ProcessGuard()


def register(config: pytest.Config) -> None:
    if config.pluginmanager.has_plugin("process-guard"):
        return
    GUARD.install()
    config.pluginmanager.register(GUARD, "process-guard")


def mark_process_tests(items: list[pytest.Item]) -> None:
    """Marks ``process`` every test whose function or fixtures start one, as far as reading
    them shows."""
    roots = (TESTS_DIR, *{item.path.parent.resolve() for item in items})
    for item in items:
        if item.get_closest_marker(MARKER) is not None or not isinstance(item, pytest.Function):
            continue
        # The fixture closure: every fixture the test needs, directly or through others.
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if any(starts_processes(f, roots) for f in [item.function, *fixtures]):
            item.add_marker(MARKER)


def starts_processes(obj: object, roots: Iterable[Path], seen: set[int] | None = None) -> bool:
    """Whether a function or class refers to one of STARTERS, following the functions and classes
    it names that are defined under ``roots`` (the test tree; the product starts no processes and
    the stdlib's ways in are STARTERS)."""
    roots = tuple(roots)
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if inspect.isclass(obj):
        try:
            ours = _under(inspect.getfile(obj), roots)
        except TypeError:  # a built-in class
            ours = False
        return ours and any(starts_processes(m, roots, seen) for m in vars(obj).values())
    if isinstance(obj, (staticmethod, classmethod)):
        return starts_processes(obj.__func__, roots, seen)
    if isinstance(obj, property):
        return any(starts_processes(f, roots, seen) for f in (obj.fget, obj.fset) if f)
    func = inspect.unwrap(obj) if callable(obj) else obj
    if not isinstance(func, types.FunctionType) or not _under(func.__code__.co_filename, roots):
        return False
    return _code_starts(func.__code__, func.__globals__, roots, seen)


def _code_starts(
    code: types.CodeType, globals_: dict[str, Any], roots: tuple[Path, ...], seen: set[int]
) -> bool:
    for name in code.co_names:
        if name in STARTERS:
            return True
        target = globals_.get(name)
        if (inspect.isfunction(target) or inspect.isclass(target)) and starts_processes(
            target, roots, seen
        ):
            return True
    # Nested functions, lambdas and comprehensions are code objects of their own.
    return any(
        _code_starts(const, globals_, roots, seen)
        for const in code.co_consts
        if isinstance(const, types.CodeType)
    )


def _under(filename: str, roots: tuple[Path, ...]) -> bool:
    path = _resolved(filename)
    return path is not None and any(path.is_relative_to(root) for root in roots)


@functools.cache
def _resolved(filename: str) -> Path | None:
    return Path(filename).resolve() if filename and not filename.startswith("<") else None
