"""What the three command lines share: ``--version``, help that shows defaults, bash completion.

Each CLI builds its parser as before and hands it to :func:`finish`, which adds ``--version``
and gives every parser and sub-parser the same help formatter. :func:`bash_completion` writes a
completion script from the same parser, so completion cannot drift from the flags: the packages
generate theirs at build time (packaging/build.py), and tests/test_cli_scripting.py runs one in
bash.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DISTRIBUTION = "modelfleet"


def package_version() -> str:
    """The installed distribution's version (pyproject.toml's, through the package metadata)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        # Imported from a checkout that was never installed: say so rather than invent a number.
        return "unknown (not installed)"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help when it has a default worth showing.

    argparse's ArgumentDefaultsHelpFormatter also prints ``(default: None)`` and
    ``(default: False)`` and repeats a default the help already states in its own words; an
    empty or false default means "off" or "none", which the help says where it matters.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text.lower()
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or (isinstance(default, str | list | tuple | dict) and not default)
        ):
            return text
        return f"{text} (default: %(default)s)"


def finish(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--version`` and give every parser the defaults-showing formatter.

    A sub-parser without its own description takes its one-line help, so ``CMD SUB --help``
    says what SUB does.
    """
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {package_version()}",
        help="print the program's version and exit",
    )
    for _, p in walk(parser):
        p.formatter_class = DefaultsHelpFormatter
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    if sub.description is None and helps.get(name):
                        sub.description = helps[name]
    return parser


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command path, parser) for the parser and every sub-parser below it, parents first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


def missing_help(parser: argparse.ArgumentParser) -> list[str]:
    """Every argument and sub-command below ``parser`` that has no help text."""
    missing = []
    for path, p in walk(parser):
        where = " ".join((p.prog.split()[0], *path))
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}
                missing += [f"{where} {n} (sub-command)" for n in action.choices if n not in helped]
            elif action.help is None or not action.help.strip():
                name = "/".join(action.option_strings) or action.metavar or action.dest
                missing.append(f"{where} {name}")
    return missing


# -- bash completion ---------------------------------------------------------------------------


def path_like(action: argparse.Action) -> bool:
    """An argument whose value is a file or folder (completed with file names)."""
    if action.type is Path:
        return True
    hint = f"{action.metavar or ''} {action.dest}".upper()
    return bool(re.search(r"FILE|DIR|PATH|PEM|SOCKET|CERT\b|KEY\b|_CA\b", hint))


def _words(items: Any) -> str:
    """Choices as one compgen word list (choices are plain words: no quoting inside)."""
    return " ".join(str(i) for i in items)


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for ``parser.prog``: sub-commands, options, choices, files.

    The script walks the words typed so far through the same tree of sub-commands the parser
    has (skipping option values), then offers that sub-command's own sub-commands, options
    (after a ``-``), an option's or positional's choices, or file names (bash's default, for
    values that are paths or free text). Only bash builtins: no Python runs on TAB.
    """
    prog = parser.prog
    fn = "_" + re.sub(r"\W", "_", prog)
    cases = []
    for path, p in walk(parser):
        subs: list[str] = []
        options: list[str] = []
        takes: list[str] = []
        values: list[str] = []  # "case" arms: option -> its choices
        positionals: list[str] = []  # per position: choices, or "" for anything
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                subs += list(action.choices)
                continue
            if not action.option_strings:
                choices = "" if action.choices is None else _words(action.choices)
                positionals.append(choices)
                continue
            options += action.option_strings
            if action.nargs == 0:
                continue
            takes += action.option_strings
            if action.choices is not None:
                arm = "|".join(action.option_strings)
                values.append(f"            {arm}) words={shlex.quote(_words(action.choices))} ;;")
            elif not path_like(action):
                # A free-text value (a name, a number, a selector): offer nothing rather than
                # file names that would be wrong.
                arm = "|".join(action.option_strings)
                values.append(f"            {arm}) words='' ; nofiles=1 ;;")
        key = shlex.quote(" ".join(path))
        value_case = "\n".join(values)
        cases.append(
            f"        {key})\n"
            f"            subs={shlex.quote(' '.join(subs))}\n"
            f"            opts={shlex.quote(' '.join(options))}\n"
            f"            takes={shlex.quote(' ' + ' '.join(takes) + ' ')}\n"
            f"            positionals=({' '.join(shlex.quote(c) for c in positionals)})\n"
            + (
                f'            if [[ $1 == value ]]; then case "$2" in\n{value_case}\n'
                "            esac; fi\n"
                if values
                else ""
            )
            + "            ;;"
        )
    body = "\n".join(cases)
    return f"""\
# bash completion for {prog}: generated from its argument parser (modelfleet.kernel.commandline).
# Do not edit; packaging/build.py writes it again from the code it packages.

# {fn}_node KIND [OPTION]: sets subs, opts, takes, positionals for the sub-command in $path;
# with KIND=value, also words/nofiles for the value of OPTION.
{fn}_node() {{
    subs='' opts='' takes=' ' positionals=()
    case "$path" in
{body}
    esac
}}

{fn}() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=''
    ((COMP_CWORD > 0)) && prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local path='' subs opts takes positionals words='' nofiles=0 npos=0 skip=0 i w
    {fn}_node
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${{COMP_WORDS[i]}}
        if ((skip)); then skip=0; continue; fi
        case "$w" in
            --) break ;;
            -*=*) continue ;;
            -*) [[ $takes == *" $w "* ]] && skip=1; continue ;;
        esac
        if [[ " $subs " == *" $w "* ]]; then
            path=${{path:+$path }}$w
            npos=0
            {fn}_node
        else
            npos=$((npos + 1))
        fi
    done
    COMPREPLY=()
    if [[ $prev == -* && $takes == *" $prev "* ]]; then
        {fn}_node value "$prev"
        if [[ -n $words ]]; then
            mapfile -t COMPREPLY < <(compgen -W "$words" -- "$cur")
        elif ((nofiles)); then
            compopt +o default 2>/dev/null
        fi
        return 0
    fi
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")
    elif [[ -n $subs ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$subs" -- "$cur")
    elif [[ -n ${{positionals[npos]:-}} ]]; then
        mapfile -t COMPREPLY < <(compgen -W "${{positionals[npos]}}" -- "$cur")
    fi
    return 0
}}

complete -o bashdefault -o default -F {fn} {prog}
"""


def message_dict(message: Any) -> dict[str, Any]:
    """A protobuf message as ``--json`` prints it: every field present, numbers as numbers.

    ``json_format.MessageToDict`` writes 64-bit integers as strings (JSON numbers lose
    precision past 2**53 in JavaScript) and leaves default values out, so a script reading
    ``"active_version"`` gets ``"2"`` or nothing at all. Our integers are versions, counts,
    sizes and times, all far below 2**53, so a script is better served by numbers and by a
    shape that does not change with the values. Enums print as their names, bytes as hex.
    """
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            out[field.name] = {k: _field_value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_field_value(field, v) for v in value]
        elif entry is not None and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _field_value(field, value)
    return out


def _field_value(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return message_dict(value)
    if field.enum_type is not None:
        named = field.enum_type.values_by_number.get(value)
        return named.name if named is not None else value
    if isinstance(value, bytes):
        return value.hex()
    return value
