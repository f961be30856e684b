"""Guardrail units: the token bucket, the bounded client table, client keys, the limits."""

from __future__ import annotations

import numpy as np
import pytest

from modelfleet.agent.serving.admission import (
    Admission,
    ClientTable,
    Limits,
    OverloadedError,
    RateLimitedError,
    RequestTooLargeError,
    TokenBucket,
    client_key,
    input_bytes,
)
from modelfleet.kernel.errors import Status


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_the_burst_then_the_rate() -> None:
    b = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    # Empty: the next token is half a second away at 2/s.
    assert b.take(0.0) == pytest.approx(0.5)
    assert b.take(0.25) == pytest.approx(0.25)
    assert b.take(0.5) == 0.0
    # A long idle time refills up to the burst, never beyond it.
    assert [b.take(1000.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert b.take(1000.0) > 0


def test_bucket_ignores_a_clock_going_backwards() -> None:
    b = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert b.take(10.0) == 0.0
    assert b.take(5.0) == pytest.approx(1.0)
    assert b.tokens == 0.0


def test_client_table_keeps_clients_apart() -> None:
    clock = Clock()
    table = ClientTable(rate=1.0, burst=2, max_clients=10, clock=clock)
    assert table.take("a") == 0.0 and table.take("a") == 0.0
    assert table.take("a") > 0
    # Another client is not touched by a's spending.
    assert table.take("b") == 0.0
    clock.now += 1.0
    assert table.take("a") == 0.0


def test_client_table_is_bounded_under_rotating_identities() -> None:
    clock = Clock()
    table = ClientTable(rate=1.0, burst=1, max_clients=100, clock=clock)
    for port in range(100_000):
        table.take(f"ipv4:10.{port >> 16 & 255}.{port >> 8 & 255}.{port & 255}")
        assert len(table) <= 100
    assert len(table) == 100
    assert table.evicted == 100_000 - 100


def test_client_table_evicts_the_least_recently_seen() -> None:
    table = ClientTable(rate=1.0, burst=1, max_clients=2, clock=Clock())
    table.take("old")
    table.take("busy")
    table.take("old")  # seen again: now "busy" is the least recent
    table.take("new")
    assert "old" in table and "new" in table and "busy" not in table


def test_client_table_refuses_nonsense() -> None:
    for args in ((0.0, 1, 1), (1.0, 0, 1), (1.0, 1, 0)):
        with pytest.raises(ValueError):
            ClientTable(*args)


@pytest.mark.parametrize(
    ("peer", "identity", "key"),
    [
        ("ipv4:10.1.2.3:5555", "", "ipv4:10.1.2.3"),
        ("ipv4:10.1.2.3:6666", "", "ipv4:10.1.2.3"),
        ("ipv6:[2001:db8:1:2:aaaa::1]:443", "", "ipv6:2001:db8:1:2::/64"),
        ("ipv6:[2001:db8:1:2:bbbb::9]:80", "", "ipv6:2001:db8:1:2::/64"),
        ("ipv6:[::1]:80", "", "ipv6:::/64"),
        ("unix:/run/x.sock", "", "unix:/run/x.sock"),
        ("ipv4:10.1.2.3:5555", "app", "cert:app"),
    ],
)
def test_client_key_drops_the_port_and_groups_ipv6(peer: str, identity: str, key: str) -> None:
    assert client_key(peer, identity) == key


def test_auto_limits_follow_threads_and_batch_size() -> None:
    lim = Limits(serving_threads=2)
    assert lim.concurrency() == 128
    assert lim.rows(64) == 8 * 64 * 2
    assert lim.rows(0) == 128  # never below the request limit: every request has a row
    assert lim.request_bytes() == 64 << 20
    assert Limits(rate_limit_per_s=2.5).burst() == 3
    set_ = Limits(max_concurrent_requests=3, max_queued_rows=7, max_request_bytes=10)
    assert (set_.concurrency(), set_.rows(64), set_.request_bytes()) == (3, 7, 10)


def test_enter_sheds_beyond_the_limits_and_leave_frees() -> None:
    adm = Admission(Limits(max_concurrent_requests=2, max_queued_rows=10))
    a = adm.enter("m", 4, 8)
    b = adm.enter("m", 4, 8)
    with pytest.raises(OverloadedError) as info:
        adm.enter("m", 1, 8)
    assert info.value.status is Status.RESOURCE_EXHAUSTED
    assert info.value.reason == "concurrency"
    assert "limit of 2 concurrent requests" in str(info.value)
    assert "max_concurrent_requests" in str(info.value)
    # Other models have their own counts.
    adm.leave(adm.enter("other", 1, 8), 1)
    adm.leave(b, 4)
    with pytest.raises(OverloadedError) as info:
        adm.enter("m", 7, 8)
    assert info.value.reason == "queued_rows"
    assert "4 rows queued" in str(info.value) and "max_queued_rows" in str(info.value)
    adm.leave(a, 4)
    assert adm.in_flight("m") == (0, 0)
    # Alone, a request larger than the rows limit still runs: it could never run otherwise.
    adm.leave(adm.enter("m", 12, 16), 12)


def test_rate_limit_names_the_limit_and_the_wait() -> None:
    adm = Admission(Limits(rate_limit_per_s=1.0, rate_limit_burst=2))
    assert adm.clients is not None
    adm.clients.clock = Clock()
    adm.check_rate("cert:a")
    adm.check_rate("cert:a")
    with pytest.raises(RateLimitedError) as info:
        adm.check_rate("cert:a")
    msg = str(info.value)
    assert "cert:a" in msg and "1 requests/s" in msg and "burst 2" in msg
    assert "retry after 1.000 s" in msg and "rate_limit_per_s" in msg
    assert info.value.retry_after_s == pytest.approx(1.0)
    adm.check_rate("cert:b")
    assert Admission().clients is None


def test_request_size_counts_payload_bytes() -> None:
    adm = Admission(Limits(max_request_bytes=100))
    adm.check_size("m", {"x": np.zeros(25, np.float32)})
    with pytest.raises(RequestTooLargeError) as info:
        adm.check_size("m", {"x": np.zeros(26, np.float32)})
    assert "104 bytes" in str(info.value) and "at most 100" in str(info.value)
    assert info.value.status is Status.RESOURCE_EXHAUSTED
    words = np.array([b"a" * 60, b"b" * 50], dtype=object)
    assert input_bytes({"w": words}) == 110


def test_the_limits_are_the_agents_settings_of_the_same_names() -> None:
    """One list of guardrail settings: Limits' fields, read from ServeConfig by name, with the
    same defaults (so Limits() in a test is what an agent without settings runs with)."""
    import dataclasses

    from modelfleet.agent.config import ServeConfig, load_config

    defaults = ServeConfig()
    for f in dataclasses.fields(Limits):
        assert getattr(defaults, f.name) == f.default, f.name
    cfg = load_config(
        overrides={"max_concurrent_requests": 5, "rate_limit_per_s": 2.0, "serving_threads": 3}
    )
    lim = Limits.from_settings(cfg)
    assert (lim.max_concurrent_requests, lim.rate_limit_per_s, lim.serving_threads) == (5, 2.0, 3)
    assert Limits.from_settings(defaults) == Limits()
