"""The command lines as scripts and people use them: --version, help with defaults on every
argument, --json on every read command, bash completion, `bundle example`."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from modelfleet.agent.cli import build_parser as agent_parser
from modelfleet.batch.cli import build_parser as batch_parser
from modelfleet.hub.cli import build_parser as hub_parser
from modelfleet.kernel.commandline import (
    DefaultsHelpFormatter,
    bash_completion,
    finish,
    missing_help,
    path_like,
    walk,
)
from tests import models
from tests.procs import ROOT, AgentProcess, HubProcess, agent_status, enroll_agent, wait_for

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "modelfleet-agent": agent_parser,
    "modelfleet-hub": hub_parser,
    "modelfleet-batch": batch_parser,
}


# -- help and --version ------------------------------------------------------------------------


@pytest.mark.parametrize("prog", PARSERS)
def test_every_argument_and_subcommand_has_help(prog: str) -> None:
    assert missing_help(PARSERS[prog]()) == []


def test_missing_help_names_what_lacks_it() -> None:
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--quiet", action="store_true", help="say less")
    p.add_argument("--level")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("run", help="run it").add_argument("target")
    sub.add_parser("stop")
    assert missing_help(finish(p)) == [
        "tool --level",
        "tool stop (sub-command)",
        "tool run target",
    ]


def _required_groups(parser: argparse.ArgumentParser) -> set[argparse.Action]:
    return {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}


@pytest.mark.parametrize("prog", PARSERS)
def test_every_option_that_takes_a_value_shows_its_default(prog: str) -> None:
    """In --help: a default argparse knows is printed; one it does not (None: the config file,
    another flag or the code decides) is said in words, so no option leaves it to guess."""
    silent = []
    for path, parser in walk(PARSERS[prog]()):
        assert parser.formatter_class is DefaultsHelpFormatter, path
        formatter = DefaultsHelpFormatter(parser.prog)
        choose_one = _required_groups(parser)
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.required:
                continue  # positionals, on/off flags, required options: no default to show
            if action in choose_one:
                continue  # one of a required set (e.g. --cron | --every)
            text = formatter._get_help_string(action) or ""
            if "default" not in text.lower():
                silent.append(f"{' '.join((prog, *path))} {action.option_strings[0]}")
    assert silent == []


def test_defaults_appear_once_in_the_rendered_help() -> None:
    parsers = dict(walk(hub_parser()))
    flat = " ".join(parsers[("rollout", "start")].format_help().split())
    assert "(default: 10,50,100)" in flat  # from argparse's default
    assert "(default: 5m)" in flat  # said in the help's own words, not "300.0"
    assert "(default: canary)" in flat
    assert "(default: None)" not in flat and "(default: False)" not in flat
    assert "300.0" not in flat


@pytest.mark.parametrize("prog", PARSERS)
def test_version_is_the_installed_package_version(
    prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        PARSERS[prog]().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"{prog} {importlib.metadata.version('modelfleet')}\n"


def test_agent_reports_the_same_version() -> None:
    """What the agent tells the hub and ServerMetadata is what `--version` prints."""
    from modelfleet.agent import __version__

    assert __version__ == importlib.metadata.version("modelfleet")


def test_subcommand_version_flags_are_not_shadowed() -> None:
    """`--version` at the top prints the program's; after a sub-command it is that command's."""
    args = hub_parser().parse_args(["publish", "fraud", "m.onnx", "--version", "3"])
    assert args.version == 3
    create = "bundle create m.onnx --name n --version 2 --samples s.npz --out o"
    args = agent_parser().parse_args(create.split())
    assert args.version == 2


# -- bash completion ---------------------------------------------------------------------------


def complete(script: Path, function: str, *words: str) -> list[str]:
    """COMPREPLY for the command line ``words`` (the last one is being typed), in real bash."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    r = subprocess.run(
        [
            "bash",
            "-c",
            f'source "$0"; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; '
            f'{function}; printf "%s\\n" "${{COMPREPLY[@]}}"; complete -p {words[0]}',
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    *reply, registration = r.stdout.splitlines()
    assert registration == f"complete -o bashdefault -o default -F {function} {words[0]}"
    return sorted(w for w in reply if w)


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("completion")
    paths = {}
    for prog, build in PARSERS.items():
        paths[prog] = out / prog
        paths[prog].write_text(bash_completion(build()))
    return paths


def test_bash_completion_follows_the_parsers(scripts: dict[str, Path]) -> None:
    hub = scripts["modelfleet-hub"]
    fn = "_modelfleet_hub"
    commands = sorted({path[0] for path, _ in walk(hub_parser()) if path})
    assert complete(hub, fn, "modelfleet-hub", "") == commands
    assert complete(hub, fn, "modelfleet-hub", "mo") == ["models"]
    # A global option's value is skipped, not taken for a command.
    assert complete(hub, fn, "modelfleet-hub", "--data", "rollout", "ro") == ["rollout"]
    assert complete(hub, fn, "modelfleet-hub", "--v") == ["--version"]
    assert complete(hub, fn, "modelfleet-hub", "models", "") == ["ls", "show", "stage", "versions"]
    assert complete(hub, fn, "modelfleet-hub", "models", "ls", "--j") == ["--json"]
    assert complete(
        hub, fn, "modelfleet-hub", "rollout", "start", "fraud", "2", "--strategy", ""
    ) == ["blue-green", "canary"]
    # Positional choices, by position.
    assert complete(hub, fn, "modelfleet-hub", "models", "stage", "fraud", "2", "p") == [
        "production"
    ]
    assert complete(hub, fn, "modelfleet-hub", "keys", "rotate", "") == [
        "root",
        "snapshot",
        "targets",
        "timestamp",
    ]
    # Free text (a selector) gets nothing; a file argument gets bash's file names (empty here,
    # `-o default` fills them in).
    assert complete(hub, fn, "modelfleet-hub", "deploy", "fraud", "1", "--selector", "") == []
    assert complete(hub, fn, "modelfleet-hub", "publish", "fraud", "") == []

    agent = scripts["modelfleet-agent"]
    fn = "_modelfleet_agent"
    assert complete(agent, fn, "modelfleet-agent", "bundle", "") == [
        "create",
        "example",
        "inspect",
    ]
    assert complete(agent, fn, "modelfleet-agent", "serve", "--device", "c") == ["cpu", "cuda"]
    batch = scripts["modelfleet-batch"]
    assert complete(batch, "_modelfleet_batch", "modelfleet-batch", "score", "--on-error", "") == [
        "fail",
        "skip",
    ]


def test_completion_offers_file_names_only_for_files() -> None:
    def option(prog: str, path: tuple[str, ...], flag: str) -> argparse.Action:
        parser = dict(walk(PARSERS[prog]()))[path]
        return next(a for a in parser._actions if flag in a.option_strings)

    for prog, path, flag in (
        ("modelfleet-agent", ("serve",), "--tls-cert"),
        ("modelfleet-agent", ("serve",), "--tls-client-ca"),
        ("modelfleet-agent", ("status",), "--admin-socket"),
        ("modelfleet-hub", ("publish",), "--samples"),
        ("modelfleet-batch", ("score",), "--model"),  # a bundle directory
    ):
        assert path_like(option(prog, path, flag)), (prog, path, flag)
    for prog, path, flag in (
        ("modelfleet-hub", ("serve",), "--agent-cert-lifetime-s"),
        ("modelfleet-hub", ("jobs", "create"), "--model"),  # a model name
        ("modelfleet-hub", ("jobs", "create"), "--keys"),
        ("modelfleet-hub", ("deploy",), "--selector"),
    ):
        assert not path_like(option(prog, path, flag)), (prog, path, flag)


# -- bundle example ----------------------------------------------------------------------------


def _agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelfleet.agent.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bundle_example_writes_two_different_real_models(tmp_path: Path) -> None:
    out = tmp_path / "ex"
    r = _agent_cli("bundle", "example", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"wrote {out / 'model.onnx'}",
        f"wrote {out / 'model_v2.onnx'}",
        f"wrote {out / 'samples.npz'}",
    ]
    with np.load(out / "samples.npz") as npz:
        x = npz["x"]
    assert x.shape == (4, 4) and x.dtype == np.float32
    y1, y2 = (
        ort.InferenceSession(str(out / m), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        for m in ("model.onnx", "model_v2.onnx")
    )
    assert y1[0].shape == y2[0].shape == (4, 3)
    assert not np.allclose(y1[0], y2[0])
    # Both become bundles with the same samples (the README's steps 1 and 4).
    for model, version in (("model.onnx", "1"), ("model_v2.onnx", "2")):
        r = _agent_cli(
            "bundle",
            "create",
            str(out / model),
            "--name",
            "fraud",
            "--version",
            version,
            "--samples",
            str(out / "samples.npz"),
            "--latency-budget-ms",
            "20",
            "--out",
            str(tmp_path / "models"),
        )
        assert r.returncode == 0, r.stderr
    # Never overwrites without --force.
    before = (out / "model.onnx").read_bytes()
    r = _agent_cli("bundle", "example", str(out))
    assert r.returncode == 8
    assert "refusing to overwrite" in r.stderr and "--force" in r.stderr
    assert _agent_cli("bundle", "example", str(out), "--force").returncode == 0
    assert (out / "model.onnx").read_bytes() == before  # same seed, same bytes


# -- --json on the hub's read commands ---------------------------------------------------------

FAST = {"MODELFLEET_AGENT_REPORT_INTERVAL_S": "0.5", "MODELFLEET_AGENT_BACKOFF_MAX_S": "1"}


def test_read_commands_print_json(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", log_path=tmp_path / "hub.log").start()
    agent = None
    try:
        config = enroll_agent(hub, tmp_path / "agent", "site=berlin", hostname="edge-1")
        agent = AgentProcess(
            tmp_path / "agent", fleet_config=config, env=FAST, log_path=tmp_path / "agent.log"
        ).start()
        src = tmp_path / "onnx"
        hub.cli("publish", "mlp", str(models.mlp(src / "v1.onnx", seed=0)), "--notes", "first")
        hub.cli("publish", "mlp", str(models.mlp(src / "v2.onnx", seed=1)))
        hub.cli("models", "stage", "mlp", "1", "production")

        def read(*args: str) -> object:
            return json.loads(hub.cli(*args, "--json"))

        assert read("models", "ls") == [
            {"name": "mlp", "latest_version": 2, "version_count": 2, "production_version": 1}
        ]
        versions = read("models", "versions", "mlp")
        assert isinstance(versions, list)
        assert [(v["version"], v["stage"], v["signed"], v["notes"]) for v in versions] == [
            (1, "production", True, "first"),
            (2, "staged", True, ""),
        ]
        assert set(versions[0]) == {
            "name",
            "version",
            "stage",
            "signed",
            "sha256",
            "size",
            "created_at",
            "notes",
            "same_content_as",
            "target_path",
        }
        assert len(versions[0]["sha256"]) == 64 and versions[0]["size"] > 0
        assert read("models", "show", "mlp") == {
            "name": "mlp",
            "latest_version": 2,
            "production_version": 1,
            "versions": versions,
        }

        hub.cli("deploy", "mlp", "1")
        wait_for(
            lambda: agent_status(agent.admin_socket).get("mlp", {}).get("active_version") == "1",
            60,
            "v1 active",
        )
        hub.cli(
            "jobs",
            "create",
            "nightly",
            "--model",
            "mlp",
            "--deployed",
            "--every",
            "1h",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--selector",
            "site=berlin",
        )
        (job,) = read("jobs", "ls")  # type: ignore[misc]
        assert job["name"] == "nightly" and job["model"] == "mlp"
        assert job["version"] is None  # --deployed: whatever each agent runs
        assert job["selector"] == {"site": "berlin"} and job["agents"] == 1
        assert job["paused"] is False and job["schedule"] == "every 3600s"

        assert read("rollout", "history", "mlp") == []
        hub.cli("rollout", "start", "mlp", "2", "--waves", "100", "--bake", "1s")
        wait_for(
            lambda: json.loads(hub.cli("rollout", "status", "mlp", "--json"))["state"] == "done",
            90,
            "rollout done",
            interval=0.5,
        )
        (rollout,) = read("rollout", "history", "mlp")  # type: ignore[misc]
        assert rollout["model"] == "mlp" and rollout["version"] == 2
        assert rollout["state"] == "done" and rollout["agents"] == 1
        # The same data `rollout status --json` prints, for the same rollout.
        assert rollout.keys() == json.loads(hub.cli("rollout", "status", "mlp", "--json")).keys()
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()


def test_message_json_keeps_every_field_and_numbers_as_numbers() -> None:
    """--json on agents ls / jobs runs / metrics / agent status (issue 14 leftover): the
    standard protobuf mapping printed versions as "2" and dropped zero values."""
    from modelfleet.kernel.commandline import message_dict
    from modelfleet.protos import agent_pb2
    from modelfleet.protos import fleet_pb2 as pb

    info = pb.AgentInfo(agent_id="a", labels={"site": "x"}, last_seen=2.5)
    info.report.models.add(name="m", active_version=2**40, previous_version=0)
    out = message_dict(info)
    assert out["labels"] == {"site": "x"} and out["last_seen"] == 2.5
    [model] = out["report"]["models"]
    assert model["active_version"] == 2**40 and model["previous_version"] == 0
    assert model["gate_passed"] is False and model["error"] == ""
    assert message_dict(pb.AgentInfo())["report"] is None
    status = message_dict(agent_pb2.StatusResponse())
    assert status == {"models": [], "ready": False, "listen": ""}
    json.dumps(out)  # plain data all the way down
