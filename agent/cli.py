"""``modelfleet-agent``: build bundles, serve them, inspect and roll back a running agent."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from modelfleet.kernel.cli import run_command
from modelfleet.kernel.commandline import finish, message_dict
from modelfleet.kernel.drift import DEFAULT_BINS, DEFAULT_TOP_K
from modelfleet.kernel.errors import (
    EXIT_NOT_READY,
    InvalidRequestError,
    ModelfleetError,
    Status,
)
from modelfleet.kernel.malloc import tune_malloc


def _add_admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--admin-socket", help="agent admin socket (default: MODELS/.modelfleet-admin.sock)"
    )
    p.add_argument(
        "--models", type=Path, default=Path("models"), help="the agent's model repository"
    )
    p.add_argument(
        "--data",
        type=Path,
        help="fleet mode: the agent's data directory (default: none, standalone)",
    )


def _add_security_args(p: argparse.ArgumentParser) -> None:
    """The inference port's TLS and token settings (docs/security.md#the-inference-port)."""
    p.add_argument(
        "--tls-cert", help="server certificate chain (PEM): serve TLS (default: none, plaintext)"
    )
    p.add_argument(
        "--tls-key", help="the server certificate's private key (PEM, mode 0600) (default: none)"
    )
    p.add_argument(
        "--tls-client-ca", help="CA bundle (PEM): require client certificates (default: none)"
    )
    p.add_argument(
        "--auth-token-file",
        help="file holding the bearer token inference calls must send (default: none)",
    )


