"""Issue 12, item 6: telemetry after an agent kill -9 loses no request the client got an answer to.

A real hub, a real agent in fleet mode, real tritonclient clients sending without pause; the
agent is killed with SIGKILL twice mid-traffic and started again. Every response a client
received must be in the hub's count. The only requests the hub may count without the client
having an answer are the ones in flight at a kill (docs/telemetry.md, "What a kill -9 can
cost"): at most one per client thread per kill, and each of them shows at the client as a
transport error.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from tests import models
from tests.procs import AgentProcess, HubProcess, enroll_agent, wait_for
from tests.test_telemetry import fleet_metrics

CLIENTS = 2
KILLS = 2
ENV = {
    "MODELFLEET_AGENT_BACKOFF_MAX_S": "1",
    "MODELFLEET_AGENT_REPORT_INTERVAL_S": "1",
    # Long intervals: without a crash-safe record, a kill loses up to this much traffic.
    "MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "3",
}


class Clients:
    """CLIENTS threads, each sending one request after the other to the current agent."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.up = threading.Event()
        self.up.set()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        # Requests that ended in a transport error: the ones in flight at a kill (and
        # connection attempts to a dead agent, which never reached it).
        self.transport_errors = 0
        self.other_errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def _run(self) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        client, url = None, None
        while not self.stop.is_set():
            if not self.up.wait(0.2):
                continue
            if client is None or url != self.url:
                url = self.url
                client = grpcclient.InferenceServerClient(url)
            try:
                client.infer("mlp", [x], client_timeout=10)
            except InferenceServerException as exc:
                with self.lock:
                    if "UNAVAILABLE" in str(exc.status()) or "DEADLINE" in str(exc.status()):
                        self.transport_errors += 1
                    else:
                        self.other_errors.append(str(exc))
                client.close()
                client = None
                # Wait for the test to bring the agent back before sending again.
                while not self.stop.is_set() and not self.up.wait(0.2):
                    pass
                continue
            with self.lock:
                self.ok += 1
        if client is not None:
            client.close()


def test_kill_9_loses_no_answered_request(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", log_path=tmp_path / "hub.log").start()
    agents: list[AgentProcess] = []
    clients: Clients | None = None
    try:
        data = tmp_path / "edge-1"
        config = enroll_agent(hub, data, "site=berlin", hostname="edge-1")

        def start_agent() -> AgentProcess:
            a = AgentProcess(
                data, fleet_config=config, env=ENV, log_path=tmp_path / f"agent{len(agents)}.log"
            )
            agents.append(a)
            a.start()
            a.wait_model("mlp", timeout=60)
            return a

        hub.cli("publish", "mlp", str(models.mlp(tmp_path / "m.onnx", seed=0)))
        hub.cli("deploy", "mlp", "1")
        clients = Clients(start_agent().url)
        for t in clients.threads:
            t.start()
        for kill in range(KILLS):
            # Traffic for a while, then kill -9 in the middle of an interval.
            time.sleep(2.2 + 0.7 * kill)
            clients.up.clear()
            agents[-1].kill()
            agent = start_agent()
            clients.url = agent.url
            clients.up.set()
        time.sleep(1.5)
        clients.stop.set()
        for t in clients.threads:
            t.join(30)
        assert not any(t.is_alive() for t in clients.threads)
        assert clients.other_errors == []
        assert clients.ok > 500, f"only {clients.ok} requests answered"
        ok, ambiguous = clients.ok, clients.transport_errors
        # At most the one request each client had in flight at each kill.
        assert ambiguous <= CLIENTS * KILLS, ambiguous

        # A clean stop flushes the last interval; then the hub's count must settle.
        assert agents[-1].stop() == 0

        def counted() -> bool:
            requests, failures, _ = fleet_metrics(hub)
            return failures == 0 and ok <= requests <= ok + ambiguous

        try:
            wait_for(counted, 60, "every answered request counted at the hub")
        except TimeoutError:
            requests, failures, table = fleet_metrics(hub)
            raise AssertionError(
                f"client got {ok} answers ({ambiguous} requests cut by the kills); the hub "
                f"counted {requests} requests, {failures} failures\n{table}"
            ) from None
        # Nothing arrives twice later on (the outbox is empty, replays would show now).
        time.sleep(1)
        requests, failures, _ = fleet_metrics(hub)
        assert failures == 0 and ok <= requests <= ok + ambiguous
        assert any("recovered from" in a.logs() for a in agents)
        print(f"\nclient answers {ok}, cut by kills {ambiguous}, hub counted {requests}")
    finally:
        if clients is not None:
            clients.stop.set()
            clients.up.set()
        for a in agents:
            a.stop()
        hub.stop()
