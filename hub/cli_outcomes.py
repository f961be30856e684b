"""``modelfleet-hub outcomes``: late labels in, accuracy out; a thin edge over ``HubOutcomes``
(docs/monitoring.md#accuracy-from-late-labels)."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfleet.kernel.errors import InvalidRequestError

if TYPE_CHECKING:
    from modelfleet.hub.outcomes import OutcomeRow

_FIX = (
    "write the outcomes as Parquet with a request_id column and a label column (classifiers: "
    "the true class index) or a value column (regressions), and optionally time"
)


def add_outcome_commands(
    sub: Any,
    duration: Callable[[str], float],
    add_json: Callable[[argparse.ArgumentParser], None],
) -> None:
    out = sub.add_parser(
        "outcomes",
        help="late labels (ground truth) by request id, and the accuracy they give",
    )
    osub = out.add_subparsers(dest="outcomes_command", required=True)
    im = osub.add_parser(
        "import",
        help="store the outcomes in a Parquet file (request_id, label or value, optional time)",
        description="Send late labels to the hub. Columns: request_id (as the client sent it "
        "with the request), then label (the true class index: classifiers) or value (the true "
        "number: regressions), optionally time (when the outcome was observed; a timestamp or "
        "unix seconds) and model (instead of --model). A request id imported again replaces "
        "its outcome: re-importing a file changes nothing. The whole file is checked before "
        "anything is sent.",
    )
    im.add_argument("file", type=Path, help="the Parquet file")
    im.add_argument(
        "--model",
        default="",
        help="the model the outcomes are for (default: the file's model column)",
    )
    add_json(im)
    sh = osub.add_parser(
        "show",
        help="accuracy per version and experiment arm, from outcomes joined with capture",
        description="Joins the model's outcomes with the predictions agents captured "
        "(`capture set`) by request id. Classifiers: accuracy, precision, recall, AUC; "
        "regressions: MAE, RMSE; each with a 95% interval (docs/monitoring.md).",
    )
    sh.add_argument("model", help="model name")
    sh.add_argument(
        "--version", type=int, default=0, help="only this version (default: every version)"
    )
    sh.add_argument(
        "--since",
        type=duration,
        default=None,
        metavar="DURATION",
        help="only predictions made in this window ending now, e.g. 7d (default: all)",
    )
    sh.add_argument(
        "--output",
        default="",
        help="the output tensor holding the prediction (default: the first captured output)",
    )
    add_json(sh)
    bl = osub.add_parser(
        "baseline",
        help="set the reference accuracy accuracy_drop is measured from",
        description="By default accuracy_drop compares a version with the newest older "
        "version that has enough labels; a baseline replaces that reference for the model.",
    )
    bl.add_argument("model", help="model name")
    grp = bl.add_mutually_exclusive_group(required=True)
    grp.add_argument("accuracy", nargs="?", type=float, help="the reference accuracy, 0 to 1")
    grp.add_argument("--clear", action="store_true", help="remove the baseline")


# -- reading the file ----------------------------------------------------------------------------


def _row_error(path: Path, row: int, text: str) -> InvalidRequestError:
    return InvalidRequestError(f"{path}: row {row}: {text}")


def read_outcomes(path: Path, model: str = "") -> dict[str, list[OutcomeRow]]:
    """The file's outcomes per model, or an error naming the column or row and the fix."""
    # Imported here, not at the top: the hub's store (numpy, the registry) is a good part of
    # the CLI's start-up, which every other command would pay for nothing.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modelfleet.hub.outcomes import OutcomeRow

    if not path.is_file():
        raise InvalidRequestError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidRequestError(f"{path}: cannot read it as Parquet ({exc}); {_FIX}") from None
    cols = table.column_names
    if "request_id" not in cols:
        raise InvalidRequestError(
            f"{path}: no request_id column (it has {', '.join(cols) or 'none'}); {_FIX}"
        )
    has_label, has_value = "label" in cols, "value" in cols
    if has_label == has_value:
        what = "both a label and a value column" if has_label else "no label or value column"
        raise InvalidRequestError(
            f"{path}: {what}; give label (classifiers: the true class index) or value "
            "(regressions: the true number), one of them"
        )
    if table.num_rows == 0:
        raise InvalidRequestError(f"{path}: no rows")
    if not model and "model" not in cols:
        raise InvalidRequestError(f"{path}: no model column; give --model MODEL")

    ids = _strings(path, table.column("request_id"), "request_id")
    target_name = "label" if has_label else "value"
    target = table.column(target_name)
    if has_label:
        labels = _labels(path, target)
    else:
        values = _values(path, target)
    times = _times(path, table.column("time")) if "time" in cols else [0.0] * table.num_rows
    models = (
        _strings(path, table.column("model"), "model")
        if "model" in cols
        else [model] * table.num_rows
    )
    out: dict[str, list[OutcomeRow]] = {}
    seen: dict[tuple[str, str], int] = {}
    for i in range(table.num_rows):
        row = i + 1
        m = models[i]
        if model and m != model:
            raise _row_error(path, row, f"model {m!r}, but --model is {model!r}")
        key = (m, ids[i])
        if key in seen:
            raise _row_error(
                path,
                row,
                f"request_id {ids[i]!r} repeats row {seen[key]}; give each request id once "
                "(a later import replaces an earlier one)",
            )
        seen[key] = row
        if has_label:
            o = OutcomeRow(ids[i], label=labels[i], time=times[i])
        else:
            o = OutcomeRow(ids[i], value=values[i], time=times[i])
        out.setdefault(m, []).append(o)
    return out


