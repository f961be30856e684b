"""Inference capture on the hub: what agents capture, the files they ship, SQL over them.

Settings live in the registry (``capture_settings``, behind the registry port) and reach agents
in their desired state (``Desired.capture_*``). Files live under ``DATA/capture``::

    capture/<model>/<agent id>/<file id>.parquet      complete, stored once
    capture/.partial/<agent id>/<model>/<file id>.part an upload in progress (resumable)

A file is stored when all of its bytes arrived and match the sha256 the agent sent; from then
on every upload of the same (agent, file id) is answered "stored" without writing anything, so
an agent that crashed between the hub's acknowledgement and its local delete ships nothing
twice. Over gRPC an upload is one stream (:meth:`CaptureStore.open_upload`); through the MQTT
broker it is a series of separate chunk messages (:meth:`CaptureStore.append`), each stored only
where it continues exactly what the hub holds, so a chunk the broker delivers twice, or late,
after a restart, changes nothing.

Who may upload what: an agent ships files only for models it was ever assigned (a deployment,
current or since removed, whose selector matches the agent: the registry's deployments log keeps
removed rows, so that is the durable record), so an enrolled agent cannot feed another model's
accuracy join (hub/outcomes.py). Files an agent still holds from a model since undeployed are
accepted. Stored files count against a per-agent quota (``capture_agent_quota_bytes``), checked
when an upload starts; past it new uploads are refused (RESOURCE_EXHAUSTED) until an operator
deletes files (docs/monitoring.md#inference-capture).

Queries load a model's files into an in-memory DuckDB table ``capture`` (plus an ``agent_id``
column) and run the caller's SQL with DuckDB's file and network access turned off.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from modelfleet.hub.registry import (
    AGENT_KEY,
    CaptureSetting,
    PermissionDeniedError,
    selector_matches,
)
from modelfleet.kernel.errors import (
    CAPTURE_REFUSED,
    InvalidRequestError,
    ModelfleetError,
    ModelNotFoundError,
    ResourceExhaustedError,
    Status,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from modelfleet.hub.ports import RegistryPort

BASIS_POINTS = 10_000
# Under the hub's data folder.
CAPTURE_DIR = "capture"
SUFFIX = ".parquet"
PARTIAL = ".partial"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
# One captured file at most (agents rotate at capture_rotate_bytes, 16 MiB by default).
MAX_FILE_BYTES = 1024**3
# Data bytes in one MQTT chunk message at most (the agent's capture_mqtt_chunk_bytes is below).
MAX_PART_BYTES = 1024 * 1024
# Uploads one agent may have in progress (an agent ships its files one at a time), and how long
# an untouched one is kept: without them, first chunks under ever new file ids would leave
# partial files, each up to MAX_FILE_BYTES, that nothing removes.
MAX_PARTIALS_PER_AGENT = 16
PARTIAL_TTL_S = 24 * 3600
# Stored capture files of one agent at most (capture_agent_quota_bytes), all models together.
AGENT_QUOTA_BYTES = 8 * 1024**3


class UploadConflictError(ModelfleetError):
    status = Status.FAILED_PRECONDITION
    reason = "capture_offset"


@dataclass(frozen=True)
class UploadHeader:
    model: str
    file_id: str
    size: int
    sha256: str
    offset: int

    def check(self) -> UploadHeader:
        for what, value in (("model", self.model), ("file id", self.file_id)):
            if not _NAME.match(value):
                raise InvalidRequestError(f"capture upload: {what} {value!r} is not a valid name")
        if not _SHA256.match(self.sha256):
            raise InvalidRequestError("capture upload: sha256 must be 64 lowercase hex digits")
        if not 0 < self.size <= MAX_FILE_BYTES:
            raise InvalidRequestError(
                f"capture upload: size {self.size} is outside 1..{MAX_FILE_BYTES} bytes"
            )
        if not 0 <= self.offset <= self.size:
            raise InvalidRequestError(
                f"capture upload: offset {self.offset} is outside 0..{self.size}"
            )
        return self


@dataclass(frozen=True)
class StoredFiles:
    model: str
    files: int
    bytes: int


def check_rule(model: str, rate_bp: int, exclude: tuple[str, ...], hashed: tuple[str, ...]) -> None:
    if not _NAME.match(model):
        raise InvalidRequestError(f"capture: {model!r} is not a model name")
    if not 0 < rate_bp <= BASIS_POINTS:
        raise InvalidRequestError(
            "capture: --rate takes a percentage above 0 and at most 100 "
            "(stop capturing with `modelfleet-hub capture off MODEL`)"
        )
    both = set(exclude) & set(hashed)
    if both:
        raise InvalidRequestError(
            f"capture: input(s) {', '.join(sorted(both))} are both excluded and hashed; "
            "give each input once (--exclude drops it, --hash keeps a keyed hash)"
        )


class CaptureStore:
    """The captured files of every agent, on the hub's disk."""

    def __init__(
        self,
        root: Path,
        agent_quota_bytes: int = AGENT_QUOTA_BYTES,
        admit: Callable[[str, str], None] | None = None,
    ) -> None:
        self.root = root
        self.agent_quota_bytes = agent_quota_bytes
        # Whether an agent may ship a model's files (CaptureService.admit): called before any
        # state is read or written, so a refused upload leaves nothing on disk.
        self.admit = admit
        # Chunk messages are handled on several threads: two copies of one chunk must not
        # write the same partial file at once. Striped, so files of other agents go on.
        self._locks = [threading.Lock() for _ in range(16)]

    def _final(self, agent_id: str, h: UploadHeader) -> Path:
        return self.root / h.model / agent_id / (h.file_id + SUFFIX)

    def _partial(self, agent_id: str, h: UploadHeader) -> Path:
        return self.root / PARTIAL / agent_id / h.model / (h.file_id + ".part")

    def state(self, agent_id: str, h: UploadHeader) -> tuple[int, bool]:
        """(bytes held, stored) for one file of one agent."""
        _check_agent(agent_id)
        h.check()
        if self.admit is not None:
            self.admit(agent_id, h.model)
        final = self._final(agent_id, h)
        if final.exists():
            return final.stat().st_size, True
        part = self._partial(agent_id, h)
        return (part.stat().st_size if part.exists() else 0), False

    def open_upload(self, agent_id: str, h: UploadHeader) -> UploadSink | None:
        """A sink for the bytes from ``h.offset`` on; None when the file is stored already."""
        have, stored = self.state(agent_id, h)
        if stored:
            return None
        if h.offset > have:
            raise UploadConflictError(
                f"capture upload of {h.file_id}: the hub holds {have} bytes, the upload starts "
                f"at {h.offset}; resume from {have}"
            )
        part = self._partial(agent_id, h)
        if not part.exists():
            self._make_room(agent_id, h)
        part.parent.mkdir(parents=True, exist_ok=True)
        return UploadSink(part, self._final(agent_id, h), h)

    def _make_room(self, agent_id: str, h: UploadHeader) -> None:
        """Drop this agent's stale partial uploads; refuse a new one past the limit."""
        now = time.time()
        live = 0
        for part in (self.root / PARTIAL / agent_id).glob("*/*.part"):
            try:
                if now - part.stat().st_mtime > PARTIAL_TTL_S:
                    part.unlink()
                else:
                    live += 1
            except FileNotFoundError:
                continue
        stored = self.agent_bytes(agent_id)
        if stored + h.size > self.agent_quota_bytes:
            raise ResourceExhaustedError(
                f"capture upload of {h.file_id} ({h.model}): agent {agent_id} has {stored} bytes "
                f"of capture files stored on the hub; {h.size} more would pass "
                f"capture_agent_quota_bytes ({self.agent_quota_bytes}). Delete files under "
                f"{self.root}/*/{agent_id}/ or raise the quota; the agent retries"
            )
        if live >= MAX_PARTIALS_PER_AGENT:
            raise ResourceExhaustedError(
                f"capture upload of {h.file_id}: agent {agent_id} has {live} uploads in progress "
                f"on the hub, the most it may have; finish those first (an upload untouched for "
                f"{PARTIAL_TTL_S // 3600} h is dropped)"
            )

    def append(self, agent_id: str, h: UploadHeader, data: bytes) -> tuple[int, bool, bool]:
        """One chunk of an upload sent as separate messages: ``data`` is the file's bytes from
        ``h.offset`` on. Written only where ``h.offset`` is what the hub holds; anything else
        (a duplicate, a late resend, a chunk ahead of a gap) writes nothing, and the answer,
        (bytes held, stored, whether this chunk was taken), tells the agent where to go on.
        Blocking: call from a thread."""
        if len(data) > MAX_PART_BYTES:
            raise InvalidRequestError(
                f"capture upload of {h.file_id}: a chunk of {len(data)} bytes is over the "
                f"{MAX_PART_BYTES} the hub takes in one message"
            )
        lock = self._locks[hash((agent_id, h.model, h.file_id)) % len(self._locks)]
        with lock:
            have, stored = self.state(agent_id, h)
            if stored:
                return have, True, False
            # A partial copy longer than the file (another file under this id) starts over.
            restart = h.offset == 0 and have > h.size
            if h.offset != have and not restart:
                return have, False, False
            sink = self.open_upload(agent_id, h)
            if sink is None:  # stored meanwhile by a gRPC upload of the same file
                return (*self.state(agent_id, h), False)
            try:
                if data:
                    sink.write(data)
                return (*sink.finish(), True)
            finally:
                sink.close()

    def agent_bytes(self, agent_id: str) -> int:
        """Bytes of the complete files one agent has stored, all models together."""
        total = 0
        for f in self.root.glob(f"*/{agent_id}/*{SUFFIX}"):
            if f.parts[-3].startswith("."):
                continue
            try:
                total += f.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def files(self, model: str) -> list[Path]:
        folder = self.root / model
        if not _NAME.match(model) or not folder.is_dir():
            return []
        return sorted(folder.glob("*/*" + SUFFIX))

    def stored(self) -> list[StoredFiles]:
        out: list[StoredFiles] = []
        if not self.root.is_dir():
            return out
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            files = self.files(folder.name)
            out.append(StoredFiles(folder.name, len(files), sum(f.stat().st_size for f in files)))
        return out

    def locate(self, model: str, version: int) -> str | None:
        """Where a model's captured data is, for retraining-trigger payloads (None: nothing)."""
        if not self.files(model):
            return None
        return f"{self.root / model} (modelfleet-hub capture query {model} ...; version {version})"

    def query(self, model: str, sql: str) -> pa.Table:
        """``sql`` over the model's files as table ``capture``. Blocking: call from a thread."""
        import duckdb

        files = self.files(model)
        if not files:
            raise ModelNotFoundError(
                f"no captured data for model {model!r} on the hub yet: turn capture on with "
                f"`modelfleet-hub capture set {model} --rate PCT` and wait for agents to ship "
                "their files (capture_rotate_s on the agent)"
            )
        if not sql.strip():
            raise InvalidRequestError('capture query: give SQL, e.g. "SELECT * FROM capture"')
        con = duckdb.connect(":memory:")
        try:
            con.execute(
                "CREATE TABLE capture AS SELECT * EXCLUDE (filename), "
                "string_split(filename, '/')[-2] AS agent_id "
                "FROM read_parquet(?, union_by_name = true, filename = true)",
                [[str(f) for f in files]],
            )
            # The caller's SQL reads the table and nothing else on the hub's disk or network.
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            try:
                rel = con.sql(sql)
                if rel is None:  # a statement without a result (e.g. SET)
                    import pyarrow as pa

                    return pa.table({})
                return rel.to_arrow_table()
            except duckdb.Error as exc:
                raise InvalidRequestError(f"capture query: {exc}") from None
        finally:
            con.close()


