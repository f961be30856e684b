"""Model control survives a restart (standalone, `serve --model-control`): a model unloaded over
gRPC or HTTP stays unloaded after the agent is killed (kill -9, right after the unload's answer)
and started again, until a client loads it; the record is a small file in the agent's data
directory, and a damaged one stops the agent with a message naming it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelfleet.kernel.bundle import create_bundle
from tests import models
from tests.conftest import mlp_samples
from tests.procs import AgentProcess, free_port, wait_for

pytestmark = pytest.mark.process

X = mlp_samples()["x"]


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    for name, seed in (("mlp", 0), ("spare", 3)):
        create_bundle(
            models.mlp(root / "src" / f"{name}.onnx", seed=seed),
            name=name,
            version=1,
            out_dir=repo,
            samples=mlp_samples(),
        )
    return repo


def start(repo: Path, data: Path, log: Path, *extra: str) -> AgentProcess:
    http = f"127.0.0.1:{free_port()}"
    agent = AgentProcess(
        repo,
        "--model-control",
        "--data",
        str(data),
        "--http-listen",
        http,
        *extra,
        log_path=log,
    )
    agent.http_url = http  # type: ignore[attr-defined]
    agent.start()
    agent.wait_live(60)
    return agent


def infer_ok(client: grpcclient.InferenceServerClient, name: str) -> None:
    inp = grpcclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    assert client.infer(name, [inp]).as_numpy("y").shape == (X.shape[0], 3)


def test_an_unload_survives_kill_9_until_the_model_is_loaded_again(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    data = tmp_path / "data"
    agent = start(repo, data, tmp_path / "agent.log")
    try:
        agent.wait_model("spare", timeout=60)
        with agent.client() as c:
            c.unload_model("spare")
        agent.kill()  # at once: the record must be on disk before the answer
    finally:
        agent.stop()
    record = data / "unloaded.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700

    agent = start(repo, data, tmp_path / "agent2.log")
    try:
        agent.wait_model("mlp", timeout=60)
        # Several polls of the repository: the bundle is on disk, the model stays unloaded.
        agent.wait_log("unloaded through model control", timeout=10)
        with agent.client() as c:
            wait_for(lambda: c.get_model_repository_index().models, 10, "repository index")
            assert not c.is_model_ready("spare")
            with pytest.raises(InferenceServerException, match="unloaded"):
                infer_ok(c, "spare")
            index = {m.name: m for m in c.get_model_repository_index().models}
            assert index["spare"].state == "UNAVAILABLE" and index["spare"].reason == "unloaded"
            infer_ok(c, "mlp")
            # Loaded again (over HTTP this time): it serves, and keeps serving after a restart.
            with httpclient.InferenceServerClient(agent.http_url) as h:  # type: ignore[attr-defined]
                h.load_model("spare")
            infer_ok(c, "spare")
        agent.kill()
    finally:
        agent.stop()
    assert json.loads(record.read_text())["unloaded"] == []

    agent = start(repo, data, tmp_path / "agent3.log")
    try:
        agent.wait_model("spare", timeout=60)
        # An unload over HTTP is recorded the same way.
        with httpclient.InferenceServerClient(agent.http_url) as h:  # type: ignore[attr-defined]
            h.unload_model("spare")
        agent.kill()
    finally:
        agent.stop()
    assert json.loads(record.read_text())["unloaded"] == ["spare"]


@pytest.mark.parametrize(
    "content",
    [b'{"unloaded": ["spa', b"\x00\x00\x00", b'{"unloaded": "spare"}', b'{"unloaded": ["../x"]}'],
    ids=["torn", "zeros", "not a list", "bad name"],
)
def test_a_damaged_record_stops_the_agent_naming_the_file(tmp_path: Path, content: bytes) -> None:
    repo = make_repo(tmp_path)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "unloaded.json").write_bytes(content)
    agent = AgentProcess(
        repo, "--model-control", "--data", str(data), log_path=tmp_path / "agent.log"
    ).start()
    try:
        assert agent.proc is not None
        code = agent.proc.wait(60)
    finally:
        agent.stop()
    assert code == 7, agent.logs()[-2000:]
    log = agent.logs()
    assert str(data / "unloaded.json") in log
    assert "delete it" in log and "load" in log, log[-2000:]
    # Nothing was served, and the file is left as it was for the operator to look at.
    assert (data / "unloaded.json").read_bytes() == content


def test_without_model_control_the_record_is_not_applied(tmp_path: Path) -> None:
    """Model control off: the repository decides what serves, and nothing is written."""
    repo = make_repo(tmp_path)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "unloaded.json").write_text('{"unloaded": ["spare"]}\n')
    with AgentProcess(repo, "--data", str(data), log_path=tmp_path / "agent.log") as agent:
        agent.wait_model("spare", timeout=60)
        assert "model control is off" in agent.logs()
    assert os.listdir(data) == ["unloaded.json"]


def test_an_unload_that_cannot_be_recorded_changes_nothing(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    data = tmp_path / "data"
    agent = start(repo, data, tmp_path / "agent.log")
    try:
        agent.wait_model("spare", timeout=60)
        # The data directory is gone and a file stands in its place (root ignores modes).
        if data.exists():
            data.rename(tmp_path / "data.old")
        data.write_text("not a folder")
        with agent.client() as c:
            with pytest.raises(InferenceServerException) as err:
                c.unload_model("spare")
            assert err.value.status() == "StatusCode.FAILED_PRECONDITION"
            assert "unloaded.json" in err.value.message()
            assert "nothing was changed" in err.value.message()
            assert c.is_model_ready("spare")
            infer_ok(c, "spare")
    finally:
        agent.stop()
