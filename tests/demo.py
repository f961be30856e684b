"""`make demo`: the whole story so far, on embedded defaults, in about a minute.

Part 1 (standalone agent): builds model versions, serves v1 with a real agent process, keeps
clients busy, drops v2 into the repository (gated hot swap, no failed request), drops a broken
v3 (refused by the gate, v2 keeps serving), rolls back.

Part 2 (fleet): starts a hub (SQLite, local blob store, TUF signing, its own CA), enrolls three
agents with different labels, publishes and signs v1 and v2, deploys v1 everywhere and v2 to
one site, and shows what the fleet reports; canary rollouts (one completes, one is rolled back
by its health gate), a scheduled batch job, desired state as code (export, diff, apply); a
traffic canary the statistical judge fails at 5% of the requests, a shadow experiment with its
output comparison and verdict (issue 15); and drift on live traffic firing the built-in alert,
whose webhook receives one signed notification (issue 16).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from modelfleet.hub.cli import EXIT_ROLLED_BACK, EXIT_STATE_DIFFERS
from modelfleet.hub.experiments import MIN_SHADOW_COMPARED
from modelfleet.kernel.bundle import create_bundle
from tests import models
from tests.procs import (
    AgentProcess,
    BrokerProcess,
    HubProcess,
    agent_status,
    enroll_agent,
    free_port,
    traffic,
    wait_for,
)


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def show(cmd: list[str], agent: AgentProcess) -> None:
    out = agent.cli(*cmd)
    print(out.stdout.rstrip() or out.stderr.rstrip(), flush=True)


class Traffic:
    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.ok = 0
        self.failed = 0
        self.by_version: dict[str, int] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self) -> None:
        # A connection of its own per client (gRPC shares one between equal channels of a
        # process otherwise), so the agent's serving processes each get some.
        own = [("grpc.use_local_subchannel_pool", 1)]
        client = grpcclient.InferenceServerClient(self.url, channel_args=own)
        x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
        while not self.stop.is_set():
            inp = grpcclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            try:
                v = client.infer("fraud", [inp]).get_response().model_version
            except Exception:
                with self.lock:
                    self.failed += 1
                continue
            with self.lock:
                self.ok += 1
                self.by_version[v] = self.by_version.get(v, 0) + 1
        client.close()

    def report(self) -> str:
        with self.lock:
            per = ", ".join(f"v{v}: {n}" for v, n in sorted(self.by_version.items()))
            return f"{self.ok} ok ({per}), {self.failed} failed"


def publish(staging: Path, repo: Path, bundle_path: Path, name: str, version: int) -> None:
    dest = repo / name / str(version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(bundle_path, dest)  # atomic: the agent sees all of the bundle or none of it


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="modelfleet-demo-"))
    repo, staging, src = work / "repo", work / "staging", work / "src"
    samples = {"x": np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)}
    step("1. Build three versions of model 'fraud' (v3 is broken: it outputs NaN)")
    v1 = create_bundle(
        models.mlp(src / "v1.onnx", seed=0),
        name="fraud",
        version=1,
        samples=samples,
        out_dir=repo,
        latency_budget_ms=50,
    )
    v2 = create_bundle(
        models.mlp(src / "v2.onnx", seed=1),
        name="fraud",
        version=2,
        samples=samples,
        out_dir=staging,
        latency_budget_ms=50,
    )
    v3 = create_bundle(
        models.nan_model(src / "v3.onnx"),
        name="fraud",
        version=3,
        samples=samples,
        out_dir=staging,
        latency_budget_ms=50,
    )
    for b in (v1, v2, v3):
        print(f"  {b.path.relative_to(work)}  sha256 {b.manifest.model_sha256[:12]}")

    http_url = f"127.0.0.1:{free_port()}"
    agent = AgentProcess(
        repo, "--http-listen", http_url, "--serving-workers", "2", log_path=work / "agent.log"
    )
    traffic = None
    try:
        step(
            "2. Start the agent on the repository (standalone mode, two serving processes on one"
            " port) and wait for READY"
        )
        t0 = time.monotonic()
        agent.start()
        agent.wait_log("agent: READY", timeout=60)
        print(f"  ready in {time.monotonic() - t0:.2f}s on {agent.url}")
        for line in agent.logs().splitlines():
            if "processes answer inference" in line:
                print(f"  {line.split(': ', 1)[1]}")
        show(["status"], agent)

        step("3. Four clients send requests continuously (tritonclient over gRPC)")
        traffic = Traffic(agent.url)
        for t in traffic.threads:
            t.start()
        time.sleep(2)
        print(f"  {traffic.report()}")

        step("4. Drop v2 into the repository: it loads beside v1, passes the gate, then swaps")
        publish(staging, repo, v2.path, "fraud", 2)
        client = agent.client()
        wait_for(lambda: client.get_model_metadata("fraud").versions[0] == "2", 30, "v2")
        time.sleep(2)
        print(f"  {traffic.report()}")
        show(["status"], agent)

        step("5. Drop broken v3: the health gate refuses it and v2 keeps serving")
        publish(staging, repo, v3.path, "fraud", 3)
        wait_for(lambda: "v3 REFUSED" in agent.cli("status").stdout, 30, "v3 verdict")
        time.sleep(1)
        print(f"  {traffic.report()}")
        show(["status"], agent)

        step("6. Roll back to v1 at once (previous version stays loaded)")
        show(["rollback", "fraud"], agent)
        time.sleep(1)
        print(f"  {traffic.report()}")

        step("6b. The same data plane over HTTP/REST (Open Inference Protocol), with curl")
        curl(
            f"http://{http_url}/v2/health/ready",
            "-o",
            "/dev/null",
            "-w",
            "ready: HTTP %{http_code}",
        )
        body = (
            '{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}'
        )
        curl(
            f"http://{http_url}/v2/models/fraud/infer",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        )
        curl(f"http://{http_url}/v2/models/nosuch/infer", "-d", body, "-w", " (HTTP %{http_code})")

        traffic.stop.set()
        for t in traffic.threads:
            t.join(10)
        step("7. Prometheus metrics (excerpt)")
        for line in agent.metrics().splitlines():
            if line.startswith(
                (
                    "modelfleet_swaps",
                    "modelfleet_rollbacks",
                    "modelfleet_gate_f",
                    "modelfleet_loaded",
                    "modelfleet_serving_process_requests_total",
                )
            ) or (line.startswith("modelfleet_requests_total") and "success" in line):
                print(f"  {line}")
        client.close()
        failed = traffic.failed
        print(f"\n  standalone part done: {traffic.report()}")
    finally:
        if traffic is not None:
            traffic.stop.set()
        agent.stop()
    try:
        ok = fleet(work) and failed == 0
        print(f"\nDone. Work dir: {work}")
        return 0 if ok else 1
    finally:
        if os.environ.get("MODELFLEET_DEMO_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)


def curl(url: str, *args: str) -> None:
    """What a plain HTTP client sees (the command, then its output)."""
    cmd = ["curl", "-sS", "--max-time", "10", *args, url]
    print(f"  $ {shlex.join(['curl', *args, url])}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    print(f"  {(out.stdout or out.stderr).strip()}")


def run_hub(hub: HubProcess, *args: str) -> str:
    print(f"$ modelfleet-hub {' '.join(args)}")
    out = hub.cli(*args).rstrip()
    print("\n".join(f"  {line}" for line in out.splitlines()))
    return out


def run_hub_code(hub: HubProcess, *args: str) -> int:
    """Like run_hub, for a command whose exit code is the point (a script would branch on it)."""
    print(f"$ modelfleet-hub {' '.join(args)}")
    r = hub.cli(*args, check=False, timeout=180)
    out = (r.stdout + r.stderr).rstrip()  # type: ignore[attr-defined]
    print("\n".join(f"  {line}" for line in out.splitlines()), flush=True)
    return int(r.returncode)  # type: ignore[attr-defined]


def fleet(work: Path) -> bool:
    src = work / "src"
    transport = os.environ.get("MODELFLEET_DEMO_TRANSPORT", "grpc")
    broker = None
    hub_args: list[str] = []
    agents: list[AgentProcess] = []
    if transport == "mqtt":
        step("8a. Configure and start Mosquitto for the fleet (TLS client certs, per-agent ACL)")
        (work / "hub").mkdir(parents=True, exist_ok=True)
        broker = BrokerProcess(work / "hub", work / "broker").configure().start()
        print(f"  mosquitto on {broker.address} with {work / 'broker' / 'mosquitto.conf'}")
        hub_args = ["--mqtt", broker.address]
    hub = HubProcess(work / "hub", *hub_args, log_path=work / "hub.log")
    try:
        step("8. Start a hub: registry in SQLite, bundles on disk, TUF signing keys, its own CA")
        hub.start()
        print(f"  hub on {hub.url} (mTLS), enrollment on 127.0.0.1:{hub.enroll_port}")
        if broker is not None:
            wait_for(lambda: "connected to MQTT broker" in hub.logs(), 30, "hub on MQTT")

        step(f"9. Enroll three agents with one-time tokens (transport: {transport})")
        sites = [
            ("berlin-gpu-1", "site=berlin,hw=gpu"),
            ("berlin-cpu-1", "site=berlin,hw=cpu"),
            ("paris-cpu-1", "site=paris,hw=cpu"),
        ]
        for host, labels in sites:
            config = enroll_agent(hub, work / host, labels, hostname=host, transport=transport)
            a = AgentProcess(
                work / host,
                fleet_config=config,
                log_path=work / f"{host}.log",
                env={
                    "MODELFLEET_AGENT_REPORT_INTERVAL_S": "1",
                    "MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "1",
                    "MODELFLEET_AGENT_DRIFT_WINDOW_S": "2",
                },
            )
            agents.append(a.start())
            print(f"  {host:<14} labels {labels:<22} inference on {a.url}")
        for a in agents:
            a.wait_live()

        step("10. Publish two versions: each is built, uploaded, verified and signed (TUF)")
        run_hub(hub, "publish", "fraud", str(src / "v1.onnx"), "--notes", "baseline")
        run_hub(hub, "publish", "fraud", str(src / "v2.onnx"), "--notes", "retrained")
        run_hub(hub, "models", "show", "fraud")

        step("11. Deploy v1 to every agent, then v2 to site=berlin only (a dry run first)")
        run_hub(hub, "deploy", "fraud", "1")
        wait_for(lambda: all(_active(a) == 1 for a in agents), 60, "v1 everywhere")
        run_hub(hub, "deploy", "fraud", "2", "--selector", "site=berlin", "--dry-run")
        run_hub(hub, "deploy", "fraud", "2", "--selector", "site=berlin")
        run_hub(hub, "deployments", "ls")
        wait_for(lambda: [_active(a) for a in agents] == [2, 2, 1], 60, "v2 in berlin")
        time.sleep(1.5)  # one report interval, so the hub has heard back

        step("12. What the fleet reports (desired and active versions, gate verdicts)")
        run_hub(hub, "agents", "ls")
        # Certificates: each agent renews its own (new key, made on the node) 30 days ahead.
        for info in json.loads(hub.cli("agents", "ls", "--json")):
            expires = info.get("cert_expires_at", 0)
            print(
                f"  {info['hostname']:<14} certificate valid until {_day(expires)}, renewed "
                f"by the agent itself from {_day(expires - 30 * 86400)}"
            )
        with grpcclient.InferenceServerClient(agents[0].url) as c:
            inp = grpcclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(np.ones((1, 4), np.float32))
            r = c.infer("fraud", [inp])
            print(
                f"  inference on berlin-gpu-1: version {r.get_response().model_version}, "
                f"y = {', '.join(f'{v:.4f}' for v in r.as_numpy('y').ravel())}"
            )

        step("13. Canary rollout of a good v3: wave by wave (33%, 66%, 100%), baking between")
        run_hub(hub, "publish", "fraud", str(models.mlp(src / "v3.onnx", seed=3)))
        run_hub(
            hub,
            "rollout",
            "start",
            "fraud",
            "3",
            "--waves",
            "33,66,100",
            "--bake",
            "2s",
            "--agent-timeout",
            "60s",
        )
        watch_rollout(hub, "fraud")
        # Completed: v3 is the fleet's desired version (set by the rollout) and production.
        run_hub(hub, "deployments", "ls", "fraud")
        run_hub(hub, "models", "show", "fraud")

        step(
            "14. Canary rollout of a broken v4 (NaN outputs): stopped in the first wave, "
            "rolled back without a command; --wait exits with the outcome's code"
        )
        run_hub(
            hub, "publish", "fraud", str(models.nan_model(src / "v4.onnx")), "--max-batch-size", "0"
        )
        code = run_hub_code(
            hub,
            "rollout",
            "start",
            "fraud",
            "4",
            "--waves",
            "33,66,100",
            "--bake",
            "2s",
            "--agent-timeout",
            "60s",
            "--wait",
            "--timeout",
            "90s",
        )
        print(f"  exit code {code} (docs/cli.md: {EXIT_ROLLED_BACK} means rolled back)")
        if code != EXIT_ROLLED_BACK:
            return False
        wait_for(lambda: all(_active(a) == 3 for a in agents), 60, "all back on v3")
        print(f"  active versions now: {[_active(a) for a in agents]}")
        run_hub(hub, "rollout", "history", "fraud")

        step("15. A scheduled batch job: score a Parquet dataset on the paris agent")
        data = work / "transactions"
        data.mkdir()
        rows = 20_000
        rng = np.random.default_rng(7)
        x = rng.standard_normal((rows, 4)).astype(np.float32)
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("id", pa.int64()), ("x", pa.list_(pa.float32(), 4))])
        pq.write_table(
            pa.table({"id": np.arange(rows), "x": list(x)}).cast(schema), data / "day-1.parquet"
        )
        print(f"  generated {rows} rows in {data / 'day-1.parquet'}")
        run_hub(
            hub,
            "jobs",
            "create",
            "nightly-scores",
            "--model",
            "fraud",
            "--deployed",
            "--every",
            "3s",
            "--input",
            str(data),
            "--output",
            str(work / "scores"),
            "--keys",
            "id",
            "--selector",
            "site=paris",
        )
        wait_for(lambda: "succeeded" in hub.cli("jobs", "runs", "nightly-scores"), 60, "a job run")
        run_hub(hub, "jobs", "pause", "nightly-scores")
        run_hub(hub, "jobs", "runs", "nightly-scores")

        step("16. Desired state as code: export to a file, diff it, then apply a smaller one")
        exported = work / "fleet.toml"
        print(f"$ modelfleet-hub export -o {exported}")
        hub.cli("export", "-o", str(exported))
        print("\n".join(f"  {line}" for line in exported.read_text().splitlines()))
        code = run_hub_code(hub, "diff", "-f", str(exported))
        print(f"  exit code {code} (0: the hub's desired state is what the file declares)")
        smaller = work / "fleet-v3.toml"
        smaller.write_text('version = 1\n\n[[deployment]]\nmodel = "fraud"\nversion = 3\n')
        print(f"$ cat {smaller}")
        print("\n".join(f"  {line}" for line in smaller.read_text().splitlines()))
        code = run_hub_code(hub, "diff", "-f", str(smaller), "--prune")
        print(
            f"  exit code {code} (docs/cli.md: {EXIT_STATE_DIFFERS} means something would change)"
        )
        if code != EXIT_STATE_DIFFERS:
            return False
        run_hub(hub, "apply", "-f", str(smaller), "--prune")
        run_hub(hub, "apply", "-f", str(smaller), "--prune")  # again: nothing to change

        if not live_comparisons(hub, agents, work):
            return False
        if not drift_alert(hub, agents[2], work):
            return False
        step("20. The audit trail: every change above, by whom, and any refused or failed call")
        out = run_hub(hub, "audit", "--limit", "12")
        return "admin:admin" in out
    finally:
        for a in agents:
            a.stop()
        hub.stop()
        if broker is not None:
            broker.stop()


def live_comparisons(hub: HubProcess, agents: list[AgentProcess], work: Path) -> bool:
    """Issue 15: a traffic canary judged on live requests, and a shadow experiment."""
    step(
        "17. Traffic canary of v5, which passes its health gate but fails single-row requests "
        "at run time: 5% of the requests first; the statistical judge fails it and every agent "
        "goes back to 0% at once"
    )
    samples = work / "reshape-samples.npz"
    np.savez(samples, x=np.ones((3, 4), np.float32))
    bad = models.reshape_model(work / "src" / "v5.onnx")
    run_hub(hub, "publish", "fraud", str(bad), "--max-batch-size", "0", "--samples", str(samples))
    with traffic(agents, model="fraud", interval_s=0.005):
        code = run_hub_code(
            hub,
            "rollout",
            "start",
            "fraud",
            "5",
            "--traffic",
            "5,50,100",
            "--waves",
            "100",
            "--bake",
            "60s",
            "--min-requests",
            "20",
            "--wait",
            "--timeout",
            "90s",
        )
    print(f"  exit code {code} (docs/cli.md: {EXIT_ROLLED_BACK} means rolled back)")
    if code != EXIT_ROLLED_BACK:
        return False
    run_hub(hub, "rollout", "status", "fraud")
    wait_for(lambda: all(_active(a) == 3 for a in agents), 60, "all on v3")

    step(
        "18. Shadow experiment: v6 (other weights) runs on copies of the berlin agents' "
        "requests after each response; clients only ever see v3"
    )
    run_hub(hub, "publish", "fraud", str(models.mlp(work / "src" / "v6.onnx", seed=6)))
    run_hub(
        hub,
        "experiment",
        "start",
        "fraud",
        "--candidate",
        "6",
        "--shadow",
        "100",
        "--selector",
        "site=berlin",
    )

    def compared() -> bool:
        shadow = json.loads(hub.cli("experiment", "status", "fraud", "--json"))["shadow"]
        return bool(shadow and shadow["compared"] >= MIN_SHADOW_COMPARED)

    with traffic(agents[:2], model="fraud", interval_s=0.005):
        wait_for(compared, 60, "shadow comparisons", interval=0.5)
    run_hub(hub, "experiment", "status", "fraud")
    run_hub(hub, "experiment", "stop", "fraud")
    return True


def drift_alert(hub: HubProcess, agent: AgentProcess, work: Path) -> bool:
    """Monitoring: a model published with reference statistics drifts on live traffic, the
    built-in drift rule fires and a webhook receives one signed notification."""
    from modelfleet.hub.webhooks import verify
    from tests.test_bundle_reference import reference_parquet
    from tests.webhook_receiver import Receiver

    step(
        "19. Drift: 'risk' is published with reference statistics; one input drifts on the "
        "paris agent, the built-in drift rule fires and a webhook gets a signed notification"
    )
    ref = reference_parquet(work / "risk-reference.parquet", rows=2000)
    print(f"  reference dataset: {ref} (2,000 rows; statistics go into the signed bundle)")
    run_hub(
        hub, "publish", "risk", str(models.mlp(work / "src" / "risk.onnx")), "--reference", str(ref)
    )
    run_hub(hub, "deploy", "risk", "1", "--selector", "site=paris")
    wait_for(lambda: _active(agent, "risk") == 1, 60, "risk v1 on paris")
    secret = work / "webhook.secret"
    secret.write_bytes(b"demo-webhook-secret\n")
    secret.chmod(0o600)
    with Receiver() as receiver:
        run_hub(hub, "webhooks", "add", "ops", receiver.url, "--secret-file", str(secret))
        # The built-in rule (PSI > 0.2) on a demo's time scale: minutes become seconds.
        run_hub(
            hub,
            "alerts",
            "rule",
            "set",
            "drift-psi",
            "--for",
            "1s",
            "--window",
            "10s",
            "--clear-for",
            "2s",
            "--min-requests",
            "20",
        )
        stop, shift = threading.Event(), {"x[1]": 0.0}

        def traffic() -> None:
            rng = np.random.default_rng(12)
            with grpcclient.InferenceServerClient(agent.url) as c:
                while not stop.is_set():
                    x = rng.standard_normal((4, 4)).astype(np.float32)
                    x[:, 3] = rng.integers(0, 4, 4)
                    x[:, 1] += shift["x[1]"]
                    inp = grpcclient.InferInput("x", [4, 4], "FP32")
                    inp.set_data_from_numpy(x)
                    c.infer("risk", [inp])
                    time.sleep(0.01)

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            print("  traffic like the reference for a few seconds, then x[1] shifts by 4 sd")
            time.sleep(4)
            shift["x[1]"] = 4.0

            def firing() -> list[tuple[dict[str, str], bytes]]:
                return [
                    (h, raw)
                    for h, raw in receiver.requests
                    if json.loads(raw)["rule"] == "drift-psi"
                    and json.loads(raw)["state"] == "firing"
                ]

            wait_for(firing, 60, "a firing drift notification", interval=0.2)
        finally:
            stop.set()
            thread.join(10)
        run_hub(hub, "drift", "risk", "--since", "10s", "--top", "3")
        run_hub(hub, "alerts", "ls")
        headers, raw = firing()[0]
        body = json.loads(raw)
        ok = verify(b"demo-webhook-secret", raw, headers, time.time())
        print(
            f"  webhook received: rule {body['rule']} {body['state']} on {body['model']} "
            f"v{body['version']}, {body['evidence']['feature']} PSI {body['value']:.2f}; "
            f"signature {'verified' if ok else 'INVALID'}; retraining trigger: "
            f"{'yes' if body.get('retrain') else 'no'}"
        )
        return ok


def watch_rollout(hub: HubProcess, model: str, timeout: float = 90) -> None:
    """A live view: print the rollout status whenever it changes, until it ends."""
    import json

    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        raw = json.loads(hub.cli("rollout", "status", model, "--json"))
        line = (
            f"  [{raw['state']:<12}] wave {raw['wave']}/{len(raw['waves'])}, "
            f"{raw['switched']}/{raw['agents']} agent(s) switched"
            + (f", bake {raw['bake_left_s']:.0f}s left" if raw["state"] == "baking" else "")
            + (f" -- {raw['reason']}" if raw["reason"] else "")
        )
        if line != last:
            print(line, flush=True)
            last = line
        if raw["state"] in ("done", "rolled_back"):
            return
        time.sleep(0.3)
    raise TimeoutError("rollout did not finish")


def _day(epoch: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def _active(agent: AgentProcess, model: str = "fraud") -> int:
    try:
        return int(agent_status(agent.admin_socket).get(model, {}).get("active_version", 0))
    except Exception:
        return -1


if __name__ == "__main__":
    sys.exit(main())
