"""Guardrails in front of the models: load shedding, per-client rate limits, request size.

Transport independent: the data plane asks :class:`Admission` before a request reaches a runner,
so every edge (gRPC, HTTP) gets the same limits and the same errors. Health, metadata and
statistics never come here, so they keep answering while inference is shed.

Per model, requests admitted and not yet answered are counted, with their rows; a request that
would take either count over its limit is refused at once (RESOURCE_EXHAUSTED) instead of
waiting. That also bounds the batcher's queue and the serving executor's queue, which hold only
admitted requests.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from modelfleet.kernel.errors import ResourceExhaustedError

# Shed reasons, the `reason` label of modelfleet_requests_shed_total.
SHED_CONCURRENCY = "concurrency"
SHED_QUEUED_ROWS = "queued_rows"
SHED_RATE_LIMIT = "rate_limit"

# The auto limits (settings at 0): requests in flight per serving thread, and rows per thread
# and max batch (eight full batches per thread waiting is already seconds on a slow model).
AUTO_REQUESTS_PER_THREAD = 64
AUTO_BATCHES_PER_THREAD = 8


class ShedError(ResourceExhaustedError):
    """A request refused by a guardrail before any work; the client may retry later."""

    reason = "shed"

    def __init__(self, message: str, *, reason: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message, reason=reason)
        # Seconds after which a retry may be admitted (HTTP's Retry-After).
        self.retry_after_s = retry_after_s


class OverloadedError(ShedError):
    """The model's concurrency or queued-rows limit is reached (HTTP 429)."""


class RateLimitedError(ShedError):
    """The client is over its rate limit (HTTP 429, Retry-After: retry_after_s)."""


class RequestTooLargeError(ResourceExhaustedError):
    """The inputs are larger than max_request_bytes (HTTP 413)."""

    reason = "request_too_large"


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; a request takes one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one will be there."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class ClientTable:
    """Token buckets per client, at most ``max_clients`` of them (least recently seen goes).

    Bounded so that a client rotating addresses or certificates costs a fixed amount of memory.
    An evicted client starts again with a full bucket, which favours it at most ``burst``
    requests: an attacker can make the limit looser for others, never refuse them.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate must be > 0, burst >= 1 and max_clients >= 1")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, client: str) -> bool:
        return client in self._buckets

    def take(self, client: str) -> float:
        now = self.clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
                self.evicted += 1
            bucket = self._buckets[client] = TokenBucket(self.rate, self.burst, now)
        else:
            self._buckets.move_to_end(client)
        return bucket.take(now)


def client_key(peer: str, identity: str = "") -> str:
    """The rate-limit key: the certificate identity when there is one, else the address.

    ``peer`` is gRPC's form (``ipv4:10.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:...``). The port
    is dropped (a client picks a new one per connection), and an IPv6 address counts by its /64,
    the block one host usually holds.
    """
    if identity:
        return f"cert:{identity}"
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return "ipv4:" + rest.rpartition(":")[0]
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]").split("%")[0]
        try:
            net = ipaddress.IPv6Network(f"{host}/64", strict=False)
        except ValueError:
            return "ipv6:" + host
        return f"ipv6:{net}"
    return peer


@dataclass(frozen=True)
class Limits:
    # 0 in a field means auto (see resolve()).
    max_concurrent_requests: int = 0
    max_queued_rows: int = 0
    max_request_bytes: int = 0
    rate_limit_per_s: float = 0.0
    rate_limit_burst: int = 0
    rate_limit_clients: int = 10_000
    # For the auto values.
    serving_threads: int = 2
    max_message_bytes: int = 64 << 20

    @classmethod
    def from_settings(cls, settings: object) -> Limits:
        """The limits from the agent's settings (ServeConfig), whose keys have these names: one
        list of guardrail settings, this class's fields (tests/test_admission.py pins that
        the names and defaults agree)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    def concurrency(self) -> int:
        return self.max_concurrent_requests or AUTO_REQUESTS_PER_THREAD * self.serving_threads

    def rows(self, max_batch_size: int) -> int:
        if self.max_queued_rows:
            return self.max_queued_rows
        auto = AUTO_BATCHES_PER_THREAD * max(1, max_batch_size) * self.serving_threads
        return max(auto, self.concurrency())

    def request_bytes(self) -> int:
        return self.max_request_bytes or self.max_message_bytes

    def burst(self) -> int:
        return self.rate_limit_burst or max(1, math.ceil(self.rate_limit_per_s))


