"""``modelfleet-batch``: batch scoring of Parquet data (a thin edge over :mod:`batch.engine`).

Errors are printed once as ``modelfleet-batch: error: <message>`` and mapped to the project's
exit codes (``kernel.errors.EXIT_CODES``); the summary goes to stdout as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from modelfleet.kernel.commandline import finish
from modelfleet.kernel.errors import EXIT_CODES, ModelfleetError
from modelfleet.kernel.malloc import tune_malloc

PROG = "modelfleet-batch"


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated column names")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from modelfleet.batch.engine import DEFAULT_BATCH_ROWS, DEFAULT_UNIT_ROWS

    parser = argparse.ArgumentParser(
        prog=PROG, description="Batch scoring of Parquet data with a modelfleet bundle."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "score",
        help="score Parquet input into DIR/run-<run_id>/ (see docs/batch.md)",
        description="Score Parquet input with a bundle. The output is committed atomically to "
        "DIR/run-<run_id>/; an interrupted run resumes when started again with the same "
        "--run-id. See docs/batch.md.",
    )
    p.add_argument("--model", required=True, metavar="BUNDLE_DIR", help="bundle directory")
    p.add_argument(
        "--input",
        required=True,
        metavar="PATH",
        help="a Parquet file, a folder (recursive) or a glob (quote it)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--sql",
        metavar="SELECT",
        help="DuckDB query over the view `input`; needs ORDER BY to be resumable (default: "
        "every row of the input)",
    )
    p.add_argument(
        "--batch-rows",
        type=_positive,
        default=DEFAULT_BATCH_ROWS,
        metavar="N",
        help=f"rows per batch and per model call (default {DEFAULT_BATCH_ROWS})",
    )
    p.add_argument(
        "--unit-rows",
        type=_positive,
        default=DEFAULT_UNIT_ROWS,
        metavar="N",
        help=f"checkpoint grain in rows (default {DEFAULT_UNIT_ROWS})",
    )
    p.add_argument(
        "--threads",
        type=_non_negative,
        default=0,
        metavar="N",
        help="cores onnxruntime may use (N single-threaded model calls at once); also caps "
        "DuckDB and Arrow threads (default 0: all cores)",
    )
    p.add_argument(
        "--features",
        type=_names,
        metavar="f0,f1,...",
        help="scalar columns feeding the model's [batch, F] input, in order (default: a list "
        "column named like the input, or the bundle's feature_names)",
    )
    p.add_argument(
        "--keys",
        type=_names,
        default=(),
        metavar="id,...",
        help="columns copied to the output unchanged (default: none)",
    )
    p.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="bad rows stop the run (fail) or go to DIR/rejected-<run_id>.parquet",
    )
    p.add_argument(
        "--run-id", metavar="ID", help="name the run; an unfinished run resumes (default: a new id)"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="execution provider; auto: CUDA when onnxruntime has it",
    )
    return finish(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_malloc()  # batches of a few MiB are allocated and freed all run long
    # Imported after parsing so that --help stays fast.
    import pyarrow as pa

    from modelfleet.batch.engine import ScoreConfig, new_run_id, score

    run_id = args.run_id or new_run_id()
    print(
        f"{PROG}: run {run_id} (resume an interrupted run with --run-id {run_id})", file=sys.stderr
    )
    if args.threads > 0:
        # This process is the job: Arrow's pool may be capped process-wide (the library leaves
        # it to its host, e.g. the agent).
        pa.set_cpu_count(args.threads)
    config = ScoreConfig(
        model=args.model,
        input=args.input,
        output=args.output,
        sql=args.sql,
        batch_rows=args.batch_rows,
        unit_rows=args.unit_rows,
        threads=args.threads,
        features=args.features,
        keys=args.keys,
        on_error=args.on_error,
        run_id=run_id,
        device=args.device,
    )
    try:
        summary = score(config)
    except ModelfleetError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_CODES[exc.status]
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; resume with --run-id {run_id}", file=sys.stderr)
        return 130
    print(f"{PROG}: {summary.text()}", file=sys.stderr)
    print(json.dumps(summary.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
