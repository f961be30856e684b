"""One compute-bound bundle served on CUDA and on CPU through a real agent: p50 and throughput.

    python -m tests.benchmarks.gpu_bench [--install-gpu SPEC] [--quick]

The model is a 512 -> 2048 -> 2048 -> 16 MLP (about 5.3 M multiply-adds per row), a bundle that
prefers ``CUDAExecutionProvider,CPUExecutionProvider``. The same bundle is served by
``modelfleet-agent serve --device cpu`` and, when the node has a GPU, ``--device cuda`` (strict:
a CUDA run that would fall back to CPU fails the gate instead of measuring the CPU twice). Each
agent is measured at concurrency 1 (p50, tritonclient.grpc, one row per request) and at
concurrency 16 (closed loop, requests/s, dynamic batching on). On a GPU node it then checks the
real fallback path: the same bundle pinned to a device id that does not exist must serve on CPU,
with the fallback counted.

Nothing is installed unless asked: ``--install-gpu onnxruntime-gpu==1.22.0`` (or a wheel file)
puts that package into a private prefix (``pip install --target``, no dependencies: they are
onnxruntime's own, already here) which only the agents of this run import, ahead of the CPU
build. Without a GPU (no CUDA provider in the agents' onnxruntime, or no ``nvidia-smi -L``) it
says so, runs the CPU part and exits 0. About 1 minute without a GPU, 2-3 with one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelfleet.kernel.bundle import create_bundle, providers_from_args
from tests import models
from tests.benchmarks.load import (
    Target,
    Throughput,
    interleaved_sequential,
    percentile_ms,
    run_concurrent,
)
from tests.procs import AgentProcess, agent_status

NAME = "gpu_mlp"
IN, HIDDEN, OUT = 512, 2048, 16
CUDA = "CUDAExecutionProvider"


def agent_providers(env: dict[str, str]) -> list[str]:
    """What the agents' onnxruntime offers: asked in a child with the agents' environment."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import onnxruntime as o; print(','.join(o.get_available_providers()))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        raise SystemExit(f"cannot import onnxruntime for the agents: {out.stderr.strip()}")
    return out.stdout.strip().split(",")


def gpu_absent_reason(providers: list[str]) -> str:
    if CUDA not in providers:
        return (
            f"the agents' onnxruntime has no {CUDA} (it offers {', '.join(providers)}); "
            "pass --install-gpu onnxruntime-gpu==VERSION, or run where onnxruntime-gpu is installed"
        )
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no nvidia-smi on PATH: no NVIDIA driver on this machine"
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return f"nvidia-smi -L lists no GPU ({(listed.stderr or listed.stdout).strip()[:200]})"
    return ""


def install_gpu(spec: str, prefix: Path) -> None:
    print(f"installing {spec} into {prefix} (only this run's agents import it)", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(prefix), spec],
        check=True,
        timeout=600,
    )


@dataclass
class Result:
    label: str
    provider: str
    p50_ms: float
    p99_ms: float
    rps: float
    failed: int
    cpu_us: float | None


def measure(
    label: str,
    repo: Path,
    work: Path,
    env: dict[str, str],
    x: np.ndarray,
    c1_requests: int,
    c16_s: float,
    *flags: str,
) -> Result:
    with AgentProcess(repo, *flags, log_path=work / f"agent-{label}.log", env=env) as agent:
        agent.wait_model(NAME, timeout=300)
        provider = agent_status(agent.admin_socket)[NAME]["active_provider"]
        target = Target(label, agent.url, NAME)
        lat = interleaved_sequential([target], x, requests=c1_requests, warmup=50)[label]
        assert agent.proc is not None
        block = run_concurrent(
            target, x, threads=16, warmup_s=1.0, duration_s=c16_s, server_pid=agent.proc.pid
        )
        tp = Throughput.of([block])
    return Result(
        label,
        provider,
        percentile_ms(lat, 50),
        percentile_ms(lat, 99),
        tp.rps,
        tp.failed,
        tp.cpu_us_per_req,
    )


