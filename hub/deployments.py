"""Deployments: the fleet's desired state as operators see and change it.

A deployment is "version V of model M for the agents whose labels match selector S" (no
selector: the whole fleet, agents enrolled later included). Per model and agent, the newest
matching deployment decides the desired version (:func:`hub.registry.decide`). Rollouts add
rows of their own: per-agent assignments while their waves run (and when they roll back), and,
once done, a deployment of their selector, so that agents enrolled afterwards get the version
too.

This module answers, for the admin API: which deployment decides what for whom
(``deployments ls|show``, ``agents ls``), what a ``deploy`` or an ``undeploy`` changes on
which agent (also as a dry run, which writes nothing), and which version the fleet desires
(the rule of the ``production`` stage). The functions take the deployments log, the agents and
the retired versions as data; :class:`Deployments` reads them from the registry and writes.
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modelfleet.hub.registry import (
    AGENT_KEY,
    AgentRow,
    DeploymentRow,
    FailedPreconditionError,
    check_labels,
    check_version,
    decide,
    selector_matches,
)
from modelfleet.kernel.errors import InvalidRequestError, ModelNotFoundError

if TYPE_CHECKING:
    from modelfleet.hub.ports import RegistryPort
    from modelfleet.hub.rollouts import Rollout

log = logging.getLogger(__name__)

Retired = Collection[tuple[str, int]]


def selector_text(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(whole fleet)"


def _key(selector: Mapping[str, str]) -> str:
    return json.dumps(dict(selector), sort_keys=True)


def _match(agent: AgentRow) -> dict[str, str]:
    return {**agent.labels, AGENT_KEY: agent.agent_id}


def _active_version(agent: AgentRow, model: str) -> int:
    for m in agent.report.models:
        if m.name == model:
            return m.active_version
    return 0


def _names(agents: Sequence[AgentRow], limit: int = 5) -> str:
    names = sorted(a.hostname or a.agent_id for a in agents)
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


@dataclass(frozen=True)
class DesiredChange:
    """One agent's desired version of a model before and after a change (0: not desired)."""

    agent_id: str
    hostname: str
    before: int
    after: int
    active: int  # what the agent last reported serving (0: nothing)
    decided_by: DeploymentRow | None  # what decides afterwards; None: nothing (model dropped)


@dataclass(frozen=True)
class DeploymentView:
    """A deployment in force, or the per-agent assignments of one rollout and version."""

    row: DeploymentRow  # per-agent: the newest row of the group
    agents: tuple[str, ...]  # active agents its selector matches now (per-agent: assigned)
    deciding: tuple[str, ...]  # of those, the agents whose desired version it decides
    per_agent: bool = False


@dataclass(frozen=True)
class RolloutView:
    """A rollout in progress, as it bears on desired state."""

    id: int
    model: str
    version: int
    state: str
    selector: dict[str, str]
    wave: int
    waves: int
    assigned: int
    agents: int
    from_versions: tuple[int, ...]
    # What an agent enrolled now with exactly the selector's labels gets: a rollout's agents
    # are chosen when it starts, new ones follow the deployments until it completes.
    new_agents: DeploymentRow | None


@dataclass(frozen=True)
class AgentDesired:
    agent_id: str
    hostname: str
    desired: int
    active: int
    decided_by: DeploymentRow | None


@dataclass(frozen=True)
class DeploymentDetail:
    view: DeploymentView
    agents: list[AgentDesired]
    history: list[DeploymentRow]  # every row of this model and selector, newest first
    rollouts: list[RolloutView]


@dataclass(frozen=True)
class DeployOutcome:
    matched: list[str]  # active agents the selector matches now
    changes: list[DesiredChange]
    revision: int  # 0: a dry run, nothing written
    notes: list[str] = field(default_factory=list)
    removed: list[DeploymentRow] = field(default_factory=list)  # undeploy


def current(rows: Sequence[DeploymentRow], retired: Retired) -> list[DeploymentRow]:
    """Per model and selector, the fleet deployment in force: its newest row that does not
    name a retired version (older rows are its history)."""
    out: dict[tuple[str, str], DeploymentRow] = {}
    for row in rows:
        # Preparations (blue/green, experiments) load a version beside the deployed one: they
        # are not what a selector is deployed to.
        if row.agent_id or row.kind == "prepare" or (row.name, row.version) in retired:
            continue
        out[(row.name, _key(row.selector))] = row
    return sorted(out.values(), key=lambda r: (r.name, r.id))


