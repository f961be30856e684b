"""The local model repository: ``DIR/<name>/<version>/`` directories, watched by polling.

Writers create a version under a temporary name and rename it into place, so a directory whose
name is a plain integer is complete. :func:`plan` is pure (what is on disk + what is loaded ->
actions) and :class:`RepositoryWatcher` applies it; a missed change is repaired on the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from modelfleet.agent.serving.routing import Comparison
from modelfleet.agent.slots import ModelStatus, SlotManager
from modelfleet.kernel.atomic import atomic_write_json
from modelfleet.kernel.bundle import BUNDLE_FILES, NAME_RE, OPTIONAL_BUNDLE_FILES
from modelfleet.kernel.errors import (
    InvalidRequestError,
    ModelfleetError,
    ModelNotFoundError,
    Status,
    did_you_mean,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionOnDisk:
    version: int
    path: Path
    # Changes whenever the directory is replaced, so a fixed bundle under the same number is
    # tried again while an unchanged failing one is not.
    fingerprint: tuple[int, int, int]


@dataclass(frozen=True)
class Deploy:
    name: str
    version: VersionOnDisk


@dataclass(frozen=True)
class Unload:
    name: str
    version: int | None  # None: the whole model


Action = Deploy | Unload


def scan(root: Path) -> dict[str, dict[int, VersionOnDisk]]:
    found: dict[str, dict[int, VersionOnDisk]] = {}
    try:
        model_dirs = list(os.scandir(root))
    except FileNotFoundError:
        return found
    for mdir in model_dirs:
        if not mdir.is_dir() or not NAME_RE.match(mdir.name):
            continue
        versions: dict[int, VersionOnDisk] = {}
        try:
            entries = list(os.scandir(mdir.path))
        except OSError:
            continue
        for vdir in entries:
            if not (vdir.name.isascii() and vdir.name.isdigit()) or not vdir.is_dir():
                continue
            try:
                st_dir = vdir.stat()
                stats = [os.stat(os.path.join(vdir.path, f)) for f in BUNDLE_FILES]
            except OSError:
                # Not complete (yet): a failing load would only be noise.
                continue
            for optional in OPTIONAL_BUNDLE_FILES:
                # Part of the fingerprint too: a version refused because its reference.json was
                # still being copied is tried again once the copy has finished.
                with contextlib.suppress(OSError):
                    stats.append(os.stat(os.path.join(vdir.path, optional)))
            version = int(vdir.name)
            # Covers every file, so a bundle copied in place non-atomically is tried again
            # once the copy has finished.
            fingerprint = (
                st_dir.st_ino,
                max(st.st_mtime_ns for st in stats),
                sum(st.st_size for st in stats),
            )
            versions[version] = VersionOnDisk(version, Path(vdir.path), fingerprint)
        if versions:
            found[mdir.name] = versions
    return found


def plan(
    on_disk: dict[str, dict[int, VersionOnDisk]],
    loaded: dict[str, ModelStatus],
    failed: dict[tuple[str, int], object],
) -> list[Action]:
    """Actions that bring the loaded models in line with the repository.

    Policy: serve the highest version that has not failed the gate with the same bytes; after a
    rollback, versions up to the one rolled back from stay put until a newer one appears.
    """
    actions: list[Action] = []
    for name in sorted(set(on_disk) | set(loaded)):
        versions = on_disk.get(name, {})
        status = loaded.get(name)
        if not versions:
            if status is not None:
                actions.append(Unload(name, None))
            continue
        active = status.active if status else None
        if status is not None:
            if status.previous is not None and status.previous not in versions:
                actions.append(Unload(name, status.previous))
            if active is not None and active not in versions:
                actions.append(Unload(name, active))
                active = status.previous if status.previous in versions else None
        good = [v for v, d in versions.items() if failed.get((name, v)) != d.fingerprint]
        hold = status.held_at_or_below if status else None
        eligible = [v for v in good if hold is None or v > hold] if active is not None else good
        if status is not None and status.loading is not None:
            continue
        if status is not None and status.comparison is not None and active is not None:
            continue  # a live comparison holds the active version (and its candidate) in place
        if eligible:
            target = max(eligible)
            if target != active:
                actions.append(Deploy(name, versions[target]))
    return actions


UNLOADED_FILE = "unloaded.json"
UNLOADED_WHY = (
    "it was unloaded through the model repository API; load it again with "
    "RepositoryModelLoad (POST /v2/repository/models/NAME/load)"
)


class UnloadedRecordError(ModelfleetError):
    status = Status.FAILED_PRECONDITION
    reason = "state_file"


class UnloadedRecord:
    """The models unloaded through model control, kept in ``DATA/unloaded.json`` so that they
    stay unloaded across restarts: ``{"unloaded": ["NAME", ...]}``, replaced atomically (a
    kill -9 leaves the old list or the new one) before an unload or load is answered."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[str]:
        """The recorded names; none when there is no file. A file that cannot be read as such
        a list stops the agent (UnloadedRecordError naming it): serving the models it held
        would undo unloads someone asked for, without anyone noticing."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._damaged(f"cannot be read: {exc}") from None
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._damaged(f"is not JSON ({exc})") from None
        names = doc.get("unloaded") if isinstance(doc, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise self._damaged('is not {"unloaded": ["NAME", ...]}')
        bad = [n for n in names if not NAME_RE.match(n)]
        if bad:
            raise self._damaged(f"holds names that are not model names: {bad[:3]}")
        return sorted(set(names))

    def write(self, names: list[str]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_json(self.path, {"unloaded": sorted(set(names))}, mode=0o600)

    def _damaged(self, what: str) -> UnloadedRecordError:
        return UnloadedRecordError(
            f"{self.path} {what}. It lists the models unloaded through model control, which "
            "stay unloaded across restarts, so the agent does not start without it: fix it "
            '(a JSON object {"unloaded": ["NAME", ...]}), or delete it to serve every model '
            "of the repository again (then unload again the ones that must not serve), or "
            "start without --model-control (model_control = false), which serves the "
            "repository whole"
        )


class RepositoryWatcher:
    def __init__(
        self,
        root: Path,
        slots: SlotManager,
        interval_s: float = 1.0,
        record: UnloadedRecord | None = None,
    ) -> None:
        self.root = Path(root)
        self.slots = slots
        self.interval_s = interval_s
        # Where unloads are kept across restarts (model control on); None: not kept.
        self.record = record
        # A sync and an explicit load or unload never interleave: a sync planned before an
        # unload would load the model straight back.
        self.lock = asyncio.Lock()

    async def sync_once(self) -> None:
        async with self.lock:
            on_disk = await asyncio.to_thread(scan, self.root)
            for name in self.slots.unloaded:
                on_disk.pop(name, None)
            await self._apply(on_disk, raise_errors=False)

    async def _apply(
        self, on_disk: dict[str, dict[int, VersionOnDisk]], *, raise_errors: bool
    ) -> None:
        loaded = {s.name: s for s in self.slots.status() if s.name in on_disk or not raise_errors}
        failed = {
            (name, v): fp
            for name, slot in self.slots.slots.items()
            for v, (fp, _) in slot.failed.items()
        }
        for action in plan(on_disk, loaded, failed):
            if isinstance(action, Unload):
                await self.slots.unload(action.name, action.version)
                continue
            try:
                await self.slots.deploy(
                    action.version.path,
                    action.version.fingerprint,
                    expect=(action.name, action.version.version),
                )
            except ModelfleetError:
                # A refusal is already logged, counted and recorded by the slot manager; the
                # active version keeps serving and this version is not retried until its bytes
                # change. An explicit load reports it to its caller.
                if raise_errors:
                    raise

    async def load(self, name: str) -> None:
        """Explicit load (model control): serve ``name`` from the repository again.

        The version is chosen as the watcher chooses it, and goes through the health gate;
        a refused version is tried again even if its bytes have not changed.
        """
        if not NAME_RE.match(name):
            raise InvalidRequestError(f"model name {name!r} is not valid", reason="model_name")
        async with self.lock:
            on_disk = await asyncio.to_thread(scan, self.root)
            if name not in on_disk:
                raise ModelNotFoundError(
                    f"no model {name!r} in the repository {self.root} (put a bundle at "
                    f"{self.root / name}/VERSION/ first){did_you_mean(name, on_disk)}"
                )
            if name in self.slots.unloaded:
                # Recorded first: should the load fail, the watcher may load it later anyway
                # (as before the unload), so the record must not keep it out after a restart.
                await self._record(sorted(set(self.slots.unloaded) - {name}), "load", name)
            self.slots.unloaded.pop(name, None)
            self.slots.forget_failures(name)
            await self._apply({name: on_disk[name]}, raise_errors=True)
            slot = self.slots.slots.get(name)
            if slot is None or slot.active is None:
                raise ModelNotFoundError(f"model {name!r} did not load (no usable version)")
            log.info("model %s loaded on request (version %d)", name, slot.active.version)

    async def unload(self, name: str) -> None:
        """Explicit unload: stop serving ``name`` until it is loaded again, also across
        restarts (kept in the record, written before the answer)."""
        async with self.lock:
            if name not in self.slots.slots and name not in self.slots.unloaded:
                raise ModelNotFoundError(
                    f"model {name!r} is not loaded here{did_you_mean(name, self.slots.slots)}"
                )
            await self._record(sorted({*self.slots.unloaded, name}), "unload", name)
            self.slots.unloaded[name] = UNLOADED_WHY
            await self.slots.unload(name)
            log.info("model %s unloaded on request", name)

    def restore(self, names: list[str]) -> None:
        """At start, before the first scan: the models a previous run unloaded stay so."""
        for name in names:
            self.slots.unloaded[name] = UNLOADED_WHY
            log.info(
                "model %s stays unloaded: it was unloaded through model control (recorded in "
                "%s); load it again with RepositoryModelLoad",
                name,
                self.record.path if self.record else "?",
            )

    async def _record(self, names: list[str], verb: str, name: str) -> None:
        if self.record is None:
            return
        try:
            # On a thread: the write ends in fsync, which must not stall inference on the loop.
            await asyncio.to_thread(self.record.write, names)
        except OSError as exc:
            raise UnloadedRecordError(
                f"cannot {verb} {name!r}: recording it in {self.record.path} failed ({exc}), "
                "so it would not last past a restart; nothing was changed. Check that the "
                "data directory (setting data) is writable and has space"
            ) from None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sync_once()
            except Exception:
                log.exception("repository sync failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)


class FleetOwnedError(ModelfleetError):
    status = Status.FAILED_PRECONDITION
    reason = "fleet_mode"


class ModelControlOffError(ModelfleetError):
    status = Status.FAILED_PRECONDITION
    reason = "model_control_off"


class ModelControl:
    """The protocol's explicit load and unload, for every transport.

    Standalone, through the repository watcher (and so the health gate); in fleet mode the hub
    decides what this agent serves, so both are refused and the hub is named.
    """

    def __init__(
        self,
        watcher: RepositoryWatcher | None = None,
        fleet_hub: str = "",
        *,
        enabled: bool = True,
    ) -> None:
        self.watcher = watcher
        self.fleet_hub = fleet_hub
        # The operator's opt-in (`model_control`); the fleet refusal below wins over it.
        self.enabled = enabled

    @property
    def available(self) -> bool:
        return self.enabled and self.watcher is not None and not self.fleet_hub

    def _watcher(self, verb: str, name: str) -> RepositoryWatcher:
        if not self.enabled and self.watcher is not None and not self.fleet_hub:
            raise ModelControlOffError(
                f"cannot {verb} {name!r}: model control is off on this agent; start it with "
                "`serve --model-control` (agent.toml: model_control = true) to let inference "
                "clients load and unload models, or manage the repository directory"
            )
        if self.watcher is None and not self.fleet_hub:
            raise FleetOwnedError(f"cannot {verb} {name!r}: this server has no model repository")
        if self.watcher is None or self.fleet_hub:
            raise FleetOwnedError(
                f"cannot {verb} {name!r}: this agent follows the hub at {self.fleet_hub}, which "
                "owns what it serves; deploy or remove models on the hub "
                "(`modelfleet-hub deploy MODEL VERSION`)"
            )
        return self.watcher

    async def load(self, name: str, parameters: dict[str, object]) -> None:
        watcher = self._watcher("load", name)
        if parameters:
            raise InvalidRequestError(
                f"load {name!r}: parameters {sorted(parameters)} are not supported; models load "
                f"only from signed bundles in {watcher.root}, as they are",
                reason="load_parameters",
            )
        await watcher.load(name)

    async def unload(self, name: str) -> None:
        await self._watcher("unload", name).unload(name)


async def compare_local(
    slots: SlotManager, root: Path, name: str, comparison: Comparison | None
) -> ModelStatus:
    """Standalone: compare a version from the repository with the active one (None: stop).

    The candidate is loaded and gated beside the active version (a refused one is an error
    here, and nothing changes); while the comparison is on, the repository watcher switches
    nothing for this model. Stopping leaves the candidate loaded as the previous version, and
    the watcher's usual policy (serve the highest version not held back) applies again.
    """
    slot = slots.slots.get(name)
    if slot is None or slot.active is None:
        raise ModelNotFoundError(
            f"model {name!r} is not serving on this agent: `modelfleet-agent status` lists what is"
        )
    if comparison is None:
        slots.set_comparison(name, None)
        return _status(slots, name)
    candidate = comparison.candidate
    if candidate == slot.active.version:
        raise InvalidRequestError(
            f"v{candidate} is the active version of {name!r}; compare another version from "
            f"{root / name} (to try the newest one, `modelfleet-agent rollback {name}` first, "
            "which keeps it from being switched to again)"
        )
    if slot.previous is None or slot.previous.version != candidate:
        on_disk = (await asyncio.to_thread(scan, root)).get(name, {}).get(candidate)
        if on_disk is None:
            raise ModelNotFoundError(
                f"{name!r} version {candidate} is not in the repository {root}: put its bundle "
                f"at {root / name / str(candidate)}/ first"
            )
        # Set before loading, so the watcher does not switch this model meanwhile; the shares
        # apply only once the candidate has passed its gate.
        previous = slot.comparison
        slots.set_comparison(name, comparison)
        try:
            await slots.deploy(
                on_disk.path, on_disk.fingerprint, expect=(name, candidate), switch=False
            )
        except ModelfleetError:
            slots.set_comparison(name, previous)
            raise
    slots.set_comparison(name, comparison)
    return _status(slots, name)


def _status(slots: SlotManager, name: str) -> ModelStatus:
    return next(s for s in slots.status() if s.name == name)
