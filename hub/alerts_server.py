"""gRPC edge of alerting (service ``HubAlerts``): admin identity, conversion, nothing else."""

from __future__ import annotations

import time

from modelfleet.hub.alert_manager import AlertManager, Event, RuleStatus, WebhookRow
from modelfleet.hub.alerts import AlertState, Rule
from modelfleet.hub.server import caller, unary
from modelfleet.protos import fleet_pb2 as pb
from modelfleet.protos import fleet_pb2_grpc as pb_grpc

# `alerts ls` shows resolved alerts this long after they resolved (`alerts history` keeps all).
RESOLVED_SHOWN_S = 3600.0


def rule_to_proto(status: RuleStatus) -> pb.AlertRule:
    r = status.rule
    msg = pb.AlertRule(
        name=r.name,
        metric=r.metric,
        comparison=r.comparison,
        threshold=r.threshold,
        for_s=r.for_s,
        window_s=r.window_s,
        clear_for_s=r.clear_for_s,
        model=r.model,
        selector=dict(r.selector),
        severity=r.severity,
        webhooks=list(r.webhooks),
        retrain=r.retrain,
        min_requests=r.min_requests,
        enabled=r.enabled,
        builtin=r.builtin,
        no_data=status.no_data,
    )
    if r.clear_threshold is not None:
        msg.clear_threshold = r.clear_threshold
    return msg


def rule_from_proto(msg: pb.AlertRule) -> Rule:
    return Rule(
        name=msg.name,
        metric=msg.metric,
        comparison=msg.comparison,
        threshold=msg.threshold,
        for_s=msg.for_s,
        window_s=msg.window_s,
        clear_for_s=msg.clear_for_s,
        clear_threshold=msg.clear_threshold if msg.HasField("clear_threshold") else None,
        model=msg.model,
        selector=dict(msg.selector),
        severity=msg.severity,
        webhooks=tuple(msg.webhooks),
        retrain=msg.retrain,
        min_requests=int(msg.min_requests),
        enabled=msg.enabled,
    ).validate()


def instance_to_proto(s: AlertState, rule: Rule | None) -> pb.AlertInstance:
    msg = pb.AlertInstance(
        rule=s.rule,
        model=s.model,
        version=s.version,
        selector=s.selector,
        state=s.state,
        since=s.since,
        updated_at=s.updated_at,
    )
    if s.value is not None:
        msg.value = s.value
    if rule is not None:
        msg.threshold = rule.threshold
        msg.severity = rule.severity
        msg.metric = rule.metric
        msg.comparison = rule.comparison
    return msg


def event_to_proto(e: Event) -> pb.AlertEvent:
    msg = pb.AlertEvent(
        at=e.at,
        rule=e.rule,
        model=e.model,
        version=e.version,
        selector=e.selector,
        state=e.state,
        previous=e.previous,
        threshold=e.threshold,
        idempotency_key=e.idempotency_key,
    )
    if e.value is not None:
        msg.value = e.value
    return msg


def webhook_to_proto(w: WebhookRow) -> pb.WebhookInfo:
    return pb.WebhookInfo(
        name=w.name,
        url=w.url,
        created_at=w.created_at,
        pending=w.pending,
        delivered=w.delivered,
        failed=w.failed,
        last_error=w.last_error,
    )


class AlertsServicer(pb_grpc.HubAlertsServicer):
    def __init__(self, alerts: AlertManager) -> None:
        self.alerts = alerts

    @unary
    async def ListAlerts(self, request, context):
        caller(context, "admin")
        statuses = self.alerts.rule_statuses()
        rules = {s.rule.name: s.rule for s in statuses}
        recent = time.time() - RESOLVED_SHOWN_S
        states = sorted(
            (
                s
                for s in self.alerts.store.states().values()
                if s.state in ("pending", "firing") or (s.state == "resolved" and s.since > recent)
            ),
            key=lambda s: s.key,
        )
        return pb.ListAlertsResponse(
            rules=[rule_to_proto(s) for s in statuses],
            alerts=[instance_to_proto(s, rules.get(s.rule)) for s in states],
        )

    @unary
    async def AlertHistory(self, request, context):
        caller(context, "admin")
        since = time.time() - request.since_s if request.since_s > 0 else 0.0
        events = self.alerts.store.history(since, request.model)
        return pb.AlertHistoryResponse(events=[event_to_proto(e) for e in events])

    @unary
    async def SetAlertRule(self, request, context):
        actor = caller(context, "admin")
        rule = self.alerts.store.set_rule(rule_from_proto(request), actor)
        source = self.alerts.sources.get(rule.metric)
        return rule_to_proto(RuleStatus(rule, source.no_data_reason if source else ""))

    @unary
    async def RemoveAlertRule(self, request, context):
        caller(context, "admin")
        restored = self.alerts.store.remove_rule(request.name)
        return pb.RemoveAlertRuleResponse(builtin_restored=restored)

    @unary
    async def AddWebhook(self, request, context):
        caller(context, "admin")
        self.alerts.store.add_webhook(
            request.name, request.url, bytes(request.secret), replace=request.replace
        )
        row = next(w for w in self.alerts.store.webhooks() if w.name == request.name)
        return webhook_to_proto(row)

    @unary
    async def ListWebhooks(self, request, context):
        caller(context, "admin")
        return pb.ListWebhooksResponse(
            webhooks=[webhook_to_proto(w) for w in self.alerts.store.webhooks()]
        )

    @unary
    async def RemoveWebhook(self, request, context):
        caller(context, "admin")
        return pb.RemoveWebhookResponse(dropped=self.alerts.store.remove_webhook(request.name))


__all__ = ["AlertsServicer", "rule_from_proto", "rule_to_proto"]
