"""``modelfleet-hub``: run the hub, publish and deploy models, manage the fleet."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfleet.hub.cli_alerts import add_alert_commands, cmd_alerts, cmd_webhooks
from modelfleet.hub.cli_capture import add_capture_commands, cmd_capture
from modelfleet.hub.cli_outcomes import add_outcome_commands, cmd_outcomes
from modelfleet.kernel.cli import run_command
from modelfleet.kernel.commandline import finish, message_dict
from modelfleet.kernel.errors import (
    EXIT_CODES,
    InvalidRequestError,
    ModelfleetError,
    Status,
    VerificationError,
)
from modelfleet.kernel.malloc import tune_malloc

if TYPE_CHECKING:
    from modelfleet.hub.signing import ExpectedTarget

DEFAULT_DATA = os.environ.get("MODELFLEET_HUB_DATA", "hub-data")


def _duration(text: str) -> float:
    """A duration with its unit. A bare ``300`` could mean seconds or minutes, so every
    duration flag of this CLI refuses it, the same way."""
    bare = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", bare):
        raise argparse.ArgumentTypeError(
            f"{bare!r} has no unit: add one, e.g. {bare}s, or 5m, 1h, 1d"
        )
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", bare)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (e.g. 90s, 10m, 1h, 7d)")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = part.partition("=")
        if not sep or not k:
            raise argparse.ArgumentTypeError(f"invalid label {part!r}: use key=value")
        out[k] = v
    return out


def _version(text: str) -> int:
    from modelfleet.kernel.bundle import MAX_VERSION, VERSION_RANGE

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 1 <= value <= MAX_VERSION:
        raise argparse.ArgumentTypeError(
            f"invalid version {text!r}: versions are integers in {VERSION_RANGE}"
        )
    return value


def _notes(text: str) -> str:
    from modelfleet.hub.registry import MAX_NOTES_BYTES

    size = len(text.encode("utf-8", "surrogateescape"))
    if size > MAX_NOTES_BYTES:
        raise argparse.ArgumentTypeError(
            f"notes are {size} bytes (UTF-8); at most {MAX_NOTES_BYTES} bytes are allowed"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelfleet-hub", description="modelfleet hub")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="hub state directory (default: $MODELFLEET_HUB_DATA or ./hub-data)",
    )
    p.add_argument("--hub", help="hub address HOST:PORT (default: from DATA/admin/hub.json)")
    p.add_argument("--admin-dir", type=Path, help="admin identity (default: DATA/admin)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the hub")
    s.add_argument(
        "--config",
        type=Path,
        help="TOML file with a [hub] table; MODELFLEET_HUB_* variables override it, flags "
        "override both (default: none)",
    )
    s.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="mTLS address for agents and the admin CLI (default: 127.0.0.1:7443)",
    )
    s.add_argument(
        "--enroll-listen",
        metavar="HOST:PORT",
        help="TLS address for enrollment only (default: the --listen port + 1)",
    )
    s.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="address handed to agents (default: the --listen host with the bound port)",
    )
    s.add_argument(
        "--advertise-enroll",
        metavar="HOST:PORT",
        help="enrollment address put in tokens (default: the --enroll-listen host with the "
        "bound port)",
    )
    s.add_argument(
        "--hostnames",
        metavar="NAMES",
        help="extra names for the hub's server certificate, comma-separated (default: none)",
    )
    s.add_argument(
        "--refresh-interval-s",
        type=float,
        metavar="S",
        help="seconds between checks that re-sign timestamp and snapshot (default: 60)",
    )
    s.add_argument(
        "--timestamp-expiry-s",
        type=float,
        metavar="S",
        help="lifetime of TUF timestamp metadata (default: 86400, 1 day)",
    )
    s.add_argument(
        "--snapshot-expiry-s",
        type=float,
        metavar="S",
        help="lifetime of TUF snapshot metadata (default: 604800, 7 days)",
    )
    s.add_argument(
        "--transfer-rate-limit-mbps",
        type=float,
        metavar="R",
        help="per-download rate limit in MB/s (default: 0, unlimited)",
    )
    s.add_argument(
        "--agent-cert-lifetime-s",
        type=float,
        help="lifetime of agent certificates (default: 365 days)",
    )
    s.add_argument("--mqtt", help="MQTT broker HOST:PORT to bridge to (default: none, gRPC only)")
    s.add_argument(
        "--advertise-mqtt",
        metavar="HOST:PORT",
        help="broker address handed to agents at enrollment (default: the --mqtt value)",
    )
    s.add_argument(
        "--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (default: INFO)"
    )
    s.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="log one JSON object per line (default: text)",
    )
    s.add_argument(
        "--metrics-listen", help="HOST:PORT for the hub's Prometheus /metrics (default: off)"
    )

    keys = sub.add_parser("keys", help="TUF signing keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    ki = ksub.add_parser("init", help="create the four role keys (before the first start)")
    ki.add_argument(
        "--offline",
        type=Path,
        help="write the root and targets private keys here, not on the hub (default: all four "
        "on the hub)",
    )

    kr = ksub.add_parser(
        "rotate", help="give a role a new key (root N+1), with the hub stopped; see security.md"
    )
    kr.add_argument(
        "role", choices=("root", "targets", "snapshot", "timestamp"), help="the role to rotate"
    )
    kr.add_argument(
        "--root-key", type=Path, help="the current root private key (default: DATA/keys/root.pem)"
    )
    kr.add_argument(
        "--new-key",
        type=Path,
        help="the new private key (default: generate one; required for a key kept offline)",
    )
    kr.add_argument(
        "--renew",
        action="store_true",
        help="root only: keep its key, re-sign root with a new expiry",
    )
    kr.add_argument(
        "--config",
        type=Path,
        help="the hub's TOML config, for its metadata lifetimes (default: the built-in ones)",
    )

    mq = sub.add_parser("mqtt-config", help="write mosquitto.conf, ACL and certificates")
    mq.add_argument("--out", type=Path, required=True, help="folder for the broker's files")
    mq.add_argument("--listen", default="127.0.0.1:8883", help="broker listener HOST:PORT")
    mq.add_argument(
        "--hostnames", default="", help="extra broker names, comma-separated (default: none)"
    )

    pub = sub.add_parser("publish", help="build, upload and sign a new model version")
    pub.add_argument("name", help="model name")
    pub.add_argument("model", type=Path, help="the MODEL.onnx file")
    pub.add_argument("--version", type=_version, help="1..2^63-1 (default: latest + 1)")
    pub.add_argument("--samples", type=Path, help="SAMPLES.npz (default: synthetic samples)")
    pub.add_argument(
        "--expected",
        type=Path,
        help="golden outputs EXPECTED.npz (default: computed from the model)",
    )
    pub.add_argument(
        "--notes", type=_notes, default="", help="at most 4096 bytes (UTF-8) (default: none)"
    )
    pub.add_argument(
        "--targets-key",
        type=Path,
        help="offline targets private key (PEM) (default: the hub signs with its own)",
    )
    pub.add_argument(
        "--allow-extra",
        action="append",
        default=[],
        metavar="TARGET_PATH",
        help="also sign this other staged target (repeat; docs/security.md) (default: none)",
    )
    pub.add_argument(
        "--latency-budget-ms",
        type=float,
        help="the health gate's p99 limit on the samples (default: 1000)",
    )
    pub.add_argument(
        "--tolerance",
        type=float,
        help="the health gate's rtol and atol (default: 1e-4 and 1e-5)",
    )
    pub.add_argument(
        "--max-batch-size",
        type=int,
        help="0: no batch dimension (default: 32 when dimension 0 is dynamic)",
    )
    pub.add_argument(
        "--max-queue-delay-us", type=int, default=0, help="batching hint stored in the bundle"
    )
    pub.add_argument(
        "--providers",
        default="",
        help="execution providers the bundle prefers, best first, comma-separated, e.g. "
        "CUDAExecutionProvider,CPUExecutionProvider or cuda,cpu (default: none, each agent's "
        "choice)",
    )
    pub.add_argument(
        "--provider-option",
        action="append",
        default=[],
        metavar="PROVIDER:KEY=VALUE",
        help="an onnxruntime option of one of --providers (repeat) (default: none)",
    )
    pub.add_argument(
        "--reference",
        type=Path,
        help="FILE.parquet of reference rows (or a reference.json) for drift statistics, stored "
        "signed in the bundle (default: none)",
    )
    pub.add_argument(
        "--reference-bins",
        type=int,
        default=10,
        help="quantile bins per numeric feature (default: 10)",
    )
    pub.add_argument(
        "--reference-top-k",
        type=int,
        default=20,
        help="categories kept per categorical feature, the rest count as other (default: 20)",
    )

    sign = sub.add_parser("sign", help="sign a published version with the offline targets key")
    sign.add_argument("name", help="model name")
    sign.add_argument("version", type=int, help="the uploaded, unsigned version")
    sign.add_argument("--targets-key", type=Path, required=True, help="targets private key (PEM)")
    sign.add_argument(
        "--sha256",
        required=True,
        metavar="HEX",
        help="the bundle sha256 that publish printed: what you mean to sign",
    )
    sign.add_argument(
        "--allow-extra",
        action="append",
        default=[],
        metavar="TARGET_PATH",
        help="also sign this other staged target (repeat; docs/security.md) (default: none)",
    )

    models = sub.add_parser("models", help="the registry")
    msub = models.add_subparsers(dest="models_command", required=True)
    mls = msub.add_parser("ls", help="every model: latest and production version")
    _add_json(mls)
    show = msub.add_parser("show", help="one model: summary and its versions")
    show.add_argument("name", help="model name")
    _add_json(show)
    vers = msub.add_parser("versions", help="one model's versions: stage, signed, size, notes")
    vers.add_argument("name", help="model name")
    _add_json(vers)
    stage = msub.add_parser("stage", help="set a version's lifecycle stage")
    stage.add_argument("name", help="model name")
    stage.add_argument("version", type=_version, help="the version to move")
    stage.add_argument(
        "stage",
        choices=["staged", "production", "deprecated", "retired"],
        help="the new stage",
    )
    stage.add_argument(
        "--force",
        action="store_true",
        help="retire a version agents still want (they fall back), or mark production a "
        "version the fleet does not desire",
    )

    dep = sub.add_parser("deploy", help="set the desired version for matching agents")
    dep.add_argument("name", help="model name")
    dep.add_argument("version", type=_version, help="the version agents should run")
    dep.add_argument("--selector", type=_labels, default={}, help="k=v[,k=v] (default: all)")
    _add_deployment_commands(sub, dep)

    ro = sub.add_parser("rollout", help="canary waves with automatic rollback")
    rsub = ro.add_subparsers(dest="rollout_command", required=True)
    rs = rsub.add_parser(
        "start",
        help="start a rollout of NAME VERSION",
        description="Roll VERSION of model NAME out to the selected agents in waves, judging "
        "each wave by its gates; see docs/cli.md. Durations need a unit (90s, 5m, 1h, 1d).",
        epilog=f"exit codes with --wait: {_ROLLOUT_EXITS_HELP}; errors as in docs/cli.md",
    )
    rs.add_argument("name", help="model name")
    rs.add_argument("version", type=int, help="the version to roll out")
    rs.add_argument(
        "--selector",
        type=_labels,
        metavar="K=V[,K=V]",
        default={},
        help="k=v[,k=v]: the agents to roll out to (default: the whole fleet)",
    )
    rs.add_argument(
        "--waves",
        metavar="LIST",
        default="10,50,100",
        help="increasing cumulative percentages of the selected agents, one per wave; the "
        "last wave always takes everyone (default: %(default)s)",
    )
    rs.add_argument(
        "--waves-are-counts",
        action="store_true",
        help="read --waves as agent counts instead of percentages (default: percentages)",
    )
    rs.add_argument(
        "--bake",
        metavar="DURATION",
        type=_duration,
        default="5m",
        help="how long each wave serves before its gates are judged (default: %(default)s)",
    )
    rs.add_argument(
        "--gate",
        metavar="EXPR",
        action="append",
        default=[],
        help="a check of each wave's telemetry, repeatable: e.g. 'error_rate<0.01', "
        "'p99_ms<100', 'p99_vs_baseline<1.2', or of late labels: 'accuracy>=0.9', "
        "'accuracy_drop<0.02' (default: none: the judge (--judge) compares canary and "
        "baseline)",
    )
    rs.add_argument(
        "--judge",
        metavar="LIST",
        default="latency,errors",
        help="metrics the statistical judge compares, canary agents against the agents still on "
        "the previous version, each NAME[:ABS_TOLERANCE[:REL_TOLERANCE]] with NAME one of "
        "latency (latency_p50 and latency_p99), latency_p50, latency_p95, latency_p99, errors; "
        "a failing metric rolls back at once, all passing moves on early; 'none': gates only; "
        "see docs/rollouts.md (default: %(default)s)",
    )
    rs.add_argument(
        "--max-bake",
        metavar="DURATION",
        type=_duration,
        default=None,
        help="a wave the judge finds inconclusive at the end of its bake bakes on up to this "
        "long, then the rollout pauses for an operator (default: 3 x --bake)",
    )
    rs.add_argument(
        "--min-labels",
        metavar="N",
        type=int,
        default=30,
        help="an accuracy gate (accuracy>=X, accuracy_drop<X: late labels, `outcomes import`) "
        "judges once the new version and its reference have N labelled predictions; until "
        "then the wave bakes on, up to --max-bake (default: 30)",
    )
    rs.add_argument(
        "--min-requests",
        metavar="N",
        type=int,
        default=0,
        help="fewer canary requests in a bake pause the rollout as inconclusive "
        "(default: %(default)s: a wave without traffic passes its gates)",
    )
    rs.add_argument(
        "--max-failed-agents",
        metavar="N",
        type=int,
        default=0,
        help="agents that may refuse the version or time out before the rollout rolls back "
        "(default: %(default)s)",
    )
    rs.add_argument(
        "--agent-timeout",
        metavar="DURATION",
        type=_duration,
        default="10m",
        help="how long an agent may take to switch (blue-green: to prepare) before it counts "
        "as failed (default: %(default)s)",
    )
    rs.add_argument(
        "--strategy",
        default="canary",
        choices=["canary", "blue-green"],
        help="canary: wave by wave; blue-green: prepare on every agent, then switch all at "
        "once (default: %(default)s)",
    )
    rs.add_argument(
        "--auto-switch",
        action="store_true",
        help="blue-green: switch once all are ready (default: wait for `rollout promote`)",
    )
    rs.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="allow a VERSION older than one the selected agents run or are set to run "
        "(default: refused)",
    )
    rs.add_argument(
        "--traffic",
        metavar="STEPS",
        default=None,
        help="traffic canary: in each wave, the percent of requests the new version answers, "
        "step by step, baking and judging between steps; increasing, ending at 100, e.g. "
        "5,25,50,100 (default: none: a wave switches its agents at once)",
    )
    rs.add_argument(
        "--rate-base",
        metavar="N",
        type=float,
        default=0.0,
        help="pacing: agents assigned in the first minute; batch k (one a minute) takes "
        "N * F^k agents (default: %(default)g: no pacing, a wave assigns all at once)",
    )
    rs.add_argument(
        "--rate-factor",
        metavar="F",
        type=float,
        default=2.0,
        help="pacing: how much the rate grows each minute, >= 1 (default: %(default)g)",
    )
    rs.add_argument(
        "--rate-max",
        metavar="M",
        type=float,
        default=0.0,
        help="pacing: at most M agents a minute (default: %(default)g: no maximum)",
    )
    rs.add_argument(
        "--abort-failed-pct",
        metavar="P",
        type=float,
        default=0.0,
        help="roll back when more than P percent of the agents resolved so far failed "
        "(refused the version or timed out); replaces --max-failed-agents (default: "
        "%(default)g: off)",
    )
    rs.add_argument(
        "--abort-min-agents",
        metavar="K",
        type=int,
        default=1,
        help="with --abort-failed-pct: judge the share once at least K agents are resolved "
        "(default: %(default)s)",
    )
    rs.add_argument(
        "--wait",
        action="store_true",
        help="watch the rollout until it ends or needs an operator; the exit code says how "
        "(default: return once started)",
    )
    rs.add_argument(
        "--timeout",
        metavar="DURATION",
        type=_duration,
        default=None,
        help=f"with --wait: stop waiting after this long (exit {EXIT_WAIT_TIMEOUT}); the "
        "rollout goes on (default: no limit)",
    )
    st = rsub.add_parser(
        "status",
        help="waves, agents, gate values, time left in bake",
        epilog=f"exit codes with --watch: {_ROLLOUT_EXITS_HELP}; without --watch 0 whatever "
        "the state",
    )
    st.add_argument("name", help="model name")
    st.add_argument(
        "--id",
        metavar="ID",
        type=int,
        default=0,
        help="this rollout of NAME (default: the active one, else the latest)",
    )
    st.add_argument(
        "--watch",
        action="store_true",
        help="follow the rollout until it ends or needs an operator, then exit with its "
        "outcome's code (default: print once)",
    )
    st.add_argument(
        "--timeout",
        metavar="DURATION",
        type=_duration,
        default=None,
        help=f"with --watch: stop watching after this long (exit {EXIT_WAIT_TIMEOUT}) "
        "(default: no limit)",
    )
    st.add_argument(
        "--json",
        action="store_true",
        help="print the status as JSON (with --watch: one JSON line per change)",
    )
    for action, what in (
        ("pause", "hold the rollout where it is: no new wave, no verdict"),
        ("resume", "go on from a pause (a bake starts afresh)"),
        ("abort", "stop and return every agent to its previous version"),
        ("promote", "assign all remaining agents at once (blue-green: switch)"),
        ("rollback", "return every agent of the rollout to its previous version"),
    ):
        ctl = rsub.add_parser(action, help=what)
        ctl.add_argument("name", help="model name")
        if action == "rollback":
            ctl.add_argument(
                "--now",
                action="store_true",
                help="end the rollout at once, rolled back, without waiting for the agents to "
                "confirm (traffic canary: every split to 0%%) (default: wait for them)",
            )
    rh = rsub.add_parser("history", help="every rollout of a model, newest last")
    rh.add_argument("name", help="model name")
    _add_json(rh)

    _add_experiment_commands(sub)

    jobs = sub.add_parser("jobs", help="scheduled batch scoring on agents")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    jc = jsub.add_parser("create", help="score Parquet on matching agents on a schedule")
    jc.add_argument("name", help="job name")
    jc.add_argument("--model", required=True, help="model name")
    pick = jc.add_mutually_exclusive_group(required=True)
    pick.add_argument("--version", type=int, help="always this version")
    pick.add_argument(
        "--deployed", action="store_true", help="the version active on the agent when it fires"
    )
    when = jc.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='crontab line, e.g. "0 2 * * *"')
    when.add_argument("--every", type=_duration, help="an interval, e.g. 30s or 1h")
    jc.add_argument("--input", required=True, help="Parquet file, folder or glob on the agent")
    jc.add_argument("--output", required=True, help="output folder on the agent")
    jc.add_argument(
        "--sql", default="", help="DuckDB SELECT over the view `input` (default: every row)"
    )
    jc.add_argument(
        "--keys", default="", help="input columns copied to the output, e.g. id (default: none)"
    )
    jc.add_argument(
        "--selector", type=_labels, default={}, help="k=v[,k=v] (default: the whole fleet)"
    )
    jls = jsub.add_parser("ls", help="every job: model, version, schedule, agents")
    _add_json(jls)
    jr = jsub.add_parser("runs", help="a job's runs as the agents reported them")
    jr.add_argument("name", help="job name")
    _add_json(jr)
    for action, what in (
        ("pause", "stop firing the job on its schedule"),
        ("resume", "fire the job on its schedule again"),
        ("delete", "remove the job from every agent"),
        ("run-now", "fire the job once now on every matching agent"),
    ):
        jsub.add_parser(action, help=what).add_argument("name", help="job name")

    agents = sub.add_parser("agents", help="the fleet")
    asub = agents.add_subparsers(dest="agents_command", required=True)
    tok = asub.add_parser("token", help="print a one-time enrollment token")
    tok.add_argument(
        "--labels",
        type=_labels,
        default={},
        help="k=v[,k=v]: the enrolled agent's labels (default: none)",
    )
    tok.add_argument(
        "--ttl",
        type=_duration,
        default=3600.0,
        help="how long the token stays valid, e.g. 90s, 10m, 1h, 7d (default: 1h)",
    )
    als = asub.add_parser("ls", help="every agent: status, labels, desired and active versions")
    _add_json(als)
    rev = asub.add_parser("revoke", help="refuse an agent from now on")
    rev.add_argument("agent_id", help="the agent's id, as `agents ls` shows it")

    met = sub.add_parser("metrics", help="request rate, error rate, latency per version")
    met.add_argument("name", help="model name")
    met.add_argument("--version", type=int, default=0, help="default: every version")
    met.add_argument("--agent", default="", help="an agent id or hostname (default: the fleet)")
    met.add_argument(
        "--since", type=_duration, default=600.0, help="window ending now (default: 10m)"
    )
    _add_json(met)
    dr = sub.add_parser(
        "drift",
        help="the most drifted features of a model, per agent and fleet-wide",
        description="Drift scores agents computed against the bundle's reference statistics "
        "(PSI, Jensen-Shannon distance, binned KS), over the drift windows that ended in the "
        "window. See docs/monitoring.md#drift-on-the-agent.",
        epilog="exit codes: 0 shown (also when no window was reported), 2 usage, 3 invalid "
        "(unknown agent, no agent matches the selector, --agent with --selector), 4 unknown "
        "model or version",
    )
    dr.add_argument("name", help="model name")
    dr.add_argument("--version", type=int, default=0, help="default: every version")
    who = dr.add_mutually_exclusive_group()
    who.add_argument("--agent", default="", help="an agent id or hostname (default: the fleet)")
    who.add_argument(
        "--selector",
        type=_labels,
        metavar="K=V[,K=V]",
        default={},
        help="the agents whose labels match (default: the whole fleet)",
    )
    dr.add_argument(
        "--since", type=_duration, default=3600.0, help="window ending now (default: 1h)"
    )
    dr.add_argument(
        "--top", type=int, default=5, help="features shown per agent and version (default: 5)"
    )
    _add_json(dr)
    _add_backup_commands(sub)
    _add_state_commands(sub)
    add_alert_commands(sub, _duration, _add_json, _labels)
    add_capture_commands(sub, _add_json, _labels)
    add_outcome_commands(sub, _duration, _add_json)
    return finish(p)


def _percent(text: str) -> float:
    try:
        return float(text.strip().rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid percent {text!r}: use a number, e.g. 10 or 0.5"
        ) from None


def _add_experiment_commands(sub: Any) -> None:
    ex = sub.add_parser(
        "experiment", help="compare a candidate with the running version on live traffic"
    )
    xsub = ex.add_subparsers(dest="experiment_command", required=True)
    xs = xsub.add_parser(
        "start",
        help="load a candidate beside the running version and split or shadow traffic to it",
        description="Start an experiment: the selected agents load --candidate beside the "
        "version they run and answer --split PCT of the requests with it, or run --shadow PCT "
        "of them again on it after the response. See docs/operations.md.",
        epilog="exit codes: 0 started, 2 usage, 3 invalid (share out of range, no agent "
        "matches), 4 unknown model or version, 7 refused (retired or unsigned version, "
        "candidate already running, overlapping experiment or rollout)",
    )
    xs.add_argument("name", help="model name")
    xs.add_argument(
        "--candidate", metavar="V", type=_version, required=True, help="the version to try"
    )
    arm = xs.add_mutually_exclusive_group(required=True)
    arm.add_argument(
        "--split",
        metavar="PCT",
        type=_percent,
        help="percent of requests the candidate answers, more than 0 and less than 100 "
        "(default: none; give --split or --shadow)",
    )
    arm.add_argument(
        "--shadow",
        metavar="PCT",
        type=_percent,
        help="percent of requests run again on the candidate after the response, more than 0 "
        "and at most 100; clients never see its output (default: none)",
    )
    xs.add_argument(
        "--sticky",
        action="store_true",
        help="with --split: a request's routing key always reaches the same version "
        "(default: each request drawn)",
    )
    xs.add_argument(
        "--selector",
        type=_labels,
        metavar="K=V[,K=V]",
        default={},
        help="k=v[,k=v]: the agents that run the experiment (default: the whole fleet)",
    )
    xs.add_argument(
        "--duration",
        metavar="DURATION",
        type=_duration,
        default=None,
        help="end the experiment after this long, e.g. 1h (default: until stop or promote)",
    )
    xs.add_argument(
        "--judge",
        metavar="LIST",
        default="",
        help="with --split: the metrics the statistical judge compares, candidate arm against "
        "active arm, as `rollout start --judge` takes them (default: latency,errors)",
    )
    xs.add_argument(
        "--gate",
        metavar="GATE",
        action="append",
        default=[],
        help="with --shadow, repeatable: a threshold on the output comparison, METRIC<VALUE or "
        "METRIC>VALUE with METRIC one of shadow_agreement, shadow_abs_diff_p50, "
        "shadow_abs_diff_p99, shadow_rel_diff_p99, shadow_js_p99, shadow_failure_rate, "
        "shadow_latency_p99_ms (default: shadow_agreement>0.98 and shadow_abs_diff_p99<0.05); "
        "with --split: accuracy>=X or accuracy_drop<X on late labels (default: none)",
    )
    _add_json(xs)
    xl = xsub.add_parser("ls", help="every experiment, running or ended")
    xl.add_argument("name", nargs="?", default="", help="model name (default: every model)")
    _add_json(xl)
    xst = xsub.add_parser("status", help="per arm: requests, errors, latency, divergence")
    xst.add_argument("name", help="model name")
    _add_experiment_id(xst)
    _add_json(xst)
    for action, what in (
        ("stop", "end the experiment: agents drop the candidate"),
        ("promote", "deploy the candidate for the experiment's selector and end it"),
    ):
        xc = xsub.add_parser(action, help=what)
        xc.add_argument("name", help="model name")
        _add_experiment_id(xc)
        _add_json(xc)


def _add_experiment_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--id",
        metavar="ID",
        type=int,
        default=0,
        help="this experiment of NAME (default: the running one, else the latest)",
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    """``--json``: the same data for scripts (docs/cli.md#json-output)."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_deployment_commands(sub: Any, dep: argparse.ArgumentParser) -> None:
    """`deploy`'s safety flags, `undeploy` and `deployments` (docs/cli.md#deployments)."""
    dep.add_argument(
        "--dry-run",
        action="store_true",
        help="show which agents would change from what to what; write nothing",
    )
    dep.add_argument(
        "--allow-empty",
        action="store_true",
        help="accept a --selector that matches no active agent (it applies to agents enrolled "
        "later)",
    )
    und = sub.add_parser(
        "undeploy", help="remove a deployment; its agents fall back to the others matching them"
    )
    und.add_argument("name", help="model name")
    und.add_argument(
        "--selector",
        type=_labels,
        default={},
        help="exactly the deployment's k=v[,k=v] (default: the whole-fleet deployment)",
    )
    und.add_argument(
        "--dry-run", action="store_true", help="show what agents would fall back to; write nothing"
    )
    deps = sub.add_parser("deployments", help="the fleet's desired state: what decides what")
    dsub = deps.add_subparsers(dest="deployments_command", required=True)
    dls = dsub.add_parser("ls", help="deployments in force and rollouts in progress")
    dls.add_argument("name", nargs="?", default="", help="one model (default: all)")
    dls.add_argument("--json", action="store_true", help="print JSON")
    dshow = dsub.add_parser("show", help="one deployment: matched agents, history")
    dshow.add_argument("name", help="model name")
    dshow.add_argument(
        "--selector",
        type=_labels,
        default={},
        help="exactly the deployment's k=v[,k=v] (default: the whole-fleet deployment)",
    )
    dshow.add_argument("--json", action="store_true", help="print JSON")


def _add_backup_commands(sub: Any) -> None:
    adm = sub.add_parser(
        "admins",
        help="named admin identities and their roles (viewer, operator, admin)",
        description="Admins other than the hub's own (HUB_DATA/admin), each with a role: viewer "
        "reads, operator also changes what runs, admin also manages trust and data. See "
        "docs/security.md#admin-roles.",
    )
    admsub = adm.add_subparsers(dest="admins_command", required=True)
    aadd = admsub.add_parser(
        "add",
        help="create a key here, have the hub certify it, write an admin folder",
        description="Makes a new key in DIR (it never leaves this machine), sends a signing "
        "request and writes admin.key (0600), admin.crt, ca.crt and hub.json into DIR: pass "
        "`--admin-dir DIR` to every command run as that admin.",
    )
    aadd.add_argument(
        "name", help="1-128 characters from A-Z a-z 0-9 _ . -; the identity is admin:NAME"
    )
    aadd.add_argument(
        "--role", required=True, choices=("viewer", "operator", "admin"), help="what it may do"
    )
    aadd.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="a new or empty folder for the identity",
    )
    aadd.add_argument(
        "--replace",
        action="store_true",
        help="replace an admin of that name: a new key and certificate; the old one is refused",
    )
    als_ = admsub.add_parser("ls", help="every admin: role, status, who added it")
    _add_json(als_)
    arole = admsub.add_parser("set-role", help="change an admin's role (applies to its next call)")
    arole.add_argument("name", help="the admin's name (without admin:)")
    arole.add_argument("role", choices=("viewer", "operator", "admin"), help="the new role")
    arev = admsub.add_parser("revoke", help="refuse an admin from its next call on")
    arev.add_argument("name", help="the admin's name (without admin:)")
    au = sub.add_parser(
        "audit",
        help="who called the hub's admin services, what they asked and how it ended",
        description="The audit trail (docs/security.md#audit-trail), oldest first: every change "
        "(publish, deploy, rollouts, tokens, revocations, alert rules, ...), every export "
        "(backup, capture queries, the state file) and every refused or failed call, with the "
        "caller's certificate identity. Successful reads only with the hub's audit_reads.",
    )
    au.add_argument(
        "--since",
        type=_duration,
        default=0.0,
        help="only calls in this window ending now, e.g. 1h, 7d (default: every entry kept)",
    )
    au.add_argument(
        "--identity",
        default="",
        help="only calls by this identity, e.g. admin:admin (default: anyone)",
    )
    au.add_argument(
        "--method", default="", help="only calls of this method, e.g. Deploy (default: every one)"
    )
    au.add_argument(
        "--failed",
        action="store_true",
        help="only calls that did not end OK (refused, failed, or UNFINISHED: the hub stopped)",
    )
    au.add_argument(
        "--limit", type=int, default=100, help="the newest N that match (1-10000, default 100)"
    )
    _add_json(au)
    b = sub.add_parser(
        "backup",
        help="copy a running hub's state (registry, TUF metadata and keys, CA, blobs, telemetry)",
        description="Ask the running hub for a consistent copy of its state and write it into "
        "DIR, with manifest.json (every file's size and SHA-256) written last. See "
        "docs/operations.md#backing-up-and-restoring-the-hub.",
    )
    b.add_argument("dir", type=Path, metavar="DIR", help="a new or empty folder")
    b.add_argument(
        "--timeout",
        type=_duration,
        default=3600.0,
        help="give up after this long (default: 1h)",
    )
    r = sub.add_parser(
        "restore",
        help="make a new data directory from a backup (offline, hub stopped)",
        description="Verify the backup in DIR against its manifest, then write it into NEW as "
        "a hub data directory. Nothing is written if any file differs.",
    )
    r.add_argument("dir", type=Path, metavar="DIR", help="a folder written by `backup`")
    r.add_argument(
        "--data-dir", type=Path, required=True, metavar="NEW", help="the data directory to create"
    )
    r.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty NEW (its contents are moved to NEW.replaced-TIME)",
    )
    r.add_argument(
        "--manifest-sha256",
        metavar="HEX",
        help="refuse the backup unless its manifest has this SHA-256 (what backup printed) "
        "(default: any manifest; the files are checked against it either way)",
    )


