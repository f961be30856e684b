"""Desired state as code: the file behind ``modelfleet-hub apply|diff|export``.

A state file (TOML, docs/operations.md#desired-state-as-code) declares, per model and selector,
the version the fleet should run and how to get there (``direct``: a deployment; ``canary`` or
``blue-green``: a rollout with the options of ``rollout start``), and the scheduled jobs. This
module reads such a file (:func:`parse`: every problem at once, with its entry and line),
checks it against the hub's state (:func:`check_and_plan`: missing, retired and unsigned
versions, selectors that match nothing, rollouts that would be refused or collide), says what
would change (:class:`Plan`), and writes the state back as a file (:func:`export`).

The functions take the hub's state as data (:class:`FleetState`); :class:`StateFiles` reads it
from the registry and applies a plan through the same cores ``deploy``, ``undeploy``, ``rollout
start`` and ``jobs`` use, so the file can do nothing those commands could not.

Idempotence: an entry is done when the deployment in force for its model and selector names its
version (a completed rollout writes exactly that deployment), so applying a file twice changes
nothing the second time. Where selectors of one model overlap, the newest deployment decides an
agent's version; entries therefore count in file order (a later entry wins), and an entry whose
deployment is older than an earlier overlapping one's is written again.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from modelfleet.hub.deployments import DesiredChange, current, no_match_message, plan
from modelfleet.hub.registry import (
    AGENT_KEY,
    AgentRow,
    DeploymentRow,
    JobRow,
    VersionRow,
    check_labels,
    decide,
    selector_matches,
)
from modelfleet.hub.rollouts import (
    ACTIVE_STATES,
    Gate,
    Rollout,
    RolloutRefusedError,
    Spec,
    check_target,
    check_waves,
)
from modelfleet.kernel.bundle import MAX_VERSION, VERSION_RANGE
from modelfleet.kernel.errors import InvalidRequestError, ModelfleetError
from modelfleet.kernel.jobs import JobSpec

if TYPE_CHECKING:
    from modelfleet.hub.deployments import Deployments
    from modelfleet.hub.jobs import Jobs
    from modelfleet.hub.ports import RegistryPort
    from modelfleet.hub.rollout_manager import RolloutManager

FORMAT_VERSION = 1
STRATEGIES = ("direct", "canary", "blue-green")
TOP_KEYS = ("version", "deployment", "job")
# Defaults are those of `rollout start` (hub/cli.py), so a file and a command line that say
# the same thing do the same thing.
ROLLOUT_DEFAULTS: dict[str, Any] = {
    "waves": ["10%", "50%", "100%"],
    "bake": "5m",
    "gates": [],
    "min_requests": 0,
    "max_failed_agents": 0,
    "agent_timeout": "10m",
    "auto_switch": False,
    "allow_downgrade": False,
}
DEPLOYMENT_KEYS = ("model", "version", "selector", "strategy", "allow_empty", *ROLLOUT_DEFAULTS)
JOB_KEYS = (
    "name",
    "model",
    "version",
    "cron",
    "every",
    "input",
    "output",
    "sql",
    "keys",
    "selector",
    "paused",
)

# Plan actions. Those in CHANGING write something when applied.
NONE, DEPLOY, ROLLOUT, IN_PROGRESS, HELD, UNDEPLOY, KEPT = (
    "none",
    "deploy",
    "rollout",
    "in_progress",
    "held",
    "undeploy",
    "kept",
)
CREATE, UPDATE, DELETE = "create", "update", "delete"
CHANGING = frozenset({DEPLOY, ROLLOUT, UNDEPLOY, CREATE, UPDATE, DELETE})

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class Problem:
    """Why a file is refused: where (``deployment[2]``, ``job[1]``, ``file``), its line
    (1-based; 0 when unknown) and what to do."""

    where: str
    line: int
    message: str

    def text(self, filename: str = "") -> str:
        at = f"{filename or '<file>'}:{self.line}" if self.line else filename or "<file>"
        return f"{at}: {self.where}: {self.message}"


@dataclass(frozen=True)
class DeploymentEntry:
    index: int  # 1-based, in file order
    line: int
    model: str
    version: int
    selector: dict[str, str]
    strategy: str
    allow_empty: bool = False
    spec: Spec | None = None  # canary and blue-green: the rollout to start

    @property
    def where(self) -> str:
        return f"deployment[{self.index}]"


@dataclass(frozen=True)
class JobEntry:
    index: int
    line: int
    spec: JobSpec
    selector: dict[str, str]

    @property
    def where(self) -> str:
        return f"job[{self.index}]"


@dataclass(frozen=True)
class Document:
    deployments: list[DeploymentEntry]
    jobs: list[JobEntry]


@dataclass(frozen=True)
class FleetState:
    """What the plan compares the file with: the hub's state at one instant."""

    rows: list[DeploymentRow]  # the deployments log in force, id order
    agents: list[AgentRow]
    versions: dict[tuple[str, int], VersionRow]
    rollouts: list[Rollout]  # every rollout that ran, id order
    jobs: list[JobRow]
    revision: int = 0

    @property
    def retired(self) -> set[tuple[str, int]]:
        return {k for k, v in self.versions.items() if v.stage == "retired"}

    @property
    def active_agents(self) -> list[AgentRow]:
        return [a for a in self.agents if a.status == "active"]


