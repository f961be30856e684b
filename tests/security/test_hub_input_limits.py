"""Nonsense on the hub's admin path (publish, deploy) and in its settings: each is refused with a
message naming the allowed range, by the CLI and by the hub itself (a raw client skips the CLI).

A real hub process, the real ``modelfleet-hub`` CLI and, for what the CLI cannot send, the admin
gRPC stub with the admin identity.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf.internal.encoder import _VarintBytes

from modelfleet.hub.registry import MAX_NOTES_BYTES
from modelfleet.protos import fleet_pb2 as pb
from modelfleet.protos import fleet_pb2_grpc as pb_grpc
from tests import models
from tests.procs import ROOT, HubProcess, free_port, wait_for

RANGE = f"1..{2**63 - 1}"
CLI_USAGE = 2  # argparse's exit status for an invalid argument


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub-limits")
    h = HubProcess(root / "hub", log_path=root / "hub.log")
    h.start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.mlp(tmp_path_factory.mktemp("onnx") / "m.onnx")


@pytest.fixture
def channel(hub: HubProcess):
    admin = hub.data / "admin"
    creds = grpc.ssl_channel_credentials(
        root_certificates=(admin / "ca.crt").read_bytes(),
        private_key=(admin / "admin.key").read_bytes(),
        certificate_chain=(admin / "admin.crt").read_bytes(),
    )
    with grpc.secure_channel(hub.url, creds) as ch:
        yield ch


@pytest.fixture
def admin(channel):
    return pb_grpc.HubAdminStub(channel)


def versions(hub: HubProcess, name: str) -> list[int]:
    r = hub.cli("models", "versions", name, check=False)
    if r.returncode == 4:  # not found: nothing published
        return []
    assert r.returncode == 0, r.stderr
    return [int(line.split()[0]) for line in r.stdout.splitlines()[1:] if line.strip()]


def publish_raw(channel, header: pb.PublishHeader | bytes, data: bytes = b"x") -> grpc.RpcError:
    """A Publish stream as any client could send it; ``header`` may be hand-encoded bytes."""
    if isinstance(header, bytes):
        # PublishChunk field 1 (header), length-delimited.
        first = b"\x0a" + _VarintBytes(len(header)) + header
    else:
        first = pb.PublishChunk(header=header).SerializeToString()
    chunks = [first, pb.PublishChunk(data=data).SerializeToString()]
    call = channel.stream_unary(
        "/modelfleet.fleet.v1.HubAdmin/Publish",
        request_serializer=lambda b: b,
        response_deserializer=pb.PublishResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        call(iter(chunks), timeout=30)
    return info.value


# -- publish --version ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["0", "-3", str(2**63), "seven"])
def test_publish_version_out_of_range_refused(hub, onnx_model, bad) -> None:
    r = hub.cli("publish", "vrange", str(onnx_model), "--version", bad, check=False)
    assert r.returncode == CLI_USAGE, r.stdout + r.stderr
    assert "--version" in r.stderr and RANGE in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "Exception iterating" not in r.stderr
    assert versions(hub, "vrange") == []


def test_publish_version_omitted_is_latest_plus_one(hub, onnx_model) -> None:
    assert "published vnext v1" in hub.cli("publish", "vnext", str(onnx_model))
    assert "published vnext v5" in hub.cli("publish", "vnext", str(onnx_model), "--version", "5")
    assert "published vnext v6" in hub.cli("publish", "vnext", str(onnx_model))
    assert versions(hub, "vnext") == [1, 5, 6]


@pytest.mark.parametrize("bad", [0, -3, -(2**63)])
def test_publish_version_out_of_range_refused_by_the_hub(channel, hub, bad) -> None:
    err = publish_raw(channel, pb.PublishHeader(name="vserver", version=bad, size=1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert f"version {bad}" in err.details() and RANGE in err.details(), err.details()
    assert versions(hub, "vserver") == []


def test_publish_version_above_2_63_refused_by_the_hub(channel, hub) -> None:
    """2^63 + 5 as a varint: what a client that encodes uint64 sends. The hub reads it as a
    negative int64 and must refuse it, not store it or fail with an internal error."""
    header = b"\x0a\x07vserver" + b"\x10" + _VarintBytes(2**63 + 5) + b"\x20\x01"
    err = publish_raw(channel, header)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert RANGE in err.details(), err.details()
    assert versions(hub, "vserver") == []


# -- publish --notes ----------------------------------------------------------------------------


def test_publish_notes_over_limit_refused(hub, onnx_model) -> None:
    assert MAX_NOTES_BYTES == 4096
    # 2-byte characters: the limit is in UTF-8 bytes, not characters.
    notes = "\u00e9" * (MAX_NOTES_BYTES // 2 + 1)
    r = hub.cli("publish", "notes", str(onnx_model), "--notes", notes, check=False)
    assert r.returncode == CLI_USAGE, r.stdout + r.stderr
    assert "--notes" in r.stderr and f"at most {MAX_NOTES_BYTES} bytes" in r.stderr, r.stderr
    assert f"{MAX_NOTES_BYTES + 2} bytes" in r.stderr, r.stderr
    assert versions(hub, "notes") == []
    at_limit = "n" * MAX_NOTES_BYTES
    assert "published notes v1" in hub.cli("publish", "notes", str(onnx_model), "--notes", at_limit)


def test_publish_notes_over_limit_refused_by_the_hub(channel, hub) -> None:
    """30 MB of notes used to be stored, and then broke every `models show`."""
    notes = "n" * (30 * 1024 * 1024)
    err = publish_raw(channel, pb.PublishHeader(name="bignotes", version=1, notes=notes, size=1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert f"at most {MAX_NOTES_BYTES} bytes" in err.details(), err.details()
    assert versions(hub, "bignotes") == []


# -- model names and selectors ------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "../etc", "a" * 129, "sp ace", "-lead"])
def test_publish_model_name_refused_with_the_rule(channel, bad) -> None:
    err = publish_raw(channel, pb.PublishHeader(name=bad, version=1, size=1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "1-128 characters" in err.details(), err.details()


@pytest.mark.parametrize(
    ("selector", "words"),
    [
        ({"": "x"}, "selector key '' "),
        ({"k=v": "x"}, "selector key 'k=v' "),
        ({"k": "a,b"}, "selector value 'a,b' "),
        ({"k" * 200: "x"}, "1 to 63"),
        ({"k": "v" * 300}, "at most 253"),
    ],
)
def test_deploy_selector_nonsense_refused(admin, hub, onnx_model, selector, words) -> None:
    if not versions(hub, "sel"):
        hub.cli("publish", "sel", str(onnx_model))
    with pytest.raises(grpc.RpcError) as info:
        admin.Deploy(pb.DeployRequest(name="sel", version=1, selector=selector), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert words in info.value.details(), info.value.details()


@pytest.mark.parametrize("bad", ["0", "-1", str(2**63)])
def test_deploy_version_out_of_range_refused(hub, bad) -> None:
    r = hub.cli("deploy", "sel", bad, check=False)
    assert r.returncode == CLI_USAGE, r.stdout + r.stderr
    assert RANGE in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- refresh interval against the metadata lifetimes ----------------------------------------------


def serve(data: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelfleet.hub.cli",
            "--data",
            str(data),
            "serve",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--enroll-listen",
            f"127.0.0.1:{free_port()}",
            *flags,
        ],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def refused_at_start(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        raise AssertionError(
            f"the hub started with a refresh interval it cannot keep:\n{out}"
        ) from None
    assert proc.returncode == 3, out
    return out


def test_refresh_interval_longer_than_timestamp_lifetime_refused(tmp_path: Path) -> None:
    """An interval of 2 h with a 1 h timestamp: the timestamp would expire between re-signings
    and every agent would freeze on it after the next publish."""
    out = refused_at_start(
        serve(tmp_path / "hub", "--refresh-interval-s", "7200", "--timestamp-expiry-s", "3600")
    )
    assert "refresh_interval_s (7200 s)" in out and "timestamp_expiry_s (3600 s)" in out, out
    assert "0 < refresh_interval_s <= 900" in out, out


def test_refresh_interval_above_a_quarter_of_snapshot_lifetime_refused(tmp_path: Path) -> None:
    env = {"MODELFLEET_HUB_SNAPSHOT_EXPIRY_S": "200", "MODELFLEET_HUB_REFRESH_INTERVAL_S": "60"}
    out = refused_at_start(serve(tmp_path / "hub", env=env))
    assert "snapshot_expiry_s (200 s)" in out and "0 < refresh_interval_s <= 50" in out, out


def test_refresh_interval_at_a_quarter_accepted_and_reload_refuses_more(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text("[hub]\ntimestamp_expiry_s = 240\nrefresh_interval_s = 60\n")
    hub = HubProcess(tmp_path / "hub", "--config", str(config), log_path=tmp_path / "hub.log")
    hub.start()
    try:
        # A SIGHUP with a longer interval keeps the running one and says why.
        config.write_text("[hub]\ntimestamp_expiry_s = 240\nrefresh_interval_s = 61\n")
        assert hub.proc is not None
        hub.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "refresh_interval_s (61 s)" in hub.logs(), 15, "reload refused")
        assert hub.proc.poll() is None
    finally:
        hub.stop()