def plan(
    model: str,
    before: Sequence[DeploymentRow],
    after: Sequence[DeploymentRow],
    agents: Sequence[AgentRow],
    retired: Retired,
) -> list[DesiredChange]:
    """The active agents whose deciding deployment of ``model`` differs between two logs."""
    out = []
    for a in agents:
        if a.status != "active":
            continue
        was = decide(before, _match(a), retired)[0].get(model)
        now = decide(after, _match(a), retired)[0].get(model)
        if (was.id if was else 0) == (now.id if now else 0):
            continue
        out.append(
            DesiredChange(
                a.agent_id,
                a.hostname,
                was.version if was else 0,
                now.version if now else 0,
                _active_version(a, model),
                now,
            )
        )
    return out


def views(
    rows: Sequence[DeploymentRow], agents: Sequence[AgentRow], retired: Retired, model: str = ""
) -> list[DeploymentView]:
    active = [a for a in agents if a.status == "active"]
    decided = {a.agent_id: decide(rows, _match(a), retired)[0] for a in active}
    out = []
    for row in current(rows, retired):
        if model and row.name != model:
            continue
        matched = tuple(a.agent_id for a in active if selector_matches(row.selector, a.labels))
        deciding = tuple(
            x for x in matched if (d := decided[x].get(row.name)) is not None and d.id == row.id
        )
        out.append(DeploymentView(row, matched, deciding))
    # Per-agent assignments matter only where they decide: grouped per rollout and version.
    groups: dict[tuple[str, int, int], list[tuple[str, DeploymentRow]]] = {}
    for agent_id, by_model in decided.items():
        for name, row in by_model.items():
            if row.agent_id and (not model or name == model):
                groups.setdefault((name, row.rollout_id, row.version), []).append((agent_id, row))
    for items in groups.values():
        ids = tuple(sorted(a for a, _ in items))
        newest = max((r for _, r in items), key=lambda r: r.id)
        out.append(DeploymentView(newest, ids, ids, per_agent=True))
    out.sort(key=lambda v: (v.row.name, v.row.id))
    return out


def rollout_views(
    rollouts: Sequence[Rollout], rows: Sequence[DeploymentRow], retired: Retired
) -> list[RolloutView]:
    out = []
    for r in rollouts:
        new = decide(rows, dict(r.spec.selector), retired)[0].get(r.spec.model)
        out.append(
            RolloutView(
                id=r.id,
                model=r.spec.model,
                version=r.spec.version,
                state=r.state,
                selector=dict(r.spec.selector),
                wave=r.wave + 1,
                waves=len(r.sizes),
                assigned=len(r.assigned),
                agents=len(r.agents),
                from_versions=tuple(sorted(set(r.previous.values()) - {0})),
                new_agents=new if new is not None and new.version else None,
            )
        )
    return out


def no_match_message(selector: Mapping[str, str], active: Sequence[AgentRow]) -> str:
    """Why a selector matches no active agent, naming the labels agents do have."""
    have: dict[str, set[str]] = {}
    for a in active:
        for k in selector:
            if k in a.labels:
                have.setdefault(k, set()).add(a.labels[k])
    hints = []
    for k, v in selector.items():
        if k not in have:
            hints.append(f"no active agent has a label {k!r}")
        elif v not in have[k]:
            values = sorted(have[k])
            close = difflib.get_close_matches(v, values, 1)
            shown = ", ".join(f"{k}={x}" for x in values[:10]) + (
                " ..." if len(values) > 10 else ""
            )
            hint = f"agents have {shown}"
            if close:
                hint += f" (did you mean {k}={close[0]}?)"
            hints.append(hint)
    if not hints:
        hints.append("no active agent has all of these labels at once")
    return (
        f"selector {selector_text(selector)} matches no active agent: {'; '.join(hints)}. A "
        "deployment also applies to agents enrolled later, so a typo would stay unnoticed: "
        "check the selector, or pass --allow-empty to deploy for agents yet to enroll"
    )


