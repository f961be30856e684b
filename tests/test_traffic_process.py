"""A real standalone agent comparing two versions: a sticky split and a shadow run, driven by
`modelfleet-agent compare` and tritonclient, observed through `status` and /metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from modelfleet.kernel.bundle import create_bundle
from tests import models
from tests.procs import AgentProcess, wait_for

pytestmark = pytest.mark.process

WIDTH = 4


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    samples = {"x": np.random.default_rng(7).standard_normal((4, WIDTH)).astype(np.float32)}
    for version, seed in ((1, 0), (2, 5)):
        create_bundle(
            models.classifier(root / "src" / f"clf-{version}.onnx", seed=seed),
            name="clf",
            version=version,
            samples=samples,
            out_dir=repo,
        )
    return repo


def infer(client, key: str = "", header: str = "") -> str:
    x = np.random.default_rng(len(key)).standard_normal((1, WIDTH)).astype(np.float32)
    inp = grpcclient.InferInput("x", [1, WIDTH], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(
        "clf",
        [inp],
        parameters={"routing_key": key} if key else None,
        headers={"x-routing-key": header} if header else None,
    )
    return result.get_response().model_version


def status_json(agent: AgentProcess) -> dict:
    out = agent.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    return {m["name"]: m for m in json.loads(out.stdout)["models"]}["clf"]


def test_sticky_split_and_shadow_run_on_a_standalone_agent(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    with AgentProcess(repo, log_path=tmp_path / "agent.log") as agent:
        agent.wait_model("clf", "2", timeout=60)
        client = agent.client()
        try:
            r = agent.cli("compare", "clf", "--split", "50")
            assert r.returncode == 3 and "compare needs --candidate VERSION" in r.stderr, r
            r = agent.cli("compare", "clf", "--candidate", "9", "--split", "50")
            assert r.returncode == 4 and "version 9 is not in the repository" in r.stderr, r
            r = agent.cli("compare", "clf", "--candidate", "2", "--split", "50")
            assert r.returncode == 3 and "v2 is the active version" in r.stderr, r

            # -- a sticky split: v1 (from the repository) answers half of the keys --------
            r = agent.cli("compare", "clf", "--candidate", "1", "--split", "50", "--sticky")
            assert r.returncode == 0, r.stderr
            assert "50% of requests to v1 (sticky by routing key); v2 active" in r.stdout
            seen: dict[str, set[str]] = {}
            for _ in range(3):
                for i in range(40):
                    key = f"user-{i}"
                    seen.setdefault(key, set()).add(infer(client, key=key))
                    # The gRPC header routes like the parameter.
                    seen[key].add(infer(client, header=key))
            assert all(len(v) == 1 for v in seen.values()), seen
            assert {v for vs in seen.values() for v in vs} == {"1", "2"}
            text = agent.cli("status").stdout
            assert "comparing [local]: 50% of requests to v1 (sticky by routing key)" in text
            metrics = agent.metrics()
            assert 'modelfleet_routed_requests_total{arm="candidate",model="clf",version="1"}' in (
                metrics
            )
            assert 'modelfleet_loaded_versions{model="clf",role="candidate",version="1"} 1.0' in (
                metrics
            )

            # -- a shadow run: every request answered by v2, copied to v1 --------------------
            r = agent.cli("compare", "clf", "--candidate", "1", "--shadow", "100")
            assert r.returncode == 0, r.stderr
            assert {infer(client) for _ in range(50)} == {"2"}
            wait_for(
                lambda: int(status_json(agent)["comparison"].get("shadow_compared", 0)) >= 50,
                30,
                "50 shadow comparisons in status",
            )
            cmp = status_json(agent)["comparison"]
            assert int(cmp["candidate_version"]) == 1 and cmp["shadow_bp"] == 10000
            assert int(cmp.get("shadow_dropped", 0)) == 0
            # Other weights: the outputs differ.
            assert cmp["max_abs_diff"] > 0
            text = agent.cli("status").stdout
            assert "shadow: 50 compared, 0 dropped, 0 failed, top-1 agreement" in text
            metrics = agent.metrics()
            assert (
                'modelfleet_shadow_requests_total{model="clf",outcome="compared",'
                'shadow_version="1",version="2"} 50.0'
            ) in metrics
            assert 'modelfleet_shadow_js_divergence_bits_count{model="clf",output="probs"' in (
                metrics
            )
            # Copies are not requests the candidate served: v1 answered only its keys' share.
            keyed_on_v1 = sum(1 for vs in seen.values() if vs == {"1"})
            served_v1 = [
                line
                for line in metrics.splitlines()
                if line.startswith("modelfleet_requests_total{")
                and 'version="1"' in line
                and 'outcome="success"' in line
            ]
            assert len(served_v1) == 1, served_v1
            assert float(served_v1[0].rsplit(" ", 1)[1]) == keyed_on_v1 * 6

            # -- off: the active version answers everything; the candidate stays loaded ------
            r = agent.cli("compare", "clf", "--off")
            assert r.returncode == 0 and "comparison off; v2 answers every request" in r.stdout
            assert status_json(agent)["comparison"] is None
            assert int(status_json(agent)["previous_version"]) == 1
        finally:
            client.close()
