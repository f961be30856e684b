"""The reference docs stay complete and true to the code.

- every command and flag in docs/cli.md (batch: docs/batch.md), each flag in its own command's
  section, and the flag tables of `serve` and `run` list exactly the flags those commands have;
- every setting in docs/configuration.md, as a row of a settings table whose default is the
  code's default;
- the "complete" agent.toml example in docs/configuration.md and the packaged
  packaging/etc/*.toml name every setting, with its default, and load.

A new flag or setting without its line, or a changed default, fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelfleet.agent.cli import build_parser as agent_parser
from modelfleet.agent.config import ServeConfig, load_config
from modelfleet.batch.cli import build_parser as batch_parser
from modelfleet.hub.cli import build_parser as hub_parser
from modelfleet.hub.config import HubConfig, load_hub_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PROGRAMS = {"modelfleet-agent": agent_parser, "modelfleet-hub": hub_parser}


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


def _flags(program: str, path: tuple[str, ...]) -> set[str]:
    build = {**PROGRAMS, "modelfleet-batch": batch_parser}[program]
    return next(set(options) for p, options in _walk(build()) if p == path)


def _choices(program: str, path: tuple[str, ...]) -> dict[str, set[str]]:
    """The flags of one command that take a fixed set of values, with those values."""
    parser = PROGRAMS[program]()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {
        o: {str(c) for c in a.choices}
        for a in parser._actions
        if a.choices and not isinstance(a, argparse._SubParsersAction)
        for o in a.option_strings
        if o.startswith("--")
    }


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


def _mentions(option: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


# -- docs/cli.md, split into the sections of each program ------------------------------------


@functools.cache
def _sections() -> dict[str, dict[str, str]]:
    """{program: {heading: text}} of docs/cli.md. A heading is the backticked command of a `##`
    or `###` title (`bundle create`, `keys rotate`); the program's own title is the heading ""
    (modelfleet-agent: the page's introduction). A section ends at the next title; the
    sections after "## modelfleet-hub" belong to the hub."""
    out: dict[str, dict[str, str]] = {"modelfleet-agent": {}, "modelfleet-hub": {}}
    program, heading, lines = "modelfleet-agent", "", []

    def close() -> None:
        out[program][heading] = "\n".join(lines)

    for line in (DOCS / "cli.md").read_text().splitlines():
        title = re.match(r"(#{2,3}) (.*)", line)
        if not title:
            lines.append(line)
            continue
        close()
        lines = [line]
        if title.group(2).strip() == "modelfleet-hub":
            program, heading = "modelfleet-hub", ""
        else:
            named = re.search(r"`([^`]+)`", title.group(2))
            heading = named.group(1) if named else title.group(2).strip()
    close()
    return out


def _section_of(program: str, path: tuple[str, ...]) -> tuple[str, str]:
    """(heading, text) of the section documenting a command: the longest prefix of its path
    that has a title of its own (`models` documents `models stage`); the top level of a
    program is its introduction, with the page's introduction."""
    sections = _sections()
    for k in range(len(path), 0, -1):
        heading = " ".join(path[:k])
        if heading in sections[program]:
            return heading, sections[program][heading]
    intro = sections[program][""]
    if program != "modelfleet-agent":
        intro += "\n" + sections["modelfleet-agent"][""]
    return "", intro


@pytest.mark.parametrize(
    ("program", "path", "option", "doc"),
    CASES,
    ids=[f"{p} {' '.join(c)} {o}" for p, c, o, _ in CASES],
)
def test_every_flag_is_documented_in_its_commands_section(
    program: str, path: tuple, option: str, doc: str
) -> None:
    if doc == "batch.md":
        text, where = (DOCS / doc).read_text(), "docs/batch.md"
    else:
        heading, text = _section_of(program, path)
        if path and not heading:
            pytest.fail(
                f"docs/cli.md has no section for `{program} {' '.join(path)}`: add a "
                f"'### `{' '.join(path)}`' (or '### `{path[0]}`') title that documents it"
            )
        where = f"docs/cli.md, section `{heading}`" if heading else "docs/cli.md's introduction"
    assert _mentions(option, text), f"`{program} {' '.join(path)} {option}` is not in {where}"


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


# -- the flag tables of serve and run --------------------------------------------------------


def _flag_table(text: str) -> list[tuple[list[str], list[str], str]]:
    """Rows of the first table in text whose first column is "Flag": (flags, setting keys,
    the first column as written)."""
    rows: list[tuple[list[str], list[str], str]] = []
    in_table = False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            if in_table:
                break
            continue
        if cells[0] == "Flag":
            in_table = True
            continue
        if in_table and not set(cells[0]) <= set("-: "):
            flags = re.findall(r"`(--[a-z][\w-]*)", cells[0])
            keys = re.findall(r"`([a-z][a-z0-9_]*)`", cells[1])
            rows.append((flags, keys, cells[0]))
    return rows


TABLES = [
    ("modelfleet-agent", ("serve",), ServeConfig),
    ("modelfleet-agent", ("run",), ServeConfig),
    ("modelfleet-hub", ("serve",), HubConfig),
]


@pytest.mark.parametrize(
    ("program", "path", "cls"), TABLES, ids=[f"{p} {c[0]}" for p, c, _ in TABLES]
)
def test_flag_tables_list_every_flag_and_its_setting(
    program: str, path: tuple[str, ...], cls: type
) -> None:
    heading, text = _section_of(program, path)
    rows = _flag_table(text)
    assert rows, f"docs/cli.md section `{heading}` has no Flag | Key | Default table"
    listed = {flag for flags, _, _ in rows for flag in flags}
    flags = _flags(program, path)
    assert listed == flags, (
        f"`{program} {' '.join(path)}`: flags missing from its table in docs/cli.md: "
        f"{sorted(flags - listed)}; listed but not flags of the command: {sorted(listed - flags)}"
    )
    settings = {f.name for f in dataclasses.fields(cls)} - {"origin"}
    choices = _choices(program, path)
    for row_flags, keys, written in rows:
        assert set(keys) <= settings, f"{row_flags}: {sorted(set(keys) - settings)} are no settings"
        for flag in row_flags:
            if flag != "--config":  # names the file, sets no key
                assert flag[2:].replace("-", "_") in keys, f"{flag}: its Key column is wrong"
            if flag in choices:
                shown = re.search(rf"{re.escape(flag)} \{{([^}}]*)\}}", written)
                assert shown and set(shown.group(1).split(",")) == choices[flag], (
                    f"{flag} takes {{{','.join(choices[flag])}}}; docs/cli.md shows {written!r}"
                )


# -- docs/configuration.md -------------------------------------------------------------------


def _setting_rows() -> dict[type, dict[str, list[str]]]:
    """Settings-table rows of docs/configuration.md: {class: {key: [type, default, ...]}};
    the agent's tables come before the "Hub settings" title, the hub's after it."""
    rows: dict[type, dict[str, list[str]]] = {ServeConfig: {}, HubConfig: {}}
    cls: type = ServeConfig
    for line in (DOCS / "configuration.md").read_text().splitlines():
        if line.startswith("## Hub settings"):
            cls = HubConfig
        row = re.match(r"\| `([a-z][a-z0-9_]*)` \|(.*)", line)
        if row:
            rows[cls][row.group(1)] = [c.strip() for c in row.group(2).split("|")]
    return rows


def _doc_value(cell: str) -> str:
    value = re.match(r"`([^`]*)`", cell)
    assert value, f"no `value` at the start of {cell!r}"
    return value.group(1)


def _same(documented: str, default: Any) -> bool:
    if isinstance(default, bool):
        return documented == str(default).lower()
    if isinstance(default, int | float):
        return float(documented) == float(default)
    return documented == ('""' if str(default) == "" else str(default))


# Annotations are strings here (the config modules use `from __future__ import annotations`).
TYPE_WORDS = {"bool": "bool", "int": "int", "float": "float", "Path": "path"}


@pytest.mark.parametrize("cls", [ServeConfig, HubConfig])
def test_every_setting_has_a_row_with_its_default(cls: type) -> None:
    rows = _setting_rows()[cls]
    defaults = cls()
    problems = []
    for f in dataclasses.fields(cls):
        if f.name == "origin":
            continue
        if f.name not in rows:
            problems.append(f"{f.name}: no row in a settings table")
            continue
        kind, default = rows[f.name][0], rows[f.name][1]
        value = getattr(defaults, f.name)
        if not _same(_doc_value(default), value):
            problems.append(f"{f.name}: documented default {default!r}, the code's is {value!r}")
        word = TYPE_WORDS.get(f.type)  # the annotation: `30 * 86400` is still a float setting
        if word and not kind.startswith(word):
            problems.append(f"{f.name}: documented type {kind!r}, the code's is {word}")
    assert not problems, f"docs/configuration.md ({cls.__name__}): " + "; ".join(problems)


def _complete_example() -> str:
    text = (DOCS / "configuration.md").read_text()
    section = text.split("## Complete example", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block, "docs/configuration.md: the Complete example has no ```toml block"
    return block.group(1)


def test_the_complete_example_sets_every_setting_to_its_default(tmp_path: Path) -> None:
    toml = _complete_example()
    table = tomllib.loads(toml)["agent"]
    names = {f.name for f in dataclasses.fields(ServeConfig)} - {"origin"}
    assert set(table) == names, (
        f"the Complete example in docs/configuration.md lacks {sorted(names - set(table))}"
    )
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    loaded, defaults = load_config(path, env={}), ServeConfig()
    changed = {
        n for n in names if getattr(loaded, n) != getattr(defaults, n)
    }  # the example says which two it sets to something else
    assert changed == {"models", "metrics_listen"}, f"not the default: {sorted(changed)}"


def _equal(value: Any, default: Any) -> bool:
    """A TOML value equals a setting's default (paths as strings, ints as floats)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    if isinstance(default, int | float):
        return isinstance(value, int | float) and float(value) == float(default)
    return str(value) == str(default)


def _packaged(path: Path) -> dict[str, Any]:
    """Every `key = value` line of a packaged config, commented out or not (the first one);
    a comment that only reads like one (`# intra_op_threads = 1 on small machines`) is prose."""
    values: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"#? ?([a-z][a-z0-9_]*) = (.*)", line)
        if m and m.group(1) not in values:
            try:
                values[m.group(1)] = tomllib.loads(f"v = {m.group(2)}")["v"]
            except tomllib.TOMLDecodeError:
                continue
    return values


PACKAGED = [
    # The packaged files point at the service's state directories instead of the defaults.
    ("agent.toml", ServeConfig, {"data", "enrollment"}),
    ("hub.toml", HubConfig, {"data"}),
]


@pytest.mark.parametrize(("name", "cls", "not_default"), PACKAGED, ids=[p[0] for p in PACKAGED])
def test_the_packaged_configs_list_every_setting_with_its_default(
    name: str, cls: type, not_default: set[str]
) -> None:
    # tests/test_systemd.py checks that every name is there; this checks the values too.
    path = ROOT / "packaging" / "etc" / name
    listed = _packaged(path)
    names = {f.name for f in dataclasses.fields(cls)} - {"origin"}
    assert names <= set(listed), f"packaging/etc/{name} lacks {sorted(names - set(listed))}"
    defaults = cls()
    wrong = [
        f"{n} = {listed[n]!r} (default {getattr(defaults, n)!r})"
        for n in sorted(names - not_default)
        if not _equal(listed[n], getattr(defaults, n))
    ]
    assert not wrong, f"packaging/etc/{name} does not show the defaults: {wrong}"
    # And it loads as shipped (the keys set in it are valid).
    if cls is ServeConfig:
        load_config(path, env={})
    else:
        load_hub_config(path, env={})
