"""Serving workers: more processes answering inference on the agent's gRPC port.

Why: the interpreter work per request (decode, validate, account, encode) runs under one GIL,
so at high concurrency one process's core is the limit, however many cores the node has. With
``serving_workers = N`` the agent runs N-1 worker processes beside itself; all of them bind the
gRPC inference port with ``SO_REUSEPORT`` and the kernel spreads *connections* over them (one
connection stays with one process: a client needs several connections to use several workers).

The process systemd started (the *leader*) keeps everything else: the hub link or the repository
watcher, the admin socket, /metrics, shadow runs and drift (those sample the leader's share of
the connections). Workers serve the HTTP/REST port too when there is one, capture by the
leader's rules, and mirror what the leader serves:

- **State.** After every change of what serves, the leader sends each worker the whole serving
  state: per model the active and previous versions (bundle folder, model digest, the leader's
  gate verdict) and the comparison. A worker loads what it lacks, switches, drops the rest, and
  answers. States are full snapshots applied in order, so a lost or late one is repaired by the
  next.
- **Two phases.** A version that is about to serve is first *prepared* everywhere: each worker
  loads it from the same bundle folder, checks that the files still match the digests the
  leader verified, and runs the health samples through its own session. Only when every live
  worker has it does the leader switch, and the switch it then sends is a pointer change in each
  worker. One worker's refusal refuses the version on every process; the old one keeps serving.
- **Telemetry.** Every worker counts into slots of the leader's journal (one writer per slot,
  given out by the leader), so hub reports, the canary judge, /metrics and the crash recovery of
  counts include every process's requests.
- **Liveness.** A worker dies with the leader (``PR_SET_PDEATHSIG`` and the end of its pipe). A
  worker that dies is started again after a pause, and loads the current state before it binds,
  so it never answers with a version the others no longer serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfleet.agent.gate import GateResult, check_outputs
from modelfleet.agent.repository import ModelControl
from modelfleet.agent.serving.capture import Capture, CaptureRule
from modelfleet.agent.serving.routing import Comparison
from modelfleet.agent.telemetry import (
    SLOT_CELLS,
    UNKNOWN_MODEL,
    CounterStore,
    TelemetryAggregator,
    VersionCounters,
    reason_indexes,
)
from modelfleet.kernel.errors import BundleError, GateFailedError, ModelfleetError, Status

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from modelfleet.agent.config import ServeConfig
    from modelfleet.agent.slots import LoadedVersion, SlotManager

log = logging.getLogger("modelfleet.agent.workers")

# The file serving processes count in when the agent is standalone (fleet mode: the journal).
SERVING_CELLS_FILE = "serving-cells"
# A worker's start: an interpreter, the imports, then every served version loaded and checked.
START_TIMEOUT_S = 600.0
# Preparing a version (load and health samples) in every worker; a big model on a busy node.
PREPARE_TIMEOUT_S = 600.0
# A state that only moves pointers.
SWITCH_TIMEOUT_S = 30.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class VersionSpec:
    name: str
    version: int
    path: str
    model_sha256: str
    # The leader's gate verdict: workers take the same serving path (inline, batched) from it.
    gate: GateResult | None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    active: int | None
    previous: int | None
    comparison: Comparison | None
    # (version, epoch): switch to it once the shared switch epoch reaches epoch.
    armed: tuple[int, int] | None = None


@dataclass
class WorkerState:
    """What one worker is to serve, and where it counts."""

    seq: int
    versions: list[VersionSpec]
    models: list[ModelSpec]
    unloaded: dict[str, str]
    # (model, version) -> first cell of this worker's slot in the shared store.
    counters: dict[tuple[str, int], int]
    # Inference capture: the leader's rules, and its HMAC key when a rule hashes an input (a
    # worker never makes a key of its own: hashes must join across processes).
    capture_rules: dict[str, CaptureRule] = field(default_factory=dict)
    capture_key: bytes | None = None


class WorkerRefusedError(GateFailedError):
    reason = "worker"


Key = tuple[str, int]
# What a worker answers to a state: per version it could not load, why; and, when it cannot
# serve what the leader serves, why it is leaving.
Answer = tuple[dict[Key, str], str]


class _Pipe:
    """One end of a worker's pipe, never blocking the event loop.

    A daemon thread reads (and forwards each message to ``on_message`` on the loop); another
    writes what :meth:`send` queues, so a worker busy loading a big model, or stopped, cannot
    freeze the process at the other end. Daemon threads: a blocked read never holds up exit.
    """

    def __init__(
        self,
        conn: Connection,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[Any], None],
        name: str,
    ) -> None:
        self.conn = conn
        self._out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.closed = loop.create_future()

        def read() -> None:
            while True:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    break
                except (
                    Exception
                ) as exc:  # a message that does not unpickle: the other end is broken
                    log.error("%s: unreadable message (%s); closing the pipe", name, exc)
                    break
                loop.call_soon_threadsafe(on_message, msg)
            loop.call_soon_threadsafe(_set, self.closed)

        def write() -> None:
            while True:
                msg = self._out.get()
                if msg is None:
                    return
                try:
                    conn.send(msg)
                except (OSError, ValueError):
                    return  # closed: the reader sees the end and reports it

        threading.Thread(target=read, name=f"{name}-read", daemon=True).start()
        threading.Thread(target=write, name=f"{name}-write", daemon=True).start()

    def send(self, msg: Any) -> None:
        self._out.put(msg)

    def close(self) -> None:
        self._out.put(None)
        with contextlib.suppress(OSError):
            self.conn.close()


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# -- the leader's side ----------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: BaseProcess | None = None
    pipe: _Pipe | None = None
    # The pid while the process runs (read by /metrics; reaping is _run's alone).
    pid: int | None = None
    # States go to it (and it must answer) once it was told to bind: from then on every state
    # reaches it in order after the one it bound with.
    ready: bool = False
    # While starting: the state it is applying (it binds once that is still the current one).
    starting: WorkerState | None = None
    restarts: int = 0
    started_at: float = 0.0
    counters: dict[Key, int] = field(default_factory=dict)
    acks: dict[int, asyncio.Future[Answer]] = field(default_factory=dict)
    # Resolved when the worker first answers (or first fails to start): start() waits on it.
    first_start: asyncio.Future[None] | None = None


class ServingWorkers:
    """The leader's handle on its worker processes (``count`` - 1 of them)."""

    def __init__(
        self,
        cfg: ServeConfig,
        listen: str,
        slots: SlotManager,
        control: ModelControl,
        count: int,
        http_listen: str = "",
        capture: Capture | None = None,
    ) -> None:
        self.cfg = cfg
        self.listen = listen
        # The HTTP port as the leader bound it ("" without one): workers serve it too.
        self.http_listen = http_listen
        self.capture = capture
        self.slots = slots
        self.control = control
        self.telemetry: TelemetryAggregator = slots.metrics.telemetry
        self.workers = [_Worker(k) for k in range(1, count)]
        self._seq = 0
        # Versions being prepared or restored: part of every state until switched to (then
        # the slot holds them) or given up.
        self._staged: dict[Key, VersionSpec] = {}
        # model -> (version, epoch) armed in every worker, until the flip.
        self._armed: dict[str, tuple[int, int]] = {}
        # Held from arm() to flip(): epochs are flipped in the order they were armed.
        self._switching = asyncio.Lock()
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._publish_pending = False
        self._ctx = multiprocessing.get_context("spawn")

    # -- state ---------------------------------------------------------------------------------

    def _spec(self, v: LoadedVersion) -> VersionSpec:
        return VersionSpec(v.name, v.version, str(v.bundle.path), v.manifest.model_sha256, v.gate)

    def _counters(self, w: _Worker, keys: list[Key]) -> dict[Key, int]:
        for key in keys:
            if key not in w.counters:
                base = self.telemetry.sibling(*key)
                if base is not None:
                    w.counters[key] = base
        return dict(w.counters)

    def _state(self, w: _Worker) -> WorkerState:
        versions: dict[Key, VersionSpec] = {}
        models = []
        for slot in self.slots.slots.values():
            for v in slot.loaded():
                versions[(v.name, v.version)] = self._spec(v)
            models.append(
                ModelSpec(
                    slot.name,
                    slot.active.version if slot.active else None,
                    slot.previous.version if slot.previous else None,
                    slot.comparison,
                    self._armed.get(slot.name),
                )
            )
        for key, spec in self._staged.items():
            versions.setdefault(key, spec)
        keys = [(UNKNOWN_MODEL, 0), *((m.name, 0) for m in models), *versions]
        rules = dict(self.capture.rules) if self.capture is not None else {}
        hmac_key = None
        if self.capture is not None and any(r.hash for r in rules.values()):
            hmac_key = self.capture.key  # read, or made once, here in the leader
        self._seq += 1
        return WorkerState(
            self._seq,
            list(versions.values()),
            models,
            dict(self.slots.unloaded),
            self._counters(w, keys),
            rules,
            hmac_key,
        )

    async def _send(self, timeout_s: float) -> list[tuple[_Worker, Answer | None]]:
        """The current state to every worker taking states; each one's answer, None when it
        died before answering. One deadline for all of them."""
        loop = asyncio.get_running_loop()
        waits = []
        for w in self.workers:
            if not w.ready or w.pipe is None:
                continue  # a starting worker binds only with the state that is current then
            state = self._state(w)
            fut: asyncio.Future[Answer] = loop.create_future()
            w.acks[state.seq] = fut
            w.pipe.send(("state", state))
            waits.append((w, fut))
        if not waits:
            return []
        await asyncio.wait([f for _, f in waits], timeout=timeout_s)
        out: list[tuple[_Worker, Answer | None]] = []
        for w, fut in waits:
            if not fut.done():
                fut.cancel()
                out.append((w, ({}, f"no answer within {timeout_s:g}s")))
            elif fut.exception() is not None:
                out.append((w, None))
            else:
                out.append((w, fut.result()))
        return out

    async def prepare(self, candidate: LoadedVersion) -> None:
        """Load and check ``candidate`` in every worker; raises if any refuses it (or dies
        while loading it: a version that kills workers must not serve)."""
        if not self.workers:
            return
        key = (candidate.name, candidate.version)
        self._staged[key] = self._spec(candidate)
        try:
            answers = await self._send(PREPARE_TIMEOUT_S)
        except BaseException:
            self._staged.pop(key, None)
            raise
        refused = []
        for w, answer in answers:
            if answer is None:
                refused.append(f"worker {w.index}: exited while loading it")
            elif key in answer[0]:
                refused.append(f"worker {w.index}: {answer[0][key]}")
            elif answer[1]:
                refused.append(f"worker {w.index}: {answer[1]}")
        if refused:
            self._staged.pop(key, None)
            self.publish()  # the workers that did load it drop it
            raise WorkerRefusedError(
                f"model {candidate.name!r} version {candidate.version} refused by serving "
                f"worker(s): {'; '.join(refused)}; the version in use keeps serving on every "
                "process"
            )

    def release(self, name: str, version: int) -> None:
        """The leader is done with a prepared version: its slot holds it now, or nothing
        will (the next state says which)."""
        if self._staged.pop((name, version), None) is not None:
            self.publish()

    async def arm(self, name: str, version: int) -> None:
        """Every worker gets ready to switch ``name`` to ``version`` at the next epoch."""
        if not self.workers:
            return
        await self._switching.acquire()
        try:
            self._armed[name] = (version, self.telemetry.store.switch_epoch + 1)
            for w, answer in await self._send(SWITCH_TIMEOUT_S):
                if answer is not None and (answer[1] or answer[0]):
                    # It loaded the version when prepared (else the prepare was refused); one
                    # that cannot arm now is leaving, and starts again with the state as it is.
                    log.error("serving worker %d did not arm the switch: %s", w.index, answer)
        except BaseException:
            self._armed.pop(name, None)
            self._switching.release()
            raise

    def flip(self) -> None:
        """One store: every armed worker switches at its next request, as the leader does now."""
        if not self.workers:
            return
        try:
            self.telemetry.store.advance_switch()
        finally:
            self._armed.clear()
            self._switching.release()

    async def commit(self, name: str, version: int) -> None:
        """After the leader switched: every worker's pointers as the leader's; waits."""
        self._staged.pop((name, version), None)
        for w, answer in await self._send(SWITCH_TIMEOUT_S):
            if answer is not None and (answer[0] or answer[1]):
                log.error("serving worker %d did not take the new state: %s", w.index, answer)

    async def sync(self) -> None:
        """The current state to every worker; returns once each has applied it."""
        for w, answer in await self._send(SWITCH_TIMEOUT_S):
            if answer is not None and answer[1]:
                log.error("serving worker %d cannot serve the new state: %s", w.index, answer)

    def publish(self, _name: str = "") -> None:
        """Send the state after a change made without waiting (rollback, unload, comparison);
        a slot listener, so several changes in one loop turn send one state."""
        if self._publish_pending or self._stopping:
            return
        self._publish_pending = True

        async def send() -> None:
            self._publish_pending = False
            for w, answer in await self._send(PREPARE_TIMEOUT_S):
                if answer is not None and answer[1]:
                    log.error("serving worker %d cannot serve the new state: %s", w.index, answer)

        self._spawn_task(send())

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- processes -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; returns once each serves (or failed to start, or after
        START_TIMEOUT_S: a slow one joins later)."""
        loop = asyncio.get_running_loop()
        for w in self.workers:
            w.first_start = loop.create_future()
            self._spawn_task(self._run(w))
        pending = [w.first_start for w in self.workers if w.first_start is not None]
        _, late = await asyncio.wait(pending, timeout=START_TIMEOUT_S)
        if late:
            log.error(
                "%d serving worker(s) not serving after %gs; the agent goes on, they join when "
                "they are ready",
                len(late),
                START_TIMEOUT_S,
            )

    def _spawn(self, w: _Worker) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        w.process = self._ctx.Process(
            target=worker_main,
            args=(
                self.cfg,
                w.index,
                (self.listen, self.http_listen),
                self._store_path(),
                self.control.available,
                child,
            ),
            name=f"modelfleet-serving-worker-{w.index}",
        )
        try:
            w.process.start()
        finally:
            child.close()
        w.pid, w.ready, w.started_at = w.process.pid, False, time.monotonic()
        loop = asyncio.get_running_loop()
        w.pipe = _Pipe(parent, loop, lambda msg: self._on_message(w, msg), f"worker-{w.index}")

    def _store_path(self) -> str:
        path = self.telemetry.store.path
        if path is None:  # pragma: no cover - app.py gives workers a shared store
            raise RuntimeError("serving workers need a file-backed telemetry store")
        return str(path)

    async def _run(self, w: _Worker) -> None:
        """One worker's life: start it, bring it to the current state, relay its messages;
        start it again when it dies, until the agent stops."""
        attempt = 0
        while not self._stopping:
            try:
                self._spawn(w)
                assert w.pipe is not None
                w.starting = self._state(w)
                w.pipe.send(("state", w.starting))
            except Exception as exc:  # no process (fork refused, no memory): try again later
                log.error("cannot start serving worker %d: %s", w.index, exc)
                if w.first_start is not None:
                    _set(w.first_start)
                attempt += 1
                await asyncio.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
                continue
            await w.pipe.closed
            w.ready = False
            for fut in w.acks.values():
                if not fut.done():
                    fut.set_exception(EOFError())
            w.acks.clear()
            w.pipe.close()
            proc = w.process
            assert proc is not None
            # Reaped before another starts: two processes must never count in the same slots.
            await asyncio.to_thread(_reap, proc, 5.0)
            w.pid = None
            if w.first_start is not None:
                _set(w.first_start)
            if self._stopping:
                return
            attempt = 0 if time.monotonic() - w.started_at > 60 else attempt + 1
            pause = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
            w.restarts += 1
            self.slots.metrics.worker_restarts.inc()
            log.error(
                "serving worker %d (pid %s) exited (exit code %s); starting it again in %gs",
                w.index,
                proc.pid,
                proc.exitcode,
                pause,
            )
            await asyncio.sleep(pause)

    def _on_message(self, w: _Worker, msg: Any) -> None:
        kind = msg[0]
        if kind == "ack":
            _, seq, errors, fatal = msg
            if fatal:
                log.error("serving worker %d: %s", w.index, fatal)
            fut = w.acks.pop(seq, None)
            if fut is not None and not fut.done():
                fut.set_result((errors, fatal))
            elif not w.ready and w.starting is not None and seq == w.starting.seq and not fatal:
                self._bind_if_current(w)
        elif kind == "ready":
            log.info(
                "serving worker %d (pid %d) answers on %s%s",
                w.index,
                msg[1],
                self.listen,
                f" and HTTP {self.http_listen}" if self.http_listen else "",
            )
            if w.first_start is not None:
                _set(w.first_start)
        elif kind == "control":
            self._spawn_task(self._control(w, *msg[1:]))

    def _bind_if_current(self, w: _Worker) -> None:
        """A starting worker applied ``w.starting``: it binds if nothing changed meanwhile,
        else it gets the state as it is now, and is asked again."""
        assert w.pipe is not None and w.starting is not None
        current = self._state(w)
        if dataclasses.replace(current, seq=0) == dataclasses.replace(w.starting, seq=0):
            w.starting, w.ready = None, True
            w.pipe.send(("bind",))
        else:
            w.starting = current
            w.pipe.send(("state", current))

    async def _control(self, w: _Worker, ident: int, verb: str, name: str, params: Any) -> None:
        """Model control asked of a worker: done here, where the repository watcher is."""
        try:
            if verb == "load":
                await self.control.load(name, params)
            else:
                await self.control.unload(name)
            answer: tuple[str, str, str] | None = None
        except ModelfleetError as exc:
            answer = (exc.status.value, exc.reason, exc.message)
        if w.pipe is not None:
            w.pipe.send(("control", ident, answer))

    def reload(self) -> None:
        """SIGHUP in the leader: workers re-read the token file and take the log settings."""
        for w in self.workers:
            if w.pipe is not None:
                w.pipe.send(("reload", self.cfg.log_level, self.cfg.log_json))

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None]

    def shares(self) -> list[tuple[int, int | None, int]]:
        """(process index, pid, requests counted) for the leader (0) and every worker."""
        out: list[tuple[int, int | None, int]] = [(0, os.getpid(), self.telemetry.own_requests())]
        for w in self.workers:
            out.append((w.index, w.pid, self.telemetry.requests_in(w.counters.values())))
        return out

    async def stop(self, grace: float) -> None:
        """Drain every worker (as the leader drains), then make sure each is gone."""
        self._stopping = True
        for w in self.workers:
            if w.pipe is not None:
                w.pipe.send(("stop", grace))

        def reap(proc: BaseProcess) -> None:
            if not _reap(proc, grace + 10.0, quiet=False):
                log.error("serving worker pid %s did not stop in time: killed", proc.pid)

        await asyncio.gather(
            *(asyncio.to_thread(reap, w.process) for w in self.workers if w.process is not None)
        )
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for w in self.workers:
            if w.pipe is not None:
                w.pipe.close()


def _reap(proc: BaseProcess, timeout_s: float, quiet: bool = True) -> bool:
    """Wait for ``proc`` to exit, killing it after ``timeout_s``; True when it left by itself."""
    proc.join(timeout_s)
    if proc.exitcode is not None:
        return True
    proc.kill()
    proc.join(5.0)
    return False


# -- the worker's side ----------------------------------------------------------------------------


class _WorkerTelemetry(TelemetryAggregator):
    """Counts in the slots the leader gave this worker; anything else in memory only."""

    def __init__(self, store: CounterStore) -> None:
        super().__init__(store=store)
        self.assigned: dict[Key, int] = {}

    def version(self, model: str, version: int) -> VersionCounters:
        fresh = (model, version) not in self._versions
        c = super().version(model, version)
        if fresh and c.store is self.store:
            # A slot this worker's predecessor counted in: its reasons keep their cells.
            c.reasons = reason_indexes(self.store.describe(c.base // SLOT_CELLS)[2])
        return c

    def _allocate(self, model: str, version: int) -> tuple[CounterStore, int]:
        base = self.assigned.get((model, version))
        if base is not None:
            return self.store, base
        if self._overflow is None:
            self._overflow = CounterStore.memory()
        base = self._overflow.allocate(model, version)
        if base is None:
            raise RuntimeError("more than 4096 unshared model versions in one serving worker")
        return self._overflow, base

    def gate(self, model: str, version: int, passed: bool) -> None:
        """The leader counts gate verdicts and switches once for all processes."""

    def switched(self, model: str, version: int, *, rollback: bool) -> None:
        pass


class _ForwardedError(ModelfleetError):
    def __init__(self, status: str, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)
        self.status = Status(status)


class _ForwardedControl(ModelControl):
    """Model control on a worker: the leader does it (it owns the repository watcher)."""

    def __init__(self, available: bool, send: Callable[[Any], None]) -> None:
        super().__init__(None, "", enabled=False)
        self._available = available
        self._send = send
        self._ids = 0
        self.answers: dict[int, asyncio.Future[tuple[str, str, str] | None]] = {}

    @property
    def available(self) -> bool:
        return self._available

    async def _ask(self, verb: str, name: str, params: Any) -> None:
        self._ids += 1
        fut: asyncio.Future[tuple[str, str, str] | None]
        fut = asyncio.get_running_loop().create_future()
        self.answers[self._ids] = fut
        self._send(("control", self._ids, verb, name, params))
        answer = await fut
        if answer is not None:
            raise _ForwardedError(*answer)

    async def load(self, name: str, parameters: dict[str, object]) -> None:
        await self._ask("load", name, parameters)

    async def unload(self, name: str) -> None:
        await self._ask("unload", name, None)


def _worker_comparison(c: Comparison | None) -> Comparison | None:
    """Shadow copies are the leader's: its shadow cells are the ones reported."""
    if c is None or not c.shadow_bp:
        return c
    c = dataclasses.replace(c, shadow_bp=0)
    return c if c.active else None