def _add_state_commands(sub: Any) -> None:
    """`apply`, `diff`, `export`: desired state as code (docs/operations.md)."""
    for name, help_text, description in (
        (
            "apply",
            "make the fleet's desired state what a state file declares",
            "Check the whole state file FILE against the hub, then deploy, start rollouts and "
            "create or update jobs so that the hub's desired state is what the file declares. "
            f"A file with any problem changes nothing (exit {EXIT_STATE_REFUSED}); applying the "
            "same file again changes nothing.",
        ),
        (
            "diff",
            "show what `apply` would change, on which agents; change nothing",
            "Show what `apply -f FILE` would do, per entry and per agent (from which version "
            "to which), with the same checks; change nothing. Exit 0 when applying FILE would "
            f"change nothing, {EXIT_STATE_DIFFERS} when it would, {EXIT_STATE_REFUSED} when the "
            "hub refuses the file.",
        ),
    ):
        c = sub.add_parser(name, help=help_text, description=description)
        c.add_argument(
            "-f",
            "--file",
            required=True,
            metavar="FILE",
            help="the state file (TOML; '-' reads standard input) (required, no default)",
        )
        c.add_argument(
            "--prune",
            action="store_true",
            help="also undeploy the deployments and delete the jobs FILE does not name "
            "(default: list them as kept)",
        )
        _add_json(c)
    e = sub.add_parser(
        "export",
        help="write the fleet's desired state as a state file",
        description="Print the deployments in force (per model and selector) and the jobs as "
        "a state file; `modelfleet-hub export | modelfleet-hub apply -f -` changes nothing.",
    )
    e.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="FILE",
        help="write to FILE instead of standard output (default: standard output)",
    )
    e.add_argument(
        "--json",
        action="store_true",
        help="print the state file's content as JSON instead of TOML",
    )


