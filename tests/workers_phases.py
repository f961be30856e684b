"""Run as ``python -m tests.workers_phases TMPDIR``: serving workers' two phases
(agent/workers.py), the leader's slot manager in this process and a real worker process on a
real port; exits non-zero with the failed assertion.

A child process because the slot manager needs modelfleet's compiled protocol, which cannot
share a process with tritonclient's copy (see tests/test_serving.py);
tests/test_serving_workers.py runs it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from modelfleet.agent.app import build_slots
from modelfleet.agent.config import ServeConfig
from modelfleet.agent.gate import GateResult
from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.repository import ModelControl
from modelfleet.agent.telemetry import CounterStore
from modelfleet.agent.workers import ServingWorkers
from modelfleet.kernel.errors import GateFailedError
from modelfleet.protos import inference_pb2 as pb
from modelfleet.protos import inference_pb2_grpc as pb_grpc
from tests.conftest import make_mlp_bundle
from tests.procs import free_port


def version_at(listen: str) -> str:
    """The model version a fresh connection to ``listen`` answers with."""
    request = pb.ModelInferRequest(
        model_name="mlp",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[np.ones((1, 4), np.float32).tobytes()],
    )
    with grpc.insecure_channel(listen) as channel:
        return (
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10).model_version
        )


def _tamper(folder: Path, other: Path) -> None:
    """An operator copies other weights over a published version's folder (a complete,
    self-consistent bundle: only the digest the leader verified tells them apart)."""
    for name in ("model.onnx", "health.npz", "manifest.json"):
        shutil.copyfile(other / name, folder / name)


def one_workers_refusal_refuses_the_version_everywhere(tmp_path: Path) -> None:
    """A version serves only once the worker has it; the worker's refusal leaves v1 serving
    everywhere; a clean version switches in the worker at the leader's epoch flip."""
    repo = tmp_path / "repo"
    repo.mkdir()
    listen = f"127.0.0.1:{free_port()}"
    cfg = ServeConfig(models=repo, listen=listen, data=tmp_path / "data", serving_workers=2)

    def version_via_worker() -> str:
        # Only the worker binds the port in this test: every answer is the worker's.
        return version_at(listen)

    async def main() -> None:
        metrics = AgentMetrics()
        metrics.telemetry.attach(CounterStore.create(tmp_path / "cells"))
        slots = build_slots(cfg, metrics)
        await slots.deploy(make_mlp_bundle(repo, 1).path)
        workers = ServingWorkers(cfg, listen, slots, ModelControl(), 2)
        slots.replicas = workers
        slots.listeners.append(workers.publish)
        await workers.start()
        try:
            assert await asyncio.to_thread(version_via_worker) == "1"

            other = make_mlp_bundle(tmp_path / "other", 2, seed=9)
            v2 = make_mlp_bundle(repo, 2, seed=5)
            prepare = workers.prepare

            async def copied_over_meanwhile(candidate) -> None:
                _tamper(Path(candidate.bundle.path), Path(other.path))
                await prepare(candidate)

            workers.prepare = copied_over_meanwhile  # type: ignore[method-assign]
            with pytest.raises(GateFailedError, match="changed after the leader loaded it"):
                await slots.deploy(v2.path)
            workers.prepare = prepare  # type: ignore[method-assign]
            assert slots.slots["mlp"].active.version == 1
            assert slots.slots["mlp"].last_gate.kind == "worker"
            await asyncio.sleep(0.2)  # the state without v2 reaches the worker
            assert await asyncio.to_thread(version_via_worker) == "1"

            # A clean version. Armed, the worker still answers v1; the flip is one store in
            # shared memory, and the worker's very next request answers v3, before any message
            # (the loop is held here, so none can be sent).
            flip = workers.flip
            seen: dict[str, str] = {}

            def checked_flip() -> None:
                seen["armed"] = version_via_worker()
                flip()
                seen["flipped"] = version_via_worker()

            workers.flip = checked_flip  # type: ignore[method-assign]
            await slots.deploy(make_mlp_bundle(repo, 3, seed=7).path)
            assert seen == {"armed": "1", "flipped": "3"}, seen
            assert await asyncio.to_thread(version_via_worker) == "3"
            # And its counts are in the leader's view.
            shares = dict((i, n) for i, _, n in workers.shares())
            assert shares[1] >= 3

            # A candidate refused by the leader's own gate: the rollback target (v1, dropped to
            # make room) is loaded back, in the worker too, and nothing stays staged.
            await slots.deploy(make_mlp_bundle(repo, 4, seed=11).path)  # v4 active, v3 previous
            real = slots._load_and_gate

            def refuse_v5(bundle):
                if bundle.version == 5:
                    return None, GateResult(5, False, "forced", "mismatch", None, 0.0)
                return real(bundle)

            slots._load_and_gate = refuse_v5  # type: ignore[method-assign]
            with pytest.raises(GateFailedError, match="forced"):
                await slots.deploy(make_mlp_bundle(repo, 5, seed=12).path)
            slots._load_and_gate = real  # type: ignore[method-assign]
            assert (slots.slots["mlp"].active.version, slots.slots["mlp"].previous.version) == (
                4,
                3,
            )
            assert workers._staged == {}, workers._staged
            # So an old folder may go, and a worker that restarts loads only what serves.
            await slots.deploy(make_mlp_bundle(repo, 6, seed=13).path)  # v3 dropped for good
            shutil.rmtree(repo / "mlp" / "3")
            (pid,) = workers.pids()
            os.kill(pid, signal.SIGKILL)
            for _ in range(200):
                await asyncio.sleep(0.1)
                w = workers.workers[0]
                if w.ready and w.pid not in (None, pid):
                    break
            else:
                raise AssertionError("the worker did not come back")
            await slots.deploy(make_mlp_bundle(repo, 7, seed=14).path)
            assert await asyncio.to_thread(version_via_worker) == "7"
        finally:
            await workers.stop(1.0)
            slots.close()

    asyncio.run(main())


if __name__ == "__main__":
    one_workers_refusal_refuses_the_version_everywhere(Path(sys.argv[1]))
    print("ok")
