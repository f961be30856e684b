"""MQTT fan-out: deploy -> every agent has its new desired state, for 100 and 1,000 agents.

Run: ``.venv/bin/python -m tests.benchmarks.fanout_bench``.

Per fleet size N, a fresh hub and a real Mosquitto configured by ``modelfleet-hub mqtt-config``
(TLS, client certificates, ACL), and N lightweight simulated agents in this process:

- identities are issued in-process with the hub's CA (``CertificateAuthority.sign_csr``) and the
  agents are added to the hub's registry (``Registry.add_agent``) while the hub is stopped:
  enrolling 1,000 agents through the CLI would take longer than the benchmark;
- each simulated agent is the agent's own ``agent.fleet.mqtt.MqttLink`` (client set-up, TLS
  identity, last will, persistent session, subscriptions and presence in ``_on_connect``, topic
  dispatch in ``_on_message``, ``publish_report``) with an ``on_desired`` callback that records
  when the deployed version arrives and answers with a report, as FleetSync does;
- instead of ``MqttLink.start()`` (``loop_start``: one network thread per client), the clients
  are connected by a small thread pool (the TLS handshakes) and then driven by two threads, each
  running a selector over its clients' sockets with paho's ``loop_read``/``loop_write``/
  ``loop_misc`` (paho's documented external loop: ``socket()``, ``want_write()``); whatever a
  callback queues is flushed right after. Why: with ``start()``, 1,000 threads contend for the
  GIL on 2 cores; in a trial only 339 of 1,000 clients had connected and subscribed after 120 s
  (starved TLS handshakes, "Protocol error" disconnects at the broker, paho reconnect backoff),
  while the selector drive connects all 1,000 in a few seconds at ~1% of a core when idle.

Measured, per N, in rounds that alternate baseline and deploy (medians; the machine is shared):

- deploy: the admin ``Deploy`` RPC (what ``modelfleet-hub deploy`` calls) -> all N agents
  received a desired state naming the new version (last arrival), and -> the hub has recorded
  all N reports (polled in the hub's SQLite registry, read-only, so polling does not load the
  hub; checked once through ``ListAgents`` at the end);
- baseline: the broker's bare fan-out: one plain paho publisher with the hub's MQTT identity
  and the hub's client settings (``make_client``) publishing one retained QoS 1 message of the
  same size to each of the N desired topics in a loop, the N agents subscribed; first publish
  -> last arrival.

Also reported: CPU seconds of hub, broker and this process during the deploy rounds, and a
SQLite commit rate on the same disk (the hub commits each report and presence change on its
own, with synchronous=FULL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import resource
import selectors
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization

from modelfleet.agent.fleet.mqtt import MqttLink
from modelfleet.kernel import mqtt_topics as t
from modelfleet.kernel.mqtt_client import make_client, session_properties
from modelfleet.protos import fleet_pb2 as pb
from tests import models
from tests.benchmarks.distribution_bench import SystemSample, cpu_seconds, format_table, row
from tests.procs import BrokerProcess, HubProcess, hub_admin

BENCH = "mqtt fan-out"
MODEL = "mlp"
SIZES = (100, 1000)
ROUNDS = {100: 5, 1000: 5}
DRIVERS = 2  # selector threads: one per core
CONNECTORS = 8  # TLS handshakes in parallel while the fleet connects
KEEPALIVE_S = 20  # as MqttLink.start()
SELECT_S = 0.01
SILENT_ROUNDS = 3
# Sentinel versions for the baseline's payloads: never published, so never confused with a deploy.
BASELINE_VERSION = 1_000_000


def _row(figure: str, value: float, unit: str, baseline: float | None = None) -> dict:
    return row(figure, value, unit, baseline, bench=BENCH)


def raise_open_files(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``want`` (Mosquitto, started later, inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the simulated fleet --------------------------------------------------------------------------


class Board:
    """Arrival times of one expected desired state; written from the driver threads."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()
        self.version: int | None = None
        self.report = False
        self.arrivals: dict[int, float] = {}
        self.done = threading.Event()

    def arm(self, version: int, report: bool) -> None:
        """Expect ``version`` next; answer it with a report (deploys) or not (baseline)."""
        with self.lock:
            self.version, self.report = version, report
            self.arrivals = {}
            self.done.clear()

    def record(self, idx: int, at: float) -> bool:
        """True the first time agent ``idx`` sees the expected version."""
        with self.lock:
            if idx in self.arrivals:
                return False
            self.arrivals[idx] = at
            if len(self.arrivals) >= self.n:
                self.done.set()
            return True


