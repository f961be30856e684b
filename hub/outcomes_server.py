"""gRPC edge of late labels (service ``HubOutcomes``): identity, conversion, nothing else."""

from __future__ import annotations

import asyncio

from modelfleet.hub.accuracy import Interval
from modelfleet.hub.outcomes import AccuracyReport, OutcomeRow, OutcomeService
from modelfleet.hub.server import caller, unary
from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.protos import fleet_pb2 as pb
from modelfleet.protos import fleet_pb2_grpc as pb_grpc


def _row(i: int, o: pb.Outcome) -> OutcomeRow:
    which = o.WhichOneof("target")
    if which is None:
        raise InvalidRequestError(
            f"outcomes: outcome {i} ({o.request_id!r}) has neither a label nor a value"
        )
    if which == "label":
        return OutcomeRow(o.request_id, label=o.label, time=o.time)
    return OutcomeRow(o.request_id, value=o.value, time=o.time)


def interval_to_proto(i: Interval | None) -> pb.Interval:
    if i is None:
        return pb.Interval(present=False)
    return pb.Interval(value=i.value, low=i.low, high=i.high, present=True)


def report_to_proto(r: AccuracyReport) -> pb.AccuracyResponse:
    groups = [
        pb.AccuracyGroup(
            version=g.version,
            arm=g.arm,
            task=g.quality.task,
            labelled=g.quality.labelled,
            accuracy=interval_to_proto(g.quality.accuracy),
            precision=interval_to_proto(g.quality.precision),
            recall=interval_to_proto(g.quality.recall),
            auc=interval_to_proto(g.quality.auc),
            mae=interval_to_proto(g.quality.mae),
            rmse=interval_to_proto(g.quality.rmse),
        )
        for g in r.groups
    ]
    baseline = (
        pb.Interval(value=r.baseline, low=r.baseline, high=r.baseline, present=True)
        if r.baseline is not None
        else pb.Interval(present=False)
    )
    return pb.AccuracyResponse(
        groups=groups, outcomes=r.outcomes, unmatched=r.unmatched, baseline=baseline, note=r.note
    )


class OutcomesServicer(pb_grpc.HubOutcomesServicer):
    def __init__(self, outcomes: OutcomeService) -> None:
        self.outcomes = outcomes

    @unary
    async def ReportOutcomes(self, request, context):
        caller(context, "admin")
        rows = [_row(i, o) for i, o in enumerate(request.outcomes, 1)]
        added, replaced = await asyncio.to_thread(self.outcomes.report, request.model, rows)
        return pb.ReportOutcomesResponse(added=added, replaced=replaced)

    @unary
    async def Accuracy(self, request, context):
        caller(context, "admin")
        report = await asyncio.to_thread(
            self.outcomes.accuracy,
            request.model,
            int(request.version),
            float(request.since),
            request.output,
        )
        return report_to_proto(report)

    @unary
    async def SetAccuracyBaseline(self, request, context):
        actor = caller(context, "admin")
        removed = await asyncio.to_thread(
            self.outcomes.store.set_baseline,
            request.model,
            None if request.clear else request.accuracy,
            actor,
        )
        return pb.SetAccuracyBaselineResponse(removed=removed)


__all__ = ["OutcomesServicer", "interval_to_proto", "report_to_proto"]
