"""``modelfleet-hub capture``: a thin edge over ``HubCapture`` (docs/monitoring.md)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelfleet.kernel.errors import InvalidRequestError


def add_capture_commands(
    sub: Any,
    add_json: Callable[[argparse.ArgumentParser], None],
    labels: Callable[[str], dict[str, str]],
) -> None:
    cap = sub.add_parser(
        "capture",
        help="inference capture: sample requests and outputs on agents, query them here",
    )
    csub = cap.add_subparsers(dest="capture_command", required=True)
    cs = csub.add_parser(
        "set",
        help="capture a share of MODEL's requests on the agents the selector matches",
        description="Turn inference capture on (or change it) for MODEL. Agents write sampled "
        "requests and outputs to local Parquet files and ship them here; query them with "
        "`capture query`. The newest setting whose selector matches an agent applies to it.",
    )
    cs.add_argument("model", help="model name")
    cs.add_argument(
        "--rate",
        type=float,
        required=True,
        metavar="PCT",
        help="percent of the model's requests captured, above 0 and at most 100 (required)",
    )
    cs.add_argument(
        "--selector",
        type=labels,
        default={},
        metavar="K=V[,K=V]",
        help="only agents with these labels (default: every agent serving the model)",
    )
    cs.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NAME",
        help="input never written (personal data); repeat for more (default: none)",
    )
    cs.add_argument(
        "--hash",
        action="append",
        default=[],
        metavar="NAME",
        help="input written only as a keyed HMAC-SHA256 of its bytes (per-agent key); repeat "
        "for more (default: none)",
    )
    add_json(cs)
    off = csub.add_parser("off", help="stop capturing MODEL (files already shipped stay)")
    off.add_argument("model", help="model name")
    off.add_argument(
        "--selector",
        type=labels,
        default=None,
        metavar="K=V[,K=V]",
        help="remove only the setting with exactly this selector (default: all of the model's)",
    )
    ls = csub.add_parser("ls", help="capture settings and the captured files the hub holds")
    add_json(ls)
    q = csub.add_parser(
        "query",
        help='run SQL over MODEL\'s captured rows (table "capture") with DuckDB',
        description="SQL over every captured row of MODEL that reached the hub, as table "
        '"capture": request_id, time, model, version, arm, agent_id, in_<input> and '
        "out_<output> (each a list of the tensor's values, or a hex HMAC for hashed inputs).",
    )
    q.add_argument("model", help="model name")
    q.add_argument("sql", help='the query, e.g. "SELECT version, count(*) FROM capture GROUP BY 1"')
    fmt = q.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON rows instead of CSV")
    fmt.add_argument("--csv", action="store_true", help="print CSV with a header row (the default)")
    ex = csub.add_parser(
        "export", help="write MODEL's captured rows to DIR/MODEL.parquet (for training)"
    )
    ex.add_argument("model", help="model name")
    ex.add_argument("dir", type=Path, help="folder to write to (created if missing)")
    ex.add_argument(
        "--sql",
        default="SELECT * FROM capture",
        help='which rows, as SQL over table "capture" (default: SELECT * FROM capture)',
    )


def _stub(args: argparse.Namespace) -> Any:
    from modelfleet.hub.cli import admin_channel
    from modelfleet.protos import fleet_pb2_grpc

    return fleet_pb2_grpc.HubCaptureStub(admin_channel(args))


def _call(fn: Any, request: Any) -> Any:
    from modelfleet.hub.cli import call

    return call(fn, request)


def _query(args: argparse.Namespace, sql: str) -> Any:
    import grpc
    import pyarrow as pa

    from modelfleet.kernel.grpc_status import error_from_rpc
    from modelfleet.protos import fleet_pb2 as pb

    stub = _stub(args)
    try:
        chunks = stub.QueryCapture(pb.QueryCaptureRequest(model=args.model, sql=sql), timeout=600)
        data = b"".join(c.data for c in chunks)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None
    return pa.ipc.open_stream(data).read_all()


def _setting_dict(s: Any) -> dict[str, Any]:
    return {
        "model": s.model,
        "selector": dict(s.selector),
        "rate_pct": s.rate_bp / 100,
        "exclude": list(s.exclude),
        "hash": list(s.hash),
        "created_at": s.created_at,
        "actor": s.actor,
    }


def _pct(pct: float) -> int:
    if not 0 < pct <= 100:
        raise InvalidRequestError(f"--rate takes a percentage above 0 and at most 100, not {pct:g}")
    return max(1, round(pct * 100))


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def cmd_capture(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    c = args.capture_command
    if c == "set":
        req = pb.CaptureSetting(
            model=args.model,
            selector=args.selector,
            rate_bp=_pct(args.rate),
            exclude=args.exclude,
            hash=args.hash,
        )
        resp = _call(_stub(args).SetCapture, req)
        if args.json:
            print(json.dumps(_setting_dict(resp), indent=2))
            return 0
        sel = ",".join(f"{k}={v}" for k, v in sorted(resp.selector.items())) or "every agent"
        extra = "".join(
            f"; {what} {', '.join(names)}"
            for what, names in (("excluded", resp.exclude), ("hashed", resp.hash))
            if names
        )
        print(f"{resp.model}: capturing {resp.rate_bp / 100:g}% of requests on {sel}{extra}")
        return 0
    if c == "off":
        req_off = pb.RemoveCaptureRequest(model=args.model, selector=args.selector or {})
        removed = _call(_stub(args).RemoveCapture, req_off).removed
        print(f"{args.model}: capture off ({removed} setting(s) removed)")
        return 0
    if c == "ls":
        resp_ls = _call(_stub(args).ListCapture, pb.ListCaptureRequest())
        if args.json:
            out = {
                "settings": [_setting_dict(s) for s in resp_ls.settings],
                "stored": [
                    {"model": s.model, "files": s.files, "bytes": s.bytes} for s in resp_ls.stored
                ],
            }
            print(json.dumps(out, indent=2))
            return 0
        print(f"{'MODEL':<16} {'SELECTOR':<20} {'RATE':>6} {'EXCLUDE':<16} {'HASH':<16} SET")
        for s in resp_ls.settings:
            sel = ",".join(f"{k}={v}" for k, v in sorted(s.selector.items())) or "*"
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created_at))
            print(
                f"{s.model:<16} {sel:<20} {s.rate_bp / 100:>5g}% "
                f"{','.join(s.exclude) or '-':<16} {','.join(s.hash) or '-':<16} {when}"
            )
        for st in resp_ls.stored:
            print(f"stored: {st.model}: {st.files} file(s), {st.bytes} bytes")
        return 0
    if c == "query":
        table = _query(args, args.sql)
        rows = table.to_pylist()
        if args.json:
            print(json.dumps([{k: _plain(v) for k, v in r.items()} for r in rows], indent=2))
            return 0
        w = csv.writer(sys.stdout)
        w.writerow(table.column_names)
        for r in rows:
            w.writerow(
                [json.dumps(_plain(v)) if isinstance(v, list) else _plain(v) for v in r.values()]
            )
        return 0
    if c == "export":
        import pyarrow.parquet as pq

        table = _query(args, args.sql)
        args.dir.mkdir(parents=True, exist_ok=True)
        target = args.dir / f"{args.model}.parquet"
        tmp = target.with_name(target.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(target)
        print(f"{args.model}: {table.num_rows} row(s) written to {target}")
        return 0
    raise InvalidRequestError(f"unknown capture command {c!r}")


__all__ = ["add_capture_commands", "cmd_capture"]
