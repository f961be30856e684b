"""Alert rules, their state machine (fake clock), the store and the webhook queue.

Attackers and faults first: a tampered or replayed notification fails verification; a queued
notification survives a new store on the same file and keeps its idempotency key; attempts are
bounded. Then the rule semantics: pending -> firing after `for`, hysteresis, overrides.
"""

from __future__ import annotations

import json
import math
import os
import stat
import threading
from collections.abc import Collection, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from modelfleet.hub.alert_manager import AlertManager, AlertSettings, AlertStore
from modelfleet.hub.alerts import (
    AlertState,
    Measurement,
    Rule,
    advance,
    effective_rules,
    idempotency_key,
    rules_in_force,
)
from modelfleet.hub.telemetry import WindowStats
from modelfleet.hub.webhooks import (
    KEY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    backoff,
    sign,
    verify,
)
from modelfleet.kernel.errors import InvalidRequestError, ModelNotFoundError
from tests.webhook_receiver import Receiver

SECRET = b"0123456789abcdef-test-secret"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeTelemetry:
    """The window part of the telemetry port, with scripted per-version stats."""

    def __init__(self) -> None:
        # (model, version) -> (requests, failures, p99_ms)
        self.stats: dict[tuple[str, int], tuple[int, int, float]] = {}
        self.calls: list[tuple[str, list[str] | None]] = []

    def window(
        self,
        model: str,
        version: int | None,
        agents: Collection[str] | None,
        since: float,
        until: float,
    ) -> list[WindowStats]:
        self.calls.append((model, None if agents is None else sorted(agents)))
        out = []
        for (m, v), (req, fail, p99) in sorted(self.stats.items()):
            if m != model or (version is not None and v != version):
                continue
            out.append(
                WindowStats(
                    model=m,
                    version=v,
                    requests=req,
                    failures=fail,
                    failures_by_reason={"inference_error": fail} if fail else {},
                    error_rate=fail / req if req else 0.0,
                    request_rate=req / (until - since),
                    p50_ms=p99 / 2,
                    p95_ms=p99,
                    p99_ms=p99,
                    agents=1,
                )
            )
        return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def manager(
    tmp_path: Path, clock: Clock, telemetry: FakeTelemetry, **settings: Any
) -> AlertManager:
    store = AlertStore(tmp_path / "alerts.sqlite", clock=clock)
    cfg = AlertSettings(**{"backoff_s": 1.0, "backoff_max_s": 8.0, "timeout_s": 5.0, **settings})
    return AlertManager(store, telemetry, cfg, clock=clock, hub="hub.test:7443")


# -- signatures: attackers ---------------------------------------------------------------------


def test_signature_verifies_and_a_tampered_body_or_timestamp_fails() -> None:
    body = b'{"state":"firing","value":0.5}'
    now = 1_700_000_000
    headers = {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: sign(SECRET, now, body)}
    assert verify(SECRET, body, headers, now)
    # Header names are case-insensitive on the wire.
    assert verify(SECRET, body, {k.lower(): v for k, v in headers.items()}, now)
    assert not verify(SECRET, body.replace(b"0.5", b"0.0"), headers, now)
    assert not verify(b"another-secret-of-16+bytes", body, headers, now)
    # The timestamp is signed: moving it forward to dodge the replay window breaks it.
    moved = {**headers, TIMESTAMP_HEADER: str(now + 1000)}
    assert not verify(SECRET, body, moved, now + 1000)
    # A faithful replay of an old request is refused by its age.
    assert not verify(SECRET, body, headers, now + 301)
    assert not verify(SECRET, body, {TIMESTAMP_HEADER: str(now)}, now)
    assert not verify(SECRET, body, {**headers, TIMESTAMP_HEADER: "-5"}, now)