class SimAgent:
    """One agent's MQTT side: MqttLink, plus what FleetSync does with a desired state."""

    def __init__(self, idx: int, agent_id: str, data_dir: Path, address: str, board: Board):
        self.idx = idx
        self.board = board
        self.link = MqttLink(address, data_dir, agent_id, self.on_desired)
        self.subacks = 0
        # MqttLink sets no on_subscribe: counting SUBACKs tells when its subscriptions are live.
        self.link.client.on_subscribe = self._on_subscribe

    def _on_subscribe(self, *_args: object) -> None:
        self.subacks += 1

    def connect(self) -> None:
        """MqttLink.start() without loop_start(): same session, keepalive, blocking handshake."""
        host, port = self.link.address.rsplit(":", 1)
        self.link.client.connect(
            host,
            int(port),
            keepalive=KEEPALIVE_S,
            clean_start=False,
            properties=session_properties(),
        )

    def on_desired(self, payload: bytes) -> None:
        now = time.monotonic()
        board = self.board
        version = board.version
        if not payload or version is None:
            return
        state = pb.DesiredState.FromString(payload)
        if not any(m.name == MODEL and m.version == version for m in state.models):
            return  # an older retained state, or the previous round's
        if board.record(self.idx, now) and board.report:
            # What the agent reports first after a new desired state: desired, not yet active.
            report = pb.AgentReport(
                models=[pb.ModelReport(name=MODEL, desired_version=version)],
                desired_revision=state.revision,
            )
            self.link.publish_report(report)