def fallback_check(repo: Path, work: Path, env: dict[str, str]) -> str:
    """CUDA asked for, but on a device id the node lacks: onnxruntime refuses, CPU serves."""
    with AgentProcess(
        repo, "--device-id", "97", log_path=work / "agent-fallback.log", env=env
    ) as agent:
        agent.wait_model(NAME, timeout=300)
        provider = agent_status(agent.admin_socket)[NAME]["active_provider"]
        counted = any(
            line.startswith("modelfleet_provider_fallbacks_total{") and line.endswith(" 1.0")
            for line in agent.metrics().splitlines()
        )
        why = [ln for ln in agent.logs().splitlines() if "cannot load, serving on" in ln]
    ok = provider == "CPUExecutionProvider" and counted and len(why) == 1
    return f"{'ok' if ok else 'FAILED'}: served on {provider}, counted {counted}, log {why[:1]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--install-gpu", metavar="SPEC", help="pip spec or wheel of onnxruntime-gpu")
    p.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = p.parse_args(argv)
    c1_requests, c16_s = (100, 3.0) if args.quick else (400, 8.0)
    work = Path(tempfile.mkdtemp(prefix="modelfleet-gpu-bench-"))
    try:
        env = dict(os.environ)
        if args.install_gpu:
            prefix = work / "onnxruntime-gpu"
            install_gpu(args.install_gpu, prefix)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(prefix), *filter(None, [env.get("PYTHONPATH")])]
            )
        providers = agent_providers(env)
        absent = gpu_absent_reason(providers)
        onnx_path = models.mlp(
            work / "mlp.onnx", inputs=IN, hidden=HIDDEN, outputs=OUT, layers=2, seed=3
        )
        rng = np.random.default_rng(0)
        samples = {"x": rng.standard_normal((4, IN)).astype(np.float32)}
        repo = work / "models"
        # GPU kernels (TF32, another summation order) differ from the CPU's expected outputs
        # by more than the default 1e-4; the budget leaves room for a cold GPU's first runs.
        create_bundle(
            onnx_path,
            name=NAME,
            version=1,
            samples=samples,
            out_dir=repo,
            rtol=1e-2,
            atol=1e-3,
            latency_budget_ms=5000,
            providers=providers_from_args("cuda,cpu", []),
        )
        x = rng.standard_normal((1, IN)).astype(np.float32)
        print(
            f"model {IN}->{HIDDEN}->{HIDDEN}->{OUT} MLP, 1 row per request; agents' "
            f"onnxruntime offers {', '.join(providers)}",
            flush=True,
        )
        started = time.monotonic()
        rows = [measure("cpu", repo, work, env, x, c1_requests, c16_s, "--device", "cpu")]
        if not absent:
            rows.append(measure("cuda", repo, work, env, x, c1_requests, c16_s, "--device", "cuda"))
        print(
            f"\n{'run':<6} {'provider':<24} {'c1 p50 ms':>10} {'c1 p99 ms':>10} "
            f"{'c16 req/s':>10} {'failed':>7} {'agent CPU us/req':>17}"
        )
        for r in rows:
            cpu = f"{r.cpu_us:.0f}" if r.cpu_us is not None else "-"
            print(
                f"{r.label:<6} {r.provider:<24} {r.p50_ms:>10.3f} {r.p99_ms:>10.3f} "
                f"{r.rps:>10.0f} {r.failed:>7} {cpu:>17}"
            )
        if len(rows) == 2:
            cpu_row, gpu_row = rows
            print(
                f"cuda/cpu: c1 p50 x{gpu_row.p50_ms / cpu_row.p50_ms:.2f}, "
                f"c16 throughput x{gpu_row.rps / cpu_row.rps:.2f}"
            )
            check = fallback_check(repo, work, env)
            print(f"fallback check (CUDA on a missing device id): {check}")
            if gpu_row.provider != CUDA or not check.startswith("ok"):
                print(f"CUDA run served on {gpu_row.provider}; fallback {check}", file=sys.stderr)
                return 1
        else:
            print(f"\nno GPU: CUDA part skipped ({absent})")
        print(f"done in {time.monotonic() - started:.0f}s")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