def test_webhook_input_is_checked_and_the_store_is_private(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "alerts.sqlite")
    assert stat.S_IMODE(os.stat(tmp_path / "alerts.sqlite").st_mode) == 0o600
    with pytest.raises(InvalidRequestError, match="16 to 4096"):
        store.add_webhook("ops", "http://127.0.0.1:9/x", b"short")
    with pytest.raises(InvalidRequestError, match="http://"):
        store.add_webhook("ops", "file:///etc/passwd", SECRET)
    with pytest.raises(InvalidRequestError, match="credentials"):
        store.add_webhook("ops", "https://user:pw@example.com/x", SECRET)
    with pytest.raises(InvalidRequestError, match="invalid webhook name"):
        store.add_webhook("Ops Team", "https://example.com/x", SECRET)
    store.add_webhook("ops", "https://example.com/x", SECRET)
    with pytest.raises(InvalidRequestError, match="--replace"):
        store.add_webhook("ops", "https://example.com/y", SECRET)
    with pytest.raises(ModelNotFoundError, match="did you mean 'ops'"):
        store.remove_webhook("opz")
    listed = store.webhooks()
    assert [(w.name, w.url) for w in listed] == [("ops", "https://example.com/x")]
    assert "secret" not in repr(listed[0]).lower()


# -- the queue: faults -------------------------------------------------------------------------


def _firing_setup(tmp_path: Path, receiver: Receiver, **settings: Any):
    clock, tel = Clock(), FakeTelemetry()
    m = manager(tmp_path, clock, tel, **settings)
    m.store.add_webhook("ops", receiver.url, SECRET)
    m.store.set_rule(Rule("error-rate", "error_rate", ">", 0.01, for_s=0, min_requests=1))
    tel.stats[("fraud", 2)] = (100, 50, 5.0)
    [t] = m.evaluate(["fraud"], [])
    assert t.state.state == "firing"
    return m, clock, tel


