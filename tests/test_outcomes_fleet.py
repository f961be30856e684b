"""Late labels through a real hub and a real agent: capture on, a rollout of a worse classifier
under an accuracy gate, predictions shipped to the hub, labels imported with
`modelfleet-hub outcomes import`; per-version accuracy appears in `outcomes show` and the gate
rolls the worse version back. An agent identity may not send outcomes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelfleet.protos import fleet_pb2 as pb
from modelfleet.protos import fleet_pb2_grpc as pb_grpc
from tests import models
from tests.procs import AgentProcess, HubProcess, agent_status, enroll_agent, wait_for

pytestmark = pytest.mark.process

MODEL = "lin"
FAST = {
    "MODELFLEET_AGENT_REPORT_INTERVAL_S": "0.5",
    "MODELFLEET_AGENT_BACKOFF_MAX_S": "1",
    "MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "1",
    "MODELFLEET_AGENT_CAPTURE_ROTATE_S": "0.5",
    "MODELFLEET_AGENT_CAPTURE_SHIP_INTERVAL_S": "0.3",
}
# Scores = x @ W. The good model's class is [x0 > 0], the truth; the worse one looks at x1,
# which is independent of the truth: right about half the time.
GOOD = np.array([[-1.0, 1.0], [0.0, 0.0]])
WORSE = np.array([[0.0, 0.0], [-1.0, 1.0]])
N = 60


def _active(agent: AgentProcess) -> int:
    try:
        return int(agent_status(agent.admin_socket).get(MODEL, {}).get("active_version", 0))
    except Exception:
        return -1


def _captured(agent: AgentProcess) -> int:
    m = re.search(
        rf'modelfleet_capture_requests_total\{{model="{MODEL}",outcome="captured"\}} (\S+)',
        agent.metrics(),
    )
    return int(float(m.group(1))) if m else 0


def _hub_rows(hub: HubProcess) -> list[dict]:
    if not list((hub.data / "capture" / MODEL).glob("*/*.parquet")):
        return []
    sql = "SELECT request_id, version FROM capture"
    return json.loads(hub.cli("capture", "query", MODEL, sql, "--json"))


def _send(agent: AgentProcess, prefix: str, truth: dict[str, int], seed: int) -> None:
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(seed)
    with grpcclient.InferenceServerClient(agent.url) as c:
        for i in range(N):
            x = rng.normal(0, 1, (1, 2)).astype(np.float32)
            inp = grpcclient.InferInput("x", [1, 2], "FP32")
            inp.set_data_from_numpy(x)
            rid = f"{prefix}-{i}"
            c.infer(MODEL, [inp], request_id=rid)
            truth[rid] = int(x[0, 0] > 0)


def _status(hub: HubProcess) -> dict:
    return json.loads(hub.cli("rollout", "status", MODEL, "--json"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    root = tmp_path_factory.mktemp("outcomes")
    hub = HubProcess(root / "hub", log_path=root / "hub.log").start()
    agent = None
    try:
        config = enroll_agent(hub, root / "a0", "site=berlin", hostname="edge-0")
        agent = AgentProcess(
            root / "a0", fleet_config=config, env=FAST, log_path=root / "a0.log"
        ).start()
        hub.cli("capture", "set", MODEL, "--rate", "100")
        hub.cli("publish", MODEL, str(models.linear_classifier(root / "good.onnx", GOOD)))
        hub.cli("publish", MODEL, str(models.linear_classifier(root / "worse.onnx", WORSE)))
        hub.cli("deploy", MODEL, "1")
        wait_for(lambda: _active(agent) == 1, 120, f"{MODEL} v1 on the agent")
        yield root, hub, agent
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()


def test_late_labels_give_accuracy_and_roll_back_a_worse_version(fleet) -> None:
    root, hub, agent = fleet
    truth: dict[str, int] = {}
    _send(agent, "a", truth, seed=1)
    out = hub.cli(
        "rollout",
        "start",
        MODEL,
        "2",
        "--waves",
        "100",
        "--bake",
        "1s",
        "--max-bake",
        "120s",
        "--judge",
        "none",
        "--gate",
        "accuracy_drop<0.05",
        "--min-labels",
        "30",
        "--agent-timeout",
        "60s",
    )
    assert "min-labels 30" in out
    wait_for(lambda: _active(agent) == 2, 60, f"{MODEL} v2 on the agent")
    _send(agent, "b", truth, seed=2)

    # Every captured prediction of both versions reaches the hub.
    def shipped() -> bool:
        n = _captured(agent)
        return n >= 2 * N and len(_hub_rows(hub)) == n

    wait_for(shipped, 60, "every captured prediction on the hub", interval=0.5)
    # No labels yet: the wave bakes on, waiting for them (not passed, not rolled back).
    wait_for(
        lambda: any("waiting for labels" in e["text"] for e in _status(hub)["events"]),
        30,
        "the rollout waiting for labels",
    )
    assert _status(hub)["state"] == "baking"

    rows = _hub_rows(hub)
    ids = [r["request_id"] for r in rows] + ["never-sent-1", "never-sent-2", "never-sent-3"]
    labels = [truth.get(i, 1) for i in ids]
    f = root / "labels.parquet"
    pq.write_table(pa.table({"request_id": ids, "label": labels}), f)
    out = hub.cli("outcomes", "import", str(f), "--model", MODEL)
    assert f"{MODEL}: {len(ids)} outcome(s) stored ({len(ids)} new, 0 replaced)" in out
    # Importing the same file again changes nothing.
    out = hub.cli("outcomes", "import", str(f), "--model", MODEL)
    assert f"(0 new, {len(ids)} replaced)" in out

    wait_for(lambda: _status(hub)["state"] == "rolled_back", 60, "the worse version rolled back")
    s = _status(hub)
    assert "accuracy_drop=" in s["reason"], s["reason"]
    gate = s["last_evaluation"]["gates"][0]
    assert gate["ok"] is False and gate["baseline"] == 1.0
    wait_for(lambda: _active(agent) == 1, 60, "the agent back on v1")

    shown = json.loads(hub.cli("outcomes", "show", MODEL, "--json"))
    assert shown["unmatched"] == 3 and shown["outcomes"] == len(ids)
    per = {(g["version"], g["arm"]): g for g in shown["groups"]}
    v1, v2 = per[(1, "*")], per[(2, "*")]
    assert v1["labelled"] == N and v1["accuracy"]["value"] == 1.0
    assert v2["labelled"] == N and v2["accuracy"]["value"] < 0.85
    assert v2["accuracy"]["low"] < v2["accuracy"]["value"] < v2["accuracy"]["high"]
    assert v1["auc"]["value"] == 1.0 and v1["precision"] is not None
    table = hub.cli("outcomes", "show", MODEL)
    assert "3 matching no captured prediction" in table
    assert re.search(r"^v1\s+active\s+60\s+1\.000", table, re.M), table
    assert re.search(r"^v2\s+active\s+60\s+0\.", table, re.M), table
    only2 = json.loads(hub.cli("outcomes", "show", MODEL, "--version", "2", "--json"))
    assert {g["version"] for g in only2["groups"]} == {2}
    # A malformed file is refused with the row and what to do; nothing is sent.
    bad = root / "bad.parquet"
    pq.write_table(pa.table({"request_id": ["x", "y"], "label": [0.0, 0.5]}), bad)
    r = hub.cli("outcomes", "import", str(bad), "--model", MODEL, check=False)
    assert r.returncode != 0 and "row 2: label 0.5 is not a class index" in r.stderr


def test_an_agent_identity_cannot_send_or_read_outcomes(fleet) -> None:
    _root, hub, agent = fleet
    ident = agent.models / "identity"
    creds = grpc.ssl_channel_credentials(
        (ident / "ca.crt").read_bytes(),
        (ident / "agent.key").read_bytes(),
        (ident / "agent.crt").read_bytes(),
    )
    with grpc.secure_channel(hub.url, creds) as channel:
        stub = pb_grpc.HubOutcomesStub(channel)
        calls = [
            (
                stub.ReportOutcomes,
                pb.ReportOutcomesRequest(
                    model=MODEL, outcomes=[pb.Outcome(request_id="a-0", label=0)]
                ),
            ),
            (stub.Accuracy, pb.AccuracyRequest(model=MODEL)),
            (stub.SetAccuracyBaseline, pb.SetAccuracyBaselineRequest(model=MODEL, accuracy=0.1)),
        ]
        for fn, request in calls:
            with pytest.raises(grpc.RpcError) as refused:
                fn(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "agent identities may not call this method" in (refused.value.details() or "")
    shown = json.loads(hub.cli("outcomes", "show", MODEL, "--json"))
    assert shown["baseline"] is None


def test_outcomes_commands_fail_clearly(fleet, tmp_path: Path) -> None:
    _root, hub, _agent = fleet
    r = hub.cli("outcomes", "show", "nothing-here", check=False)
    assert r.returncode == 0 and "no outcomes for 'nothing-here' yet" in r.stdout
    out = hub.cli("outcomes", "baseline", MODEL, "0.97")
    assert "measured from 0.97" in out
    assert json.loads(hub.cli("outcomes", "show", MODEL, "--json"))["baseline"] == 0.97
    assert "baseline removed" in hub.cli("outcomes", "baseline", MODEL, "--clear")
    r = hub.cli("outcomes", "baseline", MODEL, "1.5", check=False)
    assert r.returncode != 0 and "give a number in 0..1" in r.stderr
