"""Fleet mode: follow the hub's desired state, fetch and verify bundles, feed the slot manager.

Level-triggered: every desired state received (and every periodic resync) is compared in full
with what is loaded, so a missed event is repaired by the next one. The last desired state is
kept on disk, so an agent restarted while the hub is down serves its cached, verified bundles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modelfleet.agent import __version__
from modelfleet.agent.config import ServeConfig
from modelfleet.agent.fleet import renew as renewal
from modelfleet.agent.fleet.backoff import Backoff
from modelfleet.agent.fleet.cache import BundleCache
from modelfleet.agent.fleet.capture_ship import CaptureShipper
from modelfleet.agent.fleet.controlplane import (
    AgentReport,
    ControlPlane,
    DesiredModel,
    DesiredState,
    ModelReport,
)
from modelfleet.agent.fleet.enroll import TUF_DIR
from modelfleet.agent.fleet.outbox import OUTBOX_FILE, Outbox, TelemetryShipper, open_journal
from modelfleet.agent.fleet.transport import IDENTITY_DIR
from modelfleet.agent.fleet.verify import BundleVerifier
from modelfleet.agent.gate import GateResult
from modelfleet.agent.jobs import JobRunner
from modelfleet.agent.serving.capture import Capture, CaptureRule
from modelfleet.agent.serving.routing import BASIS_POINTS, Comparison
from modelfleet.agent.slots import SlotManager
from modelfleet.agent.telemetry import JOURNAL_FILE, JOURNAL_SLOTS
from modelfleet.kernel.atomic import atomic_write_json
from modelfleet.kernel.errors import (
    BundleError,
    InvalidRequestError,
    ModelfleetError,
    ResourceExhaustedError,
    Status,
)
from modelfleet.kernel.jobs import JobRun, JobSpec

log = logging.getLogger(__name__)

SERVED_FILE = "served.json"
# Deaths of the agent while one version was being loaded and gated before it is refused.
MAX_GATE_CRASHES = 3


def error_reason(exc: BaseException) -> str:
    """The reason reported beside an error's text (ModelReport.error_reason)."""
    if isinstance(exc, ModelfleetError):
        return exc.reason
    if isinstance(exc, ConnectionError | TimeoutError):
        return "unreachable"
    return "os"


class CacheDamagedError(ModelfleetError):
    """A cached bundle is missing or no longer matches its manifest; the hub must resend it."""

    status = Status.UNAVAILABLE
    reason = "cache_damaged"


# Shortest wait between two renewals when a new certificate is due at once (misconfiguration).
MIN_RENEW_GAP_S = 60.0