# -- admin client ------------------------------------------------------------------------------


def admin_stub(args: argparse.Namespace) -> Any:
    from modelfleet.protos import fleet_pb2_grpc

    return fleet_pb2_grpc.HubAdminStub(admin_channel(args))


def admin_channel(args: argparse.Namespace) -> Any:
    """An mTLS channel to the hub with the admin identity (any admin service's stub)."""
    import grpc

    from modelfleet.kernel.grpc_options import FLEET_MESSAGE_BYTES, message_size_options
    from modelfleet.kernel.tracing import MetadataInterceptor, env_carrier

    admin = args.admin_dir or args.data / "admin"
    address = args.hub
    if not address:
        try:
            address = json.loads((admin / "hub.json").read_text())["address"]
        except (OSError, ValueError, KeyError):
            raise _Unavailable(
                f"no hub address: pass --hub or start the hub with --data {args.data}"
            ) from None
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=(admin / "ca.crt").read_bytes(),
            private_key=(admin / "admin.key").read_bytes(),
            certificate_chain=(admin / "admin.crt").read_bytes(),
        )
    except OSError as exc:
        raise _Unavailable(f"cannot read the admin identity in {admin}: {exc}") from None
    channel = grpc.secure_channel(address, creds, options=message_size_options(FLEET_MESSAGE_BYTES))
    # Started inside a trace (TRACEPARENT set, e.g. by a CI job): the hub's spans join it.
    carried = env_carrier()
    if carried:
        channel = grpc.intercept_channel(channel, MetadataInterceptor(carried))
    return channel


class _Unavailable(ModelfleetError):
    status = Status.UNAVAILABLE


def call(fn: Any, request: Any, timeout: float = 60) -> Any:
    import grpc

    from modelfleet.kernel.grpc_status import error_from_rpc

    try:
        return fn(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None


# -- commands ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from modelfleet.hub.app import serve
    from modelfleet.hub.config import load_hub_config
    from modelfleet.kernel.logs import setup_logging

    overrides = {
        k: getattr(args, k)
        for k in (
            "listen",
            "enroll_listen",
            "advertise",
            "advertise_enroll",
            "hostnames",
            "refresh_interval_s",
            "timestamp_expiry_s",
            "snapshot_expiry_s",
            "transfer_rate_limit_mbps",
            "agent_cert_lifetime_s",
            "log_level",
            "log_json",
            "mqtt",
            "advertise_mqtt",
            "metrics_listen",
        )
    }
    # An explicit --data wins; otherwise the config file's data (or the default) applies.
    overrides["data"] = args.data
    cfg = load_hub_config(args.config, overrides)
    setup_logging(cfg.log_level, cfg.log_json)
    tune_malloc()
    asyncio.run(serve(cfg))
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    from modelfleet.hub.core import HubPaths
    from modelfleet.hub.signing import TufRepository, init_keys, load_signer

    paths = HubPaths(args.data)
    keys_dir = paths.keys
    if (paths.metadata / "root.json").exists():
        raise ModelfleetError(f"{paths.metadata} already holds a TUF repository")
    args.data.mkdir(parents=True, exist_ok=True)
    args.data.chmod(0o700)
    ids = init_keys(keys_dir, args.offline)
    # Root and targets metadata are signed now, while this machine holds those keys.
    extra = {}
    if args.offline:
        extra = {
            "root_signer": load_signer(args.offline / "root.pem"),
            "targets_signer": load_signer(args.offline / "targets.pem"),
        }
    TufRepository.create(
        paths.metadata,
        keys_dir,
        root_signer=extra.get("root_signer"),
        targets_signer=extra.get("targets_signer"),
    )
    for role, keyid in ids.items():
        print(f"{role:<10} {keyid}")
    if args.offline:
        print(
            f"root and targets private keys are in {args.offline}: move them off this machine;"
            f" publishing will need --targets-key {args.offline}/targets.pem"
        )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    return cmd_keys_rotate(args) if args.keys_command == "rotate" else cmd_keys_init(args)


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from securesystemslib.signer import CryptoSigner

    from modelfleet.hub.config import load_hub_config
    from modelfleet.hub.core import HubPaths, expiry_policy, lock_data_dir
    from modelfleet.hub.signing import TufRepository, load_signer, set_public_key
    from modelfleet.kernel.atomic import atomic_write

    paths = HubPaths(args.data)
    role = args.role
    lock = lock_data_dir(paths.root, f"rotate the {role} key")
    try:
        root_signer = load_signer(args.root_key or paths.keys / "root.pem")
        online = paths.keys / f"{role}.pem"
        if args.renew:
            if role != "root" or args.new_key:
                raise InvalidRequestError(
                    "--renew re-signs root with its own key: role root, no --new-key"
                )
            new = root_signer
        elif args.new_key:
            new = load_signer(args.new_key)
        elif online.exists() or role in ("snapshot", "timestamp"):
            new = CryptoSigner.generate_ed25519()
        else:
            raise InvalidRequestError(
                f"the {role} key is kept offline: create the new key there and pass --new-key"
            )
        # The lifetimes the hub is configured with (root_expiry_s, ...), not the defaults.
        policy = expiry_policy(load_hub_config(args.config, {"data": args.data}))
        repo = TufRepository.open(paths.metadata, paths.keys, expiry=policy)
        # The hub signs with what is in keys/: an online key is replaced there, written aside
        # first so a failed rotation leaves the old one in place.
        aside = None
        if online.exists() or role in ("snapshot", "timestamp"):
            aside = online.with_name(f".{online.name}.new")
            atomic_write(aside, new.private_bytes, 0o600)
        try:
            version = repo.rotate_key(role, new, root_signer)
        except BaseException:
            if aside is not None:
                aside.unlink(missing_ok=True)
            raise
        if aside is not None:
            os.replace(aside, online)
        set_public_key(paths.keys, role, new.public_key)
    finally:
        os.close(lock)
    what = "renewed" if args.renew else f"now {new.public_key.keyid}"
    print(f"root v{version}: the {role} key is {what}; agents follow at their next refresh")
    if args.new_key is None and not args.renew:
        print(f"the new private key is {online} (mode 0600)")
    return 0


def cmd_mqtt_config(args: argparse.Namespace) -> int:
    from modelfleet.hub.ca import CertificateAuthority
    from modelfleet.hub.config import HubConfig
    from modelfleet.hub.core import HubPaths
    from modelfleet.hub.mqtt import write_broker_config
    from modelfleet.hub.registry import Registry

    paths = HubPaths(args.data)
    args.data.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.load_or_create(paths.ca)
    hostnames = [h.strip() for h in args.hostnames.split(",") if h.strip()]
    # The CRL starts with the agents already revoked; a running hub keeps it current.
    registry = Registry(paths.db)
    try:
        conf = write_broker_config(
            ca,
            args.out.resolve(),
            args.listen,
            paths.root / "mqtt",
            hostnames,
            registry,
            HubConfig().crl_lifetime_s,
        )
    finally:
        registry.close()
    print(f"wrote {conf}; start the broker with: mosquitto -c {conf}")
    print(f"then run the hub with: modelfleet-hub --data {args.data} serve --mqtt {args.listen}")
    return 0


def _progress(total: int) -> Generator[None, int, None]:
    """A progress bar on stderr for uploads (only when stderr is a terminal or forced)."""
    start = time.monotonic()
    sent = 0
    show = sys.stderr.isatty() or os.environ.get("MODELFLEET_PROGRESS") == "1"
    while True:
        n = yield
        sent += n or 0
        if show:
            frac = sent / total if total else 1.0
            rate = sent / max(time.monotonic() - start, 1e-6) / 1e6
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r  [{bar:<30}] {frac:6.1%} {sent / 1e6:8.1f} MB {rate:7.1f} MB/s")
            if sent >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def cmd_publish(args: argparse.Namespace) -> int:
    import numpy as np

    from modelfleet.kernel.bundle import (
        TARGET_FILE_NAME,
        create_bundle,
        pack_bundle,
        providers_from_args,
        synthetic_samples,
    )
    from modelfleet.protos import fleet_pb2 as pb

    if not args.model.is_file():
        raise InvalidRequestError(f"model file {args.model} does not exist")
    stub = admin_stub(args)
    version = args.version
    if version is None:
        try:
            versions = call(stub.ListVersions, pb.ListVersionsRequest(name=args.name)).versions
            version = max((v.version for v in versions), default=0) + 1
        except ModelfleetError as exc:
            if exc.status != Status.NOT_FOUND:
                raise
            version = 1
    with tempfile.TemporaryDirectory(prefix="modelfleet-publish-") as tmp:
        if args.samples:
            with np.load(args.samples, allow_pickle=False) as npz:
                samples = {k: npz[k] for k in npz.files}
        else:
            samples = synthetic_samples(args.model)
        expected = None
        if args.expected:
            with np.load(args.expected, allow_pickle=False) as npz:
                expected = {k: npz[k] for k in npz.files}
        kwargs: dict[str, Any] = {}
        if args.latency_budget_ms is not None:
            kwargs["latency_budget_ms"] = args.latency_budget_ms
        if args.tolerance is not None:
            kwargs["rtol"] = kwargs["atol"] = args.tolerance
        bundle = create_bundle(
            args.model,
            name=args.name,
            version=version,
            samples=samples,
            expected=expected,
            out_dir=Path(tmp) / "b",
            max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us,
            reference=args.reference,
            reference_bins=args.reference_bins,
            reference_top_k=args.reference_top_k,
            providers=providers_from_args(args.providers, args.provider_option),
            **kwargs,
        )
        archive = Path(tmp) / TARGET_FILE_NAME
        digest, size = pack_bundle(bundle.path, archive)
        bar = _progress(size)
        next(bar)

        def chunks() -> Iterator[Any]:
            header = pb.PublishHeader(
                name=args.name, version=version, notes=args.notes, size=size, sha256=digest
            )
            yield pb.PublishChunk(header=header)
            with open(archive, "rb") as fh:
                while block := fh.read(1 << 20):
                    bar.send(len(block))
                    yield pb.PublishChunk(data=block)

        resp = call(stub.Publish, chunks(), timeout=3600)
    v = resp.version
    if resp.staged_payload:
        if not args.targets_key:
            print(
                f"{args.name} v{v.version} uploaded but NOT signed: the targets key is offline."
                f" Sign it with: modelfleet-hub sign {args.name} {v.version} --sha256 {digest}"
                " --targets-key FILE",
                file=sys.stderr,
            )
            return EXIT_CODES[Status.FAILED_PRECONDITION]
        from modelfleet.hub.signing import ExpectedTarget
        from modelfleet.kernel.bundle import bundle_target_path

        built = ExpectedTarget(
            bundle_target_path(args.name, version), digest, size, bundle.manifest.model_sha256
        )
        v = _sign(stub, args.name, v.version, resp, args.targets_key, built, args.allow_extra)
    same = f" (same content as v{v.same_content_as})" if v.same_content_as else ""
    print(
        f"published {v.name} v{v.version}: {v.size} bytes, sha256 {v.sha256[:12]}, "
        f"stage {v.stage}, {'signed' if v.signed else 'unsigned'}{same}"
    )
    return 0


def _sign(
    stub: Any,
    name: str,
    version: int,
    staged: Any,
    key: Path,
    expected: ExpectedTarget,
    allow_extra: list[str],
) -> Any:
    """Sign what the hub staged only if it is what the key holder means (the hub is not trusted).

    ``check_signing_request`` verifies the hub's published targets with this key's own
    signature and refuses any difference beyond ``expected`` (and ``--allow-extra`` paths).
    """
    from modelfleet.hub.signing import (
        check_signing_request,
        last_signed_path,
        load_last_signed,
        load_signer,
        save_last_signed,
    )
    from modelfleet.protos import fleet_pb2 as pb

    signer = load_signer(key)
    last = load_last_signed(key)
    if last is None:
        print(
            f"note: no record of what this key signed before ({last_signed_path(key)}); "
            "trusting the hub's targets that carry its signature",
            file=sys.stderr,
        )
    targets, extras = check_signing_request(
        staged.staged_payload,
        staged.base_targets,
        signer.public_key,
        expected,
        allow_extra=allow_extra,
        last_signed=last,
    )
    for line in extras:
        print(f"also signing (--allow-extra): {line}", file=sys.stderr)
    sig = signer.sign(staged.staged_payload)
    commit = pb.CommitTargetsRequest(
        name=name,
        version=version,
        keyid=sig.keyid,
        signature=sig.signature,
        signed_payload=staged.staged_payload,
    )
    v = call(stub.CommitTargets, commit).version
    try:
        save_last_signed(key, targets.signed.version, staged.staged_payload)
    except OSError as exc:  # a read-only key medium: the check above still ran
        print(
            f"warning: cannot record the signed targets in {last_signed_path(key)}: {exc}",
            file=sys.stderr,
        )
    print(
        f"signed targets v{targets.signed.version}: adds {expected.path} "
        f"(sha256 {expected.sha256[:16]})",
        file=sys.stderr,
    )
    return v


def cmd_sign(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    stub = admin_stub(args)
    resp = call(stub.CommitTargets, pb.CommitTargetsRequest(name=args.name, version=args.version))
    if not resp.staged_payload:
        if resp.version.sha256 != args.sha256.lower():
            raise VerificationError(
                f"{args.name} v{args.version} is signed with sha256 {resp.version.sha256}, not "
                f"{args.sha256}",
                reason="signing_diff",
            )
        print(f"{args.name} v{args.version} is already signed")
        return 0
    from modelfleet.hub.signing import ExpectedTarget
    from modelfleet.kernel.bundle import bundle_target_path

    expected = ExpectedTarget(bundle_target_path(args.name, args.version), args.sha256.lower())
    v = _sign(stub, args.name, args.version, resp, args.targets_key, expected, args.allow_extra)
    print(f"signed {v.name} v{v.version}")
    return 0


def _print_versions(versions: Any) -> None:
    print(
        f"{'VERSION':>7}  {'STAGE':<11} {'SIGNED':<6} {'SIZE':>10}  {'SHA256':<12}  CREATED"
        "               NOTES"
    )
    for v in versions:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.created_at))
        same = f" (= v{v.same_content_as})" if v.same_content_as else ""
        print(
            f"{v.version:>7}  {v.stage:<11} {'yes' if v.signed else 'NO':<6} {v.size:>10}  "
            f"{v.sha256[:12]}  {created}   {v.notes}{same}"
        )


