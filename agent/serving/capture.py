"""Inference capture: a sample of requests with their outputs, written to local Parquet files.

The data plane calls :meth:`Capture.offer` once the response is built (a dict lookup, a draw and
a ``put_nowait``); the response goes to the client whatever happens here. One writer thread
turns queued requests into Arrow tables and appends them to one open file per model. A full
queue drops the request and counts it.

Files are crash-safe: a file is written under ``<id>.parquet.tmp``, and only closed, fsynced and
renamed files (``<id>.parquet``) are complete. A kill -9 leaves complete files plus at most one
temp file per model, which :meth:`Capture.start` salvages (when its footer made it to disk) or
deletes. Rows still in memory when the process dies are lost: at most ``flush_rows`` rows or
``flush_s`` seconds of them per model.

Privacy (docs/security.md): excluded inputs are never written; hashed inputs are written as
HMAC-SHA256 (hex) of their bytes with a per-agent secret (``capture.key`` in the data folder,
mode 0600), so equal values can be joined without the values being readable.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import random
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelfleet.kernel.errors import InvalidRequestError

if TYPE_CHECKING:
    import pyarrow as pa

    from modelfleet.agent.metrics import AgentMetrics

log = logging.getLogger(__name__)

BASIS_POINTS = 10_000
SUFFIX = ".parquet"
TEMP_SUFFIX = ".parquet.tmp"
KEY_FILE = "capture.key"
RULES_FILE = "rules.json"
# Model names become folder names: the bundle format's names, never a path.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
# Nice value of the writer thread (Linux): below the serving threads' when cores are short.
WRITER_NICE = 10
# After the first sampled request of a quiet spell, the writer waits this long and then takes
# everything queued at once: one wake-up (and one GIL hand-over from the event loop) per batch
# rather than per captured request, which under load cost the serving path more than the
# writing itself (docs/benchmarks.md#drift--capture-benchmonitoring).
WRITER_BATCH_S = 0.05


@dataclass(frozen=True)
class CaptureRule:
    """What to capture of one model: a share of its requests, minus personal data."""

    rate_bp: int
    exclude: tuple[str, ...] = ()
    hash: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.rate_bp <= BASIS_POINTS:
            raise InvalidRequestError(
                f"capture rate must be 0..{BASIS_POINTS} basis points (0..100%), not {self.rate_bp}"
            )
        both = set(self.exclude) & set(self.hash)
        if both:
            raise InvalidRequestError(
                f"capture: input(s) {', '.join(sorted(both))} are both excluded and hashed; "
                "give each input once (--exclude drops it, --hash keeps a keyed hash)"
            )


@dataclass
class CaptureLimits:
    """Settings (docs/configuration.md, capture_*)."""

    dir: Path
    queue_max: int = 1024
    rotate_bytes: int = 16 * 1024 * 1024
    rotate_s: float = 300.0
    quota_bytes: int = 1024 * 1024 * 1024
    # Rows buffered per model before they are written as one row group.
    flush_rows: int = 256
    flush_s: float = 1.0


@dataclass
class _Record:
    at: float
    request_id: str
    model: str
    version: int
    arm: str
    rule: CaptureRule
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclass
class _OpenFile:
    model: str
    file_id: str
    temp: Path
    final: Path
    opened: float
    schema: pa.Schema
    writer: Any  # pyarrow.parquet.ParquetWriter


@dataclass
class _Buffer:
    rows: list[dict[str, Any]] = field(default_factory=list)
    first_at: float = 0.0


def load_key(data: Path) -> bytes:
    """The per-agent HMAC secret, created (0600, atomically) on first use."""
    path = data / KEY_FILE
    data.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise InvalidRequestError(
                f"capture key {path} is damaged ({len(key)} bytes, 32 expected): delete it to "
                "make a new one (hashes written before will no longer match new ones)"
            ) from None
        return key
    key = secrets.token_bytes(32)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def keyed_hash(key: bytes, arr: np.ndarray) -> str:
    """HMAC-SHA256 (hex) of a tensor's bytes: numbers as their native bytes, strings/bytes each
    length-prefixed, so no two different tensors share an encoding."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    if arr.dtype.kind == "O" or arr.dtype.kind in "SU":
        for item in arr.reshape(-1):
            raw = item.encode() if isinstance(item, str) else bytes(item)
            mac.update(len(raw).to_bytes(8, "little"))
            mac.update(raw)
    else:
        mac.update(np.ascontiguousarray(arr).tobytes())
    return mac.hexdigest()


