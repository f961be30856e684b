"""Late labels (outcomes) on the hub: stored by request id, joined with captured predictions.

Outcomes live in ``DATA/outcomes.sqlite``, one row per (model, request id). A request id sent
again replaces its outcome (last wins), so importing the same file twice changes nothing and a
corrected label is a re-import. A batch is stored in one transaction: all of it or none. A model's
outcomes are all class labels (a classifier) or all values (a regression); a batch of the other
kind is refused.

Accuracy joins them, by request id, with the rows agents captured (hub.capture: request id, time,
version, arm, outputs) in an in-memory DuckDB, and computes per version and arm what
:mod:`hub.accuracy` defines. Only captured requests can be scored: with capture sampling a share
of the requests, labels of the others count as unmatched. Results are cached until an import,
a new captured file or a new baseline changes the inputs, so alert rounds and rollout gates that
ask every few seconds cost a dictionary lookup.
"""

from __future__ import annotations

import math
import re
import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelfleet.hub.accuracy import (
    CLASSIFIER,
    REGRESSION,
    Quality,
    classification,
    regression,
)
from modelfleet.hub.capture import CaptureStore
from modelfleet.kernel.errors import InvalidRequestError, ModelfleetError, Status

OUTCOMES_FILE = "outcomes.sqlite"
# Outcomes in one ReportOutcomes call (the CLI sends files in batches of this many).
MAX_BATCH = 20_000
MAX_REQUEST_ID = 256
ALL_ARMS = "*"
LABEL, VALUE = "label", "value"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_CACHE_SIZE = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    model TEXT NOT NULL,
    request_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    target REAL NOT NULL,
    observed_at REAL NOT NULL,
    stored_at REAL NOT NULL,
    PRIMARY KEY (model, request_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS baselines (
    model TEXT PRIMARY KEY,
    accuracy REAL NOT NULL,
    set_at REAL NOT NULL,
    actor TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class OutcomeRow:
    request_id: str
    label: int | None = None
    value: float | None = None
    # When the outcome was observed (unix seconds); 0: when stored.
    time: float = 0.0

    @property
    def kind(self) -> str:
        return LABEL if self.label is not None else VALUE


@dataclass(frozen=True)
class Group:
    version: int
    arm: str
    quality: Quality


@dataclass(frozen=True)
class AccuracyReport:
    model: str
    groups: list[Group] = field(default_factory=list)
    outcomes: int = 0
    unmatched: int = 0
    baseline: float | None = None
    note: str = ""

    def version(self, version: int) -> Quality | None:
        for g in self.groups:
            if g.version == version and g.arm == ALL_ARMS:
                return g.quality
        return None


def check_model(model: str) -> None:
    if not _NAME.match(model):
        raise InvalidRequestError(f"outcomes: {model!r} is not a model name")


def check_outcomes(model: str, rows: Sequence[OutcomeRow]) -> str:
    """Refuse a malformed batch, naming the outcome and the fix; return its kind."""
    check_model(model)
    if not rows:
        raise InvalidRequestError("outcomes: the batch is empty; send at least one outcome")
    if len(rows) > MAX_BATCH:
        raise InvalidRequestError(
            f"outcomes: {len(rows)} outcomes in one call; send at most {MAX_BATCH} per call"
        )
    kinds = {r.kind for r in rows}
    if len(kinds) > 1:
        raise InvalidRequestError(
            "outcomes: the batch mixes labels and values; a model's outcomes are all class "
            "labels (classifier) or all values (regression)"
        )
    seen: dict[str, int] = {}
    for i, r in enumerate(rows, 1):
        where = f"outcome {i} ({r.request_id!r})"
        if not r.request_id or len(r.request_id) > MAX_REQUEST_ID:
            raise InvalidRequestError(
                f"outcomes: outcome {i} has an empty or over-long request id (1 to "
                f"{MAX_REQUEST_ID} characters, as the client sent it with the request)"
            )
        if r.request_id in seen:
            raise InvalidRequestError(
                f"outcomes: {where} repeats the request id of outcome {seen[r.request_id]}; "
                "give each request id once per batch"
            )
        seen[r.request_id] = i
        if r.label is None and r.value is None:
            raise InvalidRequestError(f"outcomes: {where} has neither a label nor a value")
        if r.label is not None and r.label < 0:
            raise InvalidRequestError(
                f"outcomes: {where} has label {r.label}; labels are class indices 0, 1, ..."
            )
        if r.value is not None and not math.isfinite(r.value):
            raise InvalidRequestError(f"outcomes: {where} has value {r.value}; give a number")
        if not math.isfinite(r.time) or r.time < 0:
            raise InvalidRequestError(
                f"outcomes: {where} has time {r.time}; give unix seconds (or 0: now)"
            )
    return kinds.pop()


def _target(r: OutcomeRow) -> float:
    if r.label is not None:
        return float(r.label)
    if r.value is None:
        raise InvalidRequestError(f"outcomes: {r.request_id!r} has neither a label nor a value")
    return float(r.value)


class OutcomesFileError(ModelfleetError):
    status = Status.FAILED_PRECONDITION
    reason = "outcomes_file"


class OutcomeStore:
    """The outcomes table and operator baselines in SQLite (one connection, serialised)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            # Late labels cannot be fetched again: starting over on our own would lose them.
            raise OutcomesFileError(
                f"{path} is damaged ({exc}); it holds the hub's late labels (outcomes). "
                "Stop the hub and restore it from a backup (`modelfleet-hub restore`), or move "
                "it aside to start with no outcomes"
            ) from None
        # Bumped by every write: part of the accuracy cache's key.
        self.generation = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def kind(self, model: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT kind FROM outcomes WHERE model = ? LIMIT 1", (model,)
            ).fetchone()
        return row[0] if row else None

    def put(self, model: str, rows: Sequence[OutcomeRow]) -> tuple[int, int]:
        """Store a checked batch in one transaction: (added, replaced)."""
        kind = check_outcomes(model, rows)
        now = self.clock()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                held = db.execute(
                    "SELECT kind FROM outcomes WHERE model = ? LIMIT 1", (model,)
                ).fetchone()
                if held and held[0] != kind:
                    raise InvalidRequestError(
                        f"outcomes: model {model!r} has {held[0]} outcomes and this batch has "
                        f"{kind}s; a model is a classifier (label) or a regression (value)"
                    )
                ids = [r.request_id for r in rows]
                existing = 0
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    existing += db.execute(
                        "SELECT count(*) FROM outcomes WHERE model = ? "
                        f"AND request_id IN ({marks})",
                        (model, *chunk),
                    ).fetchone()[0]
                db.executemany(
                    "INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (
                            model,
                            r.request_id,
                            kind,
                            _target(r),
                            r.time or now,
                            now,
                        )
                        for r in rows
                    ],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.generation += 1
        return len(rows) - existing, existing

    def targets(self, model: str) -> tuple[list[str], list[float], str | None]:
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, target, kind FROM outcomes WHERE model = ?", (model,)
            ).fetchall()
        if not rows:
            return [], [], None
        return [r[0] for r in rows], [r[1] for r in rows], rows[0][2]

    def baseline(self, model: str) -> float | None:
        with self._lock:
            row = self._db.execute(
                "SELECT accuracy FROM baselines WHERE model = ?", (model,)
            ).fetchone()
        return float(row[0]) if row else None

    def set_baseline(self, model: str, accuracy: float | None, actor: str) -> bool:
        """Set (or with None remove) the model's reference accuracy; True if one was removed."""
        check_model(model)
        with self._lock:
            if accuracy is None:
                cur = self._db.execute("DELETE FROM baselines WHERE model = ?", (model,))
                self.generation += 1
                return cur.rowcount > 0
            if not (math.isfinite(accuracy) and 0 <= accuracy <= 1):
                raise InvalidRequestError(
                    f"outcomes baseline: {accuracy:g} is not an accuracy; give a number in 0..1"
                )
            self._db.execute(
                "INSERT OR REPLACE INTO baselines VALUES (?, ?, ?, ?)",
                (model, accuracy, self.clock(), actor),
            )
            self.generation += 1
            return False


class OutcomeService:
    """Outcomes (store) joined with captured predictions (capture): what the edges call."""

    def __init__(self, store: OutcomeStore, capture: CaptureStore) -> None:
        self.store = store
        self.capture = capture
        self._cache: OrderedDict[tuple[Any, ...], AccuracyReport] = OrderedDict()
        self._cache_lock = threading.Lock()

    def close(self) -> None:
        self.store.close()

    def report(self, model: str, rows: Sequence[OutcomeRow]) -> tuple[int, int]:
        return self.store.put(model, rows)

    def accuracy(
        self,
        model: str,
        version: int = 0,
        since: float = 0.0,
        output: str = "",
        agents: Collection[str] | None = None,
    ) -> AccuracyReport:
        """Figures per version and arm. Blocking (DuckDB): call from a thread."""
        check_model(model)
        files = self.capture.files(model)
        key = (
            model,
            version,
            since,
            output,
            tuple(sorted(agents)) if agents is not None else None,
            self.store.generation,
            tuple((str(f), f.stat().st_size) for f in files),
        )
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        report = self._compute(model, files, version, since, output, agents)
        with self._cache_lock:
            self._cache[key] = report
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return report

    def _compute(
        self,
        model: str,
        files: list[Path],
        version: int,
        since: float,
        output: str,
        agents: Collection[str] | None,
    ) -> AccuracyReport:
        ids, targets, kind = self.store.targets(model)
        baseline = self.store.baseline(model)
        if not ids:
            return AccuracyReport(
                model,
                baseline=baseline,
                note=f"no outcomes for {model!r} yet: import them with "
                f"`modelfleet-hub outcomes import FILE.parquet --model {model}`",
            )
        if not files:
            return AccuracyReport(
                model,
                outcomes=len(ids),
                unmatched=len(ids),
                baseline=baseline,
                note=f"no captured predictions of {model!r} on the hub to match: turn capture on "
                f"(`modelfleet-hub capture set {model} --rate 100`)",
            )
        rows, unmatched, note = _join(files, ids, targets, version, since, output, agents)
        groups = _groups(rows, kind or LABEL)
        notes = [n for n in (note, groups[1]) if n]
        return AccuracyReport(model, groups[0], len(ids), unmatched, baseline, "; ".join(notes))

    def reference(self, model: str, version: int, min_labels: int) -> tuple[float, str] | None:
        """The accuracy ``version`` is measured against: the operator's baseline if set, else
        the newest older version with at least ``min_labels`` labelled predictions."""
        report = self.accuracy(model)
        if report.baseline is not None:
            return report.baseline, "baseline"
        best: tuple[int, float] | None = None
        for g in report.groups:
            q = g.quality
            if (
                g.arm == ALL_ARMS
                and g.version < version
                and q.accuracy is not None
                and q.labelled >= max(1, min_labels)
                and (best is None or g.version > best[0])
            ):
                best = (g.version, q.accuracy.value)
        if best is None:
            return None
        return best[1], f"v{best[0]}"


def _join(
    files: list[Path],
    ids: list[str],
    targets: list[float],
    version: int,
    since: float,
    output: str,
    agents: Collection[str] | None,
) -> tuple[list[tuple[int, str, list[float], float]], int, str]:
    """(version, arm, outputs, target) of each labelled captured prediction, the unmatched
    outcome count and a note."""
    import duckdb
    import pyarrow as pa

    con = duckdb.connect(":memory:")
    try:
        con.execute("SET threads = 1")
        paths = [str(f) for f in files]
        con.execute(
            "CREATE TABLE c AS SELECT * EXCLUDE (filename), "
            "string_split(filename, '/')[-2] AS agent_id "
            "FROM read_parquet(?, union_by_name = true, filename = true)",
            [paths],
        )
        columns = [r[0] for r in con.execute("DESCRIBE c").fetchall()]
        outs = [c for c in columns if c.startswith("out_")]
        if output:
            if "out_" + output not in columns:
                raise InvalidRequestError(
                    f"outcomes: no captured output {output!r}; the captured outputs are "
                    f"{', '.join(c[4:] for c in outs) or 'none'}"
                )
            out = "out_" + output
        elif outs:
            out = outs[0]
        else:
            raise InvalidRequestError("outcomes: the captured rows hold no output to score")
        note = f"scored output {out[4:]!r} (of {len(outs)})" if len(outs) > 1 else ""
        # The name comes from the model's outputs: quoted as an identifier, never spliced raw.
        quoted = '"' + out.replace('"', '""') + '"'
        con.register("o", pa.table({"request_id": ids, "target": targets}))
        where: list[str] = ["epoch_ms(c.time) >= ?"]
        params: list[Any] = [int(since * 1000)]
        if version:
            where.append("c.version = ?")
            params.append(version)
        if agents is not None:
            where.append("list_contains(?, c.agent_id)")
            params.append(list(agents))
        # A request id captured twice on one arm (a client that reuses ids) counts once.
        rows = con.execute(
            f"SELECT c.version, c.arm, c.{quoted}, o.target FROM c JOIN o USING (request_id) "
            f"WHERE {' AND '.join(where)} "
            "QUALIFY row_number() OVER (PARTITION BY c.request_id, c.version, c.arm "
            "ORDER BY c.time DESC) = 1",
            params,
        ).fetchall()
        unmatched = con.execute(
            "SELECT count(*) FROM o WHERE request_id NOT IN (SELECT request_id FROM c)"
        ).fetchone()
    finally:
        con.close()
    return rows, int(unmatched[0]) if unmatched else 0, note


def _quality(outputs: list[list[float]], targets: list[float], kind: str) -> tuple[Quality, int]:
    """Figures of one group; predictions whose output width is not the group's usual one (a
    request of several rows) are skipped and counted."""
    widths = Counter(len(o) for o in outputs if o is not None)
    if not widths:
        task = CLASSIFIER if kind == LABEL else REGRESSION
        return Quality(task, 0), len(outputs)
    width = widths.most_common(1)[0][0]
    keep = [i for i, o in enumerate(outputs) if o is not None and len(o) == width]
    x = np.array([outputs[i] for i in keep], dtype=np.float64).reshape(len(keep), width)
    t = np.array([targets[i] for i in keep], dtype=np.float64)
    skipped = len(outputs) - len(keep)
    if kind == LABEL:
        return classification(x, t.astype(np.int64)), skipped
    if width != 1:
        raise InvalidRequestError(
            f"outcomes: value outcomes need a single-valued output and the scored one has "
            f"{width} values per request; pick another with --output"
        )
    return regression(x[:, 0], t), skipped


def _groups(rows: list[tuple[int, str, list[float], float]], kind: str) -> tuple[list[Group], str]:
    """Per version every arm together (arm ``*``), and per version and arm."""
    by: dict[tuple[int, str], tuple[list[Any], list[float]]] = {}
    for version, arm, out, target in rows:
        for key in ((int(version), ALL_ARMS), (int(version), str(arm))):
            outs, targets = by.setdefault(key, ([], []))
            outs.append(out)
            targets.append(target)
    groups, skipped = [], 0
    for (version, arm), (outs, targets) in sorted(by.items()):
        quality, dropped = _quality(outs, targets, kind)
        if arm == ALL_ARMS:
            skipped += dropped
        groups.append(Group(version, arm, quality))
    note = (
        f"{skipped} prediction(s) skipped: their output had another width (several rows in "
        "one request)"
        if skipped
        else ""
    )
    return groups, note


__all__ = [
    "ALL_ARMS",
    "MAX_BATCH",
    "OUTCOMES_FILE",
    "AccuracyReport",
    "Group",
    "OutcomeRow",
    "OutcomeService",
    "OutcomeStore",
    "OutcomesFileError",
    "check_outcomes",
]