def version_dict(v: Any) -> dict[str, Any]:
    """A ModelVersion as `models versions --json` prints it: numbers stay numbers."""
    return {
        "name": v.name,
        "version": v.version,
        "stage": v.stage,
        "signed": v.signed,
        "sha256": v.sha256,
        "size": v.size,
        "created_at": v.created_at,
        "notes": v.notes,
        "same_content_as": v.same_content_as or None,
        "target_path": v.target_path,
    }


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def cmd_models(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    stub = admin_stub(args)
    if args.models_command == "ls":
        resp = call(stub.ListModels, pb.ListModelsRequest())
        if args.json:
            _print_json(
                [
                    {
                        "name": m.name,
                        "latest_version": m.latest_version,
                        "version_count": m.version_count,
                        "production_version": m.production_version or None,
                    }
                    for m in resp.models
                ]
            )
            return 0
        print(f"{'MODEL':<24} {'LATEST':>6} {'VERSIONS':>8} {'PRODUCTION':>10}")
        for m in resp.models:
            print(
                f"{m.name:<24} {m.latest_version:>6} {m.version_count:>8} "
                f"{m.production_version or '-':>10}"
            )
    elif args.models_command in ("show", "versions"):
        resp = call(stub.ListVersions, pb.ListVersionsRequest(name=args.name))
        latest = max((v.version for v in resp.versions), default=0)
        prod = [v.version for v in resp.versions if v.stage == "production"]
        if args.json:
            versions = [version_dict(v) for v in resp.versions]
            if args.models_command == "versions":
                _print_json(versions)
            else:
                _print_json(
                    {
                        "name": args.name,
                        "latest_version": latest,
                        "production_version": prod[0] if prod else None,
                        "versions": versions,
                    }
                )
            return 0
        if args.models_command == "show":
            print(
                f"model {args.name}: {len(resp.versions)} version(s), latest v{latest},"
                f" production {('v' + str(prod[0])) if prod else 'none'}"
            )
        _print_versions(resp.versions)
    else:
        v = call(
            stub.SetStage,
            pb.SetStageRequest(
                name=args.name, version=args.version, stage=args.stage, force=args.force
            ),
        )
        print(f"{v.name} v{v.version} is now {v.stage}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    resp = call(
        admin_stub(args).Deploy,
        pb.DeployRequest(
            name=args.name,
            version=args.version,
            selector=args.selector,
            dry_run=args.dry_run,
            allow_empty=args.allow_empty,
        ),
    )
    sel = _sel(args.selector)
    if not args.selector:
        print(
            f"no --selector: {args.name} v{args.version} targets the whole fleet, every agent "
            "enrolled now and later"
        )
    if args.dry_run:
        changing = sum(c.from_version != c.to_version for c in resp.changes)
        print(
            f"dry run, nothing written: deploying {args.name} v{args.version} to {sel} would "
            f"change the desired version of {changing} of {len(resp.agents)} matching agent(s)"
            + (":" if resp.changes else "")
        )
    else:
        print(
            f"{args.name} v{args.version} desired on {len(resp.agents)} agent(s) matching {sel}: "
            f"{', '.join(resp.agents) or '-'} (revision {resp.revision})"
        )
    if not resp.agents:
        print("  no active agent matches now: agents enrolled later with these labels get it")
    _print_changes(args.name, resp.changes, fallback=False)
    for note in resp.notes:
        print(f"note: {note}")
    return 0


def _sel(selector: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(whole fleet)"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "-"


def _set_by(d: Any) -> str:
    """Who set a deployment: "rollout 5", or "deploy by admin"."""
    if d.source == "rollout":
        return f"rollout {d.rollout_id}" if d.rollout_id else "a rollout"
    return f"deploy by {d.actor or '?'}"


def _where(selector: Any) -> str:
    return _sel(selector) if selector else "the whole fleet"


def _describe(d: Any) -> str:
    if d.agent_id:
        return f"rollout {d.rollout_id}'s assignment to this agent"
    return f"deployment {d.id} for {_where(d.selector)} ({_set_by(d)})"


def _v(version: int) -> str:
    return f"v{version}" if version else "none"


def _print_changes(model: str, changes: Any, fallback: bool) -> None:
    for c in changes:
        who = f"{c.agent_id} ({c.hostname})" if c.hostname else c.agent_id
        if c.from_version == c.to_version:
            what = f"stays {_v(c.to_version)}"
        else:
            what = f"{_v(c.from_version)} -> {_v(c.to_version)}"
        serving = f"; serving {_v(c.active_version)}" if c.active_version != c.to_version else ""
        if fallback:
            if c.HasField("decided_by") and c.to_version:
                what += f", by {_describe(c.decided_by)}"
            else:
                what += f": nothing matches it any more, it drops {model}"
        print(f"  {who}: {what}{serving}")


def _deployment_dict(d: Any) -> dict[str, Any]:
    return {
        "id": d.id,
        "model": d.model,
        "version": d.version,
        "selector": dict(d.selector),
        "created_at": d.created_at,
        "source": d.source,
        "rollout_id": d.rollout_id,
        "actor": d.actor,
        "agent_id": d.agent_id,
        "removed_at": d.removed_at,
        "removed_by": d.removed_by,
    }


def _rollout_in_progress_dict(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "model": r.model,
        "version": r.version,
        "state": r.state,
        "selector": dict(r.selector),
        "wave": r.wave,
        "waves": r.waves,
        "assigned": r.assigned,
        "agents": r.agents,
        "from_versions": list(r.from_versions),
        "new_agents": _deployment_dict(r.new_agents) if r.HasField("new_agents") else None,
    }


def _rollout_line(r: Any) -> str:
    """A rollout in progress, and what an agent enrolled meanwhile gets."""
    before = "/".join(f"v{v}" for v in r.from_versions) or "none"
    if r.HasField("new_agents"):
        now = f"v{r.new_agents.version} from {_describe(r.new_agents)}"
    else:
        now = f"no version of {r.model}"
    labels = f" with labels {_sel(r.selector)}" if r.selector else ""
    return (
        f"rollout {r.id} of {r.model} in progress ({r.state}, wave {r.wave}/{r.waves}, "
        f"{r.assigned}/{r.agents} agent(s) assigned): {before} -> v{r.version} on "
        f"{_where(r.selector)}; agents enrolled now{labels} get {now}, v{r.version} once it "
        "completes"
    )


def cmd_undeploy(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    resp = call(
        admin_stub(args).Undeploy,
        pb.UndeployRequest(name=args.name, selector=args.selector, dry_run=args.dry_run),
    )
    fleet = [d for d in resp.removed if not d.agent_id]
    assigned = [d for d in resp.removed if d.agent_id]
    head = max(fleet, key=lambda d: d.id)
    what = (
        f"the deployment of {args.name} for {_sel(args.selector)} (deployment {head.id}: "
        f"v{head.version}, {_set_by(head)} at {_when(head.created_at)})"
    )
    if len(fleet) > 1:
        what += f" with the {len(fleet) - 1} earlier deployment(s) of it"
    if assigned:
        rollouts = ", ".join(str(i) for i in sorted({d.rollout_id for d in assigned}))
        what += f", and {len(assigned)} per-agent assignment(s) of finished rollout(s) {rollouts}"
    if args.dry_run:
        print(f"dry run, nothing written: undeploy would remove {what}")
    else:
        print(f"removed {what} (revision {resp.revision})")
    if not resp.changes:
        print("no agent's desired version changes")
        return 0
    verb = "would fall back" if args.dry_run else "fall back"
    print(f"the agents it decided for {verb}:")
    _print_changes(args.name, resp.changes, fallback=True)
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    stub = admin_stub(args)
    if args.deployments_command == "ls":
        resp = call(stub.ListDeployments, pb.ListDeploymentsRequest(model=args.name))
        if args.json:
            out: dict[str, Any] = {
                "deployments": [
                    {
                        **_deployment_dict(i.deployment),
                        "per_agent": i.per_agent,
                        "agents": list(i.agents),
                        "deciding": list(i.deciding),
                    }
                    for i in resp.deployments
                ],
                "rollouts": [_rollout_in_progress_dict(r) for r in resp.rollouts],
            }
            print(json.dumps(out, indent=2))
            return 0
        print(
            f"{'ID':>5}  {'MODEL':<14} {'SELECTOR':<26} {'VERSION':>7} {'AGENTS':>6} "
            f"{'DECIDES':>7}  SET BY"
        )
        for i in resp.deployments:
            d = i.deployment
            sel = f"rollout {d.rollout_id}, per agent" if i.per_agent else _sel(d.selector)
            print(
                f"{d.id:>5}  {d.model:<14} {sel:<26} {_v(d.version):>7} {len(i.agents):>6} "
                f"{len(i.deciding):>7}  {_set_by(d)} at {_when(d.created_at)}"
            )
        if not resp.deployments:
            print("no deployments")
        for r in resp.rollouts:
            print(_rollout_line(r))
        return 0
    detail = call(
        stub.GetDeployment, pb.GetDeploymentRequest(model=args.name, selector=args.selector)
    )
    info, d = detail.info, detail.info.deployment
    if args.json:
        out = {
            "deployment": {
                **_deployment_dict(d),
                "agents": list(info.agents),
                "deciding": list(info.deciding),
            },
            "agents": [
                {
                    "agent_id": a.agent_id,
                    "hostname": a.hostname,
                    "desired_version": a.desired_version,
                    "active_version": a.active_version,
                    "decided_by": _deployment_dict(a.decided_by)
                    if a.HasField("decided_by")
                    else None,
                }
                for a in detail.agents
            ],
            "history": [_deployment_dict(h) for h in detail.history],
            "rollouts": [_rollout_in_progress_dict(r) for r in detail.rollouts],
        }
        print(json.dumps(out, indent=2))
        return 0
    print(f"deployment {d.id}: {d.model} v{d.version} for {_sel(d.selector)}")
    print(f"  set by: {_set_by(d)} at {_when(d.created_at)}")
    print(
        f"  matches {len(info.agents)} active agent(s) now; decides the desired version of "
        f"{len(info.deciding)}"
    )
    if detail.agents:
        print(f"  {'AGENT':<22} {'HOSTNAME':<16} {'DESIRED':>7} {'ACTIVE':>6}  DECIDED BY")
        for a in detail.agents:
            by = "-"
            if a.HasField("decided_by"):
                by = "this deployment" if a.decided_by.id == d.id else _describe(a.decided_by)
            print(
                f"  {a.agent_id:<22} {a.hostname:<16} {_v(a.desired_version):>7} "
                f"{_v(a.active_version):>6}  {by}"
            )
    print("  history (newest first):")
    for h in detail.history:
        if h.removed_at:
            state = f"removed by {h.removed_by or '?'} at {_when(h.removed_at)}"
        else:
            state = "in force" if h.id == d.id else "superseded"
        print(
            f"    deployment {h.id:<5} v{h.version:<6} {_when(h.created_at)}  "
            f"{_set_by(h):<20} {state}"
        )
    for r in detail.rollouts:
        print(_rollout_line(r))
    return 0


def _ago(ts: float) -> str:
    if not ts:
        return "never"
    d = max(0.0, time.time() - ts)
    return (
        f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago" if d < 7200 else f"{d / 3600:.0f}h ago"
    )


def cmd_admins(args: argparse.Namespace) -> int:
    from modelfleet.kernel.atomic import atomic_write_json
    from modelfleet.kernel.identity import (
        admin_common_name,
        generate_key,
        make_csr,
        write_pem,
        write_private_key,
    )
    from modelfleet.protos import fleet_pb2 as pb

    stub = admin_stub(args)
    if args.admins_command == "add":
        out: Path = args.out
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InvalidRequestError(
                f"{out} is not a new or empty folder: an admin identity is written into a "
                "folder of its own"
            )
        key = generate_key()
        resp = call(
            stub.AddAdmin,
            pb.AddAdminRequest(
                name=args.name,
                role=args.role,
                csr_pem=make_csr(key, admin_common_name(args.name)),
                replace=args.replace,
            ),
        )
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_key(out / "admin.key", key)
        write_pem(out / "admin.crt", resp.certificate_pem)
        write_pem(out / "ca.crt", resp.ca_pem)
        atomic_write_json(out / "hub.json", {"address": resp.hub_address}, indent=2, mode=0o600)
        print(
            f"admin:{args.name} added with the {resp.admin.role} role; identity in {out} "
            f"(pass --admin-dir {out}; certificate valid until {_when(resp.admin.cert_expires_at)})"
        )
        return 0
    if args.admins_command == "set-role":
        info = call(stub.SetAdminRole, pb.SetAdminRoleRequest(name=args.name, role=args.role))
        print(f"admin:{info.name} now has the {info.role} role (from its next call)")
        return 0
    if args.admins_command == "revoke":
        info = call(stub.RevokeAdmin, pb.RevokeAdminRequest(name=args.name))
        print(f"admin:{info.name} revoked: the hub refuses its certificate from now on")
        return 0
    resp = call(stub.ListAdmins, pb.ListAdminsRequest())
    if args.json:
        print(json.dumps([message_dict(a) for a in resp.admins], indent=2))
        return 0
    print(
        f"{'ADMIN':<24} {'ROLE':<9} {'STATUS':<8} {'ADDED BY':<20} "
        f"{'CERTIFICATE UNTIL':<23} CHANGED"
    )
    for a in resp.admins:
        changed = f"{_when(a.updated_at)} by {a.updated_by}" if a.updated_by else "-"
        print(
            f"{'admin:' + a.name:<24} {a.role:<9} {a.status:<8} {a.created_by:<20} "
            f"{_when(a.cert_expires_at):<23} {changed}"
        )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    if not 1 <= args.limit <= 10_000:
        raise InvalidRequestError(f"--limit must be 1-10000, got {args.limit}")
    resp = call(
        admin_stub(args).ListAudit,
        pb.ListAuditRequest(
            since=time.time() - args.since if args.since else 0.0,
            identity=args.identity,
            method=args.method,
            failed_only=args.failed,
            limit=args.limit,
        ),
    )
    if args.json:
        print(json.dumps([message_dict(e) for e in resp.entries], indent=2))
        return 0
    print(f"{'WHEN':<23} {'IDENTITY':<22} {'METHOD':<20} {'RESULT':<19} {'MS':>8}  REQUEST")
    for e in resp.entries:
        print(
            f"{_when(e.started_at):<23} {e.identity or '(none)':<22} {e.method:<20} "
            f"{e.code:<19} {e.duration_ms:>8.1f}  {_printable(e.request) or '-'}"
        )
        # Every line of an error's message under its entry: it may quote what a caller sent.
        for line in e.detail.splitlines():
            print(f"{'':<23} {_printable(line)}")
    return 0


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """``text`` with control characters (terminal escapes, line breaks) written as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def cmd_agents(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    stub = admin_stub(args)
    if args.agents_command == "token":
        if args.ttl < 1:
            raise InvalidRequestError("--ttl must be at least 1s")
        resp = call(
            stub.CreateToken, pb.CreateTokenRequest(labels=args.labels, ttl_seconds=int(args.ttl))
        )
        print(resp.token)
        return 0
    if args.agents_command == "revoke":
        call(stub.RevokeAgent, pb.RevokeAgentRequest(agent_id=args.agent_id))
        print(f"agent {args.agent_id} revoked: the hub refuses it from now on")
        return 0
    resp = call(stub.ListAgents, pb.ListAgentsRequest())
    if args.json:
        print(json.dumps([message_dict(a) for a in resp.agents], indent=2))
        return 0
    print(
        f"{'AGENT':<22} {'STATUS':<8} {'ONLINE':<7} {'LAST SEEN':<10} {'LABELS':<24} "
        f"{'MODEL':<12} {'DESIRED':>7} {'ACTIVE':>6}  {'SET BY':<27} GATE / ERROR"
    )
    in_progress = {r.id for r in resp.rollouts}
    for a in resp.agents:
        labels = ",".join(f"{k}={v}" for k, v in sorted(a.labels.items())) or "-"
        reports = {m.name: m for m in a.report.models}
        desired = {d.name: d.version for d in a.desired}
        compared = {
            d.name: d for d in a.desired if d.prepare_version and (d.split_bp or d.shadow_bp)
        }
        set_by = {d.model: _agent_set_by(d, in_progress) for d in a.desired_by}
        names = sorted(set(reports) | set(desired)) or ["-"]
        for i, name in enumerate(names):
            m = reports.get(name)
            gate = "-"
            if m is not None and m.gate_version:
                gate = (
                    f"v{m.gate_version} passed"
                    if m.gate_passed
                    else f"v{m.gate_version} {m.gate_kind}: {m.gate_reason}"
                )
                if m.gate_passed and m.active_provider and m.active_version == m.gate_version:
                    gate += f" on {m.active_provider.removesuffix('ExecutionProvider')}"
            if m is not None and m.error:
                gate = m.error
            online = a.presence or "-"
            head = (
                f"{a.agent_id:<22} {a.status:<8} {online:<7} {_ago(a.last_seen):<10} {labels:<24}"
                if i == 0
                else " " * 74
            )
            print(
                f"{head} {name:<12} {desired.get(name, '-')!s:>7} "
                f"{(m.active_version or '-') if m else '-'!s:>6}  "
                f"{set_by.get(name, '-'):<27} {gate}"
            )
            if name in compared:
                print(f"{'':<74} {name}: {_comparison(compared[name])}")
        if a.report.last_error:
            print(f"{'':<74} last error: {a.report.last_error}")
        if a.status == "active" and (warning := _cert_warning(a.cert_expires_at)):
            print(f"{'':<74} {warning}")
    for r in resp.rollouts:
        print(_rollout_line(r))
    return 0


def _comparison(d: Any) -> str:
    """An agent's live comparison of a model: "experiment 3: v2 on 10% of requests"."""
    if d.split_bp:
        share = f"v{d.prepare_version} answers {d.split_bp / 100:g}% of requests" + (
            " (sticky)" if d.sticky else ""
        )
    else:
        share = f"v{d.prepare_version} shadows {d.shadow_bp / 100:g}% of requests"
    return f"{d.comparison or 'comparison'}: {share}"


def _agent_set_by(d: Any, in_progress: set[int]) -> str:
    """What `agents ls` says set a desired version: a rollout (in progress or not), or who
    deployed it and when."""
    if d.source == "rollout":
        return _set_by(d) + (", in progress" if d.rollout_id in in_progress else "")
    return f"{_set_by(d)} {_ago(d.created_at)}"


# Agents renew 30 days ahead (agent cert_renew_before_s): a certificate this close to its end
# means renewals are failing.
CERT_WARN_S = 14 * 86400


def _cert_warning(expires_at: float, now: float | None = None) -> str:
    if not expires_at:
        return ""
    left = expires_at - (time.time() if now is None else now)
    if left <= 0:
        return "certificate EXPIRED: the hub refuses this agent; enroll it again"
    if left < CERT_WARN_S:
        return (
            f"certificate expires in {left / 86400:.1f} days and was not renewed "
            f"(see the agent's log)"
        )
    return ""


def cmd_jobs(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    stub = admin_stub(args)
    cmd = args.jobs_command
    if cmd == "create":
        schedule = args.cron or f"every {args.every:g}s"
        spec = pb.JobSpec(
            name=args.name,
            model=args.model,
            version=args.version or 0,
            schedule=schedule,
            input=args.input,
            output=args.output,
            sql=args.sql,
            keys=args.keys,
        )
        info = call(stub.CreateJob, pb.CreateJobRequest(spec=spec, selector=args.selector))
        which = f"v{info.spec.version}" if info.spec.version else "the deployed version"
        print(
            f"job {info.spec.name}: {info.spec.model} ({which}) {schedule} on "
            f"{info.agents} agent(s)"
        )
        return 0
    if cmd == "ls":
        resp = call(stub.ListJobs, pb.ListJobsRequest())
        if args.json:
            _print_json([job_dict(j) for j in resp.jobs])
            return 0
        print(f"{'JOB':<20} {'MODEL':<14} {'VERSION':<9} {'SCHEDULE':<16} {'AGENTS':>6}  STATE")
        for j in resp.jobs:
            s = j.spec
            version = f"v{s.version}" if s.version else "deployed"
            state = "paused" if s.paused else "active"
            print(
                f"{s.name:<20} {s.model:<14} {version:<9} {s.schedule:<16} {j.agents:>6}  {state}"
            )
        return 0
    if cmd == "runs":
        resp = call(stub.JobRuns, pb.JobRunsRequest(name=args.name))
        if args.json:
            print(
                json.dumps(
                    [message_dict(r) for r in resp.runs],
                    indent=2,
                )
            )
            return 0
        print(
            f"{'FINISHED':<20} {'AGENT':<22} {'RUN':<13} {'VERSION':>7} {'STATUS':<10} "
            f"{'ROWS IN':>9} {'ROWS OUT':>9} {'REJECTED':>8} {'SECONDS':>8}  ERROR"
        )
        for r in resp.runs:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.finished_at))
            print(
                f"{when:<20} {r.agent_id:<22} {r.run_id:<13} {r.version:>7} {r.status:<10} "
                f"{r.rows_in:>9} {r.rows_out:>9} {r.rows_rejected:>8} {r.duration_s:>8.2f}  "
                f"{r.error}"
            )
        return 0
    info = call(stub.ControlJob, pb.ControlJobRequest(name=args.name, action=cmd))
    print(f"job {args.name}: {cmd} done")
    del info
    return 0


def job_dict(job: Any) -> dict[str, Any]:
    """A JobInfo as `jobs ls --json` prints it; version null: the version deployed on each agent."""
    s = job.spec
    return {
        "name": s.name,
        "model": s.model,
        "version": s.version or None,
        "schedule": s.schedule,
        "input": s.input,
        "output": s.output,
        "sql": s.sql,
        "keys": s.keys,
        "paused": s.paused,
        "selector": dict(sorted(job.selector.items())),
        "agents": job.agents,
        "created_at": job.created_at,
    }


# Exit codes of `rollout start --wait` and `rollout status --watch`: the rollout's outcome, for
# scripts (docs/cli.md). Above kernel/errors.py's EXIT_CODES, so an outcome never reads as an
# error of the command itself.
EXIT_ROLLED_BACK = 20
EXIT_NEEDS_OPERATOR = 21  # paused (by an operator, or inconclusive), or blue-green ready
EXIT_WAIT_TIMEOUT = 22
ROLLOUT_EXIT_CODES = {
    "done": 0,
    "rolled_back": EXIT_ROLLED_BACK,
    "paused": EXIT_NEEDS_OPERATOR,
    # Blue-green without --auto-switch: prepared everywhere, nothing happens until promote.
    "ready": EXIT_NEEDS_OPERATOR,
}
_ROLLOUT_EXITS_HELP = (
    f"0 done, {EXIT_ROLLED_BACK} rolled back, {EXIT_NEEDS_OPERATOR} paused or ready for "
    f"`rollout promote`, {EXIT_WAIT_TIMEOUT} --timeout reached (the rollout goes on)"
)
WATCH_INTERVAL_S = 1.0
# A watch outlives a hub restart: it keeps asking through an outage this long (or until
# --timeout, if that comes first) before it gives up with the unavailable exit code.
WATCH_OUTAGE_S = 300.0


def rollout_dict(status: Any) -> dict[str, Any]:
    """A RolloutStatus as the plain data `rollout status --json` prints (one conversion)."""

    def opt(msg: Any, name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None

    ev = None
    if status.HasField("last_evaluation"):
        e = status.last_evaluation
        ev = {
            "wave": e.wave,
            "at": e.at,
            "since": e.since,
            "canary_requests": e.canary_requests,
            "baseline_requests": e.baseline_requests,
            "canary_failures": e.canary_failures,
            "baseline_failures": e.baseline_failures,
            "canary_agents": e.canary_agents,
            "baseline_agents": e.baseline_agents,
            "baseline_version": e.baseline_version,
            "gates": [
                {
                    "gate": g.gate,
                    "value": opt(g, "value"),
                    "ok": opt(g, "ok"),
                    **({"note": g.note} if g.note else {}),
                    "canary": opt(g, "canary"),
                    "baseline": opt(g, "baseline"),
                }
                for g in e.gates
            ],
            "verdicts": [_verdict_dict(v) for v in e.verdicts],
            "looks": e.looks,
            "final": e.final,
            "judge_note": e.judge_note,
        }
    return {
        "id": status.id,
        "model": status.model,
        "version": status.version,
        "state": status.state,
        "wave": status.wave,
        "waves": list(status.waves),
        "agents": status.agents,
        "assigned": status.assigned,
        "switched": status.switched,
        "prepared": status.prepared,
        "strategy": status.strategy,
        "failed": dict(status.failed),
        "bake_left_s": status.bake_left_s,
        "reason": status.reason,
        "gates": list(status.gates),
        "last_evaluation": ev,
        "events": [{"at": x.at, "text": x.text} for x in status.events],
        "per_agent": [
            {
                "agent_id": a.agent_id,
                "hostname": a.hostname,
                "role": a.role,
                "wave": a.wave,
                "previous_version": a.previous_version,
                "active_version": a.active_version,
                "state": a.state,
                "last_error": a.last_error,
            }
            for a in status.per_agent
        ],
        "warnings": list(status.warnings),
        "selector": dict(status.selector),
        "bake_s": status.bake_s,
        "min_requests": status.min_requests,
        "max_failed_agents": status.max_failed_agents,
        "agent_timeout_s": status.agent_timeout_s,
        "auto_switch": status.auto_switch,
        "allow_downgrade": status.allow_downgrade,
        "judge": list(status.judge),
        "max_bake_s": status.max_bake_s,
        "min_labels": status.min_labels,
        "traffic": list(status.traffic),
        "traffic_percent": status.traffic_percent,
        "queued": status.queued,
        "rate_base": status.rate_base,
        "rate_factor": status.rate_factor,
        "rate_max": status.rate_max,
        "abort_failed_pct": status.abort_failed_pct,
        "abort_min_agents": status.abort_min_agents,
    }


def _hms(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


def _fig(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


# Rows of the per-agent table in the text view; --json lists every agent.
AGENT_ROWS = 20


def _render_agents(agents: list[dict[str, Any]]) -> list[str]:
    # Failed agents first, then canaries in the order they were assigned, then the rest.
    rank = {"failed": 0}
    shown = sorted(
        agents, key=lambda a: (rank.get(a["state"], 1), a["role"] != "canary", a["wave"] or 1e9)
    )
    lines = [
        f"  {'AGENT':<24} {'HOSTNAME':<16} {'ROLE':<9} {'WAVE':>4} {'PREVIOUS':>8} "
        f"{'ACTIVE':>6}  {'STATE':<13} LAST ERROR"
    ]
    for a in shown[:AGENT_ROWS]:
        lines.append(
            f"  {a['agent_id']:<24} {a['hostname'] or '-':<16} {a['role']:<9} "
            f"{a['wave'] or '-'!s:>4} {_vcell(a['previous_version']):>8} "
            f"{_vcell(a['active_version']):>6}  {a['state']:<13} {a['last_error'] or '-'}"
        )
    if len(shown) > AGENT_ROWS:
        lines.append(f"  ... and {len(shown) - AGENT_ROWS} more agent(s) (--json lists all)")
    return lines


def _vcell(version: int) -> str:
    """A version in a table cell: "-" for none."""
    return f"v{version}" if version else "-"


def _render_rollout(status: Any) -> str:
    d = rollout_dict(status)
    selector = ",".join(f"{k}={v}" for k, v in sorted(d["selector"].items())) or "whole fleet"
    labelled = any(g.startswith("accuracy") for g in d["gates"])
    lines = [
        f"rollout {d['id']}: {d['model']} v{d['version']}  state {d['state'].upper()}"
        + (f"  ({d['reason']})" if d["reason"] else ""),
        f"  {d['strategy']}, wave {d['wave']}/{len(d['waves'])} (cumulative agents "
        f"{d['waves']}); assigned {d['assigned']}/{d['agents']}, switched {d['switched']}, "
        f"failed {len(d['failed'])}"
        + (f", prepared {d['prepared']}/{d['agents']}" if d["strategy"] == "blue-green" else ""),
        f"  selector {selector}; bake {d['bake_s']:g}s, min-requests {d['min_requests']}, "
        f"max-failed-agents {d['max_failed_agents']}, agent-timeout {d['agent_timeout_s']:g}s"
        + (", auto-switch" if d["auto_switch"] else "")
        + (", downgrade allowed" if d["allow_downgrade"] else ""),
        f"  judge {', '.join(d['judge']) or 'none'}"
        + (f", max-bake {d['max_bake_s']:g}s" if d["judge"] or labelled else "")
        + (f", min-labels {d['min_labels']}" if labelled else ""),
    ]
    if d["traffic"]:
        steps = ",".join(str(s) for s in d["traffic"])
        lines.append(
            f"  traffic canary {steps}: wave {d['wave']} at {d['traffic_percent']}% of its "
            f"requests on v{d['version']}"
        )
    if d["rate_base"] or d["queued"]:
        cap = f", at most {d['rate_max']:g}/min" if d["rate_max"] else ""
        lines.append(
            f"  pacing {d['rate_base']:g} agent(s) in the first minute, x{d['rate_factor']:g} "
            f"each minute{cap}; {d['queued']} agent(s) queued"
        )
    if d["abort_failed_pct"]:
        lines.append(
            f"  abort when more than {d['abort_failed_pct']:g}% of the agents failed, after "
            f"{d['abort_min_agents']} resolved"
        )
    lines += [f"  warning: {w}" for w in d["warnings"]]
    if d["state"] == "baking":
        lines.append(f"  bake: {d['bake_left_s']:.0f}s left")
    ev = d.get("last_evaluation")
    if ev:
        window = f", bake {_hms(ev['since'])}-{_hms(ev['at'])}" if ev["since"] else ""
        baseline = (
            f"baseline v{ev['baseline_version']} {ev['baseline_requests']} request(s), "
            f"{ev['baseline_failures']} failed, on {ev['baseline_agents']} agent(s)"
            if ev["baseline_version"]
            else "no baseline (no agent left on one previous version)"
        )
        lines.append(
            f"  last evaluation (wave {ev['wave']}{window}): canary {ev['canary_requests']} "
            f"request(s), {ev['canary_failures']} failed, on {ev['canary_agents']} agent(s); "
            f"{baseline}"
        )
        if ev["gates"]:
            lines.append(f"    {'GATE':<24} {'CANARY':>10} {'BASELINE':>10} {'VALUE':>10}  VERDICT")
        for g in ev["gates"]:
            verdict = {True: "ok", False: "FAILED", None: g.get("note", "-")}[g["ok"]]
            lines.append(
                f"    {g['gate']:<24} {_fig(g['canary']):>10} {_fig(g['baseline']):>10} "
                f"{_fig(g['value']):>10}  {verdict}"
            )
    if ev:
        lines += _render_verdicts(ev)
    if not ev or not ev["gates"]:
        lines.append(f"  gates: {', '.join(d['gates']) or 'none'}")
    if d["per_agent"]:
        lines += _render_agents(d["per_agent"])
    else:
        for agent, why in d["failed"].items():
            lines.append(f"  failed agent {agent}: {why}")
    for e in d["events"][-6:]:
        lines.append(f"  {_hms(e['at'])}  {e['text']}")
    return "\n".join(lines)


def _judged(value: float | None, unit: str) -> str:
    """A judged figure in its unit: milliseconds, or a rate in percent (percentage points)."""
    if value is None:
        return "n/a"
    value += 0.0  # no "-0"
    return f"{value * 100:.3g}%" if unit == "fraction" else f"{value:.3g}{unit}"


def _render_verdicts(ev: dict[str, Any]) -> list[str]:
    """The statistical judge's table: per metric, both arms, the effect, its interval, the
    samples, the verdict and why."""
    if not ev.get("verdicts"):
        return [f"    judge: {ev['judge_note']}"] if ev.get("judge_note") else []
    when = "end of bake" if ev.get("final", True) else "during bake"
    lines = [
        f"    judge (look {ev.get('looks', 0)}, {when}): {'METRIC':<12} {'CANARY':>9} "
        f"{'BASELINE':>9} {'EFFECT':>9} {'INTERVAL':>21} {'TOLERANCE':>9} {'N':>9}  VERDICT"
    ]
    pad = " " * len(lines[0].split("METRIC")[0])
    for v in ev["verdicts"]:
        u = v["unit"]
        interval = (
            f"[{_judged(v['low'], u)}, {_judged(v['high'], u)}]"
            if v["low"] is not None and v["high"] is not None
            else "unbounded"
        )
        diff = _judged(v["effect"], u).replace("%", " pp")
        tol = _judged(v["tolerance"], u).replace("%", " pp")
        interval = interval.replace("%", " pp")
        lines.append(
            f"{pad}{v['metric']:<12} {_judged(v['canary'], u):>9} {_judged(v['baseline'], u):>9} "
            f"{diff:>9} {interval:>21} {tol:>9} "
            f"{v['canary_samples']:>4}/{v['baseline_samples']:<4}  {v['verdict'].upper()}"
        )
        lines.append(f"{pad}  why: {v['why']}")
    return lines


class _ChangeLines:
    """Watching without a terminal: one line per change, never the whole block again.

    A new event of the engine is a line; a change of the counts (an agent switched or
    prepared) without one is a progress line. The bake countdown is not a change.
    """

    def __init__(self, status: Any) -> None:
        self.seen = {(e.at, e.text) for e in status.events}
        self.progress = self._progress(status)

    @staticmethod
    def _progress(s: Any) -> tuple[Any, ...]:
        return (s.state, s.wave, s.assigned, s.switched, s.prepared, len(s.failed))

    def lines(self, status: Any) -> list[str]:
        new = [e for e in status.events if (e.at, e.text) not in self.seen]
        self.seen.update((e.at, e.text) for e in new)
        out = [f"{_hms(e.at)}  {e.text}" for e in new]
        progress = self._progress(status)
        if progress != self.progress and not new:
            counts = f"{status.switched}/{status.assigned} assigned agent(s) switched"
            if status.strategy == "blue-green" and status.state in ("preparing", "ready"):
                counts = f"{status.prepared}/{status.agents} agent(s) prepared"
            out.append(
                f"{_hms(time.time())}  {status.state.upper()}  wave "
                f"{status.wave}/{len(status.waves)}: {counts}, {len(status.failed)} failed"
            )
        self.progress = progress
        return out


def _watch_rollout(
    stub: Any,
    first: Any,
    timeout: float | None,
    as_json: bool,
    shown: bool,
) -> int:
    """Follow one rollout until it ends, needs an operator, or ``timeout`` passes; return the
    exit code of its outcome (ROLLOUT_EXIT_CODES, EXIT_WAIT_TIMEOUT).

    ``shown``: ``first`` is already on screen (`rollout start` printed it).
    """

    tty = sys.stdout.isatty() and not as_json
    deadline = None if timeout is None else time.monotonic() + timeout
    status, changes, last_json = first, _ChangeLines(first), None
    if not shown and not tty and not as_json:
        print(_render_rollout(first), flush=True)
    while True:
        code = ROLLOUT_EXIT_CODES.get(status.state)
        if as_json:
            d = rollout_dict(status)
            d.pop("bake_left_s")  # a countdown is not a change
            if d != last_json:
                print(json.dumps(rollout_dict(status)), flush=True)
                last_json = d
        elif tty:
            left = "" if deadline is None else f", {max(0, deadline - time.monotonic()):.0f}s left"
            sys.stdout.write("\x1b[2J\x1b[H")
            print(
                f"{_render_rollout(status)}\n\nwatching rollout {status.id} every "
                f"{WATCH_INTERVAL_S:g}s{left}; Ctrl-C stops watching, not the rollout",
                flush=True,
            )
        else:
            for line in changes.lines(status):
                print(line, flush=True)
        if code is not None:
            end = (
                f"rollout {status.id} of {status.model} v{status.version}: {status.state}"
                + (f" ({status.reason})" if status.reason else "")
                + f"; exit {code}"
            )
            print(end, file=sys.stderr if as_json else sys.stdout, flush=True)
            return code
        if deadline is not None and time.monotonic() >= deadline:
            print(
                f"modelfleet-hub: rollout {status.id} of {status.model} v{status.version} is "
                f"still {status.state} after --timeout {timeout:g}s; it goes on (`modelfleet-hub "
                f"rollout status {status.model} --watch` follows it); exit {EXIT_WAIT_TIMEOUT}",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_WAIT_TIMEOUT
        pause = WATCH_INTERVAL_S
        if deadline is not None:
            pause = max(0.0, min(pause, deadline - time.monotonic()))
        time.sleep(pause)
        status = _poll_through_outage(stub, status, deadline)


def _poll_through_outage(stub: Any, status: Any, deadline: float | None) -> Any:
    """The rollout's next status; while the hub is unreachable (restarting), the last one.

    The rollout itself is durable and resumes with the hub, so a restart must not end a watch
    (or a `rollout start --wait` in a pipeline) with "unavailable". An outage longer than
    WATCH_OUTAGE_S, or one still going at the deadline, raises as before."""
    from modelfleet.protos import fleet_pb2 as pb

    request = pb.GetRolloutRequest(model=status.model, id=status.id)
    outage_since: float | None = None
    while True:
        try:
            fresh = call(stub.GetRollout, request, timeout=10)
        except ModelfleetError as exc:
            now = time.monotonic()
            if exc.status is not Status.UNAVAILABLE:
                raise
            if outage_since is None:
                outage_since = now
                print(
                    f"modelfleet-hub: the hub does not answer ({exc}); still watching rollout "
                    f"{status.id}, for up to {WATCH_OUTAGE_S:g}s",
                    file=sys.stderr,
                    flush=True,
                )
            if now - outage_since >= WATCH_OUTAGE_S or (deadline is not None and now >= deadline):
                raise
            time.sleep(WATCH_INTERVAL_S)
            continue
        if outage_since is not None:
            down = time.monotonic() - outage_since
            print(
                f"modelfleet-hub: the hub answers again after {down:.0f}s",
                file=sys.stderr,
                flush=True,
            )
        return fresh


def _usage_error(command: str, message: str) -> int:
    print(f"modelfleet-hub rollout {command}: error: {message}", file=sys.stderr)
    return 2


def cmd_rollout(args: argparse.Namespace) -> int:
    from modelfleet.hub.rollouts import Spec, parse_traffic
    from modelfleet.protos import fleet_pb2 as pb

    cmd = args.rollout_command
    if cmd == "start":
        if args.timeout is not None and not args.wait:
            return _usage_error(cmd, "--timeout needs --wait")
        waves = [w.strip() for w in args.waves.split(",") if w.strip()]
        judged = [m.strip() for m in args.judge.split(",") if m.strip()]
        no_judge = judged == ["none"]
        if no_judge:
            judged = []
        if not args.waves_are_counts:
            waves = [w if w.endswith("%") else f"{w}%" for w in waves]
        spec = Spec(
            model=args.name,
            version=args.version,
            selector=args.selector,
            waves=waves,
            bake_s=args.bake,
            gates=args.gate,
            min_requests=args.min_requests,
            max_failed_agents=args.max_failed_agents,
            agent_timeout_s=args.agent_timeout,
            strategy=args.strategy,
            auto_switch=args.auto_switch,
            allow_downgrade=args.allow_downgrade,
            judge=judged,
            max_bake_s=args.max_bake or 0.0,
            traffic=parse_traffic(args.traffic) if args.traffic is not None else [],
            rate_base=args.rate_base,
            rate_factor=args.rate_factor,
            rate_max=args.rate_max,
            abort_failed_pct=args.abort_failed_pct,
            abort_min_agents=args.abort_min_agents,
            min_labels=args.min_labels,
        )
        # The hub checks the same (every client gets it); here it fails before any connection.
        spec.validate()
        req = pb.StartRolloutRequest(
            model=spec.model,
            version=spec.version,
            selector=spec.selector,
            waves=spec.waves,
            bake_s=spec.bake_s,
            gates=spec.gates,
            min_requests=spec.min_requests,
            max_failed_agents=spec.max_failed_agents,
            agent_timeout_s=spec.agent_timeout_s,
            strategy=spec.strategy,
            auto_switch=spec.auto_switch,
            allow_downgrade=spec.allow_downgrade,
            judge=spec.judge,
            no_judge=no_judge,
            max_bake_s=spec.max_bake_s,
            traffic=spec.traffic,
            rate_base=spec.rate_base,
            rate_factor=spec.rate_factor,
            rate_max=spec.rate_max,
            abort_failed_pct=spec.abort_failed_pct,
            abort_min_agents=spec.abort_min_agents,
            min_labels=spec.min_labels,
        )
        stub = admin_stub(args)
        status = call(stub.StartRollout, req)
        print(_render_rollout(status), flush=True)
        if not args.wait:
            return 0
        return _watch_rollout(stub, status, args.timeout, as_json=False, shown=True)
    stub = admin_stub(args)
    if cmd == "status":
        if args.timeout is not None and not args.watch:
            return _usage_error(cmd, "--timeout needs --watch")
        status = call(stub.GetRollout, pb.GetRolloutRequest(model=args.name, id=args.id))
        if args.watch:
            return _watch_rollout(stub, status, args.timeout, as_json=args.json, shown=False)
        print(json.dumps(rollout_dict(status)) if args.json else _render_rollout(status))
        return 0
    if cmd == "history":
        resp = call(stub.RolloutHistory, pb.RolloutHistoryRequest(model=args.name))
        if args.json:
            _print_json([rollout_dict(r) for r in resp.rollouts])
            return 0
        for r in resp.rollouts:
            d = rollout_dict(r)
            print(f"{r.id:>4}  v{r.version:<5} {r.state:<12} agents {d['agents']:<4} {d['reason']}")
        return 0
    action = "rollback_now" if cmd == "rollback" and args.now else cmd
    status = call(stub.ControlRollout, pb.ControlRolloutRequest(model=args.name, action=action))
    print(_render_rollout(status))
    return 0


def _verdict_dict(v: Any) -> dict[str, Any]:
    """A judged metric (MetricVerdict) as plain data, for rollouts and experiments alike: the
    message's fields in order, an unset number as None. The keys are those of the rollout's
    saved state (hub.judge.verdict_to_json, which hub.convert turns into this message), with
    no second list of them here; tests/test_judge.py pins the round trip."""
    return {
        f.name: getattr(v, f.name) if not f.has_presence or v.HasField(f.name) else None
        for f in v.DESCRIPTOR.fields
    }


def experiment_dict(x: Any) -> dict[str, Any]:
    """An ExperimentStatus as the plain data `experiment status --json` prints."""

    def opt(msg: Any, name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None

    shadow = None
    if x.HasField("shadow"):
        s = x.shadow
        shadow = {
            "available": s.available,
            "note": s.note,
            "compared": s.compared,
            "dropped": s.dropped,
            "shadow_failures": s.shadow_failures,
            **{
                k: opt(s, k)
                for k in (
                    "top1_agreement",
                    "abs_diff_p50",
                    "abs_diff_p99",
                    "rel_diff_p99",
                    "js_p99",
                    "shadow_latency_p99_ms",
                )
            },
        }
    return {
        "id": x.id,
        "model": x.model,
        "candidate": x.candidate,
        "selector": dict(x.selector),
        "mode": x.mode,
        "share_percent": x.share_percent,
        "sticky": x.sticky,
        "duration_s": x.duration_s,
        "state": x.state,
        "created_at": x.created_at,
        "ends_at": x.ends_at,
        "finished_at": x.finished_at,
        "reason": x.reason,
        "actor": x.actor,
        "arms": [
            {
                "arm": a.arm,
                "version": a.version,
                "requests": a.requests,
                "failures": a.failures,
                "error_rate": a.error_rate,
                "p50_ms": opt(a, "p50_ms"),
                "p95_ms": opt(a, "p95_ms"),
                "p99_ms": opt(a, "p99_ms"),
                "agents": a.agents,
            }
            for a in x.arms
        ],
        "shadow": shadow,
        "verdict": x.verdict,
        "judge": list(x.judge),
        "gates": list(x.gates),
        "verdicts": [_verdict_dict(v) for v in x.verdicts],
        "shadow_gates": [
            {"gate": g.gate, "value": opt(g, "value"), "ok": opt(g, "ok"), "why": g.why}
            for g in x.shadow_gates
        ],
        "agents_in": list(x.agents_in),
        "agents_out": list(x.agents_out),
        "since": x.since,
        "until": x.until,
        "events": [{"at": e.at, "text": e.text} for e in x.events],
    }


def _experiment_line(d: dict[str, Any]) -> str:
    where = ",".join(f"{k}={v}" for k, v in sorted(d["selector"].items())) or "whole fleet"
    share = f"{d['mode']} {d['share_percent']:g}%" + (", sticky" if d["sticky"] else "")
    return (
        f"{d['id']:>4}  {d['model']:<12} v{d['candidate']:<5} {share:<20} {d['state']:<9} {where}"
    )


def _render_experiment(x: Any) -> str:
    d = experiment_dict(x)
    share = f"{d['mode']} {d['share_percent']:g}%" + (", sticky" if d["sticky"] else "")
    where = ",".join(f"{k}={v}" for k, v in sorted(d["selector"].items())) or "whole fleet"
    lines = [
        f"experiment {d['id']}: {d['model']} v{d['candidate']} ({share})  state "
        f"{d['state'].upper()}" + (f"  ({d['reason']})" if d["reason"] else ""),
        f"  selector {where}; {len(d['agents_in'])} agent(s) in the experiment"
        + (f", {len(d['agents_out'])} out (a newer deployment decides)" if d["agents_out"] else ""),
        f"  window {_hms(d['since'])}-{_hms(d['until'])} ({d['until'] - d['since']:.0f}s)"
        + (f"; ends {_hms(d['ends_at'])}" if d["ends_at"] and d["state"] == "running" else ""),
        f"    {'ARM':<10} {'VERSION':>7} {'REQUESTS':>9} {'ERRORS':>7} {'ERROR RATE':>10} "
        f"{'P50 MS':>8} {'P95 MS':>8} {'P99 MS':>8} {'AGENTS':>6}",
    ]
    for a in d["arms"]:
        lines.append(
            f"    {a['arm']:<10} {_vcell(a['version']):>7} {a['requests']:>9} "
            f"{a['failures']:>7} {a['error_rate']:>10.4f} {_fig(a['p50_ms']):>8} "
            f"{_fig(a['p95_ms']):>8} {_fig(a['p99_ms']):>8} {a['agents']:>6}"
        )
    s = d["shadow"]
    if s is not None:
        if not s["available"]:
            lines.append(f"  shadow: {s['note']}")
        else:
            lines.append(
                f"  shadow v{d['candidate']}: {s['compared']} compared, {s['dropped']} dropped, "
                f"{s['shadow_failures']} failed; top-1 agreement {_fig(s['top1_agreement'])}, "
                f"|diff| p50 {_fig(s['abs_diff_p50'])} p99 {_fig(s['abs_diff_p99'])}, "
                f"rel diff p99 {_fig(s['rel_diff_p99'])}, JS p99 {_fig(s['js_p99'])}, "
                f"shadow latency p99 {_fig(s['shadow_latency_p99_ms'])} ms"
                + (f" ({s['note']})" if s["note"] else "")
            )
    lines.append(f"  verdict: {d['verdict']}")
    if d["verdicts"]:
        lines += _render_verdicts({"verdicts": d["verdicts"], "looks": 1, "final": False})
    for g in d["shadow_gates"]:
        state = {True: "ok", False: "FAILED", None: "not judged"}[g["ok"]]
        lines.append(f"    gate {g['gate']:<28} {_fig(g['value']):>10}  {state}: {g['why']}")
    for e in d["events"][-6:]:
        lines.append(f"  {_hms(e['at'])}  {e['text']}")
    return "\n".join(lines)


def cmd_experiment(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    cmd = args.experiment_command
    stub = admin_stub(args)
    if cmd == "ls":
        resp = call(stub.ListExperiments, pb.ListExperimentsRequest(model=args.name))
        if args.json:
            _print_json([experiment_dict(x) for x in resp.experiments])
            return 0
        print(f"{'ID':>4}  {'MODEL':<12} {'CAND.':<6} {'SHARE':<20} {'STATE':<9} SELECTOR")
        for x in resp.experiments:
            print(_experiment_line(experiment_dict(x)))
        return 0
    if cmd == "start":
        if args.sticky and args.split is None:
            print(
                "modelfleet-hub experiment start: error: --sticky needs --split",
                file=sys.stderr,
            )
            return 2
        req = pb.StartExperimentRequest(
            model=args.name,
            candidate=args.candidate,
            selector=args.selector,
            split_percent=args.split or 0.0,
            sticky=args.sticky,
            shadow_percent=args.shadow or 0.0,
            duration_s=args.duration or 0.0,
            judge=[m.strip() for m in args.judge.split(",") if m.strip()],
            gates=args.gate,
        )
        # A share of 0 reads as "not given" on the wire: refuse it here, by its flag.
        for flag, value in (("split", args.split), ("shadow", args.shadow)):
            if value is not None and value <= 0:
                raise InvalidRequestError(
                    f"--{flag} {value:g} is out of range: more than 0 percent is needed"
                )
        x = call(stub.StartExperiment, req)
    elif cmd == "status":
        x = call(stub.GetExperiment, pb.GetExperimentRequest(model=args.name, id=args.id))
    else:
        x = call(
            stub.ControlExperiment,
            pb.ControlExperimentRequest(model=args.name, id=args.id, action=cmd),
        )
    print(json.dumps(experiment_dict(x)) if args.json else _render_experiment(x))
    return 0


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN: no successful request to measure


def cmd_metrics(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    request = pb.MetricsRequest(
        model=args.name, version=args.version, agent_id=args.agent, since_s=args.since
    )
    resp = call(admin_stub(args).Metrics, request)
    if args.json:
        print(json.dumps(message_dict(resp), indent=2))
        return 0
    who = f"agent {args.agent}" if args.agent else "the fleet"
    print(
        f"{args.name} over the last {resp.window_s:g}s, {who} (telemetry intervals ending in "
        f"the window)"
    )
    if not resp.versions:
        print("no telemetry in this window")
        return 0
    print(
        f"{'VERSION':>7} {'AGENTS':>6} {'REQUESTS':>9} {'REQ/S':>8} {'FAILURES':>8} "
        f"{'ERROR RATE':>10} {'P50 MS':>8} {'P95 MS':>8} {'P99 MS':>8}  "
        "FAILURES BY REASON"
    )
    for v in resp.versions:
        reasons = ", ".join(f"{k}={n}" for k, n in sorted(v.failures_by_reason.items())) or "-"
        print(
            f"{v.version:>7} {v.agents:>6} {v.requests:>9} {v.request_rate:>8.3f} "
            f"{v.failures:>8} {v.error_rate:>10.3%} {_ms(v.p50_ms):>8} {_ms(v.p95_ms):>8} "
            f"{_ms(v.p99_ms):>8}  {reasons}"
        )
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from modelfleet.kernel.drift import PSI_ALERT
    from modelfleet.protos import fleet_pb2 as pb

    request = pb.DriftRequest(
        model=args.name,
        version=args.version,
        agent_id=args.agent,
        selector=args.selector,
        since_s=args.since,
    )
    resp = call(admin_stub(args).Drift, request)
    if args.json:
        print(json.dumps(message_dict(resp), indent=2))
        return 0
    if args.agent:
        who = f"agent {args.agent}"
    elif args.selector:
        who = "agents " + ",".join(f"{k}={v}" for k, v in sorted(args.selector.items()))
    else:
        who = "the fleet"
    print(f"{args.name} drift over the last {resp.window_s:g}s, {who} (windows ending in it)")
    if not resp.fleet:
        print("no drift window reported in this window (does the bundle have a reference?)")
        return 0
    groups: dict[tuple[str, int], list[Any]] = {}
    for f in [*resp.fleet, *resp.agents]:
        groups.setdefault((f.agent_id, f.version), []).append(f)
    print(
        f"{'AGENT':<24} {'VERSION':>7} {'FEATURE':<24} {'ROLE':<6} {'PSI MAX':>8} "
        f"{'PSI MEAN':>8} {'PSI LAST':>8} {'JS MAX':>7} {'KS MAX':>7} {'WINDOWS':>7} {'ROWS':>9}"
    )
    for (agent, version), feats in groups.items():
        label = agent or "(fleet)"
        for f in feats[: max(args.top, 0)]:
            ks = f"{f.ks_max:.3f}" if f.HasField("ks_max") else "-"
            flag = "  drifted" if f.psi_max > PSI_ALERT else ""
            print(
                f"{label:<24} {version:>7} {f.feature:<24} {f.role:<6} {f.psi_max:>8.3f} "
                f"{f.psi_mean:>8.3f} {f.psi_last:>8.3f} {f.js_max:>7.3f} {ks:>7} "
                f"{f.windows:>7} {f.rows:>9}{flag}"
            )
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    import grpc

    from modelfleet.hub.backup import BackupFile, BackupSummary, BackupWriter
    from modelfleet.hub.convert import backup_item_from_proto
    from modelfleet.kernel.grpc_status import error_from_rpc
    from modelfleet.protos import fleet_pb2 as pb

    stub = admin_stub(args)
    writer = BackupWriter(args.dir)
    summary = None
    try:
        for chunk in stub.Backup(pb.BackupRequest(), timeout=args.timeout):
            item = backup_item_from_proto(chunk)
            if isinstance(item, BackupFile):
                writer.begin(item)
            elif isinstance(item, BackupSummary):
                summary = item
            else:
                writer.write(item)
        if summary is None:
            raise ModelfleetError("the hub ended the backup without its summary: take it again")
        digest = writer.finish(summary)
    except grpc.RpcError as exc:
        writer.abort()
        raise error_from_rpc(exc) from None
    except BaseException:
        writer.abort()
        raise
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(summary.created_at))
    tuf = ", ".join(f"{r} v{v}" for r, v in sorted(summary.tuf_versions.items()))
    print(
        f"backed up hub {summary.hub} as of {when} into {args.dir}: {summary.files} files, "
        f"{summary.bytes / 1e6:.1f} MB ({summary.models} model(s), {summary.versions} "
        f"version(s), {summary.blobs} blob(s), {summary.agents} agent(s); TUF {tuf}); the hub "
        f"paused {summary.pause_ms:.1f} ms for the copy"
    )
    print(
        f"manifest sha256 {digest}: keep it apart from the backup, "
        f"`restore --manifest-sha256 {digest}` checks it"
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from modelfleet.hub.backup import VERSION_GAP, restore

    if args.manifest_sha256 is not None and not re.fullmatch(
        r"[0-9a-fA-F]{64}", args.manifest_sha256
    ):
        raise InvalidRequestError("--manifest-sha256 takes the 64 hex digits that backup printed")
    result = restore(args.dir, args.data_dir, force=args.force, expect_sha256=args.manifest_sha256)
    m = result.manifest
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created_at))
    print(
        f"restored the backup of hub {m.hub or '?'} as of {when} ({len(m.files)} files, "
        f"{m.total_bytes / 1e6:.1f} MB, manifest verified) into {result.data_dir}"
    )
    if result.replaced is not None:
        print(
            f"the previous contents of {result.data_dir} are in {result.replaced}: delete it "
            "once the restored hub runs"
        )
    print(
        f"start it with: modelfleet-hub --data {result.data_dir} serve (with the usual --config "
        f"and flags); its first start re-signs the TUF metadata with versions {VERSION_GAP} "
        "higher, so agents accept it even if the lost hub signed newer metadata after the backup"
    )
    if not result.targets_key_online:
        print(
            "note: the targets key is offline: if versions were published after this backup, "
            "agents refuse this hub's metadata until it signs newer targets "
            "(docs/operations.md#backing-up-and-restoring-the-hub)"
        )
    print(
        "agents enrolled after the backup must enroll again; with MQTT, run mqtt-config again "
        "on this machine"
    )
    return 0


# Exit codes of `diff` and `apply` (docs/cli.md): a refused file is an invalid argument (3, as
# kernel/errors.py maps it). `diff` says "something would change" with a code of its own, not
# diff(1)'s 1, which Python gives a crash: a traceback must never read as "differs".
EXIT_STATE_DIFFERS = 24
EXIT_STATE_REFUSED = EXIT_CODES[Status.INVALID_ARGUMENT]


def _read_state_file(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read the state file {path}: {exc}") from None


def state_plan_dict(plan: Any) -> dict[str, Any]:
    """A StatePlan as `diff --json` and `apply --json` print it."""

    def change(c: Any) -> dict[str, Any]:
        return {
            "agent_id": c.agent_id,
            "hostname": c.hostname,
            "from_version": c.from_version,
            "to_version": c.to_version,
            "active_version": c.active_version,
        }

    return {
        "applied": plan.applied,
        "changes": plan.changes,
        "problems": [
            {"where": p.where, "line": p.line, "message": p.message} for p in plan.problems
        ],
        "deployments": [
            {
                "entry": a.entry,
                "line": a.line,
                "model": a.model,
                "selector": dict(sorted(a.selector.items())),
                "version": a.version,
                "strategy": a.strategy,
                "action": a.action,
                "reason": a.reason,
                "current_version": a.current_version,
                "agents": [change(c) for c in a.changes],
                "rollout_id": a.rollout_id,
                "revision": a.revision,
            }
            for a in plan.deployments
        ],
        "jobs": [
            {
                "entry": j.entry,
                "line": j.line,
                "name": j.name,
                "action": j.action,
                "reason": j.reason,
                "fields": list(j.fields),
            }
            for j in plan.jobs
        ],
    }


_STATE_VERBS = {
    "none": ("in force", "in force"),
    "deploy": ("would deploy", "deployed"),
    "rollout": ("would start a rollout", "rollout started"),
    "in_progress": ("rollout in progress", "rollout in progress"),
    "held": ("held", "held"),
    "undeploy": ("would undeploy", "undeployed"),
    "kept": ("kept (--prune removes it)", "kept (--prune removes it)"),
    "create": ("would create", "created"),
    "update": ("would update", "updated"),
    "delete": ("would delete", "deleted"),
}


def _print_state_plan(plan: Any, applied: bool) -> None:
    changing = 0
    for a in plan.deployments:
        verb = _STATE_VERBS.get(a.action, (a.action, a.action))[applied]
        head = f"deployment[{a.entry}]" if a.entry else "not in file:"
        how = f" ({a.strategy})" if a.entry and a.strategy != "direct" else ""
        now = f", now {_v(a.current_version)}" if a.current_version != a.version else ""
        extra = ""
        if a.rollout_id and a.action in ("rollout", "in_progress", "held"):
            extra = f" [rollout {a.rollout_id}]"
        elif a.revision:
            extra = f" [revision {a.revision}]"
        print(
            f"{head} {a.model} v{a.version} for {_where(a.selector)}{how}{now}: {verb}"
            f"{extra}" + (f": {a.reason}" if a.reason and a.action not in ("none", "kept") else "")
        )
        if a.action in ("deploy", "rollout", "undeploy"):
            changing += 1
            if not a.changes:
                print("  no agent's desired version changes")
            _print_changes(a.model, a.changes, fallback=a.action == "undeploy")
    for j in plan.jobs:
        verb = _STATE_VERBS.get(j.action, (j.action, j.action))[applied]
        head = f"job[{j.entry}]" if j.entry else "not in file: job"
        detail = f": {', '.join(j.fields)}" if j.fields else ""
        print(f"{head} {j.name}: {verb}{detail}")
        if j.action in ("create", "update", "delete"):
            changing += 1
    if not plan.changes:
        print("nothing to change: the hub's desired state is what the file declares")
    elif applied:
        print(f"applied {changing} change(s)")
        for a in plan.deployments:
            if a.action == "rollout":
                print(
                    f"  follow rollout {a.rollout_id}: modelfleet-hub rollout status {a.model} "
                    "--watch"
                )
    else:
        print(f"{changing} change(s); `modelfleet-hub apply -f FILE` makes them")


def cmd_state(args: argparse.Namespace) -> int:
    """`diff` and `apply`: the hub plans (and applies); this reads the file and prints."""
    from modelfleet.protos import fleet_pb2 as pb

    text = _read_state_file(args.file)
    stub = admin_stub(args)
    req = pb.StateRequest(document=text, prune=args.prune)
    plan = call(stub.ApplyState if args.command == "apply" else stub.PlanState, req)
    if args.json:
        _print_json(state_plan_dict(plan))
    if plan.problems:
        name = "<stdin>" if args.file == "-" else args.file
        for p in plan.problems:
            at = f"{name}:{p.line}" if p.line else name
            print(f"{at}: {p.where}: {p.message}", file=sys.stderr)
        print(
            f"modelfleet-hub {args.command}: {name} refused: {len(plan.problems)} problem(s); "
            "nothing changed",
            file=sys.stderr,
        )
        return EXIT_STATE_REFUSED
    if not args.json:
        _print_state_plan(plan, applied=args.command == "apply")
    if args.command == "diff" and plan.changes:
        return EXIT_STATE_DIFFERS
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import tomllib

    from modelfleet.protos import fleet_pb2 as pb

    resp = call(admin_stub(args).ExportState, pb.ExportStateRequest())
    text = json.dumps(tomllib.loads(resp.document), indent=2) + "\n" if args.json else resp.document
    if args.output is None:
        sys.stdout.write(text)
        return 0
    from modelfleet.kernel.atomic import atomic_write

    atomic_write(args.output, text.encode("utf-8"))
    print(
        f"wrote {args.output}: {resp.deployments} deployment(s), {resp.jobs} job(s)",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("modelfleet-hub", lambda: _run(argv))


# Options of modelfleet-hub itself: argparse takes them before the command only.
GLOBAL_OPTIONS = ("--data", "--hub", "--admin-dir")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse's parse, plus a pointer for a global option given after the command."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    misplaced = [a for a in extra if a.split("=", 1)[0] in GLOBAL_OPTIONS]
    if not misplaced:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    option = misplaced[0].split("=", 1)[0]
    print(
        f"modelfleet-hub: error: {option} is an option of modelfleet-hub itself and goes before "
        f"the command: {_globals_first(argv)}",
        file=sys.stderr,
    )
    sys.exit(2)


def _globals_first(argv: list[str]) -> str:
    """``argv`` as a command line with the global options (and their values) moved first."""
    import shlex

    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in GLOBAL_OPTIONS and i + 1 < len(argv):
            front += argv[i : i + 2]
            i += 2
            continue
        (front if word.split("=", 1)[0] in GLOBAL_OPTIONS else rest).append(word)
        i += 1
    return shlex.join(["modelfleet-hub", *front, *rest])


def _run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.command != "serve" and args.data is None:
        args.data = Path(DEFAULT_DATA)
    handlers = {
        "serve": cmd_serve,
        "keys": cmd_keys,
        "sign": cmd_sign,
        "mqtt-config": cmd_mqtt_config,
        "publish": cmd_publish,
        "models": cmd_models,
        "deploy": cmd_deploy,
        "undeploy": cmd_undeploy,
        "deployments": cmd_deployments,
        "agents": cmd_agents,
        "audit": cmd_audit,
        "admins": cmd_admins,
        "rollout": cmd_rollout,
        "experiment": cmd_experiment,
        "jobs": cmd_jobs,
        "metrics": cmd_metrics,
        "drift": cmd_drift,
        "backup": cmd_backup,
        "restore": cmd_restore,
        "apply": cmd_state,
        "diff": cmd_state,
        "export": cmd_export,
        "alerts": cmd_alerts,
        "webhooks": cmd_webhooks,
        "capture": cmd_capture,
        "outcomes": cmd_outcomes,
    }
    return handlers[args.command](args)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


__all__ = ["InvalidRequestError", "main"]

if __name__ == "__main__":
    sys.exit(main())
