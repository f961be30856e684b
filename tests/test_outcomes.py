"""Late labels: the figures and their intervals, the outcome store (idempotent, all or nothing),
the Parquet file checks, the join with files the agent's real capture writer wrote, the
accuracy_drop source and the rollout's accuracy gate (sans-IO, time injected)."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.serving.capture import Capture, CaptureLimits, CaptureRule, complete_files
from modelfleet.hub.accuracy import auc, classification, regression, wilson
from modelfleet.hub.alerts import AccuracySource, AlertState, Rule, advance
from modelfleet.hub.capture import CaptureStore
from modelfleet.hub.cli_outcomes import read_outcomes
from modelfleet.hub.outcomes import OutcomeRow, OutcomeService, OutcomeStore, check_outcomes
from modelfleet.hub.rollouts import Gate, Rollout, Spec, Stats
from modelfleet.kernel.errors import InvalidRequestError

# -- the figures ---------------------------------------------------------------------------------


def test_wilson_interval_matches_the_formula_and_stays_in_range() -> None:
    i = wilson(8, 10)
    assert i is not None
    assert i.value == 0.8
    # Wilson's 95% interval for 8/10 (a textbook figure).
    assert i.low == pytest.approx(0.4902, abs=1e-4) and i.high == pytest.approx(0.9433, abs=1e-4)
    edge = wilson(10, 10)
    assert edge is not None and edge.high == 1.0 and 0.6 < edge.low < 0.75
    assert wilson(0, 0) is None
    # Wider with fewer labels.
    small, big = wilson(45, 50), wilson(900, 1000)
    assert small is not None and big is not None
    assert small.high - small.low > big.high - big.low


def test_auc_is_the_pairwise_probability_with_ties_counted_half() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = np.round(y * 0.7 + rng.normal(0, 0.6, 300), 1)  # rounded: many ties
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg)])
    got = auc(s, y)
    assert got is not None
    assert got.value == pytest.approx(brute, abs=1e-12)
    assert got.low < got.value < got.high
    assert auc([0.1, 0.2], [1, 1]) is None  # one class: no AUC
    perfect = auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert perfect is not None and perfect.value == 1.0


def test_binary_classifier_from_scores_or_one_probability() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    # Two class scores: argmax; one output: the probability of class 1.
    scores = np.array([[0, 1], [0, 2], [1, 0], [2, 0], [0, 1], [3, 0], [0, 1], [1, 0]], float)
    probs = np.array([[0.9], [0.8], [0.2], [0.1], [0.6], [0.0], [0.7], [0.3]])
    for out in (scores, probs):
        q = classification(out, labels)
        assert q.labelled == 8 and q.accuracy is not None and q.accuracy.value == 6 / 8
        assert q.precision is not None and q.precision.value == 3 / 4  # TP 3, FP 1
        assert q.recall is not None and q.recall.value == 3 / 4  # TP 3, FN 1
        assert q.auc is not None and 0.5 < q.auc.value <= 1.0
        assert q.mae is None and q.rmse is None


def test_multiclass_has_macro_precision_recall_with_a_bootstrap_interval() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    right = rng.random(500) < 0.8
    pred = np.where(right, y, (y + 1) % 3)
    out = np.eye(3)[pred]
    q = classification(out, y)
    assert q.accuracy is not None and q.accuracy.value == pytest.approx(right.mean())
    assert q.precision is not None and q.precision.low < q.precision.value < q.precision.high
    assert q.recall is not None and abs(q.recall.value - 0.8) < 0.06
    assert q.auc is None  # AUC only for two classes
    assert classification(out, y) == q  # a fixed seed: the same data, the same interval


def test_regression_mae_rmse_intervals_cover_the_truth() -> None:
    rng = np.random.default_rng(1)
    truth = rng.normal(0, 1, 2000)
    pred = truth + rng.normal(0, 0.5, 2000)
    q = regression(pred, truth)
    assert q.mae is not None and q.rmse is not None
    assert q.mae.low < 0.5 * math.sqrt(2 / math.pi) < q.mae.high  # E|N(0, 0.5)|
    assert q.rmse.low < 0.5 < q.rmse.high
    assert q.accuracy is None


# -- the store -----------------------------------------------------------------------------------


def test_reimport_is_idempotent_and_the_last_label_wins(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "o.sqlite")
    rows = [OutcomeRow(f"r{i}", label=i % 2) for i in range(10)]
    assert store.put("m", rows) == (10, 0)
    assert store.put("m", rows) == (0, 10)
    ids, targets, kind = store.targets("m")
    assert len(ids) == 10 and kind == "label"
    store.put("m", [OutcomeRow("r0", label=1)])  # a corrected label
    ids, targets, _ = store.targets("m")
    assert dict(zip(ids, targets, strict=True))["r0"] == 1.0 and len(ids) == 10
    store.close()
    # Durable: a new connection (a restarted hub) sees the same.
    again = OutcomeStore(tmp_path / "o.sqlite")
    assert len(again.targets("m")[0]) == 10
    again.close()


def test_a_bad_batch_stores_nothing(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "o.sqlite")
    with pytest.raises(InvalidRequestError, match=r"outcome 3 \('r0'\) repeats .* outcome 1"):
        store.put("m", [OutcomeRow("r0", label=0), OutcomeRow("r1", label=1)] * 2)
    with pytest.raises(InvalidRequestError, match=r"has label -1; labels are class indices"):
        store.put("m", [OutcomeRow("r0", label=0), OutcomeRow("r1", label=-1)])
    assert store.targets("m")[0] == []
    store.put("m", [OutcomeRow("r0", label=0)])
    with pytest.raises(InvalidRequestError, match="has label outcomes and this batch has values"):
        store.put("m", [OutcomeRow("r9", value=1.5)])
    with pytest.raises(InvalidRequestError, match="mixes labels and values"):
        check_outcomes("m", [OutcomeRow("a", label=1), OutcomeRow("b", value=1.0)])
    with pytest.raises(InvalidRequestError, match="not a model name"):
        check_outcomes("../etc", [OutcomeRow("a", label=1)])
    with pytest.raises(InvalidRequestError, match="empty or over-long request id"):
        check_outcomes("m", [OutcomeRow("", label=1)])
    with pytest.raises(InvalidRequestError, match="neither a label nor a value"):
        check_outcomes("m", [OutcomeRow("a")])
    with pytest.raises(InvalidRequestError, match="value nan"):
        check_outcomes("m", [OutcomeRow("a", value=float("nan"))])
    with pytest.raises(InvalidRequestError, match="not an accuracy"):
        store.set_baseline("m", 1.5, "admin")
    store.close()


# -- the file ------------------------------------------------------------------------------------


def _write(path: Path, **cols: list) -> Path:
    pq.write_table(pa.table(cols), path)
    return path


def test_outcome_files_are_read_and_malformed_ones_named(tmp_path: Path) -> None:
    good = _write(
        tmp_path / "good.parquet",
        request_id=["a", "b"],
        label=[1, 0],
        time=pa.array([1_700_000_000_000, None], pa.timestamp("ms")),
    )
    rows = read_outcomes(good, "m")["m"]
    assert rows[0] == OutcomeRow("a", label=1, time=1_700_000_000.0)
    assert rows[1].time == 0.0
    by_model = read_outcomes(
        _write(tmp_path / "two.parquet", request_id=["a", "a"], value=[1.0, 2], model=["x", "y"])
    )
    assert set(by_model) == {"x", "y"} and by_model["y"][0].value == 2.0

    cases = [
        ({"id": ["a"], "label": [1]}, "no request_id column \\(it has id, label\\)"),
        ({"request_id": ["a"]}, "no label or value column"),
        ({"request_id": ["a"], "label": [1], "value": [1.0]}, "both a label and a value"),
        ({"request_id": ["a", "b"], "label": ["cat", "dog"]}, "column label is string"),
        ({"request_id": ["a", "b", "c"], "label": [1.0, 0.0, 0.5]}, "row 3: label 0.5 is not"),
        ({"request_id": ["a", None], "label": [1, 0]}, "row 2: request_id is empty"),
        ({"request_id": ["a", "b"], "label": [1, None]}, "row 2: label is empty"),
        (
            {"request_id": ["a", "b", "a"], "label": [1, 0, 1]},
            "row 3: request_id 'a' repeats row 1",
        ),
        ({"request_id": ["a"], "value": [float("nan")]}, "row 1: value nan is not a number"),
        ({"request_id": ["a"], "label": [1], "time": ["noon"]}, "column time is string"),
        ({"request_id": ["a"], "label": [1], "model": ["other"]}, "model 'other', but --model"),
    ]
    for i, (cols, message) in enumerate(cases):
        f = _write(tmp_path / f"bad{i}.parquet", **cols)
        with pytest.raises(InvalidRequestError, match=message):
            read_outcomes(f, "m")
    with pytest.raises(InvalidRequestError, match="no model column; give --model"):
        read_outcomes(good)
    text = tmp_path / "labels.csv"
    text.write_text("request_id,label\na,1\n")
    with pytest.raises(InvalidRequestError, match=r"cannot read it as Parquet.*request_id"):
        read_outcomes(text, "m")
    with pytest.raises(InvalidRequestError, match="no such file"):
        read_outcomes(tmp_path / "missing.parquet", "m")


# -- the join ------------------------------------------------------------------------------------


def _captured(tmp_path: Path, hub_root: Path, agent: str, rows: list[tuple]) -> None:
    """Rows (request id, version, arm, scores) through the agent's own capture writer, then
    stored where the hub keeps shipped files."""
    work = tmp_path / f"agent-{agent}-{len(list(tmp_path.iterdir()))}"
    cap = Capture(CaptureLimits(work / "cap"), AgentMetrics(), work)
    cap.set_rule("m", CaptureRule(10_000))
    for rid, version, arm, scores in rows:
        x = {"x": np.zeros((1, 2), np.float32)}
        cap.offer(rid, "m", version, arm, x, {"scores": np.array([scores], np.float32)})
    cap.close()
    for f in complete_files(work / "cap"):
        dest = hub_root / "m" / agent / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)


def _service(tmp_path: Path) -> OutcomeService:
    return OutcomeService(OutcomeStore(tmp_path / "o.sqlite"), CaptureStore(tmp_path / "capture"))


def test_accuracy_per_version_and_arm_with_unmatched_outcomes(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    assert "no outcomes" in svc.accuracy("m").note
    right, wrong = [0.0, 1.0], [1.0, 0.0]  # label 1 is the truth of every request
    rows = [(f"a{i}", 1, "active", right) for i in range(40)]
    rows += [(f"b{i}", 2, "candidate", right if i < 10 else wrong) for i in range(20)]
    rows += [(f"c{i}", 2, "active", right) for i in range(20)]
    _captured(tmp_path, tmp_path / "capture", "edge-1", rows)
    labels = [OutcomeRow(r[0], label=1) for r in rows] + [OutcomeRow("lost", label=1)]
    svc.report("m", labels)
    rep = svc.accuracy("m")
    assert rep.outcomes == 81 and rep.unmatched == 1
    got = {(g.version, g.arm): g.quality for g in rep.groups}
    acc = {k: (q.labelled, q.accuracy.value if q.accuracy else None) for k, q in got.items()}
    assert acc[(1, "*")] == (40, 1.0) and acc[(1, "active")] == (40, 1.0)
    assert acc[(2, "candidate")] == (20, 0.5) and acc[(2, "active")] == (20, 1.0)
    assert acc[(2, "*")] == (40, 0.75)
    assert got[(2, "*")].accuracy.low < 0.75 < got[(2, "*")].accuracy.high  # type: ignore[union-attr]
    assert rep.version(2) == got[(2, "*")]
    # Per version, and only one agent's files.
    assert {g.version for g in svc.accuracy("m", version=2).groups} == {2}
    assert svc.accuracy("m", agents=["edge-9"]).groups == []
    # The reference of v2 is v1 (enough labels), or the operator's baseline once set.
    assert svc.reference("m", 2, 30) == (1.0, "v1")
    assert svc.reference("m", 2, 41) is None
    source = AccuracySource(svc)
    (m1, m2) = source.measure("m", None, 0, 0)
    assert m1.value is None  # v1 has no older version to compare with
    assert m2.version == 2 and m2.value == pytest.approx(0.25) and m2.requests == 40
    assert m2.evidence["reference_from"] == "v1" and m2.evidence["unmatched"] == 1
    # The built-in rule (accuracy drop > 0.05) fires on it.
    rule = Rule("accuracy-drop", "accuracy_drop", ">", 0.05, for_s=0)
    state, t = advance(rule, AlertState(rule.name, "m", 2, ""), m2, now=10.0)
    assert state.state == "firing" and t is not None and t.notify
    svc.store.set_baseline("m", 0.9, "admin")
    assert svc.reference("m", 2, 30) == (0.9, "baseline")
    assert source.measure("m", None, 0, 0)[1].value == pytest.approx(0.15)
    # Only predictions after a moment count with since.
    later = time.time() + 0.05
    time.sleep(0.1)
    _captured(tmp_path, tmp_path / "capture", "edge-2", [("d0", 3, "active", right)])
    svc.report("m", [OutcomeRow("d0", label=1)])
    assert [g.version for g in svc.accuracy("m", since=later).groups] == [3, 3]
    with pytest.raises(InvalidRequestError, match=r"no captured output 'probs'.*scores"):
        svc.accuracy("m", output="probs")
    svc.close()


def test_regression_outcomes_give_mae_and_rmse(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    rows = [(f"r{i}", 1, "active", [float(i)]) for i in range(50)]
    _captured(tmp_path, tmp_path / "capture", "edge-1", rows)
    svc.report("m", [OutcomeRow(f"r{i}", value=i + (1 if i % 2 else -1)) for i in range(50)])
    q = svc.accuracy("m").version(1)
    assert q is not None and q.task == "regression" and q.labelled == 50
    assert q.mae is not None and q.mae.value == pytest.approx(1.0)
    assert q.rmse is not None and q.rmse.value == pytest.approx(1.0)
    assert q.accuracy is None
    svc.close()


# -- the rollout gate ----------------------------------------------------------------------------


@dataclass
class LabelledFleet:
    """Agents switch when assigned; telemetry is plentiful; labels are what the test says."""

    active: dict[str, int]
    labels: dict[int, tuple[int, float | None]] = field(default_factory=dict)
    baseline: float | None = None

    def apply(self, assignments: list[tuple[str, int]]) -> None:
        for agent, version in assignments:
            self.active[agent] = version

    def active_version(self, agent_id: str) -> int | None:
        return self.active.get(agent_id)

    def refusal(self, agent_id: str, version: int) -> str | None:
        return None

    def prepared(self, agent_id: str, version: int) -> bool:
        return False

    def stats(self, version: int, agents: Collection[str], since: float, until: float) -> Stats:
        return Stats(requests=1000)

    def samples(self, version: int, agents: Collection[str], since: float, until: float) -> list:
        return []

    def accuracy(self, version: int, since: float) -> tuple[int, float | None]:
        return self.labels.get(version, (0, None))

    def accuracy_baseline(self) -> float | None:
        return self.baseline


def _rollout(gate: str) -> tuple[Rollout, LabelledFleet]:
    agents = ["a0", "a1"]
    spec = Spec("m", 2, {}, ["100%"], bake_s=10, gates=[gate], max_bake_s=60, min_labels=30)
    fleet = LabelledFleet({a: 1 for a in agents}, labels={1: (500, 0.95)})
    r = Rollout.new(1, spec, agents, {a: 1 for a in agents}, now=0)
    return r, fleet


def _run(r: Rollout, fleet: LabelledFleet, now: float) -> None:
    fleet.apply(r.step(now, fleet))


def test_accuracy_gate_waits_for_labels_then_rolls_back_a_worse_version() -> None:
    r, fleet = _rollout("accuracy_drop<0.02")
    _run(r, fleet, 0)
    _run(r, fleet, 1)
    assert r.state == "baking"
    fleet.labels[2] = (12, 0.5)  # too few labels: the bake goes on
    _run(r, fleet, 11)
    assert r.state == "baking"
    assert any("waiting for labels" in e["text"] for e in r.events)
    gate = r.look["gates"][0]
    assert gate["ok"] is None and "12 of 30 labelled" in gate["note"]
    fleet.labels[2] = (40, 0.70)
    _run(r, fleet, 20)
    assert r.state in ("rolling_back", "rolled_back")
    assert "accuracy_drop=0.25" in r.reason
    assert all(v == 1 for v in fleet.active.values())


def test_accuracy_gate_passes_a_good_version_and_pauses_without_labels() -> None:
    r, fleet = _rollout("accuracy_drop<0.02")
    fleet.labels[2] = (100, 0.96)
    _run(r, fleet, 0)
    _run(r, fleet, 1)
    _run(r, fleet, 11)
    assert r.state == "done"
    ev = r.gate_values[-1]["gates"][0]
    assert ev["ok"] is True and ev["baseline"] == 0.95 and ev["value"] == pytest.approx(-0.01)
    # No labels at all: baking on up to --max-bake, then paused for an operator.
    r2, fleet2 = _rollout("accuracy>=0.9")
    for now in (0, 1, 11, 40, 70):
        _run(r2, fleet2, now)
    assert r2.state == "paused" and "too few labels" in r2.reason
    # No reference: the previous version lacks labels and no baseline is set.
    r3, fleet3 = _rollout("accuracy_drop<0.02")
    fleet3.labels = {2: (100, 0.9), 1: (5, 0.99)}
    for now in (0, 1, 11):
        _run(r3, fleet3, now)
    assert "reference v1 has 5 of 30" in r3.look["gates"][0]["note"]
    fleet3.baseline = 0.95
    _run(r3, fleet3, 17)
    assert r3.state in ("rolling_back", "rolled_back")
    assert str(Gate.parse("accuracy>=0.9")) == "accuracy>=0.9"
    with pytest.raises(InvalidRequestError, match="--min-labels"):
        Spec("m", 2, {}, ["100%"], 1, [], min_labels=0).validate()


# -- the experiment gate -------------------------------------------------------------------------


def test_a_split_experiment_is_judged_on_late_labels(tmp_path: Path) -> None:
    from tests.test_experiments import Clock, Experiments, TelemetryStore, _noop, make_registry
    from tests.test_experiments import start as start_experiment

    clock = Clock()
    reg = make_registry(tmp_path / "r.db", clock)
    store = TelemetryStore(tmp_path / "t.duckdb", retention_s=86400, clock=clock)
    x = Experiments(reg, _noop, lambda: [], store, clock=clock)
    svc = _service(tmp_path)
    x.outcomes = svc
    try:
        with pytest.raises(InvalidRequestError, match="accuracy gates need a split"):
            start_experiment(x, split_percent=0.0, shadow_percent=10.0, gates=["accuracy>=0.9"])
        e = start_experiment(x, split_percent=50.0, gates=["accuracy_drop<0.05"])
        st = x.status(e)
        (g,) = st.shadow_gates
        assert g.ok is None and "0 of 30 labelled predictions of v2" in g.why
        right, wrong = [0.0, 1.0], [1.0, 0.0]
        rows = [(f"a{i}", 1, "active", right) for i in range(40)]
        rows += [(f"c{i}", 2, "candidate", right if i % 2 else wrong) for i in range(40)]
        _captured(tmp_path, tmp_path / "capture", "b1", rows)
        svc.report("m", [OutcomeRow(r[0], label=1) for r in rows])
        st = x.status(e)
        (g,) = st.shadow_gates
        assert g.ok is False and g.value == pytest.approx(0.5)
        assert "reference 1 from the active arm" in g.why
        assert st.verdict.startswith("fail: accuracy_drop<0.05")
    finally:
        svc.close()
        store.close()
        reg.close()


# -- the gRPC edge -------------------------------------------------------------------------------


def test_outcomes_service_takes_admin_identities_only(tmp_path: Path) -> None:
    """A real mTLS gRPC server with the hub's servicer: an agent's certificate is refused, an
    admin's is served, and a malformed batch comes back as INVALID_ARGUMENT naming the outcome."""
    import asyncio
    import threading

    import grpc

    from modelfleet.hub.ca import CertificateAuthority
    from modelfleet.hub.outcomes_server import OutcomesServicer
    from modelfleet.kernel.identity import generate_key
    from modelfleet.protos import fleet_pb2 as pb
    from modelfleet.protos import fleet_pb2_grpc as pb_grpc
    from tests.test_identity import Node, key_pem

    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    key = generate_key()
    chain = ca.issue_server_cert(key.public_key(), ["127.0.0.1"]) + ca.cert_pem
    svc = _service(tmp_path)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_HubOutcomesServicer_to_server(OutcomesServicer(svc), server)
        creds = grpc.ssl_server_credentials(
            [(key_pem(key), chain)], root_certificates=ca.cert_pem, require_client_auth=True
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    one = pb.ReportOutcomesRequest(model="m", outcomes=[pb.Outcome(request_id="r1", label=1)])
    try:
        agent = Node(ca, "agent:edge-1").credentials(ca.cert_pem)
        with grpc.secure_channel(f"127.0.0.1:{port}", agent) as channel:
            stub = pb_grpc.HubOutcomesStub(channel)
            for fn, request in (
                (stub.ReportOutcomes, one),
                (stub.Accuracy, pb.AccuracyRequest(model="m")),
                (stub.SetAccuracyBaseline, pb.SetAccuracyBaselineRequest(model="m", clear=True)),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    fn(request, timeout=10)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert svc.store.targets("m")[0] == []
        admin = Node(ca, "admin:ops").credentials(ca.cert_pem)
        with grpc.secure_channel(f"127.0.0.1:{port}", admin) as channel:
            stub = pb_grpc.HubOutcomesStub(channel)
            assert stub.ReportOutcomes(one, timeout=10).added == 1
            assert stub.ReportOutcomes(one, timeout=10).replaced == 1
            bad = pb.ReportOutcomesRequest(model="m", outcomes=[pb.Outcome(request_id="r2")])
            with pytest.raises(grpc.RpcError) as invalid:
                stub.ReportOutcomes(bad, timeout=10)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "outcome 1 ('r2') has neither a label nor a value" in (
                invalid.value.details() or ""
            )
            shown = stub.Accuracy(pb.AccuracyRequest(model="m"), timeout=10)
            assert shown.outcomes == 1 and "no captured predictions" in shown.note
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        svc.close()
