"""The small contracts that hub, agent and batch share, each kept once in kernel/ (issue 13).

Fast unit tests: no processes, only an in-process gRPC server on loopback for the status mapping
(a real RpcError, not a stand-in). The last test keeps each contract in one place: a second copy
of its literals outside kernel/ fails it.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from modelfleet.agent.fleet.transport import channel_options, rpc_error
from modelfleet.hub.signing import _validate_target as make_target_file
from modelfleet.kernel.atomic import atomic_write_json
from modelfleet.kernel.bundle import TARGET_FILE_NAME, bundle_target_path
from modelfleet.kernel.errors import (
    EXIT_CODES,
    InvalidRequestError,
    ModelfleetError,
    ModelNotFoundError,
    RemoteError,
    Status,
    remote_error,
)
from modelfleet.kernel.grpc_options import (
    FLEET_MESSAGE_BYTES,
    KEEPALIVE_TIME_MS,
    keepalive_options,
    message_size_options,
    server_options,
)
from modelfleet.kernel.grpc_status import GRPC_CODES, error_from_rpc

ROOT = Path(__file__).resolve().parent.parent
SHA = "ab" * 32

# -- the TUF target path ------------------------------------------------------------------------


def test_bundle_target_path_is_name_version_bundle_tar() -> None:
    assert bundle_target_path("mlp", 3) == "mlp/3/bundle.tar"
    assert bundle_target_path("resnet-50.v2", 9223372036854775807).endswith(
        f"/9223372036854775807/{TARGET_FILE_NAME}"
    )


def test_the_hub_checks_signed_fields_against_the_same_path() -> None:
    """The hub refuses custom fields that disagree with the path the agent will look up."""
    path = bundle_target_path("mlp", 2)
    assert make_target_file(path, 10, SHA, {"name": "mlp", "version": 2}).path == path
    with pytest.raises(InvalidRequestError, match="custom version 3 does not match"):
        make_target_file(path, 10, SHA, {"name": "mlp", "version": 3})
    with pytest.raises(InvalidRequestError, match="custom name 'other' does not match"):
        make_target_file(path, 10, SHA, {"name": "other", "version": 2})


# -- atomic JSON writes ---------------------------------------------------------------------------


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    atomic_write_json(path, {"models": [{"name": "mlp", "version": 2}]})
    assert path.read_text() == '{"models": [{"name": "mlp", "version": 2}]}\n'
    atomic_write_json(path, {"a": 1}, indent=2)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_json_sets_the_exact_mode_or_leaves_it_to_the_umask(
    tmp_path: Path, umask: None
) -> None:
    atomic_write_json(tmp_path / "private.json", {}, mode=0o600)
    atomic_write_json(tmp_path / "public.json", {})
    assert (_mode(tmp_path / "private.json"), _mode(tmp_path / "public.json")) == (0o600, 0o644)
    os.umask(0o077)
    atomic_write_json(tmp_path / "public.json", {}, mode=0o644)
    atomic_write_json(tmp_path / "umask.json", {}, mode=None)
    assert (_mode(tmp_path / "public.json"), _mode(tmp_path / "umask.json")) == (0o644, 0o600)


def test_atomic_write_json_starts_a_json_lines_file(tmp_path: Path) -> None:
    """The batch checkpoint appends a line per unit after the header written here."""
    path = tmp_path / "_checkpoint.jsonl"
    atomic_write_json(path, {"format": 1}, mode=None)
    with open(path, "a") as fh:
        fh.write(json.dumps({"unit": 0}) + "\n")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"format": 1},
        {"unit": 0},
    ]


def test_a_failed_atomic_write_json_leaves_what_was_there_and_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(OSError):
        atomic_write_json(tmp_path / "taken", {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "taken", {"a": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


# -- gRPC options ---------------------------------------------------------------------------------


def test_message_size_options_limit_both_directions() -> None:
    assert dict(message_size_options(1 << 20)) == {
        "grpc.max_receive_message_length": 1 << 20,
        "grpc.max_send_message_length": 1 << 20,
    }


def test_server_options_keepalive_only_when_asked() -> None:
    plain = dict(server_options(4096))
    assert plain == {
        "grpc.max_receive_message_length": 4096,
        "grpc.max_send_message_length": 4096,
        "grpc.so_reuseport": 0,
    }
    hub = dict(server_options(4096, keepalive=True))
    assert hub.items() >= plain.items() and hub.items() >= dict(keepalive_options()).items()


def test_the_hub_accepts_the_agents_keepalive_pings() -> None:
    """A client pinging more often than the server allows gets GOAWAY (too_many_pings)."""
    agent = dict(channel_options())
    hub = dict(server_options(FLEET_MESSAGE_BYTES, keepalive=True))
    assert agent["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS
    assert hub["grpc.http2.min_ping_interval_without_data_ms"] <= agent["grpc.keepalive_time_ms"]
    assert agent["grpc.max_receive_message_length"] == FLEET_MESSAGE_BYTES


def test_grpc_takes_the_options() -> None:
    server = grpc.server(ThreadPoolExecutor(1), options=server_options(4096, keepalive=True))
    server.stop(None)
    grpc.insecure_channel("127.0.0.1:1", options=channel_options()).close()


# -- gRPC status codes back to the error family --------------------------------------------------

_METHOD = "/modelfleet.test.Contracts/Fail"


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Answers with the status code named in the request, or sleeps past the deadline."""
    name, _, details = request.decode().partition(":")
    if name == "SLOW":
        time.sleep(1.0)
        return b""
    context.abort(grpc.StatusCode[name], details)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def call() -> Iterator:
    server = grpc.server(ThreadPoolExecutor(2))
    handler = grpc.unary_unary_rpc_method_handler(_fail)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("modelfleet.test.Contracts", {"Fail": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = channel.unary_unary(_METHOD)

    def failed(request: str, timeout: float = 5) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            stub(request.encode(), timeout=timeout)
        return info.value

    yield failed
    channel.close()
    server.stop(None)


@pytest.mark.parametrize("status", list(Status))
def test_every_status_survives_the_round_trip(call, status: Status) -> None:
    """What a servicer sends (GRPC_CODES) a client maps back to the same status and exit code."""
    err = error_from_rpc(call(f"{GRPC_CODES[status].name}:refused here"), "hub")
    assert isinstance(err, ModelfleetError)
    assert (err.status, str(err), EXIT_CODES[err.status]) == (
        status,
        "hub: refused here",
        EXIT_CODES[status],
    )
    assert isinstance(err, ModelNotFoundError if status is Status.NOT_FOUND else RemoteError)


def test_codes_grpc_sends_itself(call) -> None:
    assert error_from_rpc(call("SLOW", timeout=0.05)).status is Status.UNAVAILABLE
    assert error_from_rpc(call("UNAUTHENTICATED:who")).status is Status.PERMISSION_DENIED
    unknown = error_from_rpc(call("DATA_LOSS:"))
    # No details: the code names what happened.
    assert (unknown.status, str(unknown)) == (Status.INTERNAL, "StatusCode.DATA_LOSS")


def test_the_agent_retries_transport_trouble_and_keeps_refusals(call) -> None:
    assert isinstance(rpc_error(call("UNAVAILABLE:down"), "hub"), ConnectionError)
    assert isinstance(rpc_error(call("SLOW", timeout=0.05), "hub"), ConnectionError)
    refused = rpc_error(call("FAILED_PRECONDITION:not yet"), "hub")
    assert isinstance(refused, RemoteError) and refused.status is Status.FAILED_PRECONDITION


def test_remote_error_is_transport_neutral() -> None:
    """The MQTT transport carries the status as text and uses the same rule."""
    assert isinstance(remote_error("no such target", Status.NOT_FOUND), ModelNotFoundError)
    err = remote_error("denied", Status.PERMISSION_DENIED)
    assert isinstance(err, RemoteError) and err.status is Status.PERMISSION_DENIED


# -- one place for each ---------------------------------------------------------------------------

# Literals that spell a shared contract; outside kernel/ they mean a copy was made again. Any
# string ending in the target's leaf name counts too (f"{name}/{version}/bundle.tar").
CONTRACT_LITERALS = {
    "grpc.max_receive_message_length",
    "grpc.max_send_message_length",
    "grpc.keepalive_time_ms",
    "grpc.http2.min_ping_interval_without_data_ms",
}


def contract_copies(root: Path) -> list[str]:
    found = []
    for package in ("agent", "hub", "batch"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                    continue
                if node.value in CONTRACT_LITERALS or node.value.endswith(TARGET_FILE_NAME):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    return found


def test_each_contract_lives_only_in_the_kernel() -> None:
    assert contract_copies(ROOT) == []


def test_a_copy_outside_the_kernel_is_found(tmp_path: Path) -> None:
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "x.py").write_text('def p(n, v):\n    return f"{n}/{v}/bundle.tar"\n')
    assert contract_copies(tmp_path) == ["hub/x.py:2: '/bundle.tar'"]