@dataclass(frozen=True)
class DeploymentAction:
    entry: int  # 1-based index in the file; 0: a deployment the file does not name
    line: int
    model: str
    selector: dict[str, str]
    version: int  # the file's version (not in file: the version in force)
    strategy: str
    action: str
    reason: str
    current: int = 0  # the version the deployment in force for this selector names (0: none)
    changes: list[DesiredChange] = field(default_factory=list)
    rollout_id: int = 0  # the rollout in progress, or (applied) started
    revision: int = 0  # applied: the hub's revision after this action
    spec: Spec | None = None


@dataclass(frozen=True)
class JobAction:
    entry: int
    line: int
    name: str
    action: str
    reason: str
    fields: list[str] = field(default_factory=list)  # update: what differs
    spec: JobSpec | None = None
    selector: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    deployments: list[DeploymentAction]
    jobs: list[JobAction]
    problems: list[Problem] = field(default_factory=list)
    applied: bool = False

    @property
    def changes(self) -> bool:
        actions = [a.action for a in self.deployments] + [j.action for j in self.jobs]
        return any(a in CHANGING for a in actions)


# -- reading ----------------------------------------------------------------------------------


class _Lines:
    """Line numbers for entries and keys (tomllib gives values, not positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: dict[str, list[int]] = {}
        self.first_header = len(self.lines)
        for i, line in enumerate(self.lines):
            m = re.match(r"\s*\[\[\s*([A-Za-z0-9_.-]+)\s*\]\]", line)
            if m:
                self.headers.setdefault(m.group(1), []).append(i)
                self.first_header = min(self.first_header, i)

    def entry(self, table: str, index: int) -> int:
        starts = self.headers.get(table, [])
        return starts[index - 1] + 1 if index <= len(starts) else 0

    def key(self, table: str, index: int, key: str) -> int:
        """The line of ``key =`` inside entry ``index`` of ``table`` (or the entry's line)."""
        if table:
            start = self.entry(table, index)
            if not start:
                return 0
            after = [h for hs in self.headers.values() for h in hs if h >= start]
            end = min(after, default=len(self.lines))
        else:
            start, end = 1, self.first_header
        pattern = re.compile(rf"\s*{re.escape(key)}\s*[=.]")
        for i in range(start - 1 if not table else start, end):
            if pattern.match(self.lines[i]):
                return i + 1
        return start if table else 0


def parse_duration(value: Any) -> float:
    """``"90s"``, ``"5m"``, ``"1h"``, ``"1d"``: a unit is required, as on the command line."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f'{value!r} is not a duration: write a string such as "90s" or "5m"')
    text = str(value).strip()
    if isinstance(value, (int, float)) or re.fullmatch(r"\d+(?:\.\d+)?", text):
        raise ValueError(f'{text} has no unit: write "{text}s" (or "5m", "1h", "1d")')
    m = _DURATION_RE.fullmatch(text)
    if not m:
        raise ValueError(f'{text!r} is not a duration: write e.g. "90s", "5m", "1h", "1d"')
    return float(m.group(1)) * _UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        n = seconds / _UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{seconds:g}s"


def _waves(value: Any) -> list[str]:
    """``["10%", "50%", "100%"]`` (percentages) or ``[1, 3, 10]`` (agent counts)."""
    if not isinstance(value, list) or not value:
        raise ValueError(
            'waves is a list: percentages ["10%", "50%", "100%"] or agent counts [1, 3, 10]'
        )
    out = []
    for w in value:
        if isinstance(w, int) and not isinstance(w, bool):
            out.append(str(w))
        elif isinstance(w, str) and w.strip().endswith("%"):
            out.append(w.strip())
        elif isinstance(w, str) and w.strip().isdigit():
            raise ValueError(
                f'wave "{w}" is ambiguous: write "{w.strip()}%" for a percentage or '
                f"{w.strip()} (a number, no quotes) for a count of agents"
            )
        else:
            raise ValueError(f'invalid wave {w!r}: write a percentage ("10%") or a count (3)')
    return out


def _checked_waves(value: Any) -> list[str]:
    waves = _waves(value)
    check_waves(waves)  # increasing, one kind, in range: as `rollout start` checks them
    return waves


def _unknown(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, 1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; known keys: {', '.join(known)}"


def _selector(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError('selector is a table of strings, e.g. selector = { site = "berlin" }')
    selector = {str(k): v for k, v in value.items()}
    check_labels(selector, "selector")
    for k in selector:
        if k.startswith("_"):
            raise ValueError(f"selector key {k!r} is reserved (keys starting with '_')")
    return selector


def _version(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise ValueError(f"version {value!r} is invalid: versions are integers in {VERSION_RANGE}")
    return value


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, not {value!r}")
    return value


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, not {value!r}")
    return value


def _count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a whole number >= 0, not {value!r}")
    return value


def parse(text: str) -> tuple[Document, list[Problem]]:
    """The document, and every problem found in it on its own (without the hub's state)."""
    problems: list[Problem] = []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        return Document([], []), [
            Problem("file", int(m.group(1)) if m else 0, f"not valid TOML: {exc}")
        ]
    lines = _Lines(text)
    for key in data:
        if key not in TOP_KEYS:
            line = lines.entry(key, 1) if key in lines.headers else lines.key("", 0, key)
            problems.append(Problem("file", line, _unknown(key, TOP_KEYS)))
    if "version" not in data:
        problems.append(
            Problem("file", 1, f"no format version: add `version = {FORMAT_VERSION}` at the top")
        )
    elif data["version"] != FORMAT_VERSION:
        problems.append(
            Problem(
                "file",
                lines.key("", 0, "version"),
                f"format version {data['version']!r} is not known to this hub: it reads "
                f"version = {FORMAT_VERSION}",
            )
        )
    deployments = [
        d
        for i, raw in enumerate(_tables(data, "deployment", lines, problems), 1)
        if (d := _deployment(i, raw, lines, problems)) is not None
    ]
    jobs = [
        j
        for i, raw in enumerate(_tables(data, "job", lines, problems), 1)
        if (j := _job(i, raw, lines, problems)) is not None
    ]
    # Duplicates are looked for among the raw entries: an entry with another problem still
    # counts, so fixing that one does not reveal a new problem.
    seen: dict[tuple[str, str], int] = {}
    for i, raw in enumerate(_tables(data, "deployment", lines, []), 1):
        sel = raw.get("selector") or {}
        if not isinstance(raw.get("model"), str) or not isinstance(sel, dict):
            continue
        same = (raw["model"], json.dumps(sel, sort_keys=True, default=str))
        if same in seen:
            first = seen[same]
            problems.append(
                Problem(
                    f"deployment[{i}]",
                    lines.entry("deployment", i),
                    f"{raw['model']} for {_where(sel)} is already declared by deployment[{first}] "
                    f"(line {lines.entry('deployment', first)}): one entry per model and "
                    "selector; remove one",
                )
            )
        else:
            seen[same] = i
    names: dict[str, JobEntry] = {}
    for j in jobs:
        if j.spec.name in names:
            first_job = names[j.spec.name]
            problems.append(
                Problem(
                    j.where,
                    j.line,
                    f"job {j.spec.name!r} is already declared by {first_job.where} (line "
                    f"{first_job.line}): job names are unique; rename or remove one",
                )
            )
        else:
            names[j.spec.name] = j
    return Document(deployments, jobs), problems


def _tables(
    data: Mapping[str, Any], table: str, lines: _Lines, problems: list[Problem]
) -> list[dict[str, Any]]:
    value = data.get(table, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        problems.append(
            Problem("file", lines.key("", 0, table), f"{table} must be [[{table}]] entries")
        )
        return []
    return value


def _deployment(
    index: int, raw: Mapping[str, Any], lines: _Lines, problems: list[Problem]
) -> DeploymentEntry | None:
    where, line = f"deployment[{index}]", lines.entry("deployment", index)
    ok = True

    def bad(key: str, message: str) -> None:
        nonlocal ok
        ok = False
        problems.append(Problem(where, lines.key("deployment", index, key) or line, message))

    for key in raw:
        if key not in DEPLOYMENT_KEYS:
            bad(key, _unknown(key, DEPLOYMENT_KEYS))
    values: dict[str, Any] = {}
    convert: tuple[tuple[str, Callable[[Any], Any]], ...] = (
        ("model", lambda v: _string(v, "model")),
        ("version", _version),
        ("selector", _selector),
        ("strategy", lambda v: _string(v, "strategy")),
        ("allow_empty", lambda v: _flag(v, "allow_empty")),
    )
    for key, conv in convert:
        if key not in raw:
            continue
        try:
            values[key] = conv(raw[key])
        except (ValueError, InvalidRequestError) as exc:
            bad(key, str(exc))
    for key in ("model", "version"):
        if key not in raw:
            bad(key, f"{key} is required")
    if "model" in values and not values["model"]:
        bad("model", "model must not be empty")
    strategy = values.get("strategy", "direct")
    if strategy not in STRATEGIES:
        close = difflib.get_close_matches(strategy, STRATEGIES, 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        bad("strategy", f"unknown strategy {strategy!r}{hint}: use {', '.join(STRATEGIES)}")
    options = [k for k in ROLLOUT_DEFAULTS if k in raw]
    spec = None
    if strategy == "direct" and options:
        for k in options:
            bad(
                k,
                f'{k} is a rollout option: it needs strategy = "canary" or "blue-green" '
                '(strategy "direct", the default, deploys at once)',
            )
    elif strategy in ("canary", "blue-green"):
        o = {**ROLLOUT_DEFAULTS, **{k: raw[k] for k in options}}
        parsed: dict[str, Any] = {}
        options_convert: tuple[tuple[str, Callable[[Any], Any]], ...] = (
            ("waves", _checked_waves),
            ("bake", parse_duration),
            ("agent_timeout", parse_duration),
            ("min_requests", lambda v: _count(v, "min_requests")),
            ("max_failed_agents", lambda v: _count(v, "max_failed_agents")),
            ("auto_switch", lambda v: _flag(v, "auto_switch")),
            ("allow_downgrade", lambda v: _flag(v, "allow_downgrade")),
        )
        for key, conv in options_convert:
            try:
                parsed[key] = conv(o[key])
            except (ValueError, InvalidRequestError) as exc:
                bad(key, f"{key}: {exc}" if isinstance(exc, ValueError) else str(exc))
        gates = o["gates"]
        if not isinstance(gates, list) or not all(isinstance(g, str) for g in gates):
            bad("gates", 'gates is a list of strings, e.g. ["error_rate<0.01", "p99_ms<100"]')
            gates = []
        for g in gates:
            try:
                Gate.parse(g)
            except InvalidRequestError as exc:
                bad("gates", str(exc))
        if ok:
            spec = Spec(
                model=values["model"],
                version=values["version"],
                selector=values.get("selector", {}),
                waves=parsed["waves"],
                bake_s=parsed["bake"],
                gates=list(gates),
                min_requests=parsed["min_requests"],
                max_failed_agents=parsed["max_failed_agents"],
                agent_timeout_s=parsed["agent_timeout"],
                strategy=strategy,
                auto_switch=parsed["auto_switch"],
                allow_downgrade=parsed["allow_downgrade"],
            )
            try:
                spec.validate()  # the checks of `rollout start`, all made above already
            except InvalidRequestError as exc:
                bad("strategy", str(exc))
    if not ok:
        return None
    return DeploymentEntry(
        index,
        line,
        values["model"],
        values["version"],
        values.get("selector", {}),
        strategy,
        values.get("allow_empty", False),
        spec,
    )


def _job(
    index: int, raw: Mapping[str, Any], lines: _Lines, problems: list[Problem]
) -> JobEntry | None:
    from modelfleet.kernel.schedule import trigger_for

    where, line = f"job[{index}]", lines.entry("job", index)
    ok = True

    def bad(key: str, message: str) -> None:
        nonlocal ok
        ok = False
        problems.append(Problem(where, lines.key("job", index, key) or line, message))

    for key in raw:
        if key not in JOB_KEYS:
            bad(key, _unknown(key, JOB_KEYS))
    text: dict[str, str] = {}
    for key in ("name", "model", "input", "output", "sql", "keys", "cron", "every"):
        if key in raw:
            try:
                text[key] = _string(raw[key], key)
            except ValueError as exc:
                bad(key, str(exc))
    for key in ("name", "model", "input", "output"):
        if key not in raw or (key in text and not text[key]):
            bad(key, f"{key} is required (as for `jobs create`)")
    version = 0
    if "version" not in raw:
        bad(
            "version",
            'version is required: a version number, or "deployed" (the version '
            "active on the agent when the job fires)",
        )
    elif raw["version"] != "deployed":
        try:
            version = _version(raw["version"])
        except ValueError as exc:
            bad("version", f'{exc}, or "deployed"')
    schedule = ""
    if ("cron" in raw) == ("every" in raw):
        bad("cron", 'a job needs exactly one of cron = "0 2 * * *" or every = "30s"')
    elif "every" in text:
        try:
            schedule = f"every {parse_duration(text['every']):g}s"
        except ValueError as exc:
            bad("every", f"every: {exc}")
    elif "cron" in text:
        schedule = text["cron"]
    if schedule:
        try:
            trigger_for(schedule)
        except InvalidRequestError as exc:
            bad("cron" if "cron" in raw else "every", str(exc))
    selector: dict[str, str] = {}
    try:
        selector = _selector(raw.get("selector"))
    except (ValueError, InvalidRequestError) as exc:
        bad("selector", str(exc))
    paused = False
    if "paused" in raw:
        try:
            paused = _flag(raw["paused"], "paused")
        except ValueError as exc:
            bad("paused", str(exc))
    if not ok:
        return None
    spec = JobSpec(
        name=text["name"],
        model=text["model"],
        version=version,
        schedule=schedule,
        input=text["input"],
        output=text["output"],
        sql=text.get("sql", ""),
        paused=paused,
        keys=text.get("keys", ""),
    )
    return JobEntry(index, line, spec, selector)


# -- comparing with the hub -------------------------------------------------------------------


def _where(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "the whole fleet"


def _key(selector: Mapping[str, str]) -> str:
    return json.dumps(dict(selector), sort_keys=True)


def _overlap(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Whether one agent could match both selectors (no key with two different values)."""
    return all(b[k] == v for k, v in a.items() if k in b)


def _check_version(state: FleetState, model: str, version: int, what: str) -> str | None:
    row = state.versions.get((model, version))
    if row is None:
        have = sorted(v for (m, v) in state.versions if m == model)
        if not have:
            from modelfleet.kernel.errors import did_you_mean

            models = {m for m, _ in state.versions}
            return (
                f"no model named {model!r}{did_you_mean(model, models)}: publish it first "
                "(`modelfleet-hub publish`) or fix the name"
            )
        shown = ", ".join(str(v) for v in have[-10:])
        return (
            f"{model} has no version {version} (its versions: {shown}): publish it first or "
            f"name one of these in {what}"
        )
    if row.stage == "retired":
        return (
            f"{model} v{version} is retired and is never deployed again: name a newer version "
            f"in {what}"
        )
    if not row.signed:
        return (
            f"{model} v{version} is not signed yet: sign it (`modelfleet-hub sign {model} "
            f"{version} --sha256 HEX --targets-key FILE`) before applying"
        )
    return None


def _match(agent: AgentRow) -> dict[str, str]:
    return {**agent.labels, AGENT_KEY: agent.agent_id}


def check_and_plan(doc: Document, state: FleetState, *, prune: bool = False) -> Plan:
    """What applying ``doc`` would do, or (``problems``) why it is refused. Undeploys carry no
    per-agent changes here: :class:`StateFiles` asks the deployments core for them."""
    problems: list[Problem] = []
    retired = state.retired
    in_force = {(r.name, _key(r.selector)): r for r in current(state.rows, retired)}
    active = {r.spec.model: r for r in state.rollouts if r.state in ACTIVE_STATES}
    latest: dict[str, Rollout] = {}
    for r in state.rollouts:
        latest[r.spec.model] = r
    agents = state.active_agents
    actions: list[DeploymentAction] = []
    # The log as the entries before this one leave it: each entry's changes are its own.
    log = list(state.rows)
    # The log right after the apply: a rollout writes its deployment only once it completes.
    at_once = list(state.rows)
    starting: dict[str, str] = {}  # model -> the entry that starts its rollout
    starting_selector: dict[str, dict[str, str]] = {}
    # Per model: (selector, id of the row that will decide for it) of the entries before.
    earlier: dict[str, list[tuple[dict[str, str], float]]] = {}
    for e in doc.deployments:
        bad = _check_version(state, e.model, e.version, f"{e.where}'s version")
        if bad:
            problems.append(Problem(e.where, e.line, bad))
            continue
        cur = in_force.get((e.model, _key(e.selector)))
        floor = max(
            (rid for sel, rid in earlier.get(e.model, []) if _overlap(sel, e.selector)),
            default=0.0,
        )
        done = cur is not None and cur.version == e.version and cur.id > floor
        base = DeploymentAction(
            entry=e.index,
            line=e.line,
            model=e.model,
            selector=e.selector,
            version=e.version,
            strategy=e.strategy,
            action=NONE,
            reason="",
            current=cur.version if cur else 0,
        )
        running = active.get(e.model)
        planned = DeploymentRow(
            id=max(state.revision, log[-1].id if log else 0) + 1,
            name=e.model,
            version=e.version,
            selector=dict(e.selector),
            created_at=0.0,
        )
        changes = [
            c for c in plan(e.model, log, [*log, planned], agents, retired) if c.before != c.after
        ]
        matched = [a for a in agents if selector_matches(e.selector, a.labels)]
        effective = float(cur.id) if cur else 0.0
        if running and running.spec.version == e.version and running.spec.selector == e.selector:
            act = replace(
                base,
                action=IN_PROGRESS,
                reason=f"rollout {running.id} to v{e.version} is in progress ({running.state}): "
                "left alone",
                rollout_id=running.id,
            )
        elif done:
            act = replace(base, action=NONE, reason="in force")
        elif running:
            problems.append(
                Problem(
                    e.where,
                    e.line,
                    f"rollout {running.id} of {e.model} (v{running.spec.version} to "
                    f"{_where(running.spec.selector)}) is in progress ({running.state}); it would "
                    "undo this entry: wait for it to finish, or abort it (`modelfleet-hub "
                    f"rollout abort {e.model}`), then apply again",
                )
            )
            continue
        elif not matched and not e.allow_empty:
            problems.append(
                Problem(
                    e.where,
                    e.line,
                    no_match_message(e.selector, agents).replace(
                        "pass --allow-empty", "set allow_empty = true in the entry"
                    ),
                )
            )
            continue
        elif e.model in starting and _overlap(starting_selector[e.model], e.selector):
            problems.append(
                Problem(
                    e.where,
                    e.line,
                    f"this entry would change agents of the rollout {starting[e.model]} starts "
                    f"(a later entry wins where selectors overlap): put it before "
                    f"{starting[e.model]}, or apply it once that rollout is done",
                )
            )
            continue
        elif e.spec is None or not matched:
            why = "" if e.spec is None else "no agent matches now: deployed directly"
            act = replace(base, action=DEPLOY, reason=why, changes=changes, spec=None)
            effective = math.inf
        else:
            prior = latest.get(e.model)
            desired = {}
            for a in matched:
                row = decide(at_once, _match(a), retired)[0].get(e.model)
                serving = next((m.active_version for m in a.report.models if m.name == e.model), 0)
                desired[a.hostname or a.agent_id] = (row.version if row else 0, serving)
            if all(d == e.version for d, _ in desired.values()):
                act = replace(
                    base,
                    action=DEPLOY,
                    reason=f"every matching agent already desires v{e.version}: recorded as "
                    "a deployment, no rollout needed",
                    changes=changes,
                )
                effective = math.inf
            elif (
                prior is not None
                and prior.state == "rolled_back"
                and prior.spec.version == e.version
                and prior.spec.selector == e.selector
            ):
                act = replace(
                    base,
                    action=HELD,
                    reason=f"rollout {prior.id} of v{e.version} rolled back "
                    f"({prior.reason or 'no reason recorded'}): apply does not start it again; "
                    "start it by hand "
                    "(`modelfleet-hub rollout start`) or name another version",
                    rollout_id=prior.id,
                )
            elif e.model in starting:
                problems.append(
                    Problem(
                        e.where,
                        e.line,
                        f"{starting[e.model]} already starts a rollout of {e.model}, and a model "
                        "has one rollout at a time: make this entry direct, or add it once that "
                        "rollout is done",
                    )
                )
                continue
            else:
                try:
                    check_target(e.spec, desired)
                except (RolloutRefusedError, InvalidRequestError) as exc:
                    msg = str(exc).replace("Pass --allow-downgrade", "Set allow_downgrade = true")
                    problems.append(Problem(e.where, e.line, msg))
                    continue
                act = replace(
                    base,
                    action=ROLLOUT,
                    reason=f"start a {e.strategy} rollout",
                    changes=changes,
                    spec=e.spec,
                )
                starting[e.model] = e.where
                starting_selector[e.model] = e.selector
                effective = math.inf
        actions.append(act)
        if act.action in (DEPLOY, ROLLOUT):
            log.append(planned)
        if act.action == DEPLOY:
            at_once.append(planned)
        earlier.setdefault(e.model, []).append((e.selector, effective))
    named = {(e.model, _key(e.selector)) for e in doc.deployments}
    for (model, key), row in sorted(in_force.items(), key=lambda kv: kv[1].id):
        if (model, key) in named:
            continue
        if prune and model in active:
            r = active[model]
            problems.append(
                Problem(
                    "prune",
                    0,
                    f"{model} for {_where(row.selector)} is not in the file, but rollout {r.id} "
                    f"of {model} is in progress ({r.state}): wait for it or abort it, then "
                    "apply --prune again",
                )
            )
            continue
        actions.append(
            DeploymentAction(
                entry=0,
                line=0,
                model=model,
                selector=dict(row.selector),
                version=row.version,
                strategy="direct",
                action=UNDEPLOY if prune else KEPT,
                reason="not in the file" if prune else "not in the file, kept (--prune removes it)",
                current=row.version,
            )
        )
    jobs = _plan_jobs(doc, state, prune, problems)
    return Plan(actions, jobs, problems)


def _plan_jobs(
    doc: Document, state: FleetState, prune: bool, problems: list[Problem]
) -> list[JobAction]:
    have = {j.spec.name: j for j in state.jobs}
    out = []
    for e in doc.jobs:
        if e.spec.version:
            bad = _check_version(state, e.spec.model, e.spec.version, f"{e.where}'s version")
        elif not any(m == e.spec.model for m, _ in state.versions):
            bad = _check_version(state, e.spec.model, 1, e.where)
        else:
            bad = None
        if bad:
            problems.append(Problem(e.where, e.line, bad))
            continue
        old = have.get(e.spec.name)
        if old is None:
            out.append(
                JobAction(e.index, e.line, e.spec.name, CREATE, "new job", [], e.spec, e.selector)
            )
            continue
        # run_now is an operator's request, not desired state: kept as it is.
        spec = replace(e.spec, run_now=old.spec.run_now)
        fields = [
            k for k, v in spec.to_record().items() if getattr(old.spec, k) != v and k != "run_now"
        ]
        if old.selector != e.selector:
            fields.append("selector")
        if fields:
            out.append(
                JobAction(
                    e.index,
                    e.line,
                    e.spec.name,
                    UPDATE,
                    f"changes {', '.join(fields)}",
                    fields,
                    spec,
                    e.selector,
                )
            )
        else:
            out.append(JobAction(e.index, e.line, e.spec.name, NONE, "in force", [], spec))
    named = {e.spec.name for e in doc.jobs}
    for name, job in sorted(have.items()):
        if name not in named:
            out.append(
                JobAction(
                    0,
                    0,
                    name,
                    DELETE if prune else KEPT,
                    "not in the file: delete"
                    if prune
                    else "not in the file, kept (--prune deletes it)",
                    [],
                    job.spec,
                    job.selector,
                )
            )
    return out


# -- writing ----------------------------------------------------------------------------------


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_table(selector: Mapping[str, str]) -> str:
    inner = ", ".join(f"{_toml_key(k)} = {_toml_string(v)}" for k, v in sorted(selector.items()))
    return "{ " + inner + " }" if inner else "{}"


def export(state: FleetState, hub: str = "") -> str:
    """The hub's desired state as a state file: every deployment in force (by model and
    selector, oldest first, so overlapping selectors keep their order) and every job. Applying
    it to the same hub changes nothing."""
    retired = state.retired
    agents = state.active_agents
    active = {r.spec.model: r for r in state.rollouts if r.state in ACTIVE_STATES}
    out = [
        "# modelfleet desired state (docs/operations.md#desired-state-as-code)",
        f"# exported by `modelfleet-hub export`{f' from {hub}' if hub else ''}; entries are "
        "applied in order, a later one wins where selectors overlap",
        f"version = {FORMAT_VERSION}",
    ]
    for row in sorted(current(state.rows, retired), key=lambda r: r.id):
        matched = [a for a in agents if selector_matches(row.selector, a.labels)]
        out += ["", "[[deployment]]"]
        if row.source == "rollout":
            out.append(f"# set by rollout {row.rollout_id}")
        r = active.get(row.name)
        if r is not None:
            out.append(
                f"# rollout {r.id} to v{r.spec.version} on {_where(r.spec.selector)} is in "
                f"progress ({r.state})"
            )
        out += [
            f"model = {_toml_string(row.name)}",
            f"version = {row.version}",
            f"selector = {_toml_table(row.selector)}",
            'strategy = "direct"',
        ]
        if row.selector and not matched:
            out.append("allow_empty = true  # no active agent matches now")
    for job in sorted(state.jobs, key=lambda j: j.spec.name):
        s = job.spec
        out += ["", "[[job]]", f"name = {_toml_string(s.name)}", f"model = {_toml_string(s.model)}"]
        out.append(f"version = {s.version}" if s.version else 'version = "deployed"')
        if s.schedule.strip().startswith("every "):
            seconds = float(s.schedule.strip()[len("every ") :].rstrip("s"))
            out.append(f"every = {_toml_string(format_duration(seconds))}")
        else:
            out.append(f"cron = {_toml_string(s.schedule)}")
        out += [f"input = {_toml_string(s.input)}", f"output = {_toml_string(s.output)}"]
        if s.sql:
            out.append(f"sql = {_toml_string(s.sql)}")
        if s.keys:
            out.append(f"keys = {_toml_string(s.keys)}")
        out.append(f"selector = {_toml_table(job.selector)}")
        out.append(f"paused = {'true' if s.paused else 'false'}")
    return "\n".join(out) + "\n"


# -- the I/O shell ----------------------------------------------------------------------------


class StateFiles:
    """Plan, apply and export over the hub's registry, through the cores of ``deploy``,
    ``undeploy``, ``rollout start`` and ``jobs``."""

    def __init__(
        self,
        registry: RegistryPort,
        deployments: Deployments,
        rollouts: RolloutManager,
        jobs: Jobs,
    ) -> None:
        self.registry = registry
        self.deployments = deployments
        self.rollouts = rollouts
        self.jobs = jobs

    def state(self) -> FleetState:
        rollouts = [Rollout.from_json(r["data"]) for r in self.registry.rollouts() if r["data"]]
        return FleetState(
            rows=self.registry.deployment_rows(),
            agents=self.registry.agents(),
            versions={(v.name, v.version): v for v in self.registry.all_versions()},
            rollouts=rollouts,
            jobs=self.registry.jobs(),
            revision=self.registry.revision(),
        )

    async def plan(self, text: str, *, prune: bool = False) -> Plan:
        doc, problems = parse(text)
        # The entries that parsed are checked against the hub too: every problem at once.
        result = check_and_plan(doc, self.state(), prune=prune)
        if problems:
            return Plan([], [], [*problems, *result.problems])
        actions = []
        for a in result.deployments:
            if a.action == UNDEPLOY:
                try:
                    dry = await self.deployments.undeploy(a.model, a.selector, dry_run=True)
                except ModelfleetError as exc:
                    result.problems.append(Problem("prune", 0, str(exc)))
                    continue
                a = replace(a, changes=[c for c in dry.changes if c.before != c.after])
            actions.append(a)
        return replace(result, deployments=actions)

    async def apply(self, text: str, *, prune: bool = False, actor: str = "") -> Plan:
        """Apply the plan, undeploys first, then the entries in file order, then jobs. A
        refused file changes nothing; a step that fails (the fleet changed meanwhile) stops
        the apply with an error saying what was done."""
        planned = await self.plan(text, prune=prune)
        if planned.problems or not planned.changes:
            return planned
        done: list[str] = []
        deployments: dict[int, DeploymentAction] = {}
        jobs: dict[int, JobAction] = {}
        order = sorted(
            enumerate(planned.deployments), key=lambda ia: (ia[1].action != UNDEPLOY, ia[0])
        )
        try:
            for i, a in order:
                if a.action == UNDEPLOY:
                    out = await self.deployments.undeploy(a.model, a.selector, actor=actor)
                    a = replace(a, revision=out.revision)
                elif a.action == DEPLOY:
                    out = await self.deployments.deploy(
                        a.model, a.version, a.selector, actor=actor, allow_empty=True
                    )
                    a = replace(a, revision=out.revision)
                elif a.action == ROLLOUT and a.spec is not None:
                    r = await self.rollouts.start(replace(a.spec, selector=dict(a.selector)))
                    a = replace(a, rollout_id=r.id)
                if a.action in CHANGING:
                    done.append(f"{a.action} {a.model} v{a.version} for {_where(a.selector)}")
                deployments[i] = a
            for i, j in enumerate(planned.jobs):
                if j.action == CREATE and j.spec is not None:
                    await self.jobs.create(j.spec, j.selector)
                elif j.action == UPDATE and j.spec is not None:
                    await self.jobs.put(j.spec, j.selector)
                elif j.action == DELETE:
                    await self.jobs.control(j.name, "delete")
                if j.action in CHANGING:
                    done.append(f"{j.action} job {j.name}")
                jobs[i] = j
        except ModelfleetError as exc:
            # Same error, so the same status and exit code, saying how far the apply got.
            exc.args = (f"apply stopped: {exc} (already applied: {'; '.join(done) or 'nothing'})",)
            raise
        return Plan(
            [deployments[i] for i in range(len(planned.deployments))],
            [jobs[i] for i in range(len(planned.jobs))],
            [],
            applied=True,
        )

    def export(self, hub: str = "") -> str:
        return export(self.state(), hub)
