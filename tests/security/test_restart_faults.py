"""Issue 12, items 3 and 4: after a restart, a crash or a damaged cache, the agent still serves.

Real hub and agent processes. What must hold (Mender's committed version, Triton's failed load):
the agent serves the last version that passed its gate first, gates the desired one beside it,
does not retry a version the gate refused until the desired version changes, never collects the
last good version, and quarantines a cached bundle that fails its hashes and fetches it again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from tests import models
from tests.procs import AgentProcess, wait_for
from tests.test_fleet import active, fleet, infer_version, model_error  # noqa: F401


def _served(agent: AgentProcess) -> dict:
    return json.loads((agent.models / "served.json").read_text())


def _restart(fleet, agent: AgentProcess) -> AgentProcess:  # noqa: F811
    return fleet.start_agent(agent.models, agent.models / "agent.toml")


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _cached(agent: AgentProcess, version: int) -> Path:
    return agent.models / "cache" / "bundles" / "mlp" / str(version)


@pytest.mark.parametrize("hub_state", ["hub_up", "hub_down"])
def test_restart_after_a_refused_deployment(fleet, tmp_path: Path, hub_state: str) -> None:  # noqa: F811
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("publish", "mlp", str(models.nan_model(tmp_path / "nan.onnx")))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: "refused" in model_error(hub, "edge-1"), 60, "v2 refused by the gate")
    assert active(agent) == 1
    agent.stop()
    if hub_state == "hub_down":
        hub.stop()
    again = _restart(fleet, agent)
    again.wait_model("mlp", timeout=60)
    assert infer_version(again) == "1"
    if hub_state == "hub_up":
        wait_for(lambda: "not retried" in model_error(hub, "edge-1"), 30, "refusal reported")
        time.sleep(2)  # a few reconcile rounds: the cache collector must spare v1
    assert "version 2 refused" not in again.logs()  # not gated again after the restart
    assert infer_version(again) == "1"
    assert _cached(again, 1).is_dir()
    assert _served(again)["last_good"] == {"mlp": 1}
    assert "2" in _served(again)["refused"]["mlp"]
    # Recovery: a new desired version is a new decision.
    if hub_state == "hub_down":
        hub = fleet.restart_hub(hub)
    hub.cli("publish", "mlp", str(fleet.model(3)))
    hub.cli("deploy", "mlp", "3")
    wait_for(lambda: active(again) == 3, 60, "v3 after the refused v2")


def test_kill9_mid_swap_restarts_on_a_version_that_passed(fleet, tmp_path: Path) -> None:  # noqa: F811
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    # A bigger v2: its download, load and gate take long enough to be interrupted.
    hub.cli("publish", "mlp", str(fleet.model(1, hidden=2048)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    hub.cli("deploy", "mlp", "2")
    # kill -9 at increasing points of fetch / load / gate / switch; every restart serves.
    for delay in (0.0, 0.1, 0.3, 0.6, 1.0):
        time.sleep(delay)
        agent.kill()
        agent = _restart(fleet, agent)
        agent.wait_model("mlp", timeout=60)
        assert infer_version(agent) in ("1", "2")
        assert _served(agent)["last_good"]["mlp"] in (1, 2)
    wait_for(lambda: active(agent) == 2, 60, "v2 in the end")
    assert infer_version(agent) == "2"


@pytest.mark.parametrize("hub_state", ["hub_up", "hub_down"])
def test_corrupted_active_bundle_is_quarantined_and_fetched_again(
    fleet,  # noqa: F811
    hub_state: str,
) -> None:
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("publish", "mlp", str(fleet.model(1)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: active(agent) == 2, 60, "v2")
    agent.stop()
    if hub_state == "hub_down":
        hub.stop()
    _flip(_cached(agent, 2) / "model.onnx")
    again = _restart(fleet, agent)
    # The damaged v2 is moved aside; the cached v1 serves meanwhile.
    again.wait_model("mlp", timeout=60)
    assert infer_version(again) in ("1", "2")
    again.wait_log("is damaged", timeout=30)
    quarantined = list((again.models / "cache" / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith("mlp-2-")
    if hub_state == "hub_down":
        assert infer_version(again) == "1"
        hub = fleet.restart_hub(hub)
    wait_for(lambda: active(again) == 2, 60, "v2 fetched again, verified, serving")
    assert infer_version(again) == "2"


def test_corrupted_previous_bundle_is_fetched_again_when_needed(fleet) -> None:  # noqa: F811
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("publish", "mlp", str(fleet.model(1)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: active(agent) == 2, 60, "v2")
    agent.stop()
    _flip(_cached(agent, 1) / "model.onnx")
    again = _restart(fleet, agent)
    again.wait_model("mlp", timeout=60)
    assert infer_version(again) == "2"  # the damaged previous is not needed to serve
    # Going back to v1 never loads the damaged copy: collected once the hub answered (it was
    # neither desired nor serving), or quarantined if still there, then fetched and verified.
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(again) == 1, 60, "v1 fetched again")
    manifest = json.loads((_cached(again, 1) / "manifest.json").read_text())
    digest = hashlib.sha256((_cached(again, 1) / "model.onnx").read_bytes()).hexdigest()
    assert digest == manifest["model"]["sha256"]


@pytest.mark.parametrize(
    ("served_json", "hub_state"), [("corrupt", "hub_down"), ("missing", "hub_up")]
)
def test_restart_without_a_usable_served_json_still_serves(
    fleet,  # noqa: F811
    tmp_path: Path,
    served_json: str,
    hub_state: str,
) -> None:
    """An agent upgraded from before served.json, or with it damaged: the refused v2 is gated
    again (its refusal was lost) and refused again, and a cached version that passes serves."""
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("publish", "mlp", str(models.nan_model(tmp_path / "nan.onnx")))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: "refused" in model_error(hub, "edge-1"), 60, "v2 refused by the gate")
    agent.stop()
    if hub_state == "hub_down":
        hub.stop()
    served = agent.models / "served.json"
    if served_json == "missing":
        served.unlink()
    else:
        served.write_text('{"last_good": {"mlp": 1e400}, "refused": [')
    again = _restart(fleet, agent)
    again.wait_model("mlp", timeout=60)
    assert infer_version(again) == "1"
    if hub_state == "hub_up":
        wait_for(lambda: "not retried" in model_error(hub, "edge-1"), 30, "refusal reported")
        time.sleep(2)  # reconcile rounds with the hub: v1 must stay cached and serving
    assert infer_version(again) == "1"
    assert _cached(again, 1).is_dir()
    assert _served(again)["last_good"] == {"mlp": 1}


@pytest.mark.parametrize("crashes", [2, 3])
def test_a_version_whose_gate_kills_the_agent_is_not_retried_forever(
    fleet,  # noqa: F811
    crashes: int,
) -> None:
    """served.json as the agent leaves it when it dies while gating v2 (OOM, a crash in
    onnxruntime), two or three times: two deaths are retried, the third refuses the version."""
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("publish", "mlp", str(fleet.model(1)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: active(agent) == 2, 60, "v2 cached")
    agent.stop()
    hub.stop()
    state = {"last_good": {"mlp": 1}, "refused": {}, "gating": {"mlp": [2, crashes]}}
    (agent.models / "served.json").write_text(json.dumps(state))
    again = _restart(fleet, agent)
    again.wait_model("mlp", timeout=60)
    if crashes == 2:
        wait_for(lambda: active(again) == 2, 60, "v2 gated again after two deaths")
        assert "gating" not in _served(again)
    else:
        again.wait_log("died 3 times while loading and gating", timeout=30)
        time.sleep(1)
        assert infer_version(again) == "1"
        assert _served(again)["refused"]["mlp"]["2"]["kind"] == "crash"