class _Load:
    __slots__ = ("requests", "rows")

    def __init__(self) -> None:
        self.requests = 0
        self.rows = 0


def input_bytes(feed: dict[str, np.ndarray]) -> int:
    total = 0
    for arr in feed.values():
        if arr.dtype.hasobject:
            # BYTES tensors: the payloads, not the pointers.
            total += sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in arr.flat)
        else:
            total += arr.nbytes
    return total


class Admission:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._load: dict[str, _Load] = {}
        lim = self.limits
        # Worked out once (Limits is frozen): every request checks against them.
        self._request_bytes = lim.request_bytes()
        self._concurrency = lim.concurrency()
        self._rows: dict[int, int] = {}  # by max batch size
        self.clients: ClientTable | None = None
        if lim.rate_limit_per_s > 0:
            self.clients = ClientTable(lim.rate_limit_per_s, lim.burst(), lim.rate_limit_clients)

    def check_rate(self, client: str) -> None:
        if self.clients is None:
            return
        wait = self.clients.take(client)
        if wait > 0:
            lim = self.limits
            raise RateLimitedError(
                f"client {client} is over its rate limit of {lim.rate_limit_per_s:g} requests/s "
                f"(burst {lim.burst()}): retry after {wait:.3f} s, or have the operator raise "
                "rate_limit_per_s / rate_limit_burst (--rate-limit-per-s, --rate-limit-burst)",
                reason=SHED_RATE_LIMIT,
                retry_after_s=wait,
            )

    def check_size(self, model: str, feed: dict[str, np.ndarray]) -> None:
        limit = self._request_bytes
        size = input_bytes(feed)
        if size > limit:
            raise RequestTooLargeError(
                f"request to model {model!r} has {size} bytes of inputs; this agent accepts at "
                f"most {limit} (max_request_bytes): split it into smaller batches, or have the "
                "operator raise max_request_bytes (--max-request-bytes)"
            )

    def enter(self, model: str, rows: int, max_batch_size: int) -> _Load:
        """Count a request in, or raise :class:`OverloadedError`; pair with :meth:`leave`."""
        load = self._load.get(model)
        if load is None:
            load = self._load[model] = _Load()
        concurrency = self._concurrency
        if load.requests >= concurrency:
            raise OverloadedError(
                f"model {model!r} is at its limit of {concurrency} concurrent requests "
                "(max_concurrent_requests): retry after a short backoff, or have the operator "
                "raise max_concurrent_requests (--max-concurrent-requests) or add capacity",
                reason=SHED_CONCURRENCY,
            )
        max_rows = self._rows.get(max_batch_size)
        if max_rows is None:
            max_rows = self._rows[max_batch_size] = self.limits.rows(max_batch_size)
        if load.rows + rows > max_rows and load.requests > 0:
            raise OverloadedError(
                f"model {model!r} has {load.rows} rows queued or computing; {rows} more would "
                f"pass its limit of {max_rows} (max_queued_rows): retry after a short backoff, "
                "or have the operator raise max_queued_rows (--max-queued-rows)",
                reason=SHED_QUEUED_ROWS,
            )
        load.requests += 1
        load.rows += rows
        return load

    @staticmethod
    def leave(load: _Load, rows: int) -> None:
        load.requests -= 1
        load.rows -= rows

    def in_flight(self, model: str) -> tuple[int, int]:
        load = self._load.get(model)
        return (load.requests, load.rows) if load is not None else (0, 0)
