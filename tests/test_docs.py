"""The reference docs stay complete: every command and flag in docs/cli.md (batch: docs/batch.md),
every setting in docs/configuration.md. A new flag or setting without its line fails here."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfleet.agent.cli import build_parser as agent_parser
from modelfleet.agent.config import ServeConfig
from modelfleet.batch.cli import build_parser as batch_parser
from modelfleet.hub.cli import build_parser as hub_parser
from modelfleet.hub.config import HubConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple]:
    """(command path, option strings) for every parser and sub-parser."""
    options: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            options += [o for o in action.option_strings if o.startswith("--")]
    yield path, options


def _cases() -> Iterator[tuple[str, tuple[str, ...], str, str]]:
    for program, build, doc in (
        ("modelfleet-agent", agent_parser, "cli.md"),
        ("modelfleet-hub", hub_parser, "cli.md"),
        ("modelfleet-batch", batch_parser, "batch.md"),
    ):
        for path, options in _walk(build()):
            for option in options:
                yield program, path, option, doc


CASES = list(_cases())


@pytest.mark.parametrize(
    ("program", "path", "option", "doc"),
    CASES,
    ids=[f"{p} {' '.join(c)} {o}" for p, c, o, _ in CASES],
)
def test_every_flag_is_documented(program: str, path: tuple, option: str, doc: str) -> None:
    text = (DOCS / doc).read_text()
    assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (
        f"`{program} {' '.join(path)} {option}` is not documented in docs/{doc}"
    )


def _documented(path: tuple[str, ...], lines: list[str]) -> bool:
    """Some line names the command: its words in order, alternatives written `a|b|c`."""
    words = r"[ |]+(?:[\w-]+\|)*".join(re.escape(w) for w in path)
    return any(re.search(rf"(?<![\w-]){words}(?![\w-])", line) for line in lines)


def test_every_command_is_documented() -> None:
    lines = ((DOCS / "cli.md").read_text() + (DOCS / "batch.md").read_text()).splitlines()
    missing = [
        " ".join(path)
        for build in (agent_parser, hub_parser, batch_parser)
        for path, _ in _walk(build())
        if path and not _documented(path, lines)
    ]
    assert not missing, f"commands missing from docs/cli.md or docs/batch.md: {missing}"


@pytest.mark.parametrize("cls", [ServeConfig, HubConfig])
def test_every_setting_is_documented(cls: type) -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = [
        f.name for f in dataclasses.fields(cls) if f.name != "origin" and f"`{f.name}`" not in text
    ]
    assert not missing, f"{cls.__name__} settings missing from docs/configuration.md: {missing}"