_SECURITY_KEYS = ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelfleet-agent", description="Serve verified ONNX model bundles."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    bundle = sub.add_parser("bundle", help="create or inspect model bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)
    create = bsub.add_parser("create", help="build NAME/VERSION/ from an ONNX model")
    create.add_argument("model", type=Path, help="MODEL.onnx")
    create.add_argument("--name", required=True, help="model name")
    create.add_argument("--version", type=int, required=True, help="version: a positive integer")
    create.add_argument(
        "--samples", type=Path, required=True, help="SAMPLES.npz: one array per model input"
    )
    create.add_argument("--out", type=Path, required=True, help="repository directory")
    create.add_argument(
        "--expected",
        type=Path,
        help="EXPECTED.npz: golden outputs keyed by output name (default: computed from the model)",
    )
    create.add_argument(
        "--latency-budget-ms",
        type=float,
        default=None,
        help="the gate refuses a p99 on the samples above this (default: 1000)",
    )
    create.add_argument(
        "--tolerance", type=float, default=None, help="sets both --rtol and --atol (default: unset)"
    )
    create.add_argument(
        "--rtol", type=float, default=None, help="relative tolerance of the gate (default: 1e-4)"
    )
    create.add_argument(
        "--atol", type=float, default=None, help="absolute tolerance of the gate (default: 1e-5)"
    )
    create.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="0: no batch dimension (default: 32 when dimension 0 is dynamic)",
    )
    create.add_argument(
        "--max-queue-delay-us", type=int, default=0, help="batching hint stored in the bundle"
    )
    create.add_argument(
        "--providers",
        default="",
        help="execution providers the bundle prefers, best first, comma-separated, e.g. "
        "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider or cuda,cpu "
        "(default: none, the agent's choice)",
    )
    create.add_argument(
        "--provider-option",
        action="append",
        default=[],
        metavar="PROVIDER:KEY=VALUE",
        help="an onnxruntime option of one of --providers (repeat) (default: none)",
    )
    create.add_argument(
        "--warmup-runs", type=int, default=None, help="timed gate runs, at least 1 (default: 20)"
    )
    create.add_argument(
        "--feature-names", default="", help="comma-separated feature names (default: none)"
    )
    create.add_argument(
        "--reference",
        type=Path,
        help="FILE.parquet of reference rows (or a reference.json) for drift statistics, stored "
        "signed in the bundle (default: none)",
    )
    create.add_argument(
        "--reference-bins",
        type=int,
        default=DEFAULT_BINS,
        help=f"quantile bins per numeric feature (default: {DEFAULT_BINS})",
    )
    create.add_argument(
        "--reference-top-k",
        type=int,
        default=DEFAULT_TOP_K,
        help=f"categories kept per categorical feature, the rest count as other "
        f"(default: {DEFAULT_TOP_K})",
    )
    create.add_argument(
        "--labels",
        action="append",
        default=[],
        metavar="[OUTPUT=]FILE",
        help="class labels for an output, one per line (line N names class N), stored signed in "
        "the manifest for the classification extension; OUTPUT= may be left out when the model "
        "has one output; repeat for several outputs (default: none)",
    )
    inspect = bsub.add_parser("inspect", help="verify a bundle and print its manifest")
    inspect.add_argument("bundle_dir", type=Path, help="a bundle: REPOSITORY/NAME/VERSION")
    inspect.add_argument(
        "--reference",
        action="store_true",
        help="print the verified reference statistics instead of the manifest (default: off)",
    )
    example = bsub.add_parser(
        "example",
        help="write two small example models and health-check samples to try modelfleet with",
        description="Write OUT_DIR/model.onnx, OUT_DIR/model_v2.onnx (same signature, other "
        "weights) and OUT_DIR/samples.npz: x[N, 4] float32 -> y[N, 3] float32.",
    )
    example.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write to")
    example.add_argument(
        "--force", action="store_true", help="overwrite files that exist (default: refuse)"
    )

    serve = sub.add_parser("serve", help="serve every bundle under --models (standalone mode)")
    serve.add_argument("--config", type=Path, help="TOML config file (default: none)")
    serve.add_argument("--models", type=Path, help="model repository (default: models)")
    serve.add_argument(
        "--listen",
        help="HOST:PORT for the Open Inference Protocol (gRPC) (default: 127.0.0.1:8001)",
    )
    serve.add_argument("--metrics-listen", help="HOST:PORT for Prometheus /metrics (default: off)")
    serve.add_argument(
        "--http-listen",
        help="HOST:PORT for the Open Inference Protocol over HTTP/REST (default: off)",
    )
    serve.add_argument(
        "--http-max-request-bytes",
        type=int,
        help="HTTP request body limit, larger ones get 413 (default: 67108864, 64 MiB)",
    )
    serve.add_argument(
        "--model-control",
        action="store_true",
        default=None,
        help="let inference clients load and unload models of MODELS (default: off)",
    )
    serve.add_argument(
        "--data",
        type=Path,
        help="the agent's own files: model control's unloads, capture, TensorRT caches "
        "(default: agent-data)",
    )
    serve.add_argument(
        "--admin-socket", help="admin socket path (default: MODELS/.modelfleet-admin.sock)"
    )
    serve.add_argument(
        "--poll-interval-s", type=float, help="seconds between repository scans (default: 1.0)"
    )
    serve.add_argument("--serving-threads", type=int, help="threads running inference (default: 2)")
    serve.add_argument(
        "--serving-workers",
        type=int,
        help="processes answering gRPC inference on the port, this one included (default: 1)",
    )
    serve.add_argument(
        "--intra-op-threads",
        type=int,
        help="onnxruntime threads inside one operator (default: 0, onnxruntime chooses)",
    )
    serve.add_argument(
        "--inter-op-threads",
        type=int,
        help="onnxruntime threads across operators (default: 0, onnxruntime chooses)",
    )
    serve.add_argument(
        "--device", choices=["cpu", "cuda", "auto"], help="execution provider (default: auto)"
    )
    serve.add_argument(
        "--allowed-providers",
        help="comma-separated execution providers this node may use (default: any)",
    )
    serve.add_argument(
        "--require-provider",
        choices=["on", "off"],
        help="refuse a version that cannot serve on its first provider (default: off)",
    )
    serve.add_argument("--device-id", type=int, help="GPU for CUDA/TensorRT (default: 0)")
    serve.add_argument(
        "--batching", choices=["on", "off"], help="the dynamic batcher (default: on)"
    )
    serve.add_argument(
        "--max-queue-delay-us",
        type=int,
        help="how long a lone request waits for company (default: -1, each bundle's hint)",
    )
    serve.add_argument(
        "--batch-inflight", type=int, help="batches computing at once per version (default: 1)"
    )
    serve.add_argument(
        "--ort-spinning", choices=["on", "off"], help="onnxruntime thread spinning (default: on)"
    )
    serve.add_argument(
        "--inline-max-us",
        type=int,
        help="run models faster than this (fastest gate run) on the event loop (default: 200)",
    )
    _add_security_args(serve)
    serve.add_argument(
        "--max-message-bytes", type=int, help="gRPC message limit (default: 67108864, 64 MiB)"
    )
    serve.add_argument(
        "--max-request-bytes",
        type=int,
        help="largest total input size of one request (default: 0, max_message_bytes)",
    )
    serve.add_argument(
        "--max-concurrent-requests",
        type=int,
        help="per model, requests in flight before shedding (default: 0, 64 per serving thread)",
    )
    serve.add_argument(
        "--max-queued-rows",
        type=int,
        help="per model, rows in flight before shedding (default: 0, from the batch size)",
    )
    serve.add_argument(
        "--rate-limit-per-s",
        type=float,
        help="requests per second per client (default: 0, no rate limit)",
    )
    serve.add_argument(
        "--rate-limit-burst",
        type=int,
        help="requests a client may send at once (default: 0, the rate rounded up)",
    )
    serve.add_argument(
        "--rate-limit-clients",
        type=int,
        help="clients the rate limit tracks at most (default: 10000)",
    )
    serve.add_argument(
        "--drain-timeout-s",
        type=float,
        help="seconds in-flight requests get on SIGTERM (default: 10.0)",
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    serve.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="log one JSON object per line (default: text)",
    )

    run = sub.add_parser("run", help="fleet mode: follow the hub (config written by enroll)")
    run.add_argument("--config", type=Path, required=True, help="agent.toml from enroll")
    run.add_argument("--listen", help="HOST:PORT for inference (default: from agent.toml)")
    run.add_argument(
        "--metrics-listen", help="HOST:PORT for Prometheus /metrics (default: from agent.toml)"
    )
    run.add_argument(
        "--http-listen",
        help="HOST:PORT for the Open Inference Protocol over HTTP/REST (default: from agent.toml)",
    )
    run.add_argument(
        "--serving-workers",
        type=int,
        help="processes answering gRPC inference on the port, this one included "
        "(default: from agent.toml, else 1)",
    )
    _add_security_args(run)
    run.add_argument(
        "--tls-agent-identity",
        action="store_true",
        default=None,
        help="serve TLS with this agent's enrolled certificate",
    )
    run.add_argument(
        "--tls-client-ca-hub",
        action="store_true",
        default=None,
        help="require client certificates issued by the hub's CA",
    )
    run.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    run.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="log one JSON object per line (default: text)",
    )

    enroll = sub.add_parser("enroll", help="join a hub's fleet with a one-time token")
    source = enroll.add_mutually_exclusive_group()
    source.add_argument(
        "--token-file",
        metavar="PATH",
        help="file holding the token from `modelfleet-hub agents token`; '-' reads standard input "
        "(default: $MODELFLEET_AGENT_ENROLL_TOKEN)",
    )
    source.add_argument(
        "--token",
        help="the token itself (discouraged: other local users "
        "can read it in the process list and redeem it first) (default: none)",
    )
    enroll.add_argument("--data", type=Path, required=True, help="agent state directory")
    enroll.add_argument(
        "--listen", default="127.0.0.1:8001", help="where this agent will serve inference"
    )
    enroll.add_argument(
        "--metrics-listen", default="", help="HOST:PORT for Prometheus /metrics (default: off)"
    )
    enroll.add_argument("--hostname", help="name reported to the hub (default: this host's)")
    enroll.add_argument("--force", action="store_true", help="enroll again, replacing identity")
    enroll.add_argument(
        "--transport",
        choices=["grpc", "mqtt", "both"],
        default="grpc",
        help="how this agent reaches the hub (default: grpc)",
    )

    status = sub.add_parser("status", help="what a running agent serves, and gate results")
    _add_admin_args(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    rollback = sub.add_parser("rollback", help="switch MODEL back to its previous version now")
    rollback.add_argument("model", help="model name")
    _add_admin_args(rollback)

    compare = sub.add_parser(
        "compare",
        help="standalone: split or shadow MODEL's traffic to a candidate version",
    )
    compare.add_argument("model", help="model name")
    compare.add_argument(
        "--candidate",
        type=int,
        help="version from the repository to compare with the active one (default: none)",
    )
    share = compare.add_mutually_exclusive_group(required=True)
    share.add_argument(
        "--split",
        type=float,
        metavar="PCT",
        help="percent of requests the candidate answers (default: none)",
    )
    share.add_argument(
        "--shadow",
        type=float,
        metavar="PCT",
        help="percent of the active version's requests copied to the candidate (default: none)",
    )
    share.add_argument("--off", action="store_true", help="stop comparing")
    compare.add_argument(
        "--sticky",
        action="store_true",
        help="with --split: requests with a routing key always reach the same version",
    )
    _add_admin_args(compare)

    capture = sub.add_parser(
        "capture",
        help="standalone: write a sample of MODEL's requests and outputs to Parquet files",
    )
    capture.add_argument("model", help="model name")
    rate = capture.add_mutually_exclusive_group(required=True)
    rate.add_argument(
        "--rate",
        type=float,
        metavar="PCT",
        help="percent of the model's requests captured (default: none)",
    )
    rate.add_argument("--off", action="store_true", help="stop capturing this model")
    capture.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NAME",
        help="input never written (personal data); repeat for more (default: none)",
    )
    capture.add_argument(
        "--hash",
        action="append",
        default=[],
        metavar="NAME",
        help="input written only as a keyed HMAC-SHA256 of its bytes; repeat for more "
        "(default: none)",
    )
    _add_admin_args(capture)
    return finish(parser)