def test_a_queued_notification_survives_a_new_store_and_keeps_its_key(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.status = 503
    m, clock, _ = _firing_setup(tmp_path, receiver)
    assert [s for *_, s in m.deliver_due()] == ["pending"]
    first_key = receiver.requests[0][0][KEY_HEADER]
    m.close()
    # The "restart": a new store and manager on the same file, the receiver back up.
    receiver.status = 200
    clock.now += 60
    m2 = manager(tmp_path, clock, FakeTelemetry())
    assert [s for *_, s in m2.deliver_due()] == ["delivered"]
    assert m2.deliver_due() == []  # delivered once, not again
    keys = [h[KEY_HEADER] for h, _ in receiver.requests]
    assert keys == [first_key, first_key]
    bodies = {b for _, b in receiver.requests}
    assert len(bodies) == 1  # the same bytes on every attempt
    for headers, body in receiver.requests:
        assert verify(SECRET, body, headers, clock.now, tolerance_s=3600)
    assert json.loads(body)["idempotency_key"] == first_key
    [w] = m2.store.webhooks()
    assert (w.delivered, w.pending, w.failed) == (1, 0, 0)
    m2.close()


def test_attempts_are_bounded_with_growing_jittered_backoff(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.status = 500
    m, clock, _ = _firing_setup(tmp_path, receiver, max_attempts=4)
    delays = []
    for _ in range(10):
        m.deliver_due()
        nxt = m.store.next_due()
        if nxt is None:
            break
        delays.append(nxt - clock.now)
        clock.now = nxt
    assert len(receiver.requests) == 4
    assert len(delays) == 3
    assert all(1.0 * 2**i * 0.5 <= d <= 1.0 * 2**i for i, d in enumerate(delays))
    [w] = m.store.webhooks()
    assert (w.delivered, w.pending, w.failed) == (0, 0, 1)
    assert w.last_error == "HTTP 500"
    m.close()


def test_a_redirect_is_an_error_not_a_silent_get(tmp_path: Path) -> None:
    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        r = Receiver()
        r.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        m, _, _ = _firing_setup(tmp_path, r)
        assert [s for *_, s in m.deliver_due()] == ["pending"]
        assert m.store.webhooks()[0].last_error == "HTTP 302"
        m.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_backoff_is_capped() -> None:
    assert all(backoff(a, 1.0, 10.0) <= 10.0 for a in range(1, 40))
    assert backoff(1, 1.0, 10.0) >= 0.5


# -- the state machine (fake clock) ------------------------------------------------------------

RULE = Rule("error-rate", "error_rate", ">", 0.01, for_s=60, clear_for_s=30, min_requests=10)


def run(rule: Rule, values: list[tuple[float, float | None]], requests: int = 100):
    """Feed (time, value) pairs; returns [(time, state)] after each and the transitions."""
    s = AlertState(rule.name, "fraud", 2, "")
    states, transitions = [], []
    for now, value in values:
        m = Measurement(2, value, requests) if value is not None else None
        s, t = advance(rule, s, m, now)
        states.append((now, s.state))
        if t is not None:
            transitions.append(t)
    return states, transitions


def test_pending_becomes_firing_only_after_for() -> None:
    states, ts = run(RULE, [(0, 0.05), (30, 0.05), (59, 0.05), (60, 0.05), (70, 0.05)])
    assert [s for _, s in states] == ["pending", "pending", "pending", "firing", "firing"]
    assert [(t.previous, t.state.state, t.notify) for t in ts] == [
        ("inactive", "pending", False),
        ("pending", "firing", True),
    ]
    assert ts[1].episode == 0  # the episode starts when the condition started holding


def test_a_blip_shorter_than_for_never_fires_or_notifies() -> None:
    states, ts = run(RULE, [(0, 0.05), (30, 0.0), (40, 0.05), (90, 0.05)])
    assert [s for _, s in states] == ["pending", "inactive", "pending", "pending"]
    assert not any(t.notify for t in ts)


def test_resolving_needs_clear_for_and_hysteresis_prevents_flapping() -> None:
    rule = Rule(
        "error-rate", "error_rate", ">", 0.01, for_s=0, clear_for_s=30, clear_threshold=0.005
    )
    states, ts = run(
        rule,
        [
            (0, 0.02),  # fires at once (for 0)
            (10, 0.008),  # below the threshold but above the clear threshold: still firing
            (20, 0.004),  # clear starts
            (40, 0.004),
            (45, 0.02),  # back up before clear_for: the clear timer restarts
            (50, 0.004),
            (79, 0.004),
            (80, 0.004),  # clear for 30 s: resolved
        ],
    )
    assert [s for _, s in states] == [
        "firing",
        "firing",
        "firing",
        "firing",
        "firing",
        "firing",
        "firing",
        "resolved",
    ]
    assert [(t.previous, t.state.state) for t in ts] == [
        ("inactive", "firing"),
        ("firing", "resolved"),
    ]
    # Both notifications of the episode have distinct, stable keys.
    assert idempotency_key(ts[0]) != idempotency_key(ts[1])
    assert idempotency_key(ts[1]) == idempotency_key(ts[1])


def test_too_few_requests_is_no_data_and_no_data_clears() -> None:
    states, _ = run(RULE, [(0, 1.0)], requests=3)  # 3 failures of 3 are not an error rate
    assert states == [(0, "inactive")]
    rule = Rule("r", "error_rate", ">", 0.01, for_s=0, clear_for_s=10)
    states, _ = run(rule, [(0, 0.5), (5, None), (15, None)])
    assert [s for _, s in states] == ["firing", "firing", "resolved"]


def test_rule_validation_names_the_problem() -> None:
    with pytest.raises(InvalidRequestError, match="unknown metric 'cpu'"):
        Rule("r", "cpu", ">", 1).validate()
    with pytest.raises(InvalidRequestError, match="could never resolve"):
        Rule("r", "error_rate", ">", 0.01, clear_threshold=0.02).validate()
    with pytest.raises(InvalidRequestError, match="finite"):
        Rule("r", "error_rate", ">", math.nan).validate()
    with pytest.raises(InvalidRequestError, match="invalid rule name"):
        Rule("Bad Name", "error_rate").validate()
    with pytest.raises(InvalidRequestError, match="unknown rule field"):
        Rule.from_dict({"name": "r", "metric": "error_rate", "colour": "red"})
    Rule("r", "latency_p99_ms", "<", 5, clear_threshold=10).validate()  # "<": clears above


# -- overrides ---------------------------------------------------------------------------------


def test_builtins_are_the_product_defaults_and_overridable_per_model_and_selector() -> None:
    builtins = {r.name: r for r in rules_in_force([])}
    assert (builtins["latency-p99"].metric, builtins["latency-p99"].threshold) == (
        "latency_p99_ms",
        100.0,
    )
    assert (builtins["error-rate"].metric, builtins["error-rate"].threshold) == (
        "error_rate",
        0.01,
    )
    assert builtins["drift-psi"].threshold == 0.2
    stored = [
        Rule("fraud-errors", "error_rate", ">", 0.05, model="fraud"),
        Rule("quiet-latency", "latency_p99_ms", ">", 100, model="batch-*", enabled=False),
        Rule("berlin-latency", "latency_p99_ms", ">", 50, selector={"site": "berlin"}),
    ]
    rules = rules_in_force(stored)

    def names(model: str) -> set[str]:
        return {r.name for r in effective_rules(rules, model)}

    # fraud: its own error-rate rule replaces the built-in; latency as everywhere.
    assert names("fraud") == {
        "fraud-errors",
        "latency-p99",
        "berlin-latency",
        "drift-psi",
        "accuracy-drop",
    }
    assert "error-rate" in names("churn")
    # A disabled override silences the fleet-wide latency rule for the models it matches.
    assert "latency-p99" not in names("batch-nightly")
    assert "berlin-latency" in names("batch-nightly")
    # A stored rule named like a built-in replaces it everywhere.
    replaced = rules_in_force([Rule("error-rate", "error_rate", ">", 0.2)])
    assert next(r for r in replaced if r.name == "error-rate").threshold == 0.2


def test_manager_fires_per_version_and_selector_and_reports_no_data_kinds(
    tmp_path: Path, receiver: Receiver
) -> None:
    clock, tel = Clock(), FakeTelemetry()
    m = manager(tmp_path, clock, tel)
    m.store.add_webhook("ops", receiver.url, SECRET)
    m.store.add_webhook("ml", receiver.url, SECRET)
    m.store.set_rule(Rule("error-rate", "error_rate", ">", 0.01, for_s=10, min_requests=1))
    m.store.set_rule(
        Rule(
            "berlin-slow",
            "latency_p99_ms",
            ">",
            50,
            for_s=0,
            selector={"site": "berlin"},
            webhooks=("ml",),
            retrain=True,
        )
    )
    tel.stats[("fraud", 1)] = (100, 0, 10.0)
    tel.stats[("fraud", 2)] = (100, 20, 80.0)
    agents = [("a1", {"site": "berlin"}), ("a2", {"site": "paris"})]
    ts = m.evaluate(["fraud"], agents)
    # v2's latency fires at once for berlin's agents; its error rate is pending.
    assert sorted((t.state.rule, t.state.version, t.state.state) for t in ts) == [
        ("berlin-slow", 2, "firing"),
        ("error-rate", 2, "pending"),
    ]
    assert ("fraud", ["a1"]) in tel.calls
    clock.now += 10
    ts = m.evaluate(["fraud"], agents)
    assert [(t.state.rule, t.state.state) for t in ts] == [("error-rate", "firing")]
    sent = sorted((o["webhook"], json.loads(o["body"])["rule"]) for o in m.store.outbox())
    # berlin-slow only to ml; error-rate to every webhook.
    assert sent == [("ml", "berlin-slow"), ("ml", "error-rate"), ("ops", "error-rate")]
    m.deliver_due()
    bodies = [json.loads(b) for _, b in receiver.requests]
    slow = next(b for b in bodies if b["rule"] == "berlin-slow")
    assert slow["retrain"]["model"] == "fraud" and slow["retrain"]["version"] == 2
    assert slow["retrain"]["captured_data"] is None  # reserved for inference capture
    assert slow["retrain"]["evidence"]["p99_ms"] == 80.0
    assert slow["selector"] == "site=berlin"
    err = next(b for b in bodies if b["rule"] == "error-rate")
    assert (err["state"], err["value"], err["threshold"]) == ("firing", 0.2, 0.01)
    assert err["evidence"]["failures_by_reason"] == {"inference_error": 20}
    assert "retrain" not in err
    # Evaluating again changes nothing and sends nothing new.
    assert m.evaluate(["fraud"], agents) == []
    assert len(m.store.outbox()) == 3
    # Drift and accuracy rules exist and say why they do not evaluate.
    no_data = {s.rule.name: s.no_data for s in m.rule_statuses()}
    assert no_data["drift-psi"].startswith("no data yet")
    assert no_data["accuracy-drop"].startswith("no data yet")
    assert no_data["error-rate"] == ""
    # The history has every transition.
    assert sorted((e.rule, e.state) for e in m.store.history()) == [
        ("berlin-slow", "firing"),
        ("error-rate", "firing"),
        ("error-rate", "pending"),
    ]
    m.close()


def test_a_registered_source_makes_drift_rules_evaluate(tmp_path: Path) -> None:
    class Drift:
        no_data_reason = ""

        def measure(self, model, agents, since, until):
            return [Measurement(3, 0.35, 1000, {"feature": "amount", "psi": 0.35})]

    clock, tel = Clock(), FakeTelemetry()
    m = manager(tmp_path, clock, tel)
    m.register_source("drift_psi", Drift())
    m.store.set_rule(Rule("drift-psi", "drift_psi", ">", 0.2, for_s=0, retrain=True))
    [t] = m.evaluate(["fraud"], [])
    assert (t.state.rule, t.state.version, t.state.state) == ("drift-psi", 3, "firing")
    m.close()


def test_removing_a_firing_rule_resolves_its_alert_and_a_builtin_comes_back(
    tmp_path: Path, receiver: Receiver
) -> None:
    clock, tel = Clock(), FakeTelemetry()
    m = manager(tmp_path, clock, tel)
    m.store.add_webhook("ops", receiver.url, SECRET)
    m.store.set_rule(Rule("fraud-errors", "error_rate", ">", 0.01, for_s=0, model="fraud"))
    tel.stats[("fraud", 1)] = (100, 50, 5.0)
    m.evaluate(["fraud"], [])
    assert m.store.remove_rule("fraud-errors") is False
    assert "fraud-errors" not in {r.name for r in m.store.rules()}
    clock.now += 5
    ts = m.evaluate(["fraud"], [])
    # The built-in error-rate rule applies to fraud again: pending.
    assert ("error-rate", "pending") in [(t.state.rule, t.state.state) for t in ts]
    [t] = [t for t in ts if t.state.rule == "fraud-errors"]
    # Someone was paged for it: the end is notified too, with the removed rule's definition.
    assert (t.state.rule, t.previous, t.state.state, t.notify) == (
        "fraud-errors",
        "firing",
        "resolved",
        True,
    )
    assert not [s for s in m.store.states().values() if s.rule == "fraud-errors"]
    assert m.store.removed_rules() == []
    m.deliver_due()
    assert [json.loads(b)["state"] for _, b in receiver.requests] == ["firing", "resolved"]
    m.store.set_rule(Rule("error-rate", "error_rate", ">", 0.5))
    assert m.store.remove_rule("error-rate") is True
    with pytest.raises(InvalidRequestError, match="built in"):
        m.store.remove_rule("error-rate")
    with pytest.raises(ModelNotFoundError, match="no alert rule"):
        m.store.remove_rule("nope")
    # A removed name can be used again.
    m.store.set_rule(Rule("fraud-errors", "error_rate", ">", 0.02, model="fraud"))
    assert "fraud-errors" in {r.name for r in m.store.rules()}
    m.close()


def test_changing_a_rule_keeps_its_alert_and_judges_it_by_the_new_definition(
    tmp_path: Path,
) -> None:
    clock, tel = Clock(), FakeTelemetry()
    m = manager(tmp_path, clock, tel)
    m.store.set_rule(Rule("error-rate", "error_rate", ">", 0.01, for_s=0, clear_for_s=0))
    tel.stats[("fraud", 1)] = (100, 5, 5.0)
    [t] = m.evaluate(["fraud"], [])
    assert t.state.state == "firing"
    clock.now += 5
    assert m.evaluate(["fraud"], []) == []  # unchanged: no second firing
    m.store.set_rule(Rule("error-rate", "error_rate", ">", 0.1, for_s=0, clear_for_s=0))
    clock.now += 5
    [t] = m.evaluate(["fraud"], [])
    assert (t.previous, t.state.state) == ("firing", "resolved")
    m.close()
