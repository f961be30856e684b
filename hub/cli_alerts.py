"""``modelfleet-hub alerts`` and ``modelfleet-hub webhooks``: thin edges over ``HubAlerts``.

Webhook secrets are read from a file or standard input, never from the command line (other
local users can read argv), and never printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from modelfleet.kernel.commandline import message_dict
from modelfleet.kernel.errors import InvalidRequestError

# What `rule set` starts from for a new rule (an existing rule starts from its own values).
NEW_RULE = {
    "comparison": ">",
    "for_s": 60.0,
    "window_s": 300.0,
    "clear_for_s": 60.0,
    "model": "*",
    "severity": "warning",
    "min_requests": 10,
}


def add_alert_commands(
    sub: Any,
    duration: Callable[[str], float],
    add_json: Callable[[argparse.ArgumentParser], None],
    labels: Callable[[str], dict[str, str]],
) -> None:
    from modelfleet.hub.alerts import COMPARISONS, METRICS, SEVERITIES

    al = sub.add_parser("alerts", help="alert rules, their current states and history")
    asub = al.add_subparsers(dest="alerts_command", required=True)
    ls = asub.add_parser("ls", help="every rule in force and the alerts pending or firing")
    add_json(ls)
    hist = asub.add_parser("history", help="alert state changes, oldest first")
    hist.add_argument(
        "--since",
        type=duration,
        default=86400.0,
        help="changes in this window ending now, e.g. 1h, 7d (default: 1d)",
    )
    hist.add_argument("--model", default="", help="only this model (default: every model)")
    add_json(hist)

    rule = asub.add_parser("rule", help="create, change or remove alert rules")
    rsub = rule.add_subparsers(dest="rule_command", required=True)
    rs = rsub.add_parser(
        "set",
        help="create a rule, or change the named one (flags not given keep its values)",
        description="Create or change an alert rule. A built-in's name (latency-p99, "
        "error-rate, drift-psi, accuracy-drop) changes that built-in everywhere; a new name "
        "with --model and/or --selector overrides it for those models/agents only. Flags not "
        "given keep the rule's current values, or the defaults shown for a new rule.",
    )
    rs.add_argument("name", help="rule name (a-z 0-9 . _ -)")
    rs.add_argument(
        "--metric",
        choices=sorted(METRICS),
        help="what is measured (default: the rule's current metric; required for a new rule)",
    )
    rs.add_argument(
        "--comparison",
        choices=COMPARISONS,
        help="how the value is compared with the threshold (default: current, new: >)",
    )
    rs.add_argument(
        "--threshold",
        type=float,
        help="fires when the value is past this (default: current; required for a new rule)",
    )
    rs.add_argument(
        "--for",
        dest="for_s",
        type=duration,
        metavar="DURATION",
        help="how long the condition must hold before firing, e.g. 0s, 1m "
        "(default: current, new: 1m)",
    )
    rs.add_argument(
        "--window",
        dest="window_s",
        type=duration,
        metavar="DURATION",
        help="telemetry window each evaluation measures (default: current, new: 5m)",
    )
    rs.add_argument(
        "--clear-for",
        dest="clear_for_s",
        type=duration,
        metavar="DURATION",
        help="how long the value must be back before a firing alert resolves "
        "(default: current, new: 1m)",
    )
    rs.add_argument(
        "--clear-threshold",
        type=float,
        help="the value counts as back only past this, on the healthy side "
        "(default: current, new: the threshold)",
    )
    rs.add_argument(
        "--model",
        help="model name or pattern (fnmatch, e.g. 'fraud-*') (default: current, new: *)",
    )
    rs.add_argument(
        "--selector",
        type=labels,
        metavar="KEY=VALUE,...",
        help="measure only agents with these labels; '' for the whole fleet "
        "(default: current, new: the whole fleet)",
    )
    rs.add_argument(
        "--severity", choices=SEVERITIES, help="severity (default: current, new: warning)"
    )
    rs.add_argument(
        "--webhook",
        action="append",
        metavar="NAME",
        help="notify this webhook; repeat for several (default: current, new: every webhook)",
    )
    rs.add_argument(
        "--retrain",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a retraining trigger: the payload names model, version, evidence and captured "
        "data (default: current, new: off)",
    )
    rs.add_argument(
        "--min-requests",
        type=int,
        help="fewer requests in the window count as no data (default: current, new: 10)",
    )
    rs.add_argument(
        "--enabled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--no-enabled silences the rule (for the models it matches, when it overrides a "
        "broader one) (default: current, new: enabled)",
    )
    add_json(rs)
    rm = rsub.add_parser("rm", help="remove a rule (a built-in's override: the default is back)")
    rm.add_argument("name", help="rule name")

    wh = sub.add_parser("webhooks", help="where alert notifications are sent")
    wsub = wh.add_subparsers(dest="webhooks_command", required=True)
    wa = wsub.add_parser(
        "add",
        help="add a webhook; its HMAC secret comes from a file or standard input",
        description="Add a webhook. Notifications are POSTed as JSON, signed with HMAC-SHA256 "
        "over TIMESTAMP.BODY with the secret (docs/monitoring.md#webhooks). The secret is "
        "read from --secret-file or standard input, never from the command line.",
    )
    wa.add_argument("name", help="webhook name (a-z 0-9 . _ -)")
    wa.add_argument("url", help="http:// or https:// URL the hub POSTs to")
    wa.add_argument(
        "--secret-file",
        default="-",
        metavar="FILE",
        help="file holding the secret, 16 to 4096 bytes; - reads standard input (default: -)",
    )
    wa.add_argument(
        "--replace",
        action="store_true",
        help="replace a webhook of the same name (default: refuse)",
    )
    wls = wsub.add_parser("ls", help="webhooks with their delivered, queued and failed counts")
    add_json(wls)
    wrm = wsub.add_parser("rm", help="remove a webhook (its queued notifications are dropped)")
    wrm.add_argument("name", help="webhook name")


def _stub(args: argparse.Namespace) -> Any:
    from modelfleet.hub.cli import admin_channel
    from modelfleet.protos import fleet_pb2_grpc

    return fleet_pb2_grpc.HubAlertsStub(admin_channel(args))


def _call(fn: Any, request: Any) -> Any:
    from modelfleet.hub.cli import call

    return call(fn, request)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _val(msg: Any, field: str = "value") -> str:
    return f"{getattr(msg, field):.4g}" if msg.HasField(field) else "-"


def _dump(msg: Any) -> dict[str, Any]:
    return message_dict(msg)


def cmd_alerts(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    stub = _stub(args)
    if args.alerts_command == "ls":
        resp = _call(stub.ListAlerts, pb.ListAlertsRequest())
        if args.json:
            print(json.dumps(_dump(resp), indent=2))
            return 0
        print(
            f"{'RULE':<18} {'METRIC':<15} {'CONDITION':<12} {'FOR':>6} {'WINDOW':>7} "
            f"{'MODEL':<12} {'SELECTOR':<14} {'SEVERITY':<9} NOTES"
        )
        for r in resp.rules:
            notes = []
            if r.builtin:
                notes.append("built-in")
            if not r.enabled:
                notes.append("disabled")
            if r.retrain:
                notes.append("retrain")
            if r.webhooks:
                notes.append("webhooks=" + ",".join(r.webhooks))
            if r.no_data:
                notes.append(r.no_data)
            sel = ",".join(f"{k}={v}" for k, v in sorted(r.selector.items())) or "*"
            print(
                f"{r.name:<18} {r.metric:<15} {r.comparison + ' ' + format(r.threshold, 'g'):<12} "
                f"{r.for_s:>5g}s {r.window_s:>6g}s {r.model:<12} {sel:<14} {r.severity:<9} "
                f"{'; '.join(notes)}"
            )
        print()
        if not resp.alerts:
            print("no alerts pending or firing")
            return 0
        print(
            f"{'STATE':<9} {'RULE':<18} {'MODEL':<12} {'VERSION':>7} {'SELECTOR':<14} "
            f"{'VALUE':>10} {'THRESHOLD':>10} SINCE"
        )
        for a in resp.alerts:
            print(
                f"{a.state:<9} {a.rule:<18} {a.model:<12} {a.version:>7} {a.selector or '*':<14} "
                f"{_val(a):>10} {a.comparison + ' ' + format(a.threshold, 'g'):>10} "
                f"{_when(a.since)}"
            )
        return 0
    if args.alerts_command == "history":
        resp = _call(
            stub.AlertHistory, pb.AlertHistoryRequest(since_s=args.since, model=args.model)
        )
        if args.json:
            print(json.dumps(_dump(resp).get("events", []), indent=2))
            return 0
        if not resp.events:
            print("no alert state changes in this window")
            return 0
        for e in resp.events:
            sel = f" [{e.selector}]" if e.selector else ""
            print(
                f"{_when(e.at)}  {e.rule} {e.model} v{e.version}{sel}: {e.previous} -> "
                f"{e.state} (value {_val(e)}, threshold {e.threshold:g})"
            )
        return 0
    return _cmd_rule(args, stub)


def _cmd_rule(args: argparse.Namespace, stub: Any) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    if args.rule_command == "rm":
        resp = _call(stub.RemoveAlertRule, pb.RemoveAlertRuleRequest(name=args.name))
        if resp.builtin_restored:
            print(f"removed the override of built-in rule {args.name}: its default is in force")
        else:
            print(f"removed alert rule {args.name}")
        return 0
    current = next(
        (r for r in _call(stub.ListAlerts, pb.ListAlertsRequest()).rules if r.name == args.name),
        None,
    )
    rule = pb.AlertRule()
    if current is not None:
        rule.CopyFrom(current)
        rule.builtin = False
        rule.no_data = ""
    else:
        rule.name = args.name
        rule.enabled = True
        for key, value in NEW_RULE.items():
            setattr(rule, key, value)
        if args.metric is None or args.threshold is None:
            raise InvalidRequestError(
                f"{args.name!r} is a new rule: give at least --metric and --threshold"
            )
    for key in ("metric", "comparison", "threshold", "for_s", "window_s", "clear_for_s"):
        if getattr(args, key) is not None:
            setattr(rule, key, getattr(args, key))
    for key in ("model", "severity", "min_requests", "retrain", "enabled", "clear_threshold"):
        if getattr(args, key) is not None:
            setattr(rule, key, getattr(args, key))
    if args.selector is not None:
        rule.selector.clear()
        rule.selector.update(args.selector)
    if args.webhook is not None:
        del rule.webhooks[:]
        rule.webhooks.extend(args.webhook)
    saved = _call(stub.SetAlertRule, rule)
    if args.json:
        print(json.dumps(_dump(saved), indent=2))
        return 0
    print(
        f"alert rule {saved.name}: {saved.metric} {saved.comparison} {saved.threshold:g} for "
        f"{saved.for_s:g}s over {saved.window_s:g}s, model {saved.model}"
        + (f", agents {dict(saved.selector)}" if saved.selector else "")
        + ("" if saved.enabled else " (disabled)")
    )
    if saved.no_data:
        print(f"note: {saved.no_data}", file=sys.stderr)
    return 0


def _read_secret(path: str) -> bytes:
    if path == "-":
        if sys.stdin.isatty():
            import getpass

            # Typed, not echoed: the secret stays off the screen and out of the scrollback.
            data = getpass.getpass("webhook secret: ").encode()
        else:
            data = sys.stdin.buffer.read()
    else:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot read the webhook secret from {path}: {exc.strerror}"
            ) from None
    # A trailing newline from `echo` or an editor is not part of the secret.
    return data.rstrip(b"\r\n")


def cmd_webhooks(args: argparse.Namespace) -> int:
    from modelfleet.protos import fleet_pb2 as pb

    stub = _stub(args)
    if args.webhooks_command == "add":
        secret = _read_secret(args.secret_file)
        w = _call(
            stub.AddWebhook,
            pb.AddWebhookRequest(name=args.name, url=args.url, secret=secret, replace=args.replace),
        )
        print(f"webhook {w.name} -> {w.url} added (secret stored on the hub, not shown)")
        return 0
    if args.webhooks_command == "rm":
        resp = _call(stub.RemoveWebhook, pb.RemoveWebhookRequest(name=args.name))
        extra = f"; {resp.dropped} undelivered notification(s) dropped" if resp.dropped else ""
        print(f"removed webhook {args.name}{extra}")
        return 0
    resp = _call(stub.ListWebhooks, pb.ListWebhooksRequest())
    if args.json:
        print(json.dumps(_dump(resp).get("webhooks", []), indent=2))
        return 0
    if not resp.webhooks:
        print("no webhooks (add one with `modelfleet-hub webhooks add NAME URL`)")
        return 0
    print(f"{'NAME':<16} {'DELIVERED':>9} {'QUEUED':>6} {'FAILED':>6}  URL  LAST ERROR")
    for w in resp.webhooks:
        print(
            f"{w.name:<16} {w.delivered:>9} {w.pending:>6} {w.failed:>6}  {w.url}  "
            f"{w.last_error or '-'}"
        )
    return 0


__all__ = ["add_alert_commands", "cmd_alerts", "cmd_webhooks"]