def _load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"{what} {path}: cannot read: {exc}") from None


def _labels_args(model: Path, specs: list[str]) -> dict[str, tuple[str, ...]]:
    """``--labels [OUTPUT=]FILE`` values -> output name -> labels."""
    from modelfleet.kernel import bundle as b

    out: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        output, sep, file = spec.partition("=")
        if not sep:
            output, file = "", spec
        if not output:
            try:
                outputs = b.signature_from_onnx(model.read_bytes())[1]
            except OSError as exc:
                raise InvalidRequestError(f"cannot read model {model}: {exc}") from None
            if len(outputs) != 1:
                names = ", ".join(o.name for o in outputs)
                raise InvalidRequestError(
                    f"--labels {spec}: the model has {len(outputs)} outputs ({names}); "
                    "say which one: --labels OUTPUT=FILE"
                )
            output = outputs[0].name
        if output in out:
            raise InvalidRequestError(f"--labels: output {output!r} is given labels twice")
        out[output] = b.read_labels_file(file)
    return out


def cmd_bundle_create(args: argparse.Namespace) -> int:
    from modelfleet.kernel import bundle as b

    kwargs: dict[str, Any] = {}
    if args.tolerance is not None:
        kwargs["rtol"] = kwargs["atol"] = args.tolerance
    if args.rtol is not None:
        kwargs["rtol"] = args.rtol
    if args.atol is not None:
        kwargs["atol"] = args.atol
    if args.latency_budget_ms is not None:
        kwargs["latency_budget_ms"] = args.latency_budget_ms
    if args.warmup_runs is not None:
        kwargs["warmup_runs"] = args.warmup_runs
    created = b.create_bundle(
        args.model,
        name=args.name,
        version=args.version,
        samples=_load_npz(args.samples, "samples"),
        expected=_load_npz(args.expected, "expected outputs") if args.expected else None,
        out_dir=args.out,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        feature_names=tuple(f for f in args.feature_names.split(",") if f),
        reference=args.reference,
        reference_bins=args.reference_bins,
        reference_top_k=args.reference_top_k,
        labels=_labels_args(args.model, args.labels),
        providers=b.providers_from_args(args.providers, args.provider_option),
        **kwargs,
    )
    print(
        f"created {created.path} ({created.manifest.model_size} bytes, "
        f"sha256 {created.manifest.model_sha256[:12]})"
    )
    reference = created.reference()
    if reference is not None:
        features = sum(len(t.features) for t in reference.tensors)
        print(f"reference: {reference.rows} rows, {features} features in reference.json")
    return 0