class UploadSink:
    """Bytes of one upload, appended to its partial file; :meth:`finish` stores it."""

    def __init__(self, part: Path, final: Path, h: UploadHeader) -> None:
        self.part, self.final, self.h = part, final, h
        self._f = part.open("r+b" if part.exists() else "wb")
        # A resend from an earlier offset overwrites what came after it.
        self._f.truncate(h.offset)
        self._f.seek(h.offset)
        self.have = h.offset

    def write(self, data: bytes) -> None:
        if self.have + len(data) > self.h.size:
            self.close()
            raise InvalidRequestError(
                f"capture upload of {self.h.file_id}: more bytes than its size {self.h.size}"
            )
        self._f.write(data)
        self.have += len(data)

    def close(self) -> None:
        self._f.close()

    def finish(self) -> tuple[int, bool]:
        """Blocking (hashes the file): call from a thread."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self.have < self.h.size:
            return self.have, False
        digest = hashlib.sha256()
        with self.part.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != self.h.sha256:
            self.part.unlink(missing_ok=True)
            raise InvalidRequestError(
                f"capture upload of {self.h.file_id}: sha256 mismatch; the partial copy was "
                "dropped and the next upload starts over"
            )
        self.final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.part, self.final)
        fd = os.open(self.final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.h.size, True


class CaptureService:
    """Settings (registry) and files (store): what the gRPC edge calls."""

    def __init__(self, registry: RegistryPort, store: CaptureStore) -> None:
        self.registry = registry
        self.store = store
        # The registry is used on the event loop only; MQTT chunks are handled on worker
        # threads, which hop to this loop for the check (set where the hub starts).
        self.loop: asyncio.AbstractEventLoop | None = None
        store.admit = self._admit_any_thread

    def _admit_any_thread(self, agent_id: str, model: str) -> None:
        loop = self.loop
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or here is loop:
            self.admit(agent_id, model)
            return
        asyncio.run_coroutine_threadsafe(self._admit(agent_id, model), loop).result(timeout=10)

    async def _admit(self, agent_id: str, model: str) -> None:
        self.admit(agent_id, model)

    def admit(self, agent_id: str, model: str) -> None:
        """Refuse ``agent_id``'s files of a model no deployment ever gave it (PERMISSION_DENIED).

        Any deployment row counts, removed ones too, as long as it is not a "not desired" row:
        an agent may still hold finished files from a model undeployed since, and those are
        its own predictions. Matched against the agent's labels now (the registry keeps no
        label history), so an agent relabeled out of a selector loses that model's backlog."""
        agent = self.registry.agent(agent_id)
        match = {**agent.labels, AGENT_KEY: agent_id}
        for row in self.registry.deployment_rows(include_removed=True):
            if row.name == model and row.version and selector_matches(row.selector, match):
                return
        raise PermissionDeniedError(
            f"{CAPTURE_REFUSED}: model {model!r} was never deployed to agent {agent_id}, so "
            "the hub takes no capture files of it from this agent (the agent sets the file aside)"
        )

    def set(
        self,
        model: str,
        selector: Mapping[str, str],
        rate_bp: int,
        exclude: tuple[str, ...],
        hashed: tuple[str, ...],
        actor: str,
    ) -> CaptureSetting:
        check_rule(model, rate_bp, exclude, hashed)
        return self.registry.set_capture(
            CaptureSetting(model, dict(selector), rate_bp, exclude, hashed, actor=actor)
        )

    def remove(self, model: str, selector: Mapping[str, str] | None) -> int:
        removed = self.registry.remove_capture(model, selector)
        if not removed:
            raise ModelNotFoundError(
                f"capture is not set for model {model!r}"
                + (f" with selector {dict(selector)}" if selector else "")
                + " (see `modelfleet-hub capture ls`)"
            )
        return removed


def _check_agent(agent_id: str) -> None:
    if not _NAME.match(agent_id):
        raise InvalidRequestError(f"capture upload: agent id {agent_id!r} is not a valid name")


__all__ = [
    "AGENT_QUOTA_BYTES",
    "CAPTURE_DIR",
    "MAX_PART_BYTES",
    "CaptureService",
    "CaptureStore",
    "StoredFiles",
    "UploadConflictError",
    "UploadHeader",
    "UploadSink",
    "check_rule",
]
