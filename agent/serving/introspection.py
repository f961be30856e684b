"""What the agent says about itself, the same whichever transport asks: server extensions, model
metadata and configuration, statistics and the repository index.

Messages are built as the protocol's protobuf types (gRPC sends them as they are; the HTTP edge
writes their JSON form), so the two edges cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from modelfleet.agent.repository import ModelControl
from modelfleet.agent.serving.batcher import DynamicBatcher
from modelfleet.agent.slots import LoadedVersion, SlotManager
from modelfleet.kernel.bundle import TensorSpec
from modelfleet.kernel.errors import ModelNotFoundError
from modelfleet.protos import inference_pb2 as pb

# Triton's model-config enum names for our datatypes (BYTES is TYPE_STRING there).
_CONFIG_TYPE = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


class Draining(Protocol):
    """The part of the health reporter an edge reads: whether the agent is shutting down."""

    draining: bool


def extensions(control: ModelControl, transport: Iterable[str] = ()) -> list[str]:
    """Only what answers (sequences and CUDA shared memory are not listed); ``transport`` adds
    what one edge alone serves (HTTP's ``binary_tensor_data``)."""
    out = {
        "classification",
        "model_configuration",
        "statistics",
        "system_shared_memory",
        *transport,
    }
    if control.available:
        out.add("model_repository")
    return sorted(out)


def model_metadata(slots: SlotManager, v: LoadedVersion) -> pb.ModelMetadataResponse:
    m = v.manifest

    def tensors(specs: Iterable[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [
            pb.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=t.datatype, shape=list(t.shape)
            )
            for t in specs
        ]

    return pb.ModelMetadataResponse(
        name=m.name,
        versions=[str(x.version) for x in slots.slots[v.name].loaded()],
        platform="onnxruntime_onnx",
        inputs=tensors(m.inputs),
        outputs=tensors(m.outputs),
    )


def model_config(v: LoadedVersion) -> pb.ModelConfig:
    m = v.manifest
    batched = m.max_batch_size > 0

    def dims(shape: tuple[int, ...]) -> list[int]:
        # Triton's config leaves the batch dimension out when max_batch_size > 0.
        return list(shape[1:] if batched else shape)

    cfg = pb.ModelConfig(
        name=m.name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=m.max_batch_size,
        input=[
            pb.ModelInput(name=t.name, data_type=_CONFIG_TYPE[t.datatype], dims=dims(t.shape))
            for t in m.inputs
        ],
        output=[
            pb.ModelOutput(name=t.name, data_type=_CONFIG_TYPE[t.datatype], dims=dims(t.shape))
            for t in m.outputs
        ],
    )
    if isinstance(v.runner, DynamicBatcher):
        cfg.dynamic_batching.max_queue_delay_microseconds = v.runner.max_queue_delay_us
    return cfg


def statistics(slots: SlotManager, name: str, version: str) -> pb.ModelStatisticsResponse:
    """Every loaded version (no name), a model's loaded versions, or one version."""
    versions: list[LoadedVersion] = []
    if name:
        slot = slots.slots.get(name)
        if slot is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded")
        versions = [slots.resolve(name, version)] if version else slot.loaded()
    else:
        for slot in slots.slots.values():
            versions.extend(slot.loaded())
    return pb.ModelStatisticsResponse(model_stats=[model_statistics(v) for v in versions])


def model_statistics(v: LoadedVersion) -> pb.ModelStatistics:
    s = v.stats

    def dur(count: int, ns: int) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=count, ns=ns)

    return pb.ModelStatistics(
        name=v.name,
        version=str(v.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=dur(s.success_count, s.success_ns),
            fail=dur(s.fail_count, s.fail_ns),
            queue=dur(s.success_count, s.queue_ns),
            compute_input=dur(s.execution_count, 0),
            compute_infer=dur(s.execution_count, s.compute_ns),
            compute_output=dur(s.execution_count, 0),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=rows,
                compute_input=dur(n, 0),
                compute_infer=dur(n, ns),
                compute_output=dur(n, 0),
            )
            for rows, (n, ns) in sorted(s.batches.items())
        ],
    )


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str = ""


def repository_index(slots: SlotManager, ready_only: bool) -> list[IndexEntry]:
    """Active, previous (rollback target), loading, refused and unloaded versions; with
    ``ready_only`` just the ones that serve."""
    out: list[IndexEntry] = []
    for st in slots.status():
        if st.active is not None:
            out.append(IndexEntry(st.name, str(st.active), "READY"))
        if st.previous is not None:
            out.append(
                IndexEntry(
                    st.name, str(st.previous), "READY", "previous version, kept for rollback"
                )
            )
        if ready_only:
            continue
        if st.loading is not None:
            out.append(IndexEntry(st.name, str(st.loading), "LOADING"))
        for version, result in sorted(st.failed.items()):
            out.append(IndexEntry(st.name, str(version), "UNAVAILABLE", result.reason))
    if not ready_only:
        for name in sorted(set(slots.unloaded) - set(slots.slots)):
            out.append(IndexEntry(name, "", "UNAVAILABLE", "unloaded"))
    return out