class FleetSync:
    """Reconciles the hub's desired state with the slots, through one :class:`ControlPlane`.

    How the hub is reached is the control plane's business: nothing here asks
    (``connect_control_plane`` in agent/app.py chooses the adapter).
    """

    def __init__(
        self,
        cfg: ServeConfig,
        slots: SlotManager,
        inference_address: str,
        control: ControlPlane,
        capture: Capture | None = None,
    ) -> None:
        self.cfg = cfg
        self.control = control
        self.slots = slots
        self.inference_address = inference_address
        self.data = Path(cfg.data)
        self.cache = BundleCache(self.data / "cache", cfg.cache_max_bytes)
        # Batch threads are capped so a job never starves online serving.
        self.jobs = JobRunner(
            slots,
            self._report_job_run,
            threads=cfg.batch_threads,
            private=(self.data, cfg.capture_path()),
        )
        self.state_file = self.data / "desired.json"
        self.desired: list[DesiredModel] = self._load_desired()
        # What each model last served (it passed its gate) and what the gate refused, so that
        # a restart serves the last good version first and does not retry a refused one.
        self.served_file = self.data / SERVED_FILE
        self.last_good: dict[str, int] = {}
        self._gate_crashes: dict[tuple[str, int], int] = {}
        self._load_served(slots)
        self.revision = 0
        self.errors: dict[str, str] = {}
        # Per model, why (a machine-readable reason beside the words): see error_reason().
        self.error_reasons: dict[str, str] = {}
        self.last_error = ""
        self.wakeup = asyncio.Event()
        self.report_now = asyncio.Event()
        self.ident = self.data / IDENTITY_DIR
        self.cert_expires_at = renewal.current_certificate(
            self.ident
        ).not_valid_after_utc.timestamp()
        self.renew_error = ""
        # Set between a renewal written to disk and the connections that use it: retried.
        self._identity_stale = False
        self.verifier = BundleVerifier(
            self.data / TUF_DIR,
            self.cache.bundles,
            control,
            partial_dir=self.cache.partial,
            reserve_bytes=cfg.disk_reserve_bytes,
        )
        slots.listeners.append(lambda _name: self.report_now.set())
        slots.listeners.append(self._on_slot_change)
        # Telemetry (docs/telemetry.md): through the outbox, over the control plane.
        outbox = Outbox(self.data / OUTBOX_FILE, cfg.telemetry_outbox_max_reports)
        # From here on every count is in the crash-safe journal (docs/telemetry.md).
        # Serving workers count in slots of their own: room for each process's versions.
        journal = open_journal(
            self.data / JOURNAL_FILE, outbox, JOURNAL_SLOTS * max(1, cfg.serving_workers)
        )
        slots.metrics.telemetry.attach(journal)
        self.telemetry = TelemetryShipper(
            slots.metrics.telemetry,
            outbox,
            control.send_telemetry,
            interval_s=cfg.telemetry_interval_s,
            serving=self._serving_versions,
            backoff_max_s=cfg.backoff_max_s,
        )
        control.set_late_ack_handler(self.telemetry.ack_late)
        # Inference capture: the rules come with the desired state (the saved one first, so a
        # restart without the hub keeps capturing); files go back over the control plane.
        self.capture = capture
        self.capture_shipper = (
            CaptureShipper(capture, control, cfg.capture_ship_interval_s, cfg.backoff_max_s)
            if capture is not None
            else None
        )
        self._apply_capture()

    # -- state on disk --------------------------------------------------------------------------

    def _load_desired(self) -> list[DesiredModel]:
        self.job_specs: list[JobSpec] = []
        try:
            raw = json.loads(self.state_file.read_text())
            self.job_specs = [JobSpec.from_record(j) for j in raw.get("jobs", [])]
            return [DesiredModel(**d) for d in raw["models"]]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", self.state_file, exc)
            return []

    def _save_desired(self) -> None:
        atomic_write_json(
            self.state_file,
            {
                "models": [asdict(d) for d in self.desired],
                "jobs": [asdict(j) for j in self.job_specs],
            },
            mode=0o600,
        )

    def _load_served(self, slots: SlotManager) -> None:
        try:
            raw = json.loads(self.served_file.read_text())
            self.last_good = {str(k): int(v) for k, v in raw.get("last_good", {}).items()}
            desired = {d.name for d in self.desired}
            for name, refused in raw.get("refused", {}).items():
                if name not in desired:
                    continue  # no longer wanted: nothing to remember it against
                for version, r in refused.items():
                    result = GateResult(
                        int(version),
                        False,
                        str(r["reason"]),
                        str(r["kind"]),
                        None,
                        float(r.get("at", 0.0)),
                    )
                    slots.remember_failure(str(name), int(version), r.get("fingerprint"), result)
            # A gate that was running when the agent died: count it, and after
            # MAX_GATE_CRASHES refuse the version (it takes the process down: OOM, a crash in
            # onnxruntime), instead of crash-looping on every start.
            for name, (version, crashes) in raw.get("gating", {}).items():
                name, version, crashes = str(name), int(version), int(crashes)
                if name not in desired:
                    continue
                self._gate_crashes[name, version] = crashes
                if crashes >= MAX_GATE_CRASHES:
                    sha = next(
                        (d.sha256 for d in self.desired if d.name == name and d.version == version),
                        None,
                    )
                    reason = (
                        f"the agent died {crashes} times while loading and gating this "
                        "version (out of memory? a crash in onnxruntime?); see the system "
                        "log"
                    )
                    log.error("%s v%d: %s; not retried", name, version, reason)
                    slots.remember_failure(
                        name,
                        version,
                        sha,
                        GateResult(version, False, reason, "crash", None, time.time()),
                    )
        except FileNotFoundError:
            return
        except Exception as exc:  # any damage (bad JSON, wrong types, huge numbers)
            # Written atomically, so this is damage: start without it (the hub's desired state
            # still decides), and say so.
            log.warning("ignoring unreadable %s: %s", self.served_file, exc)
            self.last_good = {}

    def _served_state(self) -> dict[str, Any]:
        refused: dict[str, dict[str, Any]] = {}
        for name, slot in self.slots.slots.items():
            for version, (fingerprint, r) in slot.failed.items():
                if isinstance(fingerprint, str | None):
                    refused.setdefault(name, {})[str(version)] = {
                        "fingerprint": fingerprint,
                        "reason": r.reason,
                        "kind": r.kind,
                        "at": r.at,
                    }
        # Written before a load starts, cleared when it ends either way: present at start-up
        # means the process died while gating (counted per version).
        gating = {
            name: [slot.loading, self._gate_crashes.get((name, slot.loading), 0) + 1]
            for name, slot in self.slots.slots.items()
            if slot.loading is not None
        }
        state: dict[str, Any] = {
            "last_good": dict(sorted(self.last_good.items())),
            "refused": refused,
        }
        if gating:
            state["gating"] = gating
        return state

    def _on_slot_change(self, name: str) -> None:
        slot = self.slots.slots.get(name)
        if slot is not None and slot.active is not None:
            self.last_good[name] = slot.active.version
        if slot is not None and slot.loading is None:
            # This load ended without taking the process down: its crash count is history.
            for key in [k for k in self._gate_crashes if k[0] == name]:
                if slot.last_gate is not None and slot.last_gate.version == key[1]:
                    del self._gate_crashes[key]
        state = self._served_state()
        if state != getattr(self, "_served_written", None):
            atomic_write_json(self.served_file, state, mode=0o600)
            self._served_written = state

    # -- reconciling ----------------------------------------------------------------------------

    async def restore(self) -> None:
        """Before the hub answers: serve the last good version of each model, then reconcile.

        The last version that passed its gate serves first (never a candidate that was being
        swapped in when the agent died); the desired version is then gated beside it from the
        cache, unless the gate already refused those exact bytes before the restart.
        """
        if not self.desired:
            return
        log.info("restoring %d model(s) from the local cache", len(self.desired))
        for d in self.desired:
            good = self.last_good.get(d.name)
            if good is None:
                continue  # nothing has passed here yet: reconcile gates the desired version
            # A damaged last-good copy: the newest other cached version serves meanwhile.
            others = sorted(
                (
                    v
                    for n, v, _ in self.cache.entries()
                    if n == d.name and v not in (good, d.version)
                ),
                reverse=True,
            )
            order = [good, *others]
            for version in order:
                if self.slots.has_failed(d.name, version, None) or not self.cache.has(
                    d.name, version
                ):
                    continue
                try:
                    await self._deploy(d.name, version, None, offline=True)
                    break
                except (ModelfleetError, OSError) as exc:
                    log.warning("cannot restore %s v%d: %s", d.name, version, exc)
        await self.reconcile(offline=True)

    async def _deploy(
        self,
        name: str,
        version: int,
        fingerprint: object,
        *,
        offline: bool,
        size: int = 0,
        switch: bool = True,
    ) -> None:
        """Fetch if missing, then load, gate and switch; a damaged cached copy is quarantined.

        A cached bundle whose files no longer match its manifest (bit rot, a bad disk, an
        edit) is moved aside and fetched again from the hub, verified, once per run; offline,
        the error says it waits for the hub. What serves keeps serving throughout.
        """
        for attempt in (1, 2):
            if not self.cache.has(name, version):
                if offline:
                    raise CacheDamagedError(
                        f"{name} v{version} is not in the cache; waiting for the hub to fetch it"
                    )
                await asyncio.to_thread(self._fetch, DesiredModel(name, version, size=size))
            try:
                await self.slots.deploy(
                    self.cache.path(name, version),
                    fingerprint,
                    expect=(name, version),
                    switch=switch,
                )
                return
            except BundleError as exc:
                # The bytes were verified when they arrived (and by the hub at publish), so a
                # mismatch now is damage on this disk, not the bundle's fault: not a refusal.
                self.slots.forget_failures(name, version)
                where = await asyncio.to_thread(self.cache.quarantine, name, version)
                log.error(
                    "cached %s v%d is damaged (%s); moved to %s and fetching it again from the hub",
                    name,
                    version,
                    exc,
                    where,
                )
                if offline or attempt == 2:
                    raise CacheDamagedError(
                        f"cached {name} v{version} is damaged ({exc}); quarantined to {where}; "
                        + (
                            "it is fetched again when the hub answers"
                            if offline
                            else "a fresh copy was damaged too: check this node's disk; retrying"
                        )
                    ) from None

    async def reconcile(self, *, offline: bool = False) -> None:
        desired = list(self.desired)
        for d in desired:
            slot = self.slots.slots.get(d.name)
            if slot is not None and slot.active is not None and slot.active.version == d.version:
                self.errors.pop(d.name, None)
                if d.prepare_version and d.prepare_version != d.version and not offline:
                    await self._prepare(d)
                continue
            if self.slots.has_failed(d.name, d.version, d.sha256):
                refused = slot.failed[d.version][1] if slot is not None else None
                serving = slot.active.version if slot and slot.active else None
                self.error_reasons[d.name] = "gate"
                self.errors[d.name] = (
                    f"v{d.version} was refused by the health gate"
                    f"{f' ({refused.reason})' if refused else ''}; not retried until the desired "
                    f"version changes; serving {f'v{serving}' if serving else 'nothing'}"
                )
                if serving is None:
                    await self._serve_best_cached(d)
                continue  # the gate refused these exact bytes; a new version will come
            try:
                if offline and not self.cache.has(d.name, d.version):
                    if slot is None or slot.active is None:
                        await self._serve_best_cached(d)
                    continue
                await self._deploy(d.name, d.version, d.sha256, offline=offline, size=d.size)
                self.errors.pop(d.name, None)
                if d.prepare_version and d.prepare_version != d.version and not offline:
                    # In the same pass: a state that brings both (a new agent joining a
                    # comparison) must not wait for the next resync to load the candidate.
                    await self._prepare(d)
            except (ModelfleetError, OSError) as exc:
                self.errors[d.name] = str(exc)
                self.error_reasons[d.name] = error_reason(exc)
                self.last_error = f"{d.name} v{d.version}: {exc}"
                log.warning("cannot deploy %s v%d: %s", d.name, d.version, exc)
                slot = self.slots.slots.get(d.name)
                if slot is None or slot.active is None:
                    # Nothing serves this model (a first start, a lost served.json): the newest
                    # cached version that passes its gate serves until the desired one can.
                    await self._serve_best_cached(d)
        # Slots made by this pass (a first deploy) get their comparison now.
        self._apply_comparisons()
        if not self.errors and self.last_error and not self.last_error.startswith("hub:"):
            self.last_error = ""  # recovered: an old error must not linger in `agents ls`
        if offline:
            # Nothing is removed before the hub has spoken: the cache is all we may serve.
            self.report_now.set()
            return
        wanted = {d.name for d in desired}
        for name in list(self.slots.slots):
            if name not in wanted:
                await self.slots.unload(name)
        keep = {(d.name, d.version) for d in desired}
        keep |= {(d.name, d.prepare_version) for d in desired if d.prepare_version}
        # The last good version stays until something newer serves (then that is last good).
        keep |= {(name, v) for name, v in self.last_good.items() if name in wanted}
        for slot in self.slots.slots.values():
            keep.update((slot.name, v.version) for v in slot.loaded())
        await asyncio.to_thread(self.cache.collect, keep)
        await asyncio.to_thread(self.cache.collect_partials, {d.sha256 for d in desired})
        self.report_now.set()

    async def _prepare(self, d: DesiredModel) -> None:
        """Blue/green: fetch, verify, load and gate the next version; keep serving this one."""
        slot = self.slots.slots.get(d.name)
        if slot is not None and any(v.version == d.prepare_version for v in slot.loaded()):
            return
        if self.slots.has_failed(d.name, d.prepare_version, None):
            return
        try:
            await self._deploy(
                d.name, d.prepare_version, None, offline=False, size=d.prepare_size, switch=False
            )
        except (ModelfleetError, OSError) as exc:
            self.errors[d.name] = str(exc)
            self.error_reasons[d.name] = error_reason(exc)
            log.warning("cannot prepare %s v%d: %s", d.name, d.prepare_version, exc)

    async def _serve_best_cached(self, d: DesiredModel) -> None:
        """Hub down, desired version not here yet: serve the newest cached version that loads."""
        cached = sorted((v for name, v, _ in self.cache.entries() if name == d.name), reverse=True)
        for best in cached:
            slot = self.slots.slots.get(d.name)
            if best == d.version or (slot is not None and best in slot.failed):
                continue
            log.warning(
                "%s v%d cannot serve yet; serving cached v%d meanwhile", d.name, d.version, best
            )
            try:
                await self._deploy(d.name, best, None, offline=True)
                return
            except (ModelfleetError, OSError) as exc:
                log.warning("cannot serve cached %s v%d: %s", d.name, best, exc)
        log.warning(
            "%s v%d cannot serve yet and no other cached version can; waiting for the hub",
            d.name,
            d.version,
        )

    def _fetch(self, d: DesiredModel) -> None:
        """Download, verify and unpack (one pass, see agent/fleet/verify.py) into the cache."""
        need = d.size + self.cfg.disk_reserve_bytes
        free = shutil.disk_usage(self.cache.root).free
        if d.size and free < need:
            raise ResourceExhaustedError(
                f"not enough disk space for {d.name} v{d.version}: need {need / 1e6:.1f} MB "
                f"(bundle and reserve), {free / 1e6:.1f} MB free"
            )
        self.verifier.fetch_bundle(d.name, d.version)
        log.info("fetched and verified %s v%d", d.name, d.version)

    async def reconcile_loop(self, stop: asyncio.Event) -> None:
        retry = Backoff(base=2.0, cap=self.cfg.backoff_max_s)
        while not stop.is_set():
            # Cleared before the pass reads the desired state, not after it: a state that
            # arrives while the pass fetches or gates sets it again and gets a pass of its own.
            self.wakeup.clear()
            await self.reconcile()
            if self.errors:
                # Failed fetches are retried on their own; new desired states wake us sooner.
                delay = retry.next()
            else:
                retry.reset()
                delay = None
            waiter = asyncio.ensure_future(self.wakeup.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait(
                {waiter, stopper}, timeout=delay, return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
            stopper.cancel()

    # -- talking to the hub ---------------------------------------------------------------------

    async def watch_loop(self, stop: asyncio.Event) -> None:
        await self.control.watch_desired(self._on_desired, self._on_hub_trouble, stop)

    def _on_hub_trouble(self, error: str) -> None:
        self.last_error = error  # reads "hub: ..." until the next desired state

    def _on_desired(self, state: DesiredState) -> None:
        if self.last_error.startswith("hub:"):
            self.last_error = ""  # the hub answers again
        desired, jobs = list(state.models), list(state.jobs)
        self.revision = state.revision
        if jobs != self.job_specs:
            self.job_specs = jobs
            self._save_desired()
            self.jobs.apply(jobs)
        if desired != self.desired:
            before = {d.name: (d.version, d.prepare_version) for d in self.desired}
            for d in desired:
                if before.get(d.name, (d.version, d.prepare_version)) != (
                    d.version,
                    d.prepare_version,
                ):
                    # A new desired version is a new decision: earlier refusals may be retried.
                    self.slots.forget_failures(d.name)
            log.info(
                "desired state (revision %d): %s",
                state.revision,
                ", ".join(f"{d.name} v{d.version}" for d in desired) or "nothing",
            )
            self.desired = desired
            self._save_desired()
        self._apply_comparisons()
        self._apply_capture()
        self.wakeup.set()

    def _apply_capture(self) -> None:
        if self.capture is None:
            return
        rules = {}
        for d in self.desired:
            if d.capture_rate_bp:
                try:
                    rules[d.name] = CaptureRule(
                        min(d.capture_rate_bp, BASIS_POINTS), d.capture_exclude, d.capture_hash
                    )
                except InvalidRequestError as exc:
                    log.warning("%s: capture ignored: %s", d.name, exc)
        self.capture.set_rules(rules)

    def _apply_comparisons(self) -> None:
        """The desired state's split and shadow shares, at once: nothing loads or unloads for
        them (the candidate is the prepared version; until it has passed its gate, everything
        goes to the active one)."""
        wanted = {}
        for d in self.desired:
            if d.prepare_version and d.prepare_version != d.version and (d.split_bp or d.shadow_bp):
                try:
                    wanted[d.name] = Comparison(
                        d.prepare_version,
                        min(d.split_bp, BASIS_POINTS),
                        d.sticky,
                        min(d.shadow_bp, BASIS_POINTS),
                        d.comparison,
                    )
                except ValueError as exc:  # pragma: no cover - clamped above
                    log.warning("%s: comparison ignored: %s", d.name, exc)
        for name in set(self.slots.slots) | set(wanted):
            self.slots.set_comparison(name, wanted.get(name))

    # -- certificate renewal --------------------------------------------------------------------

    async def renew_loop(self, stop: asyncio.Event) -> None:
        """Renew the agent's certificate when due (agent/fleet/renew.py), retrying with backoff.

        Sleeps until the renewal time (re-checked at least hourly, so a clock that jumps is
        noticed); a failure is retried while the current certificate still works.
        """
        backoff = Backoff(base=5.0, cap=max(self.cfg.backoff_max_s, 60.0))
        while not stop.is_set():
            try:
                if self._identity_stale:
                    await self._use_identity()
                due = renewal.due_at(self.ident, self.cfg.cert_renew_before_s)
                delay = min(due - time.time(), 3600.0)
                if delay <= 0:
                    await self.renew_certificate()
                    backoff.reset()
                    delay = renewal.due_at(self.ident, self.cfg.cert_renew_before_s) - time.time()
                    if delay <= 0:
                        # The new certificate is due at once: the hub's lifetime is shorter than
                        # cert_renew_before_s allows for. Renew now and then, not in a loop.
                        log.warning(
                            "the renewed certificate is due for renewal at once "
                            "(agent_cert_lifetime_s on the hub is too short for "
                            "cert_renew_before_s); next renewal in %.0fs",
                            MIN_RENEW_GAP_S,
                        )
                        delay = MIN_RENEW_GAP_S
            except Exception as exc:
                hint = ""
                with contextlib.suppress(Exception):
                    expires = renewal.current_certificate(self.ident).not_valid_after_utc
                    if expires.timestamp() <= time.time():
                        hint = (
                            f" The certificate expired on {expires:%Y-%m-%d %H:%M} UTC: "
                            f"the hub refuses it now; enroll again (modelfleet-agent enroll "
                            f"--force) unless this node's clock is wrong."
                        )
                delay = backoff.next()
                self.renew_error = f"certificate renewal: {exc}"
                log.warning(
                    "renewing the agent certificate failed: %s; retrying in %.0fs.%s",
                    exc,
                    delay,
                    hint,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def renew_certificate(self) -> None:
        """One renewal now, then every connection made from here on uses the new certificate."""
        cert = await renewal.renew(self.ident, self.control.renew_certificate)
        self._identity_stale = True
        self.cert_expires_at = cert.not_valid_after_utc.timestamp()
        self.renew_error = ""
        log.info(
            "renewed the agent certificate (new key); valid until %s",
            cert.not_valid_after_utc.isoformat(timespec="seconds"),
        )
        await self._use_identity()
        self.report_now.set()

    async def _use_identity(self) -> None:
        """New connections with the identity on disk; calls in flight finish on the old ones."""
        await self.control.use_identity()
        self._identity_stale = False

    def build_report(self) -> AgentReport:
        desired = {d.name: d.version for d in self.desired}
        models = []
        for st in self.slots.status():
            gate = st.last_gate
            models.append(
                ModelReport(
                    name=st.name,
                    active_version=st.active or 0,
                    previous_version=st.previous or 0,
                    loading_version=st.loading or 0,
                    desired_version=desired.get(st.name, 0),
                    gate_version=gate.version if gate is not None else 0,
                    gate_passed=gate.passed if gate is not None else False,
                    gate_kind=gate.kind if gate is not None else "",
                    gate_reason=gate.reason if gate is not None else "",
                    error=self.errors.get(st.name, ""),
                    error_reason=self.error_reasons.get(st.name, "")
                    if st.name in self.errors
                    else "",
                    active_provider=st.active_provider,
                )
            )
        reported = {m.name for m in models}
        for name, version in desired.items():
            if name not in reported:
                models.append(
                    ModelReport(
                        name=name,
                        desired_version=version,
                        error=self.errors.get(name, ""),
                        error_reason=self.error_reasons.get(name, "")
                        if name in self.errors
                        else "",
                    )
                )
        return AgentReport(
            models=tuple(models),
            # A failing renewal stays visible until one succeeds, whatever else clears.
            last_error=self.last_error or self.renew_error,
            desired_revision=self.revision,
            cache_bytes=self.cache.size(),
            disk_free_bytes=shutil.disk_usage(self.cache.root).free,
            agent_version=__version__,
            inference_address=self.inference_address,
            cert_expires_at=self.cert_expires_at,
        )

    async def report_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.report_now.clear()
            try:
                await self.control.send_report(self.build_report())
            except (OSError, ModelfleetError) as exc:
                log.debug("report failed: %s", exc)
            except Exception:
                # The heartbeat must outlive any one bad report: rollouts time agents out on it.
                log.exception("building or sending the state report failed; will retry")
            waiters = {
                asyncio.ensure_future(self.report_now.wait()),
                asyncio.ensure_future(stop.wait()),
            }
            await asyncio.wait(
                waiters, timeout=self.cfg.report_interval_s, return_when=asyncio.FIRST_COMPLETED
            )
            for w in waiters:
                w.cancel()
            # Coalesce bursts of changes (a swap touches several fields) into one report.
            await asyncio.sleep(0.05)

    def _serving_versions(self) -> list[tuple[str, int]]:
        return [(st.name, st.active) for st in self.slots.status() if st.active is not None]

    async def _final_telemetry(self) -> None:
        """The partial interval goes to the outbox (the app stops us after the drain, so it
        includes the drained requests); one quick try to send it, then the outbox closes."""
        try:
            await self.telemetry.cut(only_if_active=True)
        except Exception as exc:
            log.error("cannot write the last telemetry interval: %s", exc)
        try:
            if timeout_s := self.control.final_telemetry_timeout_s:
                await asyncio.wait_for(self.telemetry.send_once(), timeout_s)
        except Exception as exc:  # best effort: whatever is not acked waits in the outbox
            log.debug("final telemetry send: %s", exc)
        self.telemetry.outbox.close()

    async def _report_job_run(self, run: JobRun) -> None:
        # Through the telemetry outbox: on disk at once, delivered over the control plane,
        # resent until the hub acknowledges it (so a run that ends while the hub is down is
        # not lost).
        await self.telemetry.cut(job_runs=[run])

    async def run(self, stop: asyncio.Event) -> None:
        # Jobs restored with the desired state keep their schedules across restarts.
        self.jobs.start()
        self.jobs.apply(self.job_specs)
        tasks = [
            asyncio.ensure_future(self.reconcile_loop(stop)),
            asyncio.ensure_future(self.report_loop(stop)),
            asyncio.ensure_future(self.telemetry.collect_loop(stop)),
            asyncio.ensure_future(self.telemetry.send_loop(stop)),
            asyncio.ensure_future(self.renew_loop(stop)),
            asyncio.ensure_future(self.watch_loop(stop)),
        ]
        if self.capture_shipper is not None:
            tasks.append(asyncio.ensure_future(self.capture_shipper.run(stop)))
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.jobs.shutdown()
            await self._final_telemetry()
            with contextlib.suppress(Exception):
                await self.control.send_final_report(self.build_report())
            await self.control.close()