class Driver(threading.Thread):
    """Runs paho's network loop for many clients from one thread, over a selector."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.selector = selectors.DefaultSelector()
        self.incoming: queue.SimpleQueue[mqtt.Client] = queue.SimpleQueue()
        self.clients: dict[mqtt.Client, object] = {}  # client -> its registered socket
        self.stopping = threading.Event()
        self.lost = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the main thread, which owns the clean-up
            self.error = exc

    def _run(self) -> None:
        next_misc = time.monotonic() + 1.0
        while not self.stopping.is_set():
            while True:
                try:
                    client = self.incoming.get_nowait()
                except queue.Empty:
                    break
                sock = client.socket()
                if sock is None:
                    self.lost += 1
                    continue
                self.clients[client] = sock
                self.selector.register(sock, self._events(client), client)
            if self.clients:
                for key, mask in self.selector.select(timeout=SELECT_S):
                    self._service(key.data, mask)
            else:
                time.sleep(SELECT_S)
            if time.monotonic() >= next_misc:
                # Keepalive pings and timeouts, as paho's own loop does about once a second.
                next_misc = time.monotonic() + 1.0
                for client in list(self.clients):
                    if client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                        self._drop(client)
                    else:
                        self._flush(client)

    @staticmethod
    def _events(client: mqtt.Client) -> int:
        return selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)

    def _service(self, client: mqtt.Client, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            sock = self.clients[client]
            # Bounded: a TLS socket can hold decrypted bytes that select() does not report, so
            # keep reading while it has some pending (paho's own loop does the same check).
            for _ in range(256):
                if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                    self._drop(client)
                    return
                if not getattr(sock, "pending", lambda: 0)():
                    break
        self._flush(client)

    def _flush(self, client: mqtt.Client) -> None:
        """Write what callbacks queued (subscribes, reports) and track write interest."""
        if client not in self.clients:
            return
        if client.want_write() and client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
            self._drop(client)
            return
        sock = self.clients[client]
        events = self._events(client)
        if self.selector.get_key(sock).events != events:
            self.selector.modify(sock, events, client)

    def _drop(self, client: mqtt.Client) -> None:
        sock = self.clients.pop(client, None)
        if sock is not None:
            self.lost += 1
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)


class Fleet:
    """N simulated agents connected to the broker; always closed by the caller."""

    def __init__(self, sims: list[SimAgent]) -> None:
        self.sims = sims
        self.drivers = [Driver(f"mqtt-driver-{i}") for i in range(DRIVERS)]

    def connect(self, timeout: float) -> None:
        for d in self.drivers:
            d.start()
        deadline = time.monotonic() + timeout

        def connect_one(sim: SimAgent) -> None:
            sim.connect()
            self.drivers[sim.idx % DRIVERS].incoming.put(sim.link.client)

        with ThreadPoolExecutor(CONNECTORS) as pool:
            for f in [pool.submit(connect_one, s) for s in self.sims]:
                f.result(timeout=max(deadline - time.monotonic(), 1.0))
        # Both of MqttLink's subscriptions acknowledged: retained desired states will arrive.
        while sum(min(s.subacks, 2) for s in self.sims) < 2 * len(self.sims):
            self.check()
            if time.monotonic() > deadline:
                ready = sum(s.subacks >= 2 for s in self.sims)
                raise TimeoutError(f"only {ready}/{len(self.sims)} agents subscribed")
            time.sleep(0.05)

    def check(self) -> None:
        for d in self.drivers:
            if d.error is not None:
                raise RuntimeError(f"{d.name} failed") from d.error
            if d.lost:
                raise RuntimeError(f"{d.name}: {d.lost} MQTT connection(s) lost")

    def close(self) -> None:
        # MqttLink warns on every disconnect; a thousand planned ones would bury the results.
        link_log = logging.getLogger("modelfleet.agent.fleet.mqtt")
        level = link_log.level
        link_log.setLevel(logging.ERROR)
        try:
            for d in self.drivers:
                d.stopping.set()
            for d in self.drivers:
                if d.is_alive():
                    d.join(10)
            for sim in self.sims:
                client = sim.link.client
                # Best effort, client by client: one broken connection must not leak the rest.
                with contextlib.suppress(Exception):
                    # A clean DISCONNECT: the broker drops the will, the hub sees no offline storm.
                    if client.socket() is not None:
                        client.disconnect()
                sock = client.socket()
                if sock is not None:
                    sock.close()
        finally:
            link_log.setLevel(level)


# -- set-up ---------------------------------------------------------------------------------------


def issue_identities(hub_data: Path, work: Path, n: int) -> list[tuple[str, Path]]:
    """n agents: key + CSR + certificate from the hub's CA, registered while the hub is down."""
    from modelfleet.hub.ca import CertificateAuthority
    from modelfleet.hub.registry import Registry
    from modelfleet.kernel.identity import cert_fingerprint, generate_key, make_csr

    ca = CertificateAuthority.load_or_create(hub_data / "ca")
    registry = Registry(hub_data / "registry.db")
    # Per connection: skip the fsync per insert; this is set-up, not what is measured.
    registry.db.execute("PRAGMA synchronous=OFF")
    out = []
    try:
        for i in range(n):
            agent_id = f"sim-{i:04d}"
            data = work / "agents" / agent_id
            ident = data / "identity"
            ident.mkdir(parents=True)
            key = generate_key()
            cert = ca.sign_csr(make_csr(key, f"agent:{agent_id}"), f"agent:{agent_id}")
            # Plain writes: 3,000 small files with an fsync each would dominate the set-up.
            (ident / "ca.crt").write_bytes(ca.cert_pem)
            (ident / "agent.crt").write_bytes(cert)
            key_file = ident / "agent.key"
            key_file.touch(mode=0o600)
            key_file.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            registry.add_agent(agent_id, agent_id, {"fleet": "sim"}, cert_fingerprint(cert))
            out.append((agent_id, data))
    finally:
        registry.close()
    return out


