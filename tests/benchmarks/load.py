"""Load generators: tritonclient.grpc, called the same way against the agent and the echo server.

Every request reuses a prepared ``InferInput`` so the client does the same, minimal work for both
targets; latency is measured around ``client.infer`` and so includes the client's own cost, which
the echo baseline carries too.
"""

from __future__ import annotations

import functools
import math
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
    server_cpu: Callable[[], float] | None = None,
) -> Block:
    """Closed-loop load for ``warmup_s`` + ``duration_s``; figures cover the second part only.

    Server CPU comes from ``server_cpu`` (seconds so far, e.g. summed over a process tree) when
    given, else from ``server_pid``.
    """
    if server_cpu is None and server_pid:
        server_cpu = functools.partial(cpu_seconds, server_pid)
    with ConcurrentLoad(
        target, x, threads=threads, max_duration_s=warmup_s + duration_s + 30
    ) as load:
        time.sleep(warmup_s)
        t0 = time.perf_counter_ns()
        cpu0 = server_cpu() if server_cpu else 0.0
        time.sleep(duration_s)
        t1 = time.perf_counter_ns()
        cpu1 = server_cpu() if server_cpu else 0.0
    rec = load.record()
    _, lats = rec.window(t0, t1)
    return Block(
        completed=rec.completed_in(t0, t1),
        seconds=(t1 - t0) / 1e9,
        latencies=lats,
        failed=len(rec.errors_in(t0, t1)),
        cpu_s=cpu1 - cpu0 if server_cpu else None,
    )


class OpenLoad:
    """Request ``i`` is due at ``t0 + i / rate``, whether or not earlier ones have returned.

    A closed loop slows down with the server and so hides a stall; here the offered rate stays
    fixed and latency counts from each request's *due* time, so a stalled server or a sender
    that fell behind shows in the figures instead of thinning the sample (no coordinated
    omission). ``senders`` threads, each with its own client (own channel), own every
    ``senders``-th request and send it with a blocking ``infer`` at its due time, as wrk2 does
    per connection: at most ``senders`` requests are in flight, and when all are busy the next
    ones leave late, which their latency shows. Blocking calls, not ``async_infer``: on two
    shared cores a future per request and a callback on gRPC's thread cost the client about a
    third more CPU per request, taken from the server being measured.

    Every scheduled request ends in exactly one of: answered (``OK``), failed (``FAILED``: an
    error from the server or the client, or the client's deadline), or never sent (``UNSENT``:
    the load was stopped early). ``counts()`` adds them up.
    """

    UNSENT, PENDING, OK, FAILED = 0, 1, 2, 3
    # Error messages kept verbatim (the first ones); the rest are only counted by kind.
    KEEP_ERRORS = 20

    def __init__(
        self,
        target: Target,
        x: np.ndarray,
        *,
        rate: float,
        duration_s: float,
        senders: int = 16,
        timeout_s: float = CLIENT_TIMEOUT_S,
    ) -> None:
        if rate <= 0 or duration_s <= 0 or senders < 1:
            raise ValueError(
                f"rate, duration and senders must be positive, got {rate}, "
                f"{duration_s} and {senders}"
            )
        self.target = target
        self.x = x
        self.rate = rate
        self.n = max(1, int(rate * duration_s))
        self.period_ns = 1e9 / rate
        self.senders = senders
        self.timeout_s = timeout_s
        self.t0 = 0
        self.state = np.zeros(self.n, dtype=np.int8)
        # From the due time to the answer (or the error), ns; -1 while unanswered.
        self.latency = np.full(self.n, -1, dtype=np.int64)
        # How late the request actually left, ns: the sender was busy or descheduled.
        self.send_lag = np.zeros(self.n, dtype=np.int64)
        self.version = np.zeros(self.n, dtype=np.int32)
        self.error_kinds: dict[str, int] = {}
        self.first_errors: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: list[grpcclient.InferenceServerClient] = []

    def scheduled_ns(self, i: np.ndarray) -> np.ndarray:
        """perf_counter_ns at which requests ``i`` were due."""
        return self.t0 + np.round(i * self.period_ns).astype(np.int64)

    def __enter__(self) -> OpenLoad:
        for _ in range(self.senders):
            client = grpcclient.InferenceServerClient(self.target.url)
            self._clients.append(client)
            client.is_server_live(client_timeout=self.timeout_s)  # connected before the clock
        # A little head room so every sender is waiting for its first slot when it comes.
        self.t0 = time.perf_counter_ns() + 50_000_000
        for k, client in enumerate(self._clients):
            t = threading.Thread(target=self._send, args=(k, client), name=f"open-{k}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, timeout: float) -> None:
        """Wait for the whole schedule to be sent and answered (at most ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        """Stop sending; what is in flight ends within the client's deadline. Closes the clients."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        for c in self._clients:
            c.close()
        self._clients = []

    def _send(self, k: int, client: grpcclient.InferenceServerClient) -> None:
        inputs = make_inputs(self.x)
        model = self.target.model
        for i in range(k, self.n, self.senders):
            due = self.t0 + round(i * self.period_ns)
            wait_ns = due - time.perf_counter_ns()
            # Sleep in slices so stop() is honoured within 50 ms even between slow slots.
            while wait_ns > 0:
                if self._stop.wait(min(wait_ns, 50_000_000) / 1e9):
                    return
                wait_ns = due - time.perf_counter_ns()
            if self._stop.is_set():
                return
            self.send_lag[i] = -wait_ns
            self.state[i] = self.PENDING
            try:
                res = client.infer(model, inputs, client_timeout=self.timeout_s)
                version = res.get_response().model_version
            except Exception as exc:  # every failure counts, whatever its kind
                self.latency[i] = time.perf_counter_ns() - due
                self._fail(i, f"{type(exc).__name__}: {exc}")
                continue
            self.latency[i] = time.perf_counter_ns() - due
            self.version[i] = int(version) if version.isdigit() else -1
            self.state[i] = self.OK

    def _fail(self, i: int, message: str) -> None:
        with self._lock:
            self.state[i] = self.FAILED
            # Grouped by the exception and the start of its message (status code and detail).
            kind = message[:90]
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
            if len(self.first_errors) < self.KEEP_ERRORS:
                self.first_errors.append((i, message[:300]))

    def counts(self) -> dict[str, int]:
        s = self.state
        return {
            "scheduled": self.n,
            "ok": int(np.count_nonzero(s == self.OK)),
            "failed": int(np.count_nonzero(s == self.FAILED)),
            # In flight when counted: only while the load runs (stop() waits for them).
            "pending": int(np.count_nonzero(s == self.PENDING)),
            "unsent": int(np.count_nonzero(s == self.UNSENT)),
        }

    def window(self, t0_ns: int, t1_ns: int) -> np.ndarray:
        """Indices of the requests due in [t0_ns, t1_ns)."""
        lo = max(0, math.ceil((t0_ns - self.t0) / self.period_ns))
        hi = min(self.n, max(0, math.ceil((t1_ns - self.t0) / self.period_ns)))
        return np.arange(lo, hi) if hi > lo else np.empty(0, dtype=np.int64)

    def ok_latencies(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Latencies (ns) of the answered requests among ``idx`` (all when None)."""
        state = self.state if idx is None else self.state[idx]
        lat = self.latency if idx is None else self.latency[idx]
        return lat[state == self.OK]