def cmd_bundle_inspect(args: argparse.Namespace) -> int:
    from modelfleet.kernel.bundle import load_bundle

    bundle = load_bundle(args.bundle_dir)
    if args.reference:
        reference = bundle.reference()
        if reference is None:
            raise InvalidRequestError(
                f"{args.bundle_dir} has no reference statistics; build it with "
                "`bundle create --reference FILE.parquet`"
            )
        print(json.dumps(reference.to_json(), indent=1))
        return 0
    print(json.dumps(bundle.manifest.to_json(), indent=2))
    return 0


def cmd_bundle_example(args: argparse.Namespace) -> int:
    from modelfleet.agent.examples import write_examples

    for path in write_examples(args.out_dir, force=args.force):
        print(f"wrote {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from modelfleet.agent.app import serve
    from modelfleet.agent.config import load_config
    from modelfleet.kernel.logs import setup_logging

    overrides = {
        "models": args.models,
        "listen": args.listen,
        "metrics_listen": args.metrics_listen,
        "http_listen": args.http_listen,
        "http_max_request_bytes": args.http_max_request_bytes,
        "model_control": args.model_control,
        "data": args.data,
        "admin_socket": args.admin_socket,
        "poll_interval_s": args.poll_interval_s,
        "serving_threads": args.serving_threads,
        "serving_workers": args.serving_workers,
        "intra_op_threads": args.intra_op_threads,
        "inter_op_threads": args.inter_op_threads,
        "device": args.device,
        "allowed_providers": args.allowed_providers,
        "require_provider": args.require_provider,
        "device_id": args.device_id,
        "batching": args.batching,
        "max_queue_delay_us": args.max_queue_delay_us,
        "batch_inflight": args.batch_inflight,
        "inline_max_us": args.inline_max_us,
        "ort_spinning": args.ort_spinning,
        "max_message_bytes": args.max_message_bytes,
        "max_request_bytes": args.max_request_bytes,
        "max_concurrent_requests": args.max_concurrent_requests,
        "max_queued_rows": args.max_queued_rows,
        "rate_limit_per_s": args.rate_limit_per_s,
        "rate_limit_burst": args.rate_limit_burst,
        "rate_limit_clients": args.rate_limit_clients,
        "drain_timeout_s": args.drain_timeout_s,
        "log_level": args.log_level,
        "log_json": args.log_json,
        **{k: getattr(args, k) for k in _SECURITY_KEYS},
    }
    cfg = load_config(args.config, overrides)
    setup_logging(cfg.log_level, cfg.log_json)
    tune_malloc()
    _run_profiled(serve(cfg))
    return 0


# Benchmark aid, off unless set: a path to write a cProfile of the event loop thread to when the
# agent stops (docs/benchmarks.md, "Where the CPU per request goes"). Outside the
# MODELFLEET_AGENT_ prefix on purpose: it is not a setting and never in a config file.
PROFILE_ENV = "MODELFLEET_PROFILE_LOOP"


def _run_profiled(main: Any) -> None:
    path = os.environ.get(PROFILE_ENV)
    if not path:
        asyncio.run(main)
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        asyncio.run(main)
    finally:
        profiler.disable()
        profiler.dump_stats(path)


def cmd_run(args: argparse.Namespace) -> int:
    from modelfleet.agent.app import serve
    from modelfleet.agent.config import load_config
    from modelfleet.kernel.logs import setup_logging

    overrides = {
        "listen": args.listen,
        "metrics_listen": args.metrics_listen,
        "http_listen": args.http_listen,
        "serving_workers": args.serving_workers,
        "log_level": args.log_level,
        "log_json": args.log_json,
        "tls_agent_identity": args.tls_agent_identity,
        "tls_client_ca_hub": args.tls_client_ca_hub,
        **{k: getattr(args, k) for k in _SECURITY_KEYS},
    }
    cfg = load_config(args.config, overrides)
    if not cfg.hub:
        raise InvalidRequestError(f"{args.config} names no hub: enroll first, or use `serve`")
    setup_logging(cfg.log_level, cfg.log_json)
    tune_malloc()
    asyncio.run(serve(cfg))
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from modelfleet.agent.fleet.enroll import TOKEN_ENV, enroll, read_token_file

    if args.token_file is not None:
        token = read_token_file(args.token_file)
    elif args.token is not None:
        print(
            "modelfleet-agent: warning: --token is visible to every local user in the process "
            "list until enrollment ends; use --token-file PATH or --token-file - (stdin)",
            file=sys.stderr,
        )
        token = args.token
    elif os.environ.get(TOKEN_ENV, "").strip():
        token = os.environ[TOKEN_ENV]
    else:
        raise InvalidRequestError(
            "no enrollment token: pass --token-file PATH (or --token-file - to read standard "
            f"input), or set {TOKEN_ENV}"
        )
    agent_id, config = enroll(
        token,
        args.data,
        listen=args.listen,
        metrics_listen=args.metrics_listen,
        hostname=args.hostname,
        force=args.force,
        transport=args.transport,
    )
    print(f"enrolled as {agent_id}; start with: modelfleet-agent run --config {config}")
    return 0


def _admin_stub(args: argparse.Namespace) -> Any:
    import grpc

    from modelfleet.agent.config import check_admin_socket_path
    from modelfleet.protos import agent_pb2_grpc

    if args.admin_socket:
        path = args.admin_socket
    elif args.data:
        path = str(args.data / "admin.sock")
    else:
        path = str(args.models / ".modelfleet-admin.sock")
    check_admin_socket_path(Path(path))
    if not Path(path).exists():
        raise _Unavailable(f"no agent admin socket at {path} (is the agent running?)")
    channel = grpc.insecure_channel(f"unix:{path}")
    return agent_pb2_grpc.AgentAdminStub(channel)


class _Unavailable(ModelfleetError):
    status = Status.UNAVAILABLE


def _call(fn: Any, request: Any) -> Any:
    import grpc

    from modelfleet.kernel.grpc_status import error_from_rpc

    try:
        return fn(request, timeout=10)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None


def cmd_status(args: argparse.Namespace) -> int:
    from modelfleet.protos import agent_pb2

    resp = _call(_admin_stub(args).Status, agent_pb2.StatusRequest())
    # Scripts and probes branch on readiness alone: the same verdict as ServerReady.
    code = 0 if resp.ready else EXIT_NOT_READY
    if args.json:
        print(json.dumps(message_dict(resp), indent=2))
        return code
    verdict = "READY" if resp.ready else "NOT READY"
    if not resp.ready:
        waiting = [m.name for m in resp.models if not m.active_version]
        verdict += (
            f" (no version serves yet for {', '.join(waiting)})"
            if waiting
            else " (no model to serve yet)"
        )
    print(f"agent on {resp.listen}: {verdict}")
    header = f"{'MODEL':<20} {'ACTIVE':>6} {'PREVIOUS':>8} {'LOADING':>7}  LAST GATE"
    print(header)
    for m in resp.models:
        gate = "-"
        if m.HasField("last_gate"):
            g = m.last_gate
            p99 = f"p99 {g.p99_ms:.2f} ms" if g.p99_ms >= 0 else ""
            if g.min_ms > 0:
                p99 += f", fastest {g.min_ms:.3f} ms"
            gate = (
                f"v{g.version} passed {p99}"
                if g.passed
                else f"v{g.version} REFUSED ({g.kind}): {g.reason}"
            )
        print(
            f"{m.name:<20} {m.active_version or '-':>6} {m.previous_version or '-':>8} "
            f"{m.loading_version or '-':>7}  {gate}"
        )
        for f in m.failed:
            if not (m.HasField("last_gate") and f.version == m.last_gate.version):
                print(f"{'':<20} refused v{f.version} ({f.kind}): {f.reason}")
        if m.active_provider:
            served = f"v{m.active_version} on {m.active_provider}"
            if m.active_path:
                served += f" ({m.active_path})"
            if m.previous_provider:
                served += f", v{m.previous_version} on {m.previous_provider}"
                if m.previous_path:
                    served += f" ({m.previous_path})"
            print(f"{'':<20} provider: {served}")
        if m.held_at_or_below:
            print(f"{'':<20} held after rollback: versions <= {m.held_at_or_below} not re-deployed")
        if m.HasField("comparison"):
            c = m.comparison
            label = f" [{c.label}]" if c.label else ""
            print(f"{'':<20} comparing{label}: {_comparison_words(m)}")
            if c.shadow_bp or c.shadow_compared or c.shadow_dropped:
                agree = (
                    f", top-1 agreement {c.top1_agree / c.top1_total:.4f}" if c.top1_total else ""
                )
                print(
                    f"{'':<20} shadow: {c.shadow_compared} compared, {c.shadow_dropped} dropped, "
                    f"{c.shadow_failures} failed{agree}, max abs diff {c.max_abs_diff:.3g}"
                )
    return code


def cmd_rollback(args: argparse.Namespace) -> int:
    from modelfleet.protos import agent_pb2

    resp = _call(_admin_stub(args).Rollback, agent_pb2.RollbackRequest(model=args.model))
    print(f"{args.model}: rolled back from version {resp.from_version} to {resp.to_version}")
    return 0


def _basis_points(pct: float, flag: str) -> int:
    if not 0 <= pct <= 100:
        raise InvalidRequestError(f"{flag} takes a percentage from 0 to 100, not {pct:g}")
    return round(pct * 100)


def cmd_compare(args: argparse.Namespace) -> int:
    from modelfleet.protos import agent_pb2

    req = agent_pb2.CompareRequest(model=args.model, off=args.off)
    if not args.off:
        if args.candidate is None:
            raise InvalidRequestError(
                "compare needs --candidate VERSION (a version in the repository), or --off"
            )
        if args.sticky and args.split is None:
            raise InvalidRequestError("--sticky applies to --split only")
        req.candidate_version = args.candidate
        req.sticky = args.sticky
        if args.split is not None:
            req.split_bp = _basis_points(args.split, "--split")
        else:
            req.shadow_bp = _basis_points(args.shadow, "--shadow")
    resp = _call(_admin_stub(args).Compare, req)
    m = resp.model
    if args.off:
        print(f"{args.model}: comparison off; v{m.active_version} answers every request")
        return 0
    print(f"{args.model}: {_comparison_words(m)}")
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from modelfleet.protos import agent_pb2

    req = agent_pb2.CaptureRequest(model=args.model, off=args.off)
    if not args.off:
        req.rate_bp = _basis_points(args.rate, "--rate")
        req.exclude.extend(args.exclude)
        req.hash.extend(args.hash)
    elif args.exclude or args.hash:
        raise InvalidRequestError("--exclude and --hash go with --rate, not --off")
    resp = _call(_admin_stub(args).Capture, req)
    if not resp.rate_bp:
        print(f"{args.model}: capture off; {resp.files} complete file(s) on disk")
        return 0
    extra = "".join(
        f"; {what} {', '.join(names)}"
        for what, names in (("excluded", resp.exclude), ("hashed", resp.hash))
        if names
    )
    print(
        f"{args.model}: capturing {resp.rate_bp / 100:g}% of requests{extra} "
        f"({resp.captured} captured, {resp.dropped} dropped, {resp.files} file(s))"
    )
    return 0


def _comparison_words(m: Any) -> str:
    c = m.comparison
    parts = []
    if c.split_bp:
        parts.append(
            f"{c.split_bp / 100:g}% of requests to v{c.candidate_version}"
            + (" (sticky by routing key)" if c.sticky else "")
        )
    if c.shadow_bp:
        parts.append(
            f"{c.shadow_bp / 100:g}% of v{m.active_version}'s copied to "
            f"v{c.candidate_version} (shadow)"
        )
    words = ", ".join(parts)
    if not c.comparing:
        words += f"; waiting for v{c.candidate_version} to load and pass its gate"
    return f"{words}; v{m.active_version} active"


def main(argv: list[str] | None = None) -> int:
    return run_command("modelfleet-agent", lambda: _dispatch(build_parser().parse_args(argv)))


def _dispatch(args: argparse.Namespace) -> int:
    handlers = {
        "serve": cmd_serve,
        "run": cmd_run,
        "enroll": cmd_enroll,
        "status": cmd_status,
        "rollback": cmd_rollback,
        "compare": cmd_compare,
        "capture": cmd_capture,
    }
    if args.command == "bundle":
        handler = {
            "create": cmd_bundle_create,
            "inspect": cmd_bundle_inspect,
            "example": cmd_bundle_example,
        }[args.bundle_command]
    else:
        handler = handlers[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