def count(db: Path, sql: str, *args: object) -> int:
    """One read-only query on the hub's registry (WAL: never blocks the hub's writes)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(con.execute(sql, args).fetchone()[0])
    finally:
        con.close()


REPORTED = (
    "SELECT COUNT(*) FROM agents WHERE "
    "CAST(json_extract(report, '$.models[0].desired_version') AS INTEGER) = ?"
)


def wait_count(db: Path, sql: str, args: tuple, n: int, t0: float, timeout: float) -> float:
    """Seconds after t0 at which ``sql`` counts n rows; polled every 20 ms."""
    deadline = t0 + timeout
    while True:
        now = time.monotonic()
        if count(db, sql, *args) >= n:
            return now - t0
        if now > deadline:
            raise TimeoutError(f"{count(db, sql, *args)}/{n} after {timeout:.0f}s: {sql}")
        time.sleep(0.02)


def desired_queries(db: Path) -> float:
    """Seconds for what the hub's publish_desired asks the registry, for every agent, once.

    The same Registry methods (``agents``, then ``revision`` and ``desired_for`` per agent),
    on the hub's database, in this process: the hub's share of a deploy before any publish.
    """
    from modelfleet.hub.registry import Registry

    registry = Registry(db)
    try:
        start = time.monotonic()
        for agent in registry.agents():
            registry.revision()
            registry.desired_for(agent.labels)
        return time.monotonic() - start
    finally:
        registry.close()


def sqlite_commit_rate(path: Path, n: int) -> float:
    """Single-row UPDATE transactions per second, WAL + synchronous=FULL, as the hub commits."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, report TEXT)")
        con.executemany("INSERT INTO a VALUES (?, '')", [(i,) for i in range(n)])
        start = time.monotonic()
        for i in range(n):
            con.execute("BEGIN IMMEDIATE")
            con.execute("UPDATE a SET report = ? WHERE id = ?", ('{"models": []}', i))
            con.execute("COMMIT")
        return n / (time.monotonic() - start)
    finally:
        con.close()


# -- one fleet size -------------------------------------------------------------------------------