class Deployments:
    """Desired state for operators: list, show, deploy, undeploy, and the production rule."""

    def __init__(
        self,
        registry: RegistryPort,
        notify: Callable[[], Awaitable[None]],
        rollouts: Callable[[], list[Rollout]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.notify = notify
        self.rollouts = rollouts
        self.clock = clock

    def _state(self) -> tuple[list[DeploymentRow], list[AgentRow], set[tuple[str, int]]]:
        return (
            self.registry.deployment_rows(),
            self.registry.agents(),
            self.registry.retired_versions(),
        )

    def _check_model(self, model: str) -> None:
        if model:
            self.registry.versions(model)  # an unknown model: ModelNotFoundError

    def active_rollouts(self, model: str = "") -> list[RolloutView]:
        rows, _, retired = self._state()
        active = [r for r in self.rollouts() if not model or r.spec.model == model]
        return rollout_views(active, rows, retired)

    def ls(self, model: str = "") -> tuple[list[DeploymentView], list[RolloutView]]:
        self._check_model(model)
        rows, agents, retired = self._state()
        return views(rows, agents, retired, model), self.active_rollouts(model)

    def _not_found(
        self, model: str, selector: Mapping[str, str], rows: Sequence[DeploymentRow]
    ) -> ModelNotFoundError:
        have = [r for r in current(rows, self.registry.retired_versions()) if r.name == model]
        listed = ", ".join(f"{selector_text(r.selector)} v{r.version}" for r in have)
        return ModelNotFoundError(
            f"{model} has no deployment for {selector_text(selector)}"
            + (f"; its deployments: {listed}" if listed else "; it has no deployment at all")
            + " (see `modelfleet-hub deployments ls`)"
        )

    def show(self, model: str, selector: Mapping[str, str]) -> DeploymentDetail:
        self._check_model(model)
        rows, agents, retired = self._state()
        key = _key(selector)
        found = [
            v
            for v in views(rows, agents, retired, model)
            if not v.per_agent and _key(v.row.selector) == key
        ]
        if not found:
            raise self._not_found(model, selector, rows)
        history = [
            r
            for r in self.registry.deployment_rows(include_removed=True)
            if r.name == model and not r.agent_id and _key(r.selector) == key
        ]
        detail = []
        for a in agents:
            if a.status != "active" or not selector_matches(selector, a.labels):
                continue
            row = decide(rows, _match(a), retired)[0].get(model)
            detail.append(
                AgentDesired(
                    a.agent_id,
                    a.hostname,
                    row.version if row else 0,
                    _active_version(a, model),
                    row,
                )
            )
        return DeploymentDetail(
            found[0],
            detail,
            history[::-1],
            rollout_views([r for r in self.rollouts() if r.spec.model == model], rows, retired),
        )

    def _rollout_notes(self, model: str) -> list[str]:
        return [
            f"rollout {r.id} of {model} (v{r.spec.version}, {r.state}) is in progress: its next "
            "waves, a rollback and its completion assign versions to its agents again"
            for r in self.rollouts()
            if r.spec.model == model
        ]

    async def deploy(
        self,
        name: str,
        version: int,
        selector: Mapping[str, str],
        *,
        actor: str = "",
        dry_run: bool = False,
        allow_empty: bool = False,
    ) -> DeployOutcome:
        check_version(version, name)
        check_labels(selector, "selector")
        if AGENT_KEY in selector:
            raise InvalidRequestError(f"selector key {AGENT_KEY!r} is reserved for rollouts")
        self.registry.check_deployable(name, version)
        rows, agents, retired = self._state()
        active = [a for a in agents if a.status == "active"]
        matched = [a.agent_id for a in active if selector_matches(selector, a.labels)]
        if selector and not matched and not allow_empty:
            raise InvalidRequestError(no_match_message(selector, active))
        notes = self._rollout_notes(name)
        if dry_run:
            planned = DeploymentRow(
                id=self.registry.revision() + 1,
                name=name,
                version=version,
                selector=dict(selector),
                created_at=self.clock(),
                actor=actor,
            )
            changes = plan(name, rows, [*rows, planned], agents, retired)
            return DeployOutcome(matched, changes, 0, notes)
        revision = self.registry.deploy(name, version, selector, actor=actor)
        changes = plan(name, rows, self.registry.deployment_rows(), agents, retired)
        log.info(
            "deploy %s v%d to %s by %s: %d agent(s) match, %d change",
            name,
            version,
            selector_text(selector),
            actor or "?",
            len(matched),
            sum(c.before != c.after for c in changes),
        )
        await self.notify()
        return DeployOutcome(matched, changes, revision, notes)

    async def undeploy(
        self, name: str, selector: Mapping[str, str], *, actor: str = "", dry_run: bool = False
    ) -> DeployOutcome:
        """Remove the deployment of ``name`` for exactly ``selector``, with its history and the
        per-agent assignments finished rollouts left on the agents it matches; those agents
        fall back to whatever other deployment matches them, or drop the model."""
        check_labels(selector, "selector")
        self._check_model(name)
        rows, agents, retired = self._state()
        key = _key(selector)
        # An experiment's preparation ends with `experiment stop|promote`, not here.
        fleet = [
            r
            for r in rows
            if r.name == name and not r.agent_id and r.kind != "prepare" and _key(r.selector) == key
        ]
        if not fleet:
            raise self._not_found(name, selector, rows)
        for r in self.rollouts():
            if r.spec.model == name:
                raise FailedPreconditionError(
                    f"rollout {r.id} of {name} is in progress ({r.state}): it assigns versions "
                    "and, once done, deploys its selector, which would undo this. Abort it "
                    f"(`modelfleet-hub rollout abort {name}`) or let it finish, then undeploy"
                )
        active = [a for a in agents if a.status == "active"]
        matched = [a.agent_id for a in active if selector_matches(selector, a.labels)]
        everyone = {a.agent_id for a in agents if selector_matches(selector, a.labels)}
        # Without these, an agent a finished rollout assigned a version one by one would keep
        # it after the deployment that superseded the assignment is gone.
        assigned = [r for r in rows if r.name == name and r.agent_id in everyone]
        removed = fleet + assigned
        ids = {r.id for r in removed}
        after = [r for r in rows if r.id not in ids]
        changes = plan(name, rows, after, agents, retired)
        if dry_run:
            return DeployOutcome(matched, changes, 0, removed=removed)
        revision = self.registry.remove_deployments(ids, actor)
        log.info(
            "undeploy %s for %s by %s: %d row(s) removed, %d agent(s) change",
            name,
            selector_text(selector),
            actor or "?",
            len(ids),
            len(changes),
        )
        await self.notify()
        return DeployOutcome(matched, changes, revision, removed=removed)

    # -- the production stage ----------------------------------------------------------------
    #
    # Rule (docs/cli.md#models): production is the version the fleet desires. `models stage M V
    # production` is refused while any active agent desires another version of M (--force marks
    # it anyway); a rollout that completes marks its version production, and the versions it
    # replaced (and the production one before) deprecated, when afterwards every active agent
    # that desires M desires that version. Otherwise the stages stay, and the rollout says why.

    def fleet_versions(self, model: str) -> dict[int, list[AgentRow]]:
        """Version -> the active agents whose desired version of ``model`` it is."""
        rows, agents, retired = self._state()
        out: dict[int, list[AgentRow]] = {}
        for a in agents:
            if a.status != "active":
                continue
            row = decide(rows, _match(a), retired)[0].get(model)
            if row is not None and row.version:
                out.setdefault(row.version, []).append(a)
        return out

    def _others(self, model: str, version: int) -> str:
        others = {v: a for v, a in self.fleet_versions(model).items() if v != version}
        return "; ".join(
            f"v{v} on {len(a)} agent(s) ({_names(a)})" for v, a in sorted(others.items())
        )

    def check_production(self, model: str, version: int) -> None:
        others = self._others(model, version)
        if others:
            raise FailedPreconditionError(
                f"refusing to mark {model} v{version} production: production is the version "
                f"the fleet desires, and active agents desire {others}. Deploy or roll out "
                f"v{version} to them first (a completed rollout marks it production by "
                "itself), or pass --force to mark it anyway"
            )

    def promote_completed(self, model: str, version: int, replaced: Collection[int]) -> str:
        """Stages after a completed rollout (the rule above); returns what happened, in words."""
        others = self._others(model, version)
        if others:
            return (
                f"v{version} not marked production: active agents outside the rollout desire "
                f"{others} (production is the version the whole fleet desires)"
            )
        deprecated = self.registry.promote(model, version, set(replaced) - {0, version})
        shown = ", ".join(f"v{v}" for v in deprecated)
        return f"v{version} is now production" + (f"; {shown} deprecated" if shown else "")