def _strings(path: Path, col: Any, name: str) -> list[str]:
    import pyarrow as pa

    if pa.types.is_integer(col.type):
        col = col.cast(pa.string())
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise InvalidRequestError(f"{path}: column {name} is {col.type}; it must hold text")
    values = col.to_pylist()
    for i, v in enumerate(values):
        if not v:
            raise _row_error(path, i + 1, f"{name} is empty; every row needs one")
    return values


def _labels(path: Path, col: Any) -> list[int]:
    import pyarrow as pa

    t = col.type
    if not (pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t)):
        raise InvalidRequestError(
            f"{path}: column label is {t}; labels are class indices (0, 1, ...): map class "
            "names to the positions of the model's output first"
        )
    out = []
    for i, v in enumerate(col.to_pylist()):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            raise _row_error(path, i + 1, "label is empty; every row needs one")
        if isinstance(v, float) and not v.is_integer():
            raise _row_error(path, i + 1, f"label {v:g} is not a class index (0, 1, ...)")
        if int(v) < 0:
            raise _row_error(
                path, i + 1, f"label {int(v)} is negative; class indices are 0, 1, ..."
            )
        out.append(int(v))
    return out


def _values(path: Path, col: Any) -> list[float]:
    import pyarrow as pa

    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise InvalidRequestError(f"{path}: column value is {col.type}; it must hold numbers")
    out = []
    for i, v in enumerate(col.to_pylist()):
        if v is None or not math.isfinite(v):
            raise _row_error(path, i + 1, f"value {v} is not a number; every row needs one")
        out.append(float(v))
    return out


def _times(path: Path, col: Any) -> list[float]:
    import pyarrow as pa

    t = col.type
    if pa.types.is_timestamp(t):
        seconds = col.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()
        return [0.0 if s is None else s / 1e6 for s in seconds]
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        out = []
        for i, v in enumerate(col.to_pylist()):
            if v is not None and (not math.isfinite(v) or v < 0):
                raise _row_error(path, i + 1, f"time {v} is not unix seconds")
            out.append(0.0 if v is None else float(v))
        return out
    raise InvalidRequestError(
        f"{path}: column time is {t}; give a timestamp or unix seconds (or leave it out)"
    )


# -- the commands --------------------------------------------------------------------------------


def _stub(args: argparse.Namespace) -> Any:
    from modelfleet.hub.cli import admin_channel
    from modelfleet.protos import fleet_pb2_grpc

    return fleet_pb2_grpc.HubOutcomesStub(admin_channel(args))


def _call(fn: Any, request: Any) -> Any:
    from modelfleet.hub.cli import call

    return call(fn, request)


def _outcome_proto(o: OutcomeRow) -> Any:
    from modelfleet.protos import fleet_pb2 as pb

    if o.label is not None:
        return pb.Outcome(request_id=o.request_id, label=o.label, time=o.time)
    return pb.Outcome(request_id=o.request_id, value=o.value, time=o.time)


def _interval(i: Any) -> dict[str, float] | None:
    return {"value": i.value, "low": i.low, "high": i.high} if i.present else None


def _cell(i: Any) -> str:
    return f"{i.value:.3f} [{i.low:.3f},{i.high:.3f}]" if i.present else "-"


