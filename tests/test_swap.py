"""Blue/green behind the health gate, on a real agent process under real load."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelfleet.kernel.bundle import create_bundle, load_bundle
from tests import models
from tests.conftest import make_mlp_bundle, mlp_samples
from tests.procs import wait_for

X = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)


def call(client, x: np.ndarray = X, version: str = ""):
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("mlp", [inp], model_version=version)


def active_version(client) -> str:
    return call(client).get_response().model_version


def publish(staging: Path, repo: Path, version: int, build) -> Path:
    """Build a bundle aside, then rename it into the watched repository in one step."""
    bundle = build(staging, version)
    dest = repo / bundle.name / str(version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(bundle.path, dest)
    return dest


def status(agent) -> dict:
    out = agent.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    return {m["name"]: m for m in json.loads(out.stdout).get("models", [])}


class Load:
    """Concurrent clients hammering the agent; every response is checked against the model
    version that answered it, so a request finished on the wrong session would show."""

    def __init__(self, url: str, sessions: dict[str, ort.InferenceSession], threads: int = 8):
        self.url, self.sessions = url, sessions
        self.stop = threading.Event()
        self.ok, self.failed, self.wrong = 0, [], []
        self.versions: set[str] = set()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        rng = np.random.default_rng(threading.get_ident() % 1000)
        try:
            while not self.stop.is_set():
                x = rng.standard_normal((1, 4)).astype(np.float32)
                try:
                    r = call(client, x)
                except Exception as exc:
                    with self.lock:
                        self.failed.append(str(exc))
                    continue
                v = r.get_response().model_version
                want = self.sessions[v].run(None, {"x": x})[0]
                with self.lock:
                    self.ok += 1
                    self.versions.add(v)
                    if not np.allclose(r.as_numpy("y"), want, rtol=1e-5, atol=1e-6):
                        self.wrong.append(v)
        finally:
            client.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_hot_swap_under_load_fails_no_request(repo: Path, staging: Path, agent_factory) -> None:
    v1 = make_mlp_bundle(repo, 1, seed=0)
    v2 = make_mlp_bundle(staging, 2, seed=1)
    sessions = {
        "1": ort.InferenceSession(str(v1.model_path)),
        "2": ort.InferenceSession(str(v2.model_path)),
    }
    agent = agent_factory(repo)
    agent.wait_model("mlp", "1")
    with Load(agent.url, sessions) as load:
        wait_for(lambda: load.ok > 200, 30, "steady load")
        shutil.copytree(v2.path, staging / "v2-copy")
        os.rename(staging / "v2-copy", repo / "mlp" / "2")
        client = agent.client()
        wait_for(lambda: active_version(client) == "2", 30, "v2 active")
        seen = load.ok
        wait_for(lambda: load.ok > seen + 200, 30, "load on v2")
        client.close()
    assert load.failed == []
    assert load.wrong == []
    assert load.versions == {"1", "2"}
    s = status(agent)["mlp"]
    assert (s["active_version"], s["previous_version"]) == (2, 1)
    assert 'modelfleet_swaps_total{model="mlp"} 2.0' in agent.metrics()  # none -> 1 -> 2


@pytest.mark.parametrize(
    ("build", "kind", "words"),
    [
        (
            lambda out, v: create_bundle(
                models.nan_model(out / "nan.onnx"),
                name="mlp",
                version=v,
                out_dir=out,
                samples=mlp_samples(),
            ),
            "non_finite",
            "non-finite value",
        ),
        (
            # Golden outputs from v1's model; v2's weights drifted: the outputs must not match.
            lambda out, v: make_mlp_bundle(
                out,
                v,
                seed=9,
                expected={
                    "y": ort.InferenceSession(str(models.mlp(out / "ref.onnx", seed=0))).run(
                        None, mlp_samples()
                    )[0]
                },
            ),
            "mismatch",
            "differs from the expected output",
        ),
        (
            lambda out, v: make_mlp_bundle(out, v, seed=0, latency_budget_ms=0.0001),
            "latency",
            "exceeds the budget of 0.0001 ms",
        ),
    ],
    ids=["nan", "wrong-outputs", "too-slow"],
)
def test_gate_refuses_bad_versions_and_old_keeps_serving(
    repo: Path, staging: Path, agent_factory, build, kind: str, words: str
) -> None:
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo)
    agent.wait_model("mlp", "1")
    client = agent.client()
    before = call(client).as_numpy("y")
    publish(staging, repo, 2, build)
    wait_for(lambda: status(agent)["mlp"].get("failed"), 30, "gate verdict on v2")
    s = status(agent)["mlp"]
    assert s["active_version"] == 1 and s["previous_version"] == 0
    failure = s["failed"][0]
    assert failure["version"] == 2 and failure["kind"] == kind and words in failure["reason"]
    # The refused version never served, not even when asked for by number.
    assert not client.is_model_ready("mlp", "2")
    np.testing.assert_array_equal(call(client).as_numpy("y"), before)
    assert call(client).get_response().model_version == "1"
    text = agent.metrics()
    assert f'modelfleet_gate_failures_total{{model="mlp",reason="{kind}",version="2"}} 1.0' in text
    assert "v2 REFUSED" in agent.cli("status").stdout
    assert words in agent.logs()
    # Not retried while its bytes are unchanged.
    time.sleep(0.6)
    assert f'reason="{kind}",version="2"}} 1.0' in agent.metrics()
    client.close()


def test_corrupt_and_mislabelled_bundles_are_refused(
    repo: Path, staging: Path, agent_factory
) -> None:
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo)
    agent.wait_model("mlp", "1")
    v2 = make_mlp_bundle(staging, 2, seed=4)
    model = v2.path / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-5] ^= 0x55
    model.write_bytes(bytes(data))
    os.rename(v2.path, repo / "mlp" / "2")
    # A bundle whose manifest claims to be another model.
    other = create_bundle(
        models.mlp(staging / "o.onnx"),
        name="other",
        version=3,
        samples=mlp_samples(),
        out_dir=staging,
    )
    os.rename(other.path, repo / "mlp" / "3")
    wait_for(lambda: len(status(agent)["mlp"].get("failed", [])) == 2, 30, "both refused")
    failed = {f["version"]: f for f in status(agent)["mlp"]["failed"]}
    assert failed[2]["kind"] == "bundle" and "sha256" in failed[2]["reason"]
    assert "manifest says 'other' version 3" in failed[3]["reason"]
    client = agent.client()
    assert active_version(client) == "1"
    # Fixing the bytes under the same number is picked up: the fingerprint changed.
    shutil.rmtree(repo / "mlp" / "2")
    publish(staging, repo, 2, lambda out, v: make_mlp_bundle(out, v, seed=4))
    shutil.rmtree(repo / "mlp" / "3")
    wait_for(lambda: active_version(client) == "2", 30, "fixed v2 active")
    client.close()


def test_rollback_is_instant_and_sticks(repo: Path, staging: Path, agent_factory) -> None:
    make_mlp_bundle(repo, 1, seed=0)
    agent = agent_factory(repo)
    agent.wait_model("mlp", "1")
    client = agent.client()
    publish(staging, repo, 2, lambda out, v: make_mlp_bundle(out, v, seed=1))
    wait_for(lambda: active_version(client) == "2", 30, "v2 active")
    start = time.monotonic()
    out = agent.cli("rollback", "mlp")
    assert out.returncode == 0, out.stderr
    assert "rolled back from version 2 to 1" in out.stdout
    assert active_version(client) == "1"
    assert time.monotonic() - start < 10  # a CLI start plus one RPC: no load, no gate
    # Both stay loaded, and the watcher does not undo the operator's decision.
    time.sleep(1.0)
    assert active_version(client) == "1"
    assert client.is_model_ready("mlp", "2")
    assert call(client, version="2").get_response().model_version == "2"
    assert 'modelfleet_rollbacks_total{model="mlp"} 1.0' in agent.metrics()
    # A newer version is deployed again as usual; at most two versions stay loaded.
    publish(staging, repo, 3, lambda out, v: make_mlp_bundle(out, v, seed=2))
    wait_for(lambda: active_version(client) == "3", 30, "v3 active")
    assert client.get_model_metadata("mlp", as_json=True)["versions"] == ["3", "1"]
    assert not client.is_model_ready("mlp", "2")
    client.close()


def test_refused_candidate_keeps_the_rollback_target(
    repo: Path, staging: Path, agent_factory
) -> None:
    make_mlp_bundle(repo, 1, seed=0)
    agent = agent_factory(repo)
    agent.wait_model("mlp", "1")
    client = agent.client()
    publish(staging, repo, 2, lambda out, v: make_mlp_bundle(out, v, seed=1))
    wait_for(lambda: active_version(client) == "2", 30, "v2 active")
    publish(
        staging,
        repo,
        3,
        lambda out, v: create_bundle(
            models.nan_model(out / "nan.onnx"),
            name="mlp",
            version=v,
            out_dir=out,
            samples=mlp_samples(),
        ),
    )
    wait_for(
        lambda: (
            status(agent)["mlp"].get("previous_version") == 1 and status(agent)["mlp"].get("failed")
        ),
        30,
        "v3 refused, v1 restored",
    )
    assert active_version(client) == "2"
    assert agent.cli("rollback", "mlp").returncode == 0
    assert active_version(client) == "1"
    client.close()


def test_readiness_follows_what_can_serve(repo: Path, staging: Path, agent_factory) -> None:
    agent = agent_factory(repo)
    agent.wait_live()
    client = agent.client()
    with grpcclient.InferenceServerClient(agent.url) as _:
        pass
    import grpc

    channel = grpc.insecure_channel(agent.url)
    health = health_pb2_grpc.HealthStub(channel)

    def overall() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status

    # Nothing loaded: live, but neither ready nor SERVING.
    assert client.is_server_live() and not client.is_server_ready()
    assert overall() == health_pb2.HealthCheckResponse.NOT_SERVING
    publish(staging, repo, 1, lambda out, v: make_mlp_bundle(out, v))
    wait_for(lambda: client.is_server_ready(), 30, "ready")
    wait_for(lambda: overall() == health_pb2.HealthCheckResponse.SERVING, 10, "SERVING")
    # A model whose only version fails the gate makes the server not ready.
    publish(
        staging,
        repo,
        1,
        lambda out, v: create_bundle(
            models.nan_model(out / "nan.onnx"),
            name="broken",
            version=v,
            out_dir=out,
            samples=mlp_samples(),
        ),
    )
    wait_for(lambda: not client.is_server_ready(), 30, "not ready with a broken model")
    assert overall() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert client.is_model_ready("mlp")
    # Removing the broken model restores readiness; removing a version unloads it.
    shutil.rmtree(repo / "broken")
    wait_for(lambda: client.is_server_ready(), 30, "ready again")
    shutil.rmtree(repo / "mlp" / "1")
    wait_for(lambda: not client.is_model_ready("mlp"), 30, "mlp unloaded")
    channel.close()
    client.close()


def test_version_removed_falls_back_to_previous(repo: Path, staging: Path, agent_factory) -> None:
    make_mlp_bundle(repo, 1, seed=0)
    agent = agent_factory(repo)
    agent.wait_model("mlp", "1")
    client = agent.client()
    publish(staging, repo, 2, lambda out, v: make_mlp_bundle(out, v, seed=1))
    wait_for(lambda: active_version(client) == "2", 30, "v2 active")
    shutil.rmtree(repo / "mlp" / "2")
    wait_for(lambda: active_version(client) == "1", 30, "back on v1")
    assert load_bundle(repo / "mlp" / "1").version == 1
    client.close()


def test_start_with_bundles_on_disk_serves_latest(repo: Path, agent_factory) -> None:
    for v in (1, 2, 3):
        make_mlp_bundle(repo, v, seed=v)
    agent = agent_factory(repo)
    agent.wait_model("mlp")
    client = agent.client()
    assert active_version(client) == "3"
    assert "): serving mlp v3" in agent.logs()
    client.close()
    assert agent.stop() == 0
    assert "stopped" in agent.logs()