class _Mirror:
    """Applies the leader's states to this worker's slots (and capture rules).

    Pointers move at once for versions already loaded (a rollback never waits behind a load);
    loads run in the background, and each finished load applies the newest state again.
    """

    def __init__(self, slots: SlotManager, telemetry: _WorkerTelemetry, capture: Capture) -> None:
        self.slots = slots
        self.telemetry = telemetry
        self.capture = capture
        self.latest: WorkerState | None = None
        self.loaded: dict[Key, LoadedVersion] = {}
        self.loading: dict[Key, asyncio.Task[None]] = {}
        self.failed: dict[Key, str] = {}

    def _apply_capture(self, state: WorkerState) -> None:
        if state.capture_key is not None:
            self.capture._key = state.capture_key
        rules = dict(state.capture_rules)
        if state.capture_key is None:
            # Hashing needs the leader's key; without it the input would not join (never
            # happens: the leader sends the key with any rule that hashes).
            rules = {m: r for m, r in rules.items() if not r.hash}
        self.capture.set_rules(rules)

    def _load(self, spec: VersionSpec) -> LoadedVersion:
        """Runs on the loader thread: the bundle the leader verified, checked again here."""
        from modelfleet.agent.slots import LoadedVersion
        from modelfleet.kernel.bundle import load_bundle
        from modelfleet.kernel.runtime import OnnxModel

        bundle = load_bundle(spec.path)
        if (bundle.name, bundle.version) != (spec.name, spec.version) or (
            bundle.manifest.model_sha256 != spec.model_sha256
        ):
            raise BundleError(
                f"{spec.path} changed after the leader loaded it (it verified {spec.name!r} "
                f"version {spec.version}, model sha256 {spec.model_sha256[:16]}...); "
                "bundles are immutable: put a new version in a new folder"
            )
        model = OnnxModel(bundle, self.slots.runtime)
        samples = bundle.health_samples()
        failure = check_outputs(bundle.manifest, samples.expected, model.run(samples.inputs))
        if failure is not None:
            raise WorkerRefusedError(f"health samples ({failure[0]}): {failure[1]}")
        return LoadedVersion(
            bundle,
            model,
            self.slots.serving_executor,
            self.slots.batching,
            self.slots.metrics,
            gate=spec.gate,
        )

    async def _load_task(self, key: Key, spec: VersionSpec) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.loaded[key] = await loop.run_in_executor(
                self.slots.loader_executor, self._load, spec
            )
            self.failed.pop(key, None)
        except ModelfleetError as exc:
            self.failed[key] = str(exc)
        except Exception as exc:  # onnxruntime's own errors
            self.failed[key] = f"{type(exc).__name__}: {exc}"
        finally:
            self.loading.pop(key, None)
        self._set_pointers()

    def receive(self, state: WorkerState) -> asyncio.Task[Answer]:
        """Take ``state`` as the newest; the task answers once its versions are loaded."""
        self.latest = state
        self.telemetry.assigned.update(state.counters)
        self.slots.unloaded = dict(state.unloaded)
        self._apply_capture(state)
        keys = []
        for spec in state.versions:
            key = (spec.name, spec.version)
            keys.append(key)
            if key not in self.loaded and key not in self.loading:
                self.failed.pop(key, None)
                self.loading[key] = asyncio.get_running_loop().create_task(
                    self._load_task(key, spec)
                )
        self._set_pointers()
        return asyncio.get_running_loop().create_task(self._answer(keys))

    async def _answer(self, keys: list[Key]) -> Answer:
        waits = [self.loading[k] for k in keys if k in self.loading]
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)
        errors = {k: self.failed[k] for k in keys if k in self.failed}
        return errors, self.cannot_serve()

    def cannot_serve(self) -> str:
        """Why this worker cannot serve what the newest state says it serves ("" if it can)."""
        state = self.latest
        if state is None:
            return ""
        for m in state.models:
            for v in (m.active, m.previous):
                if v and (m.name, v) in self.failed:
                    return f"cannot serve {m.name} v{v}: {self.failed[(m.name, v)]}"
        return ""

    def _set_pointers(self) -> None:
        """The newest state's pointers, for every model whose versions are all loaded (the
        others keep theirs until their loads finish); then unneeded versions go."""
        state = self.latest
        if state is None:
            return
        epoch = self.telemetry.store.switch_epoch
        names = set()
        for m in state.models:
            names.add(m.name)
            needed = [v for v in (m.active, m.previous, m.armed and m.armed[0]) if v]
            if any((m.name, v) not in self.loaded for v in needed):
                continue
            slot = self.slots.slot(m.name)
            slot.active = self.loaded[(m.name, m.active)] if m.active else None
            slot.previous = self.loaded[(m.name, m.previous)] if m.previous else None
            slot.comparison = _worker_comparison(m.comparison)
            slot.pending = None
            if m.armed is not None:
                slot.pending = (self.loaded[(m.name, m.armed[0])], m.armed[1])
                if epoch >= m.armed[1]:  # flipped already: as settle() would
                    self.slots.settle(slot)
        for name in list(self.slots.slots):
            if name not in names:
                del self.slots.slots[name]
        wanted = {(v.name, v.version) for v in state.versions}
        for key in list(self.loaded):
            if key not in wanted:
                # In-flight requests hold their own reference; the session goes with them.
                del self.loaded[key]