def run_size(n: int, work: Path, onnx: Path) -> list[dict]:
    began = time.monotonic()
    hub_data = work / "hub"
    hub_data.mkdir(parents=True)
    broker = BrokerProcess(hub_data, work / "broker").configure()
    hub: HubProcess | None = None
    fleet: Fleet | None = None
    publisher: mqtt.Client | None = None
    try:
        agents = issue_identities(hub_data, work, n)
        print(
            f"  N={n}: {n} identities issued and registered ({time.monotonic() - began:.1f}s)",
            flush=True,
        )
        broker.start()
        hub = HubProcess(hub_data, "--mqtt", broker.address, log_path=work / "hub.log").start()
        assert hub.proc is not None and broker.proc is not None
        deadline = time.monotonic() + 30
        while "connected to MQTT broker" not in hub.logs():
            if time.monotonic() > deadline:
                raise TimeoutError("hub did not connect to the broker")
            time.sleep(0.05)
        rounds = ROUNDS[n]
        for _ in range(rounds + SILENT_ROUNDS):
            hub.cli("publish", MODEL, str(onnx))

        board = Board(n)
        sims = [SimAgent(i, a, d, broker.address, board) for i, (a, d) in enumerate(agents)]
        fleet = Fleet(sims)
        connecting = time.monotonic()
        fleet.connect(timeout=120)
        db = hub_data / "registry.db"
        # Every "online" presence recorded: the hub's backlog from the connections is done.
        online = "SELECT COUNT(*) FROM agents WHERE presence = 'online'"
        wait_count(db, online, (), n, time.monotonic(), timeout=120)
        print(
            f"  N={n}: all connected and subscribed, presence recorded by the hub "
            f"({time.monotonic() - connecting:.1f}s)",
            flush=True,
        )

        mdir = hub_data / "mqtt"
        publisher = make_client(
            "bench-publisher", mdir / "ca.crt", mdir / "hub.crt", mdir / "hub.key"
        )
        host, port = broker.address.rsplit(":", 1)
        publisher.connect(host, int(port), keepalive=KEEPALIVE_S)
        publisher.loop_start()
        topics = [t.topic(f"agent:{a}", t.DESIRED) for a, _ in agents]
        stub = hub_admin(hub)
        stub.ListAgents(pb.ListAgentsRequest(), timeout=30)  # TLS handshake outside the clock
        (v1,) = [
            v
            for v in stub.ListVersions(pb.ListVersionsRequest(name=MODEL)).versions
            if v.version == 1
        ]

        baseline_s, deploy_s, first_s, reports_s = [], [], [], []
        hub_cpu = broker_cpu = me_cpu = me_cpu_base = 0.0
        sys_rows: list[list[dict]] = []
        for r in range(rounds):
            # Baseline: the same payload size as the hub's desired state, a sentinel version.
            sentinel = BASELINE_VERSION + r
            payload = pb.DesiredState(
                revision=10**6 + r,
                models=[
                    pb.DesiredModel(
                        name=MODEL,
                        version=sentinel,
                        target_path=v1.target_path,
                        sha256=v1.sha256,
                        size=v1.size,
                    )
                ],
            ).SerializeToString()
            board.arm(sentinel, report=False)
            me0 = time.process_time()
            t0 = time.monotonic()
            for topic in topics:
                publisher.publish(topic, payload, qos=1, retain=True)
            if not board.done.wait(60):
                fleet.check()
                raise TimeoutError(f"baseline: {len(board.arrivals)}/{n} arrivals")
            baseline_s.append(max(board.arrivals.values()) - t0)
            me_cpu_base += time.process_time() - me0

            # Deploy: version r + 1 to the whole fleet, as `modelfleet-hub deploy` does.
            version = r + 1
            board.arm(version, report=True)
            cpu0 = (cpu_seconds(hub.proc.pid), cpu_seconds(broker.proc.pid), time.process_time())
            sys0 = SystemSample.take(work)
            t0 = time.monotonic()
            stub.Deploy(pb.DeployRequest(name=MODEL, version=version), timeout=60)
            if not board.done.wait(60):
                fleet.check()
                raise TimeoutError(f"deploy: {len(board.arrivals)}/{n} arrivals")
            deploy_s.append(max(board.arrivals.values()) - t0)
            first_s.append(min(board.arrivals.values()) - t0)
            reports_s.append(wait_count(db, REPORTED, (version,), n, t0, timeout=120))
            hub_cpu += cpu_seconds(hub.proc.pid) - cpu0[0]
            broker_cpu += cpu_seconds(broker.proc.pid) - cpu0[1]
            me_cpu += time.process_time() - cpu0[2]
            if sys0 is not None:
                sys_rows.append(sys0.rows(SystemSample.take(work), f"N={n} deploy", BENCH))
            print(
                f"  N={n} round {r + 1}: baseline {baseline_s[-1]:.3f}s, deploy -> all "
                f"desired {deploy_s[-1]:.3f}s, -> all reports {reports_s[-1]:.3f}s",
                flush=True,
            )
        fleet.check()
        # The admin API agrees with what was polled in the database.
        listed = stub.ListAgents(pb.ListAgentsRequest(), timeout=60).agents
        got = sum(1 for a in listed for m in a.report.models if m.desired_version == rounds)
        if got != n:
            raise RuntimeError(f"ListAgents shows {got}/{n} reports of v{rounds}")

        # Diagnostic: the same deploy to agents that do not answer, so the hub fans out without
        # a thousand reports arriving (and being committed) while it publishes.
        silent_s = []
        hub_cpu_silent = 0.0
        for r in range(SILENT_ROUNDS):
            version = rounds + r + 1
            board.arm(version, report=False)
            cpu0 = (cpu_seconds(hub.proc.pid), 0.0, 0.0)
            t0 = time.monotonic()
            stub.Deploy(pb.DeployRequest(name=MODEL, version=version), timeout=60)
            if not board.done.wait(60):
                fleet.check()
                raise TimeoutError(f"silent deploy: {len(board.arrivals)}/{n} arrivals")
            silent_s.append(max(board.arrivals.values()) - t0)
            hub_cpu_silent += cpu_seconds(hub.proc.pid) - cpu0[0]
        fleet.check()

        base = statistics.median(baseline_s)
        dep = statistics.median(deploy_s)
        rep = statistics.median(reports_s)
        first = statistics.median(first_s)
        tail = statistics.median(r - d for r, d in zip(reports_s, deploy_s, strict=True))
        queries = desired_queries(db)
        rows = [
            _row(f"N={n}: broker bare fan-out, first publish -> last arrival", base, "s"),
            _row(f"N={n}: deploy -> all agents received desired", dep, "s", base),
            _row(f"N={n}: deploy -> first agent received desired", first, "s"),
            _row(f"N={n}: deploy -> hub has all reports", rep, "s", base),
            _row(f"N={n}: last arrival -> hub has all reports", tail, "s"),
            _row(
                f"N={n}: deploy -> all desired, agents not reporting (diagnostic)",
                statistics.median(silent_s),
                "s",
                base,
            ),
            _row(f"N={n}: hub CPU per deploy round (deploy -> all reports)", hub_cpu / rounds, "s"),
            _row(
                f"N={n}: hub CPU per silent deploy round (diagnostic)",
                hub_cpu_silent / SILENT_ROUNDS,
                "s",
            ),
            _row(f"N={n}: broker CPU per deploy round", broker_cpu / rounds, "s"),
            _row(f"N={n}: simulated agents' CPU per deploy round", me_cpu / rounds, "s"),
            _row(f"N={n}: simulated agents' CPU per baseline round", me_cpu_base / rounds, "s"),
            _row(f"N={n}: hub's desired-state queries for all agents (in-process)", queries, "s"),
        ]
        for j, sample in enumerate(sys_rows[0] if sys_rows else []):
            value = statistics.median(run[j]["value"] for run in sys_rows)
            rows.append(_row(sample["figure"], value, sample["unit"]))
        print(f"  N={n}: took {time.monotonic() - began:.0f}s", flush=True)
        return rows
    except BaseException:
        if hub is not None:
            tail = hub.logs().strip().splitlines()[-10:]
            print("--- hub log (last lines)\n" + "\n".join(tail), flush=True)
        print(
            "--- broker log (last lines)\n" + "\n".join(broker.logs().splitlines()[-10:]),
            flush=True,
        )
        raise
    finally:
        if publisher is not None:
            publisher.disconnect()
            publisher.loop_stop()
        if fleet is not None:
            fleet.close()
        if hub is not None:
            hub.stop()
        broker.stop()


def main() -> list[dict]:
    began = time.monotonic()
    limit = raise_open_files(4 * max(SIZES) + 1024)
    print(
        f"fan-out benchmark (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
        f"cores, open-file limit {limit})",
        flush=True,
    )
    rows: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="modelfleet-fanout-bench-"))
    try:
        onnx = models.mlp(root / "small.onnx")
        for n in SIZES:
            rows += run_size(n, root / f"n{n}", onnx)
        rate = sqlite_commit_rate(root / "commit-rate.db", 1000)
        rows.append(
            _row("sqlite: single-row commits per second (WAL, synchronous=FULL)", rate, "1/s")
        )
        print(f"  fan-out benchmark took {time.monotonic() - began:.0f}s", flush=True)
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    print(format_table(main()))