def accuracy_dict(resp: Any) -> dict[str, Any]:
    return {
        "outcomes": resp.outcomes,
        "unmatched": resp.unmatched,
        "baseline": resp.baseline.value if resp.baseline.present else None,
        "note": resp.note,
        "groups": [
            {
                "version": g.version,
                "arm": g.arm,
                "task": g.task,
                "labelled": g.labelled,
                **{
                    k: _interval(getattr(g, k))
                    for k in ("accuracy", "precision", "recall", "auc", "mae", "rmse")
                },
            }
            for g in resp.groups
        ],
    }


def _render(model: str, resp: Any) -> str:
    base = f"; baseline {resp.baseline.value:.3f}" if resp.baseline.present else ""
    lines = [
        f"{model}: {resp.outcomes} outcome(s), {resp.unmatched} matching no captured "
        f"prediction{base}"
    ]
    arms: dict[int, int] = {}
    for g in resp.groups:
        if g.arm != "*":
            arms[g.version] = arms.get(g.version, 0) + 1
    # A version's row for every arm together only where it has more than one arm.
    shown = [g for g in resp.groups if g.arm != "*" or arms.get(g.version, 0) > 1]
    if any(g.task == "regression" for g in shown):
        lines.append(f"{'VERSION':<8} {'ARM':<10} {'LABELLED':>8}  {'MAE':<26} RMSE")
        for g in shown:
            lines.append(
                f"{'v' + str(g.version):<8} {('all' if g.arm == '*' else g.arm):<10} "
                f"{g.labelled:>8}  {_cell(g.mae):<26} {_cell(g.rmse)}"
            )
    elif shown:
        lines.append(
            f"{'VERSION':<8} {'ARM':<10} {'LABELLED':>8}  {'ACCURACY':<22} {'PRECISION':<22} "
            f"{'RECALL':<22} AUC"
        )
        for g in shown:
            lines.append(
                f"{'v' + str(g.version):<8} {('all' if g.arm == '*' else g.arm):<10} "
                f"{g.labelled:>8}  {_cell(g.accuracy):<22} {_cell(g.precision):<22} "
                f"{_cell(g.recall):<22} {_cell(g.auc)}"
            )
    else:
        lines.append("no labelled predictions yet")
    if resp.note:
        lines.append(f"note: {resp.note}")
    return "\n".join(lines)


def cmd_outcomes(args: argparse.Namespace) -> int:
    from modelfleet.hub.outcomes import MAX_BATCH
    from modelfleet.protos import fleet_pb2 as pb

    c = args.outcomes_command
    if c == "import":
        per_model = read_outcomes(args.file, args.model)
        stub = _stub(args)
        result = {}
        for model, rows in per_model.items():
            added = replaced = 0
            for start in range(0, len(rows), MAX_BATCH):
                batch = rows[start : start + MAX_BATCH]
                req = pb.ReportOutcomesRequest(
                    model=model, outcomes=[_outcome_proto(o) for o in batch]
                )
                resp = _call(stub.ReportOutcomes, req)
                added += resp.added
                replaced += resp.replaced
            result[model] = {"added": added, "replaced": replaced}
            if not args.json:
                print(f"{model}: {len(rows)} outcome(s) stored ({added} new, {replaced} replaced)")
        if args.json:
            print(json.dumps(result, indent=2))
        return 0
    if c == "show":
        since = time.time() - args.since if args.since else 0.0
        req_acc = pb.AccuracyRequest(
            model=args.model, version=args.version, since=since, output=args.output
        )
        resp_acc = _call(_stub(args).Accuracy, req_acc)
        if args.json:
            print(json.dumps(accuracy_dict(resp_acc), indent=2))
        else:
            print(_render(args.model, resp_acc))
        return 0
    if c == "baseline":
        if args.clear:
            req_b = pb.SetAccuracyBaselineRequest(model=args.model, clear=True)
            removed = _call(_stub(args).SetAccuracyBaseline, req_b).removed
            print(f"{args.model}: " + ("baseline removed" if removed else "no baseline was set"))
            return 0
        req_b = pb.SetAccuracyBaselineRequest(model=args.model, accuracy=args.accuracy)
        _call(_stub(args).SetAccuracyBaseline, req_b)
        print(f"{args.model}: accuracy_drop is measured from {args.accuracy:g}")
        return 0
    raise InvalidRequestError(f"unknown outcomes command {c!r}")


__all__ = ["accuracy_dict", "add_outcome_commands", "cmd_outcomes", "read_outcomes"]