def _die_with_parent() -> None:
    """SIGKILL when the leader dies, however it dies (Linux); the pipe's end covers the rest."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def worker_main(
    cfg: ServeConfig,
    index: int,
    listen: tuple[str, str],
    store_path: str,
    control_available: bool,
    conn: Any,
) -> None:
    """A serving worker's process (multiprocessing spawn target)."""
    _die_with_parent()
    parent = os.getppid()
    # The leader handles Ctrl-C and reloads (it tells its workers); SIGTERM (systemd stopping
    # the whole unit) drains this process like the leader.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from modelfleet.kernel.logs import setup_logging

    setup_logging(cfg.log_level, cfg.log_json)
    if os.getppid() != parent or parent == 1:
        return  # the leader died before PDEATHSIG was set
    try:
        asyncio.run(_serve_worker(cfg, index, listen, Path(store_path), control_available, conn))
    except ModelfleetError as exc:
        log.error("serving worker %d: %s", index, exc)
        raise SystemExit(1) from None


async def _serve_worker(
    cfg: ServeConfig,
    index: int,
    listen: tuple[str, str],
    store_path: Path,
    control_available: bool,
    conn: Connection,
) -> None:
    from modelfleet.agent.app import (
        build_capture,
        build_slots,
        http_inference_server,
        inference_security,
    )
    from modelfleet.agent.metrics import AgentMetrics
    from modelfleet.agent.serving.admission import Admission, Limits
    from modelfleet.agent.serving.dataplane import DataPlane
    from modelfleet.agent.serving.grpc_server import HealthReporter, build_server
    from modelfleet.agent.serving.shm import SharedMemoryRegistry
    from modelfleet.kernel.logs import setup_logging

    loop = asyncio.get_running_loop()
    store = CounterStore.map(store_path)
    telemetry = _WorkerTelemetry(store)
    metrics = AgentMetrics(telemetry=telemetry)
    slots = build_slots(cfg, metrics)
    slots.switch_epoch = lambda: store.switch_epoch
    # Captured files go into the same folder, under names of their own (the leader ships them
    # and keeps the quota; a worker never salvages files, which may be the leader's open ones).
    capture = build_capture(cfg, metrics)
    capture._key = b""  # replaced by the leader's key before any rule that hashes applies
    mirror = _Mirror(slots, telemetry, capture)
    credentials, token_check, _, tls_files = inference_security(cfg)
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    pipe = _Pipe(conn, loop, inbox.put_nowait, f"worker-{index}-leader")
    control = _ForwardedControl(control_available, pipe.send)
    dataplane = DataPlane(slots, metrics, None, capture, Admission(Limits.from_settings(cfg)))
    health = HealthReporter(slots)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    grace = cfg.drain_timeout_s
    servers: list[Any] = []
    leaving = ""

    def answered(seq: int, task: asyncio.Task[Answer]) -> None:
        nonlocal leaving
        errors, fatal = task.result()
        pipe.send(("ack", seq, errors, fatal))
        if fatal and not leaving:
            # Serving less than the others would answer "not loaded" on part of the
            # connections: leave; the leader starts this worker again.
            leaving = fatal
            stop.set()

    async def bind() -> None:
        await health.refresh()
        shm = SharedMemoryRegistry()  # one for both edges, as in the leader
        server, _port = build_server(
            slots,
            dataplane,
            health,
            listen[0],
            cfg.max_message_bytes,
            credentials,
            [token_check] if token_check else [],
            control,
            shm,
            reuse_port=True,
        )
        await server.start()
        servers.append(server)
        if listen[1]:
            from modelfleet.agent.serving.security import server_ssl_context

            http = http_inference_server(
                cfg,
                slots,
                dataplane,
                health,
                token_check,
                control,
                shm,
                listen[1],
                server_ssl_context(tls_files) if tls_files else None,
            )
            await http.start()
            servers.append(http)
        pipe.send(("ready", os.getpid()))

    async def listen_to_leader() -> None:
        nonlocal grace
        gone = pipe.closed
        while True:
            got = loop.create_task(inbox.get())
            done, _ = await asyncio.wait([got, gone], return_when=asyncio.FIRST_COMPLETED)
            if got not in done:
                got.cancel()
                log.error("serving worker %d: the leader is gone; stopping", index)
                grace = 0.0
                stop.set()
                return
            msg = got.result()
            kind = msg[0]
            if kind == "state":
                state = msg[1]
                task = mirror.receive(state)
                task.add_done_callback(functools.partial(answered, state.seq))
                if servers:
                    await health.refresh()
            elif kind == "bind":
                await bind()
            elif kind == "control":
                fut = control.answers.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg[2])
            elif kind == "reload":
                setup_logging(msg[1], msg[2])
                if token_check is not None:
                    token_check.reload()
            elif kind == "stop":
                grace = msg[1]
                stop.set()
                return

    listener = loop.create_task(listen_to_leader())
    await stop.wait()
    if leaving:
        log.error("serving worker %d: %s; leaving", index, leaving)
    health.draining = True
    await health.refresh()
    await asyncio.gather(
        *(s.stop(grace=grace) if hasattr(s, "add_insecure_port") else s.stop() for s in servers)
    )
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    await dataplane.close()
    await asyncio.to_thread(capture.close)
    slots.close()
    pipe.close()
    if leaving:
        raise WorkerRefusedError(leaving)


__all__ = [
    "SERVING_CELLS_FILE",
    "ServingWorkers",
    "VersionSpec",
    "WorkerRefusedError",
    "WorkerState",
    "worker_main",
]
