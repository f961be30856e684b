from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GateResult(_message.Message):
    __slots__ = ("version", "passed", "reason", "kind", "p99_ms", "at_unix", "min_ms")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    MIN_MS_FIELD_NUMBER: _ClassVar[int]
    version: int
    passed: bool
    reason: str
    kind: str
    p99_ms: float
    at_unix: float
    min_ms: float
    def __init__(self, version: _Optional[int] = ..., passed: _Optional[bool] = ..., reason: _Optional[str] = ..., kind: _Optional[str] = ..., p99_ms: _Optional[float] = ..., at_unix: _Optional[float] = ..., min_ms: _Optional[float] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "active_version", "previous_version", "loading_version", "ready", "last_gate", "failed", "held_at_or_below", "comparison", "active_provider", "previous_provider", "active_path", "previous_path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADING_VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    LAST_GATE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    HELD_AT_OR_BELOW_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_PATH_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    active_version: int
    previous_version: int
    loading_version: int
    ready: bool
    last_gate: GateResult
    failed: _containers.RepeatedCompositeFieldContainer[GateResult]
    held_at_or_below: int
    comparison: Comparison
    active_provider: str
    previous_provider: str
    active_path: str
    previous_path: str
    def __init__(self, name: _Optional[str] = ..., active_version: _Optional[int] = ..., previous_version: _Optional[int] = ..., loading_version: _Optional[int] = ..., ready: _Optional[bool] = ..., last_gate: _Optional[_Union[GateResult, _Mapping]] = ..., failed: _Optional[_Iterable[_Union[GateResult, _Mapping]]] = ..., held_at_or_below: _Optional[int] = ..., comparison: _Optional[_Union[Comparison, _Mapping]] = ..., active_provider: _Optional[str] = ..., previous_provider: _Optional[str] = ..., active_path: _Optional[str] = ..., previous_path: _Optional[str] = ...) -> None: ...

class Comparison(_message.Message):
    __slots__ = ("candidate_version", "split_bp", "sticky", "shadow_bp", "label", "comparing", "shadow_compared", "shadow_dropped", "shadow_failures", "top1_agree", "top1_total", "max_abs_diff")
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPLIT_BP_FIELD_NUMBER: _ClassVar[int]
    STICKY_FIELD_NUMBER: _ClassVar[int]
    SHADOW_BP_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    COMPARING_FIELD_NUMBER: _ClassVar[int]
    SHADOW_COMPARED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_DROPPED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FAILURES_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREE_FIELD_NUMBER: _ClassVar[int]
    TOP1_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    candidate_version: int
    split_bp: int
    sticky: bool
    shadow_bp: int
    label: str
    comparing: bool
    shadow_compared: int
    shadow_dropped: int
    shadow_failures: int
    top1_agree: int
    top1_total: int
    max_abs_diff: float
    def __init__(self, candidate_version: _Optional[int] = ..., split_bp: _Optional[int] = ..., sticky: _Optional[bool] = ..., shadow_bp: _Optional[int] = ..., label: _Optional[str] = ..., comparing: _Optional[bool] = ..., shadow_compared: _Optional[int] = ..., shadow_dropped: _Optional[int] = ..., shadow_failures: _Optional[int] = ..., top1_agree: _Optional[int] = ..., top1_total: _Optional[int] = ..., max_abs_diff: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("models", "ready", "listen")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    ready: bool
    listen: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., ready: _Optional[bool] = ..., listen: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("from_version", "to_version")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    to_version: int
    def __init__(self, from_version: _Optional[int] = ..., to_version: _Optional[int] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("model", "candidate_version", "split_bp", "sticky", "shadow_bp", "off")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPLIT_BP_FIELD_NUMBER: _ClassVar[int]
    STICKY_FIELD_NUMBER: _ClassVar[int]
    SHADOW_BP_FIELD_NUMBER: _ClassVar[int]
    OFF_FIELD_NUMBER: _ClassVar[int]
    model: str
    candidate_version: int
    split_bp: int
    sticky: bool
    shadow_bp: int
    off: bool
    def __init__(self, model: _Optional[str] = ..., candidate_version: _Optional[int] = ..., split_bp: _Optional[int] = ..., sticky: _Optional[bool] = ..., shadow_bp: _Optional[int] = ..., off: _Optional[bool] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelStatus
    def __init__(self, model: _Optional[_Union[ModelStatus, _Mapping]] = ...) -> None: ...

class CaptureRequest(_message.Message):
    __slots__ = ("model", "rate_bp", "exclude", "hash", "off")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RATE_BP_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    OFF_FIELD_NUMBER: _ClassVar[int]
    model: str
    rate_bp: int
    exclude: _containers.RepeatedScalarFieldContainer[str]
    hash: _containers.RepeatedScalarFieldContainer[str]
    off: bool
    def __init__(self, model: _Optional[str] = ..., rate_bp: _Optional[int] = ..., exclude: _Optional[_Iterable[str]] = ..., hash: _Optional[_Iterable[str]] = ..., off: _Optional[bool] = ...) -> None: ...

class CaptureResponse(_message.Message):
    __slots__ = ("model", "rate_bp", "exclude", "hash", "captured", "dropped", "files")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RATE_BP_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    model: str
    rate_bp: int
    exclude: _containers.RepeatedScalarFieldContainer[str]
    hash: _containers.RepeatedScalarFieldContainer[str]
    captured: int
    dropped: int
    files: int
    def __init__(self, model: _Optional[str] = ..., rate_bp: _Optional[int] = ..., exclude: _Optional[_Iterable[str]] = ..., hash: _Optional[_Iterable[str]] = ..., captured: _Optional[int] = ..., dropped: _Optional[int] = ..., files: _Optional[int] = ...) -> None: ...
