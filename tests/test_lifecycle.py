"""Process lifecycle: start-up readiness and a graceful stop that finishes in-flight requests."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from tests.conftest import make_mlp_bundle


def test_sigterm_finishes_in_flight_requests(repo: Path, agent_factory) -> None:
    make_mlp_bundle(repo, 1)
    # A long queue delay keeps requests in flight (queued in the batcher) for ~0.8 s.
    agent = agent_factory(
        repo, "--max-queue-delay-us", "800000", "--drain-timeout-s", "10", "--inline-max-us", "0"
    )
    agent.wait_model("mlp")
    results: list[object] = []
    lock = threading.Lock()

    def one() -> None:
        client = grpcclient.InferenceServerClient(agent.url)
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        try:
            out: object = client.infer("mlp", [inp], client_timeout=30).as_numpy("y")
        except Exception as exc:
            out = exc
        with lock:
            results.append(out)
        client.close()

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # requests are now waiting for their batch
    sent_at = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert agent.proc.wait(30) == 0
    assert len(results) == 6
    assert all(isinstance(r, np.ndarray) and r.shape == (1, 3) for r in results), results
    assert time.monotonic() - sent_at < 10
    logs = agent.logs()
    assert "draining in-flight requests" in logs and "stopped" in logs
    assert not agent.admin_socket.exists()
