"""Load generators: tritonclient.grpc, called the same way against the agent and the echo server.

Every request reuses a prepared ``InferInput`` so the client does the same, minimal work for both
targets; latency is measured around ``client.infer`` and so includes the client's own cost, which
the echo baseline carries too.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient

# A request that takes this long is counted as failed instead of hanging the run.
CLIENT_TIMEOUT_S = 10.0


def make_inputs(x: np.ndarray, name: str = "x") -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def percentile_ms(latencies_ns: np.ndarray, q: float) -> float:
    if latencies_ns.size == 0:
        return float("nan")
    return float(np.percentile(latencies_ns, q)) / 1e6


@dataclass
class Target:
    """Where to send requests: a server URL and a model name on it."""

    label: str
    url: str
    model: str


def response_bytes(target: Target, x: np.ndarray) -> int:
    """Serialised size of one response, to check the echo baseline matches the agent."""
    client = grpcclient.InferenceServerClient(target.url)
    try:
        res = client.infer(target.model, make_inputs(x), client_timeout=CLIENT_TIMEOUT_S)
        return res.get_response().ByteSize()
    finally:
        client.close()


@dataclass
class LocalTarget:
    """Work done in this process, timed like a request: in-process onnxruntime."""

    label: str
    call: Callable[[], object]


def interleaved_sequential(
    targets: list[Target | LocalTarget],
    x: np.ndarray,
    *,
    requests: int,
    block: int = 100,
    warmup: int = 200,
) -> dict[str, np.ndarray]:
    """Concurrency 1: alternate blocks of sequential requests between the targets.

    Alternating in small blocks means a burst of noise from a neighbour on the shared machine
    hits every target alike, so the ratios stay meaningful even when absolute numbers wobble.
    Returns latencies in ns per target label.
    """
    inputs = make_inputs(x)
    calls: dict[str, Callable[[], object]] = {}
    clients = []
    try:
        for t in targets:
            if isinstance(t, LocalTarget):
                calls[t.label] = t.call
                continue
            client = grpcclient.InferenceServerClient(t.url)
            clients.append(client)

            def call(client: grpcclient.InferenceServerClient = client, model: str = t.model):
                res = client.infer(model, inputs, client_timeout=CLIENT_TIMEOUT_S)
                return res.as_numpy("y")

            calls[t.label] = call
        for fn in calls.values():
            for _ in range(warmup):
                fn()
        out: dict[str, list[int]] = {label: [] for label in calls}
        done = 0
        while done < requests:
            n = min(block, requests - done)
            for label, fn in calls.items():
                lat = out[label]
                for _ in range(n):
                    start = time.perf_counter_ns()
                    fn()
                    lat.append(time.perf_counter_ns() - start)
            done += n
    finally:
        for c in clients:
            c.close()
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


@dataclass
class LoadRecord:
    """Everything one concurrent load saw, one entry per request, in perf_counter_ns."""

    starts: np.ndarray
    latencies: np.ndarray
    versions: list[str]
    errors: list[tuple[int, str]] = field(default_factory=list)

    def window(self, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
        """Requests that started in [t0, t1): (start times, latencies)."""
        mask = (self.starts >= t0) & (self.starts < t1)
        return self.starts[mask], self.latencies[mask]

    def completed_in(self, t0: int, t1: int) -> int:
        ends = self.starts + self.latencies
        return int(np.count_nonzero((ends >= t0) & (ends < t1)))

    def errors_in(self, t0: int, t1: int) -> list[tuple[int, str]]:
        return [e for e in self.errors if t0 <= e[0] < t1]


class ConcurrentLoad:
    """``threads`` closed-loop clients, each with its own InferenceServerClient (own channel).

    Use as a context manager: the threads stop and are joined on exit whatever happens, and a
    hard ``max_duration_s`` bounds them even if the caller never stops them.
    """

    def __init__(
        self, target: Target, x: np.ndarray, *, threads: int = 16, max_duration_s: float = 300.0
    ) -> None:
        self.target = target
        self.x = x
        self.n_threads = threads
        self.max_duration_s = max_duration_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._per_thread: list[tuple[list[int], list[int], list[str], list[tuple[int, str]]]] = []
        self._ready = threading.Barrier(threads + 1)

    def __enter__(self) -> ConcurrentLoad:
        for i in range(self.n_threads):
            bucket: tuple[list[int], list[int], list[str], list[tuple[int, str]]] = ([], [], [], [])
            self._per_thread.append(bucket)
            t = threading.Thread(target=self._worker, args=(bucket,), name=f"load-{i}", daemon=True)
            self._threads.append(t)
            t.start()
        # Start the clock only when every client is connected and about to send.
        self._ready.wait(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=CLIENT_TIMEOUT_S + 5)

    def _worker(
        self, bucket: tuple[list[int], list[int], list[str], list[tuple[int, str]]]
    ) -> None:
        starts, lats, versions, errors = bucket
        client = grpcclient.InferenceServerClient(self.target.url)
        inputs = make_inputs(self.x)
        model = self.target.model
        deadline = time.monotonic() + self.max_duration_s
        try:
            try:
                client.is_server_live()
            finally:
                self._ready.wait(timeout=30)
            while not self._stop.is_set() and time.monotonic() < deadline:
                start = time.perf_counter_ns()
                try:
                    res = client.infer(model, inputs, client_timeout=CLIENT_TIMEOUT_S)
                    res.as_numpy("y")
                except Exception as exc:  # every failure counts, whatever its kind
                    errors.append((start, f"{type(exc).__name__}: {exc}"))
                    continue
                lats.append(time.perf_counter_ns() - start)
                starts.append(start)
                versions.append(res.get_response().model_version)
        finally:
            client.close()

    def record(self) -> LoadRecord:
        starts: list[int] = []
        lats: list[int] = []
        versions: list[str] = []
        errors: list[tuple[int, str]] = []
        for s, lat, v, e in self._per_thread:
            starts += s
            lats += lat
            versions += v
            errors += e
        order = np.argsort(np.asarray(starts, dtype=np.int64), kind="stable")
        return LoadRecord(
            starts=np.asarray(starts, dtype=np.int64)[order],
            latencies=np.asarray(lats, dtype=np.int64)[order],
            versions=[versions[i] for i in order],
            errors=sorted(errors),
        )


@dataclass
class Block:
    """One measured window of closed-loop load against one target."""

    completed: int
    seconds: float
    latencies: np.ndarray
    failed: int
    # Server CPU (user + system) over the window, when its pid is known.
    cpu_s: float | None = None


@dataclass
class Throughput:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    failed: int
    # Server CPU per completed request, when the server's pid is known.
    cpu_us_per_req: float | None = None

    @classmethod
    def of(cls, blocks: list[Block]) -> Throughput:
        """Pool several windows: total completions over total time, percentiles over all."""
        completed = sum(b.completed for b in blocks)
        seconds = sum(b.seconds for b in blocks)
        lats = np.concatenate([b.latencies for b in blocks]) if blocks else np.empty(0)
        cpu = [b.cpu_s for b in blocks]
        known = all(c is not None for c in cpu) and completed > 0
        return cls(
            rps=completed / seconds if seconds else 0.0,
            p50_ms=percentile_ms(lats, 50),
            p99_ms=percentile_ms(lats, 99),
            requests=int(lats.size),
            failed=sum(b.failed for b in blocks),
            cpu_us_per_req=sum(c or 0.0 for c in cpu) * 1e6 / completed if known else None,
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        # The command name may hold spaces; everything after its closing ")" is fixed-format.
        fields = fh.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); [0] here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_concurrent(
    target: Target,
    x: np.ndarray,
    *,
    threads: int = 16,
    warmup_s: float = 1.0,
    duration_s: float = 6.0,
    server_pid: int | None = None,
) -> Block:
    """Closed-loop load for ``warmup_s`` + ``duration_s``; figures cover the second part only."""
    with ConcurrentLoad(
        target, x, threads=threads, max_duration_s=warmup_s + duration_s + 30
    ) as load:
        time.sleep(warmup_s)
        t0 = time.perf_counter_ns()
        cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
        time.sleep(duration_s)
        t1 = time.perf_counter_ns()
        cpu1 = cpu_seconds(server_pid) if server_pid else 0.0
    rec = load.record()
    _, lats = rec.window(t0, t1)
    return Block(
        completed=rec.completed_in(t0, t1),
        seconds=(t1 - t0) / 1e9,
        latencies=lats,
        failed=len(rec.errors_in(t0, t1)),
        cpu_s=cpu1 - cpu0 if server_pid else None,
    )