def complete_files(root: Path) -> list[Path]:
    """Complete capture files under ``root`` (one folder per model), oldest first."""
    found = []
    if not root.is_dir():
        return []
    for model_dir in root.iterdir():
        if not model_dir.is_dir():
            continue
        for f in model_dir.iterdir():
            if f.name.endswith(SUFFIX) and not f.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    found.append((f.stat().st_mtime, f.name, f))
    return [f for _, _, f in sorted(found)]


class Capture:
    """Per-model rules, the bounded queue and the writer thread."""

    def __init__(self, limits: CaptureLimits, metrics: AgentMetrics, key: bytes | Path) -> None:
        self.limits = limits
        self.metrics = metrics
        # The HMAC key, or the folder it is kept in: read (or made) at the first hashed input,
        # so an agent that never hashes never writes one.
        self._key = key
        self.rules: dict[str, CaptureRule] = {}
        self._rng = random.Random()
        self._queue: queue.Queue[_Record | None] = queue.Queue(max(limits.queue_max, 1))
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._open: dict[str, _OpenFile] = {}
        self._buffers: dict[str, _Buffer] = {}
        self.closed = False
        # Totals since start, for `modelfleet-agent capture` (Prometheus has the same).
        self.captured: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        # Called after the rules change (serving workers capture by the same rules).
        self.listeners: list[Callable[[], None]] = []

    @property
    def key(self) -> bytes:
        if isinstance(self._key, Path):
            self._key = load_key(self._key)
        return self._key

    # -- rules ----------------------------------------------------------------------------------

    def set_rule(self, model: str, rule: CaptureRule | None) -> None:
        if rule is None or rule.rate_bp == 0:
            self.rules.pop(model, None)
        else:
            if not _SAFE_NAME.match(model):
                raise InvalidRequestError(f"capture: {model!r} is not a model name")
            self.rules[model] = rule
        self._changed()

    def set_rules(self, rules: dict[str, CaptureRule]) -> None:
        """Replace every rule (the hub's desired state, each time it arrives)."""
        new = {m: r for m, r in rules.items() if r.rate_bp > 0 and _SAFE_NAME.match(m)}
        changed = new != self.rules
        self.rules = new
        if changed:
            self._changed()

    def _changed(self) -> None:
        for listener in self.listeners:
            try:
                listener()
            except Exception:  # a broken listener must not break a rule change
                log.exception("capture rule listener failed")

    # -- the serving path -----------------------------------------------------------------------

    def offer(
        self,
        request_id: str,
        model: str,
        version: int,
        arm: str,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> bool:
        """Sample and queue (never waits); False when not sampled or dropped."""
        rule = self.rules.get(model)
        if rule is None or self.closed:
            return False
        if rule.rate_bp < BASIS_POINTS and self._rng.random() * BASIS_POINTS >= rule.rate_bp:
            return False
        if self._thread is None:
            self.start_writer()
        try:
            self._queue.put_nowait(
                _Record(time.time(), request_id, model, version, arm, rule, inputs, outputs)
            )
        except queue.Full:
            self.dropped[model] = self.dropped.get(model, 0) + 1
            self.metrics.capture_requests.labels(model, "dropped").inc()
            return False
        return True

    # -- start-up -------------------------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """Before writing: temp files a crash left are salvaged when complete, else deleted.

        Returns (salvaged, deleted)."""
        import pyarrow.parquet as pq

        salvaged = deleted = 0
        root = self.limits.dir
        if not root.is_dir():
            return 0, 0
        for model_dir in root.iterdir():
            if not model_dir.is_dir():
                continue
            for f in model_dir.iterdir():
                if not f.name.endswith(TEMP_SUFFIX):
                    continue
                try:
                    # The footer is written last: if it reads, every row group is there.
                    pq.ParquetFile(f).metadata  # noqa: B018 - reading it is the check
                except Exception:
                    f.unlink(missing_ok=True)
                    deleted += 1
                    continue
                _fsync_path(f)
                os.replace(f, f.with_name(f.name[: -len(TEMP_SUFFIX)] + SUFFIX))
                _fsync_path(model_dir)
                salvaged += 1
        if salvaged or deleted:
            log.warning(
                "capture: %d unfinished file(s) from a crash salvaged, %d discarded",
                salvaged,
                deleted,
            )
        self.enforce_quota()
        return salvaged, deleted

    def start_writer(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="capture-writer", daemon=True
                )
                self._thread.start()

    # -- the writer thread ----------------------------------------------------------------------

    def _work(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        tick = min(self.limits.flush_s, 1.0)
        while True:
            records: list[_Record | None] = []
            try:
                records.append(self._queue.get(timeout=tick))
            except queue.Empty:
                pass  # a tick: time-based flushes and rotation only
            else:
                if records[0] is not None:
                    # While this thread sleeps, offers queue without waking it.
                    time.sleep(WRITER_BATCH_S)
                    with contextlib.suppress(queue.Empty):
                        while len(records) <= self.limits.queue_max:
                            records.append(self._queue.get_nowait())
            try:
                for rec in records:
                    if rec is None:
                        self._close_all()
                        return
                    self._add(rec)
                self._housekeep()
            except Exception:  # a disk problem must never take the agent down
                log.exception("capture: writing failed; the rows in memory are dropped")
                self._buffers.clear()
                self._abandon_all()

    def _add(self, rec: _Record) -> None:
        row: dict[str, Any] = {
            # Requests without an id get one, so outcomes can still name each captured row.
            "request_id": rec.request_id or uuid.uuid4().hex,
            "time": rec.at,
            "model": rec.model,
            "version": rec.version,
            "arm": rec.arm,
        }
        for name, arr in rec.inputs.items():
            if name in rec.rule.exclude:
                continue
            if name in rec.rule.hash:
                row["in_" + name] = keyed_hash(self.key, arr)
            else:
                row["in_" + name] = arr
        for name, arr in rec.outputs.items():
            row["out_" + name] = arr
        buf = self._buffers.setdefault(rec.model, _Buffer())
        if not buf.rows:
            buf.first_at = time.monotonic()
        buf.rows.append(row)
        self.captured[rec.model] = self.captured.get(rec.model, 0) + 1
        self.metrics.capture_requests.labels(rec.model, "captured").inc()
        if len(buf.rows) >= self.limits.flush_rows:
            self._flush(rec.model)

    def _housekeep(self) -> None:
        now = time.monotonic()
        for model, buf in list(self._buffers.items()):
            if buf.rows and now - buf.first_at >= self.limits.flush_s:
                self._flush(model)
        for model, f in list(self._open.items()):
            if now - f.opened >= self.limits.rotate_s:
                self._finish(model)

    def _flush(self, model: str) -> None:
        import pyarrow.parquet as pq

        buf = self._buffers.pop(model, None)
        if buf is None or not buf.rows:
            return
        table = _to_table(buf.rows)
        f = self._open.get(model)
        if f is not None and not f.schema.equals(table.schema):
            # Another signature (a new version): a file holds one schema.
            self._finish(model)
            f = None
        if f is None:
            folder = self.limits.dir / model
            folder.mkdir(parents=True, exist_ok=True)
            file_id = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:12]}"
            temp = folder / (file_id + TEMP_SUFFIX)
            writer = pq.ParquetWriter(temp, table.schema, compression="zstd")
            final = folder / (file_id + SUFFIX)
            f = _OpenFile(model, file_id, temp, final, time.monotonic(), table.schema, writer)
            self._open[model] = f
        before = _size(f.temp)
        f.writer.write_table(table)
        grown = _size(f.temp) - before
        if grown > 0:
            self.metrics.capture_bytes.labels(model).inc(grown)
        if _size(f.temp) >= self.limits.rotate_bytes:
            self._finish(model)

    def _finish(self, model: str) -> None:
        """Close, fsync and rename: from here on the file is complete (and may be shipped)."""
        f = self._open.pop(model, None)
        if f is None:
            return
        before = _size(f.temp)
        f.writer.close()
        grown = _size(f.temp) - before
        if grown > 0:
            self.metrics.capture_bytes.labels(model).inc(grown)
        _fsync_path(f.temp)
        os.replace(f.temp, f.final)
        _fsync_path(f.final.parent)
        self.metrics.capture_files.labels(model, "written").inc()
        self.enforce_quota()

    def _abandon_all(self) -> None:
        for f in self._open.values():
            with contextlib.suppress(Exception):
                f.writer.close()
            f.temp.unlink(missing_ok=True)
        self._open.clear()

    def _close_all(self) -> None:
        for model in list(self._buffers):
            try:
                self._flush(model)
            except Exception:
                log.exception("capture: could not write the last rows of %s", model)
        for model in list(self._open):
            try:
                self._finish(model)
            except Exception:
                log.exception("capture: could not finish the file of %s", model)

    def enforce_quota(self) -> int:
        """Delete the oldest complete files until the capture folder fits its quota."""
        files = complete_files(self.limits.dir)
        sizes = {f: _size(f) for f in files}
        total = sum(sizes.values()) + sum(_size(o.temp) for o in list(self._open.values()))
        deleted = 0
        for f in files:
            if total <= self.limits.quota_bytes:
                break
            f.unlink(missing_ok=True)
            total -= sizes[f]
            deleted += 1
            self.metrics.capture_files.labels(f.parent.name, "deleted_quota").inc()
        if deleted:
            log.warning(
                "capture: %d oldest file(s) deleted to stay within capture_quota_bytes (%d)",
                deleted,
                self.limits.quota_bytes,
            )
        return deleted

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued and buffered, finish every open file (bounded)."""
        self.closed = True
        t = self._thread
        if t is None:
            return
        deadline = time.monotonic() + timeout_s
        while t.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            log.warning("capture: the writer did not finish in %gs", timeout_s)

    def files(self) -> list[Path]:
        return complete_files(self.limits.dir)


class LocalRules:
    """Standalone agents: rules set with `modelfleet-agent capture`, kept across restarts."""

    def __init__(self, root: Path) -> None:
        self.path = root / RULES_FILE

    def load(self) -> dict[str, CaptureRule]:
        try:
            raw = json.loads(self.path.read_text())
            return {
                m: CaptureRule(int(r["rate_bp"]), tuple(r["exclude"]), tuple(r["hash"]))
                for m, r in raw.items()
            }
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, InvalidRequestError) as exc:
            log.warning("capture: ignoring unreadable %s: %s", self.path, exc)
            return {}

    def save(self, rules: dict[str, CaptureRule]) -> None:
        from modelfleet.kernel.atomic import atomic_write_json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.path,
            {
                m: {"rate_bp": r.rate_bp, "exclude": list(r.exclude), "hash": list(r.hash)}
                for m, r in rules.items()
            },
            mode=0o600,
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _column(values: list[Any]) -> pa.Array:
    """One tensor column: a list of each row's flattened values (or hex strings if hashed)."""
    import pyarrow as pa

    if all(isinstance(v, str) or v is None for v in values):
        return pa.array(values, pa.string())
    arrays = [v if isinstance(v, np.ndarray) else None for v in values]
    sample = next(a for a in arrays if a is not None)
    if sample.dtype.kind in "OSU":
        return pa.array(
            [None if a is None else [_as_bytes(x) for x in a.reshape(-1)] for a in arrays],
            pa.list_(pa.binary()),
        )
    flat = [a.reshape(-1) for a in arrays if a is not None]
    dtype = np.result_type(*[a.dtype for a in flat])
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    lengths = [0 if a is None else a.size for a in arrays]
    np.cumsum(lengths, out=offsets[1:])
    values_arr = pa.array(np.concatenate(flat).astype(dtype, copy=False))
    mask = pa.array([a is None for a in arrays]) if any(a is None for a in arrays) else None
    return pa.ListArray.from_arrays(pa.array(offsets), values_arr, mask=mask)


def _as_bytes(x: Any) -> bytes:
    return x.encode() if isinstance(x, str) else bytes(x)


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    import pyarrow as pa

    names: list[str] = []
    for r in rows:
        for k in r:
            if k not in names:
                names.append(k)
    fixed = {
        "request_id": pa.string(),
        "time": pa.timestamp("ms", tz="UTC"),
        "model": pa.string(),
        "version": pa.int64(),
        "arm": pa.string(),
    }
    cols = []
    for name in names:
        values = [r.get(name) for r in rows]
        if name == "time":
            stamps = [int(r["time"] * 1000) for r in rows]
            cols.append(pa.array(stamps, pa.timestamp("ms", tz="UTC")))
        elif name in fixed:
            cols.append(pa.array(values, fixed[name]))
        else:
            cols.append(_column(values))
    return pa.table(dict(zip(names, cols, strict=True)))


__all__ = [
    "BASIS_POINTS",
    "Capture",
    "CaptureLimits",
    "CaptureRule",
    "LocalRules",
    "complete_files",
    "keyed_hash",
    "load_key",
]
