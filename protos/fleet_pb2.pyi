from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdminInfo(_message.Message):
    __slots__ = ("name", "role", "status", "created_at", "created_by", "cert_expires_at", "updated_at", "updated_by")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CERT_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_BY_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    status: str
    created_at: float
    created_by: str
    cert_expires_at: float
    updated_at: float
    updated_by: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., status: _Optional[str] = ..., created_at: _Optional[float] = ..., created_by: _Optional[str] = ..., cert_expires_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., updated_by: _Optional[str] = ...) -> None: ...

class AddAdminRequest(_message.Message):
    __slots__ = ("name", "role", "csr_pem", "replace")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    csr_pem: bytes
    replace: bool
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., replace: _Optional[bool] = ...) -> None: ...

class AddAdminResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_pem", "hub_address", "admin")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    HUB_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_pem: bytes
    hub_address: str
    admin: AdminInfo
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., hub_address: _Optional[str] = ..., admin: _Optional[_Union[AdminInfo, _Mapping]] = ...) -> None: ...

class ListAdminsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdminsResponse(_message.Message):
    __slots__ = ("admins",)
    ADMINS_FIELD_NUMBER: _ClassVar[int]
    admins: _containers.RepeatedCompositeFieldContainer[AdminInfo]
    def __init__(self, admins: _Optional[_Iterable[_Union[AdminInfo, _Mapping]]] = ...) -> None: ...

class SetAdminRoleRequest(_message.Message):
    __slots__ = ("name", "role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class RevokeAdminRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("since", "identity", "method", "failed_only", "limit")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FAILED_ONLY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    since: float
    identity: str
    method: str
    failed_only: bool
    limit: int
    def __init__(self, since: _Optional[float] = ..., identity: _Optional[str] = ..., method: _Optional[str] = ..., failed_only: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "started_at", "duration_ms", "identity", "peer", "service", "method", "request", "code", "detail")
    ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    id: int
    started_at: float
    duration_ms: float
    identity: str
    peer: str
    service: str
    method: str
    request: str
    code: str
    detail: str
    def __init__(self, id: _Optional[int] = ..., started_at: _Optional[float] = ..., duration_ms: _Optional[float] = ..., identity: _Optional[str] = ..., peer: _Optional[str] = ..., service: _Optional[str] = ..., method: _Optional[str] = ..., request: _Optional[str] = ..., code: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("token_id", "secret", "csr_pem", "hostname")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    secret: str
    csr_pem: bytes
    hostname: str
    def __init__(self, token_id: _Optional[str] = ..., secret: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., hostname: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("agent_id", "certificate_pem", "ca_pem", "tuf_root", "hub_address", "labels", "mqtt_address")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    TUF_ROOT_FIELD_NUMBER: _ClassVar[int]
    HUB_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MQTT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    certificate_pem: bytes
    ca_pem: bytes
    tuf_root: bytes
    hub_address: str
    labels: _containers.ScalarMap[str, str]
    mqtt_address: str
    def __init__(self, agent_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., tuf_root: _Optional[bytes] = ..., hub_address: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., mqtt_address: _Optional[str] = ...) -> None: ...

class RenewCertificateRequest(_message.Message):
    __slots__ = ("csr_pem", "certificate_pem", "signature")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    certificate_pem: bytes
    signature: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RenewCertificateResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_pem")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_pem: bytes
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ...) -> None: ...

class WatchDesiredRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DesiredModel(_message.Message):
    __slots__ = ("name", "version", "target_path", "sha256", "size", "prepare_version", "prepare_size", "split_bp", "sticky", "shadow_bp", "comparison", "capture_rate_bp", "capture_exclude", "capture_hash")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PREPARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREPARE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_BP_FIELD_NUMBER: _ClassVar[int]
    STICKY_FIELD_NUMBER: _ClassVar[int]
    SHADOW_BP_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_RATE_BP_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_HASH_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    target_path: str
    sha256: str
    size: int
    prepare_version: int
    prepare_size: int
    split_bp: int
    sticky: bool
    shadow_bp: int
    comparison: str
    capture_rate_bp: int
    capture_exclude: _containers.RepeatedScalarFieldContainer[str]
    capture_hash: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., target_path: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., prepare_version: _Optional[int] = ..., prepare_size: _Optional[int] = ..., split_bp: _Optional[int] = ..., sticky: _Optional[bool] = ..., shadow_bp: _Optional[int] = ..., comparison: _Optional[str] = ..., capture_rate_bp: _Optional[int] = ..., capture_exclude: _Optional[_Iterable[str]] = ..., capture_hash: _Optional[_Iterable[str]] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("revision", "models", "jobs")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    models: _containers.RepeatedCompositeFieldContainer[DesiredModel]
    jobs: _containers.RepeatedCompositeFieldContainer[JobSpec]
    def __init__(self, revision: _Optional[int] = ..., models: _Optional[_Iterable[_Union[DesiredModel, _Mapping]]] = ..., jobs: _Optional[_Iterable[_Union[JobSpec, _Mapping]]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "model", "version", "schedule", "input", "output", "sql", "paused", "run_now", "keys")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    RUN_NOW_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    version: int
    schedule: str
    input: str
    output: str
    sql: str
    paused: bool
    run_now: int
    keys: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., schedule: _Optional[str] = ..., input: _Optional[str] = ..., output: _Optional[str] = ..., sql: _Optional[str] = ..., paused: _Optional[bool] = ..., run_now: _Optional[int] = ..., keys: _Optional[str] = ...) -> None: ...

class JobRun(_message.Message):
    __slots__ = ("job", "run_id", "model", "version", "status", "rows_in", "rows_out", "rows_rejected", "duration_s", "error", "started_at", "finished_at", "agent_id")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROWS_IN_FIELD_NUMBER: _ClassVar[int]
    ROWS_OUT_FIELD_NUMBER: _ClassVar[int]
    ROWS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    job: str
    run_id: str
    model: str
    version: int
    status: str
    rows_in: int
    rows_out: int
    rows_rejected: int
    duration_s: float
    error: str
    started_at: float
    finished_at: float
    agent_id: str
    def __init__(self, job: _Optional[str] = ..., run_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., status: _Optional[str] = ..., rows_in: _Optional[int] = ..., rows_out: _Optional[int] = ..., rows_rejected: _Optional[int] = ..., duration_s: _Optional[float] = ..., error: _Optional[str] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., agent_id: _Optional[str] = ...) -> None: ...

class ModelReport(_message.Message):
    __slots__ = ("name", "active_version", "previous_version", "loading_version", "desired_version", "gate_version", "gate_passed", "gate_kind", "gate_reason", "error", "error_reason", "active_provider")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADING_VERSION_FIELD_NUMBER: _ClassVar[int]
    DESIRED_VERSION_FIELD_NUMBER: _ClassVar[int]
    GATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    GATE_PASSED_FIELD_NUMBER: _ClassVar[int]
    GATE_KIND_FIELD_NUMBER: _ClassVar[int]
    GATE_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    name: str
    active_version: int
    previous_version: int
    loading_version: int
    desired_version: int
    gate_version: int
    gate_passed: bool
    gate_kind: str
    gate_reason: str
    error: str
    error_reason: str
    active_provider: str
    def __init__(self, name: _Optional[str] = ..., active_version: _Optional[int] = ..., previous_version: _Optional[int] = ..., loading_version: _Optional[int] = ..., desired_version: _Optional[int] = ..., gate_version: _Optional[int] = ..., gate_passed: _Optional[bool] = ..., gate_kind: _Optional[str] = ..., gate_reason: _Optional[str] = ..., error: _Optional[str] = ..., error_reason: _Optional[str] = ..., active_provider: _Optional[str] = ...) -> None: ...

class AgentReport(_message.Message):
    __slots__ = ("models", "last_error", "desired_revision", "cache_bytes", "disk_free_bytes", "agent_version", "inference_address", "cert_expires_at")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REVISION_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CERT_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelReport]
    last_error: str
    desired_revision: int
    cache_bytes: int
    disk_free_bytes: int
    agent_version: str
    inference_address: str
    cert_expires_at: float
    def __init__(self, models: _Optional[_Iterable[_Union[ModelReport, _Mapping]]] = ..., last_error: _Optional[str] = ..., desired_revision: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., disk_free_bytes: _Optional[int] = ..., agent_version: _Optional[str] = ..., inference_address: _Optional[str] = ..., cert_expires_at: _Optional[float] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("path", "offset")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class PublishHeader(_message.Message):
    __slots__ = ("name", "version", "notes", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    notes: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., notes: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class PublishChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PublishHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PublishHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "version", "stage", "sha256", "size", "notes", "created_at", "same_content_as", "signed", "target_path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SAME_CONTENT_AS_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    stage: str
    sha256: str
    size: int
    notes: str
    created_at: float
    same_content_as: int
    signed: bool
    target_path: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., stage: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., notes: _Optional[str] = ..., created_at: _Optional[float] = ..., same_content_as: _Optional[int] = ..., signed: _Optional[bool] = ..., target_path: _Optional[str] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("version", "staged_payload", "targets_keyid", "base_targets")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGED_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TARGETS_KEYID_FIELD_NUMBER: _ClassVar[int]
    BASE_TARGETS_FIELD_NUMBER: _ClassVar[int]
    version: ModelVersion
    staged_payload: bytes
    targets_keyid: str
    base_targets: bytes
    def __init__(self, version: _Optional[_Union[ModelVersion, _Mapping]] = ..., staged_payload: _Optional[bytes] = ..., targets_keyid: _Optional[str] = ..., base_targets: _Optional[bytes] = ...) -> None: ...

class CommitTargetsRequest(_message.Message):
    __slots__ = ("name", "version", "keyid", "signature", "signed_payload")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEYID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNED_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    keyid: str
    signature: str
    signed_payload: bytes
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., keyid: _Optional[str] = ..., signature: _Optional[str] = ..., signed_payload: _Optional[bytes] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "latest_version", "version_count", "production_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_COUNT_FIELD_NUMBER: _ClassVar[int]
    PRODUCTION_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    latest_version: int
    version_count: int
    production_version: int
    def __init__(self, name: _Optional[str] = ..., latest_version: _Optional[int] = ..., version_count: _Optional[int] = ..., production_version: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class SetStageRequest(_message.Message):
    __slots__ = ("name", "version", "stage", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    stage: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., stage: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("name", "version", "selector", "dry_run", "allow_empty")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    ALLOW_EMPTY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    selector: _containers.ScalarMap[str, str]
    dry_run: bool
    allow_empty: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., selector: _Optional[_Mapping[str, str]] = ..., dry_run: _Optional[bool] = ..., allow_empty: _Optional[bool] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("agents", "revision", "changes", "dry_run", "notes")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedScalarFieldContainer[str]
    revision: int
    changes: _containers.RepeatedCompositeFieldContainer[DesiredChange]
    dry_run: bool
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agents: _Optional[_Iterable[str]] = ..., revision: _Optional[int] = ..., changes: _Optional[_Iterable[_Union[DesiredChange, _Mapping]]] = ..., dry_run: _Optional[bool] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("id", "model", "version", "selector", "created_at", "source", "rollout_id", "actor", "agent_id", "removed_at", "removed_by")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REMOVED_AT_FIELD_NUMBER: _ClassVar[int]
    REMOVED_BY_FIELD_NUMBER: _ClassVar[int]
    id: int
    model: str
    version: int
    selector: _containers.ScalarMap[str, str]
    created_at: float
    source: str
    rollout_id: int
    actor: str
    agent_id: str
    removed_at: float
    removed_by: str
    def __init__(self, id: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., selector: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[float] = ..., source: _Optional[str] = ..., rollout_id: _Optional[int] = ..., actor: _Optional[str] = ..., agent_id: _Optional[str] = ..., removed_at: _Optional[float] = ..., removed_by: _Optional[str] = ...) -> None: ...

class DesiredChange(_message.Message):
    __slots__ = ("agent_id", "hostname", "from_version", "to_version", "active_version", "decided_by")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    hostname: str
    from_version: int
    to_version: int
    active_version: int
    decided_by: Deployment
    def __init__(self, agent_id: _Optional[str] = ..., hostname: _Optional[str] = ..., from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., active_version: _Optional[int] = ..., decided_by: _Optional[_Union[Deployment, _Mapping]] = ...) -> None: ...

class DeploymentInfo(_message.Message):
    __slots__ = ("deployment", "agents", "deciding", "per_agent")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    DECIDING_FIELD_NUMBER: _ClassVar[int]
    PER_AGENT_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    agents: _containers.RepeatedScalarFieldContainer[str]
    deciding: _containers.RepeatedScalarFieldContainer[str]
    per_agent: bool
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., agents: _Optional[_Iterable[str]] = ..., deciding: _Optional[_Iterable[str]] = ..., per_agent: _Optional[bool] = ...) -> None: ...

class RolloutInProgress(_message.Message):
    __slots__ = ("id", "model", "version", "state", "selector", "wave", "waves", "assigned", "agents", "from_versions", "new_agents")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    WAVE_FIELD_NUMBER: _ClassVar[int]
    WAVES_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEW_AGENTS_FIELD_NUMBER: _ClassVar[int]
    id: int
    model: str
    version: int
    state: str
    selector: _containers.ScalarMap[str, str]
    wave: int
    waves: int
    assigned: int
    agents: int
    from_versions: _containers.RepeatedScalarFieldContainer[int]
    new_agents: Deployment
    def __init__(self, id: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., wave: _Optional[int] = ..., waves: _Optional[int] = ..., assigned: _Optional[int] = ..., agents: _Optional[int] = ..., from_versions: _Optional[_Iterable[int]] = ..., new_agents: _Optional[_Union[Deployment, _Mapping]] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments", "rollouts")
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[DeploymentInfo]
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutInProgress]
    def __init__(self, deployments: _Optional[_Iterable[_Union[DeploymentInfo, _Mapping]]] = ..., rollouts: _Optional[_Iterable[_Union[RolloutInProgress, _Mapping]]] = ...) -> None: ...

class GetDeploymentRequest(_message.Message):
    __slots__ = ("model", "selector")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    selector: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DeploymentAgent(_message.Message):
    __slots__ = ("agent_id", "hostname", "desired_version", "active_version", "decided_by")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DESIRED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    hostname: str
    desired_version: int
    active_version: int
    decided_by: Deployment
    def __init__(self, agent_id: _Optional[str] = ..., hostname: _Optional[str] = ..., desired_version: _Optional[int] = ..., active_version: _Optional[int] = ..., decided_by: _Optional[_Union[Deployment, _Mapping]] = ...) -> None: ...

class DeploymentDetail(_message.Message):
    __slots__ = ("info", "agents", "history", "rollouts")
    INFO_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    info: DeploymentInfo
    agents: _containers.RepeatedCompositeFieldContainer[DeploymentAgent]
    history: _containers.RepeatedCompositeFieldContainer[Deployment]
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutInProgress]
    def __init__(self, info: _Optional[_Union[DeploymentInfo, _Mapping]] = ..., agents: _Optional[_Iterable[_Union[DeploymentAgent, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., rollouts: _Optional[_Iterable[_Union[RolloutInProgress, _Mapping]]] = ...) -> None: ...

class UndeployRequest(_message.Message):
    __slots__ = ("name", "selector", "dry_run")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    name: str
    selector: _containers.ScalarMap[str, str]
    dry_run: bool
    def __init__(self, name: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class UndeployResponse(_message.Message):
    __slots__ = ("removed", "changes", "revision", "dry_run", "agents")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    removed: _containers.RepeatedCompositeFieldContainer[Deployment]
    changes: _containers.RepeatedCompositeFieldContainer[DesiredChange]
    revision: int
    dry_run: bool
    agents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, removed: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., changes: _Optional[_Iterable[_Union[DesiredChange, _Mapping]]] = ..., revision: _Optional[int] = ..., dry_run: _Optional[bool] = ..., agents: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("labels", "ttl_seconds")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    ttl_seconds: int
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "token_id", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: str
    expires_at: float
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[str] = ..., expires_at: _Optional[float] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("agent_id", "hostname", "labels", "enrolled_at", "last_seen", "status", "report", "desired", "presence", "cert_expires_at", "desired_by")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_FIELD_NUMBER: _ClassVar[int]
    CERT_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DESIRED_BY_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    hostname: str
    labels: _containers.ScalarMap[str, str]
    enrolled_at: float
    last_seen: float
    status: str
    report: AgentReport
    desired: _containers.RepeatedCompositeFieldContainer[DesiredModel]
    presence: str
    cert_expires_at: float
    desired_by: _containers.RepeatedCompositeFieldContainer[Deployment]
    def __init__(self, agent_id: _Optional[str] = ..., hostname: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., enrolled_at: _Optional[float] = ..., last_seen: _Optional[float] = ..., status: _Optional[str] = ..., report: _Optional[_Union[AgentReport, _Mapping]] = ..., desired: _Optional[_Iterable[_Union[DesiredModel, _Mapping]]] = ..., presence: _Optional[str] = ..., cert_expires_at: _Optional[float] = ..., desired_by: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents", "rollouts")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutInProgress]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ..., rollouts: _Optional[_Iterable[_Union[RolloutInProgress, _Mapping]]] = ...) -> None: ...

class RevokeAgentRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class RevokeAgentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("bounds", "counts", "sum", "count")
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    bounds: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    sum: float
    count: int
    def __init__(self, bounds: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., sum: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class VersionTelemetry(_message.Message):
    __slots__ = ("model", "version", "requests", "failures", "failures_by_reason", "request_latency", "queue_latency", "compute_latency", "batch_size", "gate_passed", "gate_failed", "swaps", "rollbacks", "arm", "shadow", "drift")
    class FailuresByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_LATENCY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LATENCY_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_LATENCY_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GATE_PASSED_FIELD_NUMBER: _ClassVar[int]
    GATE_FAILED_FIELD_NUMBER: _ClassVar[int]
    SWAPS_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    requests: int
    failures: int
    failures_by_reason: _containers.ScalarMap[str, int]
    request_latency: Histogram
    queue_latency: Histogram
    compute_latency: Histogram
    batch_size: Histogram
    gate_passed: int
    gate_failed: int
    swaps: int
    rollbacks: int
    arm: str
    shadow: _containers.RepeatedCompositeFieldContainer[ShadowCompare]
    drift: _containers.RepeatedCompositeFieldContainer[DriftReport]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ..., failures_by_reason: _Optional[_Mapping[str, int]] = ..., request_latency: _Optional[_Union[Histogram, _Mapping]] = ..., queue_latency: _Optional[_Union[Histogram, _Mapping]] = ..., compute_latency: _Optional[_Union[Histogram, _Mapping]] = ..., batch_size: _Optional[_Union[Histogram, _Mapping]] = ..., gate_passed: _Optional[int] = ..., gate_failed: _Optional[int] = ..., swaps: _Optional[int] = ..., rollbacks: _Optional[int] = ..., arm: _Optional[str] = ..., shadow: _Optional[_Iterable[_Union[ShadowCompare, _Mapping]]] = ..., drift: _Optional[_Iterable[_Union[DriftReport, _Mapping]]] = ...) -> None: ...

class DriftReport(_message.Message):
    __slots__ = ("window_start_unix", "window_end_unix", "offered", "sampled", "features")
    WINDOW_START_UNIX_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_UNIX_FIELD_NUMBER: _ClassVar[int]
    OFFERED_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    window_start_unix: float
    window_end_unix: float
    offered: int
    sampled: int
    features: _containers.RepeatedCompositeFieldContainer[DriftFeature]
    def __init__(self, window_start_unix: _Optional[float] = ..., window_end_unix: _Optional[float] = ..., offered: _Optional[int] = ..., sampled: _Optional[int] = ..., features: _Optional[_Iterable[_Union[DriftFeature, _Mapping]]] = ...) -> None: ...

class DriftFeature(_message.Message):
    __slots__ = ("tensor", "name", "role", "kind", "psi", "js", "ks", "rows", "counts")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    JS_FIELD_NUMBER: _ClassVar[int]
    KS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    name: str
    role: str
    kind: str
    psi: float
    js: float
    ks: float
    rows: int
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tensor: _Optional[str] = ..., name: _Optional[str] = ..., role: _Optional[str] = ..., kind: _Optional[str] = ..., psi: _Optional[float] = ..., js: _Optional[float] = ..., ks: _Optional[float] = ..., rows: _Optional[int] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class ShadowCompare(_message.Message):
    __slots__ = ("shadow_version", "output", "compared", "dropped", "shadow_failures", "top1_agree", "top1_total", "abs_diff", "rel_diff", "js_divergence", "shadow_latency")
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FAILURES_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREE_FIELD_NUMBER: _ClassVar[int]
    TOP1_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    REL_DIFF_FIELD_NUMBER: _ClassVar[int]
    JS_DIVERGENCE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_LATENCY_FIELD_NUMBER: _ClassVar[int]
    shadow_version: int
    output: str
    compared: int
    dropped: int
    shadow_failures: int
    top1_agree: int
    top1_total: int
    abs_diff: Histogram
    rel_diff: Histogram
    js_divergence: Histogram
    shadow_latency: Histogram
    def __init__(self, shadow_version: _Optional[int] = ..., output: _Optional[str] = ..., compared: _Optional[int] = ..., dropped: _Optional[int] = ..., shadow_failures: _Optional[int] = ..., top1_agree: _Optional[int] = ..., top1_total: _Optional[int] = ..., abs_diff: _Optional[_Union[Histogram, _Mapping]] = ..., rel_diff: _Optional[_Union[Histogram, _Mapping]] = ..., js_divergence: _Optional[_Union[Histogram, _Mapping]] = ..., shadow_latency: _Optional[_Union[Histogram, _Mapping]] = ...) -> None: ...

class TelemetryReport(_message.Message):
    __slots__ = ("seq", "start_unix", "end_unix", "versions", "rss_bytes", "cpu_seconds", "dropped_reports", "job_runs")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_REPORTS_FIELD_NUMBER: _ClassVar[int]
    JOB_RUNS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    start_unix: float
    end_unix: float
    versions: _containers.RepeatedCompositeFieldContainer[VersionTelemetry]
    rss_bytes: int
    cpu_seconds: float
    dropped_reports: int
    job_runs: _containers.RepeatedCompositeFieldContainer[JobRun]
    def __init__(self, seq: _Optional[int] = ..., start_unix: _Optional[float] = ..., end_unix: _Optional[float] = ..., versions: _Optional[_Iterable[_Union[VersionTelemetry, _Mapping]]] = ..., rss_bytes: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., dropped_reports: _Optional[int] = ..., job_runs: _Optional[_Iterable[_Union[JobRun, _Mapping]]] = ...) -> None: ...

class TelemetryBatch(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[TelemetryReport]
    def __init__(self, reports: _Optional[_Iterable[_Union[TelemetryReport, _Mapping]]] = ...) -> None: ...

class TelemetryAck(_message.Message):
    __slots__ = ("acked",)
    ACKED_FIELD_NUMBER: _ClassVar[int]
    acked: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, acked: _Optional[_Iterable[int]] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ("model", "version", "agent_id", "since_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    agent_id: str
    since_s: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., agent_id: _Optional[str] = ..., since_s: _Optional[float] = ...) -> None: ...

class VersionMetrics(_message.Message):
    __slots__ = ("model", "version", "requests", "failures", "request_rate", "error_rate", "p50_ms", "p95_ms", "p99_ms", "failures_by_reason", "agents")
    class FailuresByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_RATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    requests: int
    failures: int
    request_rate: float
    error_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    failures_by_reason: _containers.ScalarMap[str, int]
    agents: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ..., request_rate: _Optional[float] = ..., error_rate: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., failures_by_reason: _Optional[_Mapping[str, int]] = ..., agents: _Optional[int] = ...) -> None: ...

class MetricsResponse(_message.Message):
    __slots__ = ("versions", "window_s")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionMetrics]
    window_s: float
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionMetrics, _Mapping]]] = ..., window_s: _Optional[float] = ...) -> None: ...

class DriftRequest(_message.Message):
    __slots__ = ("model", "version", "agent_id", "selector", "since_s")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SINCE_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    agent_id: str
    selector: _containers.ScalarMap[str, str]
    since_s: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., agent_id: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., since_s: _Optional[float] = ...) -> None: ...

class FeatureDriftStats(_message.Message):
    __slots__ = ("version", "agent_id", "tensor", "feature", "role", "windows", "rows", "psi_max", "psi_mean", "psi_last", "js_max", "ks_max", "agents")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PSI_MAX_FIELD_NUMBER: _ClassVar[int]
    PSI_MEAN_FIELD_NUMBER: _ClassVar[int]
    PSI_LAST_FIELD_NUMBER: _ClassVar[int]
    JS_MAX_FIELD_NUMBER: _ClassVar[int]
    KS_MAX_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    agent_id: str
    tensor: str
    feature: str
    role: str
    windows: int
    rows: int
    psi_max: float
    psi_mean: float
    psi_last: float
    js_max: float
    ks_max: float
    agents: int
    def __init__(self, version: _Optional[int] = ..., agent_id: _Optional[str] = ..., tensor: _Optional[str] = ..., feature: _Optional[str] = ..., role: _Optional[str] = ..., windows: _Optional[int] = ..., rows: _Optional[int] = ..., psi_max: _Optional[float] = ..., psi_mean: _Optional[float] = ..., psi_last: _Optional[float] = ..., js_max: _Optional[float] = ..., ks_max: _Optional[float] = ..., agents: _Optional[int] = ...) -> None: ...

class DriftResponse(_message.Message):
    __slots__ = ("fleet", "agents", "window_s")
    FLEET_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    fleet: _containers.RepeatedCompositeFieldContainer[FeatureDriftStats]
    agents: _containers.RepeatedCompositeFieldContainer[FeatureDriftStats]
    window_s: float
    def __init__(self, fleet: _Optional[_Iterable[_Union[FeatureDriftStats, _Mapping]]] = ..., agents: _Optional[_Iterable[_Union[FeatureDriftStats, _Mapping]]] = ..., window_s: _Optional[float] = ...) -> None: ...

class StartRolloutRequest(_message.Message):
    __slots__ = ("model", "version", "selector", "waves", "bake_s", "gates", "min_requests", "max_failed_agents", "agent_timeout_s", "strategy", "auto_switch", "allow_downgrade", "traffic", "rate_base", "rate_factor", "rate_max", "abort_failed_pct", "abort_min_agents", "judge", "no_judge", "max_bake_s", "min_labels")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    WAVES_FIELD_NUMBER: _ClassVar[int]
    BAKE_S_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILED_AGENTS_FIELD_NUMBER: _ClassVar[int]
    AGENT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    AUTO_SWITCH_FIELD_NUMBER: _ClassVar[int]
    ALLOW_DOWNGRADE_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    RATE_BASE_FIELD_NUMBER: _ClassVar[int]
    RATE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    RATE_MAX_FIELD_NUMBER: _ClassVar[int]
    ABORT_FAILED_PCT_FIELD_NUMBER: _ClassVar[int]
    ABORT_MIN_AGENTS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    NO_JUDGE_FIELD_NUMBER: _ClassVar[int]
    MAX_BAKE_S_FIELD_NUMBER: _ClassVar[int]
    MIN_LABELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    selector: _containers.ScalarMap[str, str]
    waves: _containers.RepeatedScalarFieldContainer[str]
    bake_s: float
    gates: _containers.RepeatedScalarFieldContainer[str]
    min_requests: int
    max_failed_agents: int
    agent_timeout_s: float
    strategy: str
    auto_switch: bool
    allow_downgrade: bool
    traffic: _containers.RepeatedScalarFieldContainer[int]
    rate_base: float
    rate_factor: float
    rate_max: float
    abort_failed_pct: float
    abort_min_agents: int
    judge: _containers.RepeatedScalarFieldContainer[str]
    no_judge: bool
    max_bake_s: float
    min_labels: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., selector: _Optional[_Mapping[str, str]] = ..., waves: _Optional[_Iterable[str]] = ..., bake_s: _Optional[float] = ..., gates: _Optional[_Iterable[str]] = ..., min_requests: _Optional[int] = ..., max_failed_agents: _Optional[int] = ..., agent_timeout_s: _Optional[float] = ..., strategy: _Optional[str] = ..., auto_switch: _Optional[bool] = ..., allow_downgrade: _Optional[bool] = ..., traffic: _Optional[_Iterable[int]] = ..., rate_base: _Optional[float] = ..., rate_factor: _Optional[float] = ..., rate_max: _Optional[float] = ..., abort_failed_pct: _Optional[float] = ..., abort_min_agents: _Optional[int] = ..., judge: _Optional[_Iterable[str]] = ..., no_judge: _Optional[bool] = ..., max_bake_s: _Optional[float] = ..., min_labels: _Optional[int] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("model", "id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    id: int
    def __init__(self, model: _Optional[str] = ..., id: _Optional[int] = ...) -> None: ...

class ControlRolloutRequest(_message.Message):
    __slots__ = ("model", "action")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    action: str
    def __init__(self, model: _Optional[str] = ..., action: _Optional[str] = ...) -> None: ...

class RolloutEvent(_message.Message):
    __slots__ = ("at", "text")
    AT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    at: float
    text: str
    def __init__(self, at: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class GateValue(_message.Message):
    __slots__ = ("gate", "value", "ok", "note", "canary", "baseline")
    GATE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    gate: str
    value: float
    ok: bool
    note: str
    canary: float
    baseline: float
    def __init__(self, gate: _Optional[str] = ..., value: _Optional[float] = ..., ok: _Optional[bool] = ..., note: _Optional[str] = ..., canary: _Optional[float] = ..., baseline: _Optional[float] = ...) -> None: ...

class MetricVerdict(_message.Message):
    __slots__ = ("metric", "verdict", "canary", "baseline", "effect", "low", "high", "tolerance", "canary_samples", "baseline_samples", "canary_requests", "baseline_requests", "looks", "unit", "why")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    CANARY_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BASELINE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CANARY_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LOOKS_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    metric: str
    verdict: str
    canary: float
    baseline: float
    effect: float
    low: float
    high: float
    tolerance: float
    canary_samples: int
    baseline_samples: int
    canary_requests: int
    baseline_requests: int
    looks: int
    unit: str
    why: str
    def __init__(self, metric: _Optional[str] = ..., verdict: _Optional[str] = ..., canary: _Optional[float] = ..., baseline: _Optional[float] = ..., effect: _Optional[float] = ..., low: _Optional[float] = ..., high: _Optional[float] = ..., tolerance: _Optional[float] = ..., canary_samples: _Optional[int] = ..., baseline_samples: _Optional[int] = ..., canary_requests: _Optional[int] = ..., baseline_requests: _Optional[int] = ..., looks: _Optional[int] = ..., unit: _Optional[str] = ..., why: _Optional[str] = ...) -> None: ...

class GateEvaluation(_message.Message):
    __slots__ = ("wave", "at", "canary_requests", "baseline_requests", "gates", "canary_failures", "baseline_failures", "canary_agents", "baseline_agents", "baseline_version", "since", "verdicts", "looks", "final", "judge_note")
    WAVE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    CANARY_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    CANARY_FAILURES_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    CANARY_AGENTS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_AGENTS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    LOOKS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    JUDGE_NOTE_FIELD_NUMBER: _ClassVar[int]
    wave: int
    at: float
    canary_requests: int
    baseline_requests: int
    gates: _containers.RepeatedCompositeFieldContainer[GateValue]
    canary_failures: int
    baseline_failures: int
    canary_agents: int
    baseline_agents: int
    baseline_version: int
    since: float
    verdicts: _containers.RepeatedCompositeFieldContainer[MetricVerdict]
    looks: int
    final: bool
    judge_note: str
    def __init__(self, wave: _Optional[int] = ..., at: _Optional[float] = ..., canary_requests: _Optional[int] = ..., baseline_requests: _Optional[int] = ..., gates: _Optional[_Iterable[_Union[GateValue, _Mapping]]] = ..., canary_failures: _Optional[int] = ..., baseline_failures: _Optional[int] = ..., canary_agents: _Optional[int] = ..., baseline_agents: _Optional[int] = ..., baseline_version: _Optional[int] = ..., since: _Optional[float] = ..., verdicts: _Optional[_Iterable[_Union[MetricVerdict, _Mapping]]] = ..., looks: _Optional[int] = ..., final: _Optional[bool] = ..., judge_note: _Optional[str] = ...) -> None: ...

class RolloutAgent(_message.Message):
    __slots__ = ("agent_id", "hostname", "role", "wave", "previous_version", "active_version", "state", "last_error")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WAVE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    hostname: str
    role: str
    wave: int
    previous_version: int
    active_version: int
    state: str
    last_error: str
    def __init__(self, agent_id: _Optional[str] = ..., hostname: _Optional[str] = ..., role: _Optional[str] = ..., wave: _Optional[int] = ..., previous_version: _Optional[int] = ..., active_version: _Optional[int] = ..., state: _Optional[str] = ..., last_error: _Optional[str] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("id", "model", "version", "state", "wave", "waves", "agents", "assigned", "switched", "prepared", "strategy", "failed", "bake_left_s", "reason", "gates", "last_evaluation", "events", "per_agent", "warnings", "selector", "bake_s", "min_requests", "max_failed_agents", "agent_timeout_s", "auto_switch", "allow_downgrade", "traffic", "traffic_percent", "queued", "rate_base", "rate_factor", "rate_max", "abort_failed_pct", "abort_min_agents", "judge", "max_bake_s", "min_labels")
    class FailedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WAVE_FIELD_NUMBER: _ClassVar[int]
    WAVES_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_FIELD_NUMBER: _ClassVar[int]
    SWITCHED_FIELD_NUMBER: _ClassVar[int]
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    BAKE_LEFT_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    LAST_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    PER_AGENT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    BAKE_S_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILED_AGENTS_FIELD_NUMBER: _ClassVar[int]
    AGENT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    AUTO_SWITCH_FIELD_NUMBER: _ClassVar[int]
    ALLOW_DOWNGRADE_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RATE_BASE_FIELD_NUMBER: _ClassVar[int]
    RATE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    RATE_MAX_FIELD_NUMBER: _ClassVar[int]
    ABORT_FAILED_PCT_FIELD_NUMBER: _ClassVar[int]
    ABORT_MIN_AGENTS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    MAX_BAKE_S_FIELD_NUMBER: _ClassVar[int]
    MIN_LABELS_FIELD_NUMBER: _ClassVar[int]
    id: int
    model: str
    version: int
    state: str
    wave: int
    waves: _containers.RepeatedScalarFieldContainer[int]
    agents: int
    assigned: int
    switched: int
    prepared: int
    strategy: str
    failed: _containers.ScalarMap[str, str]
    bake_left_s: float
    reason: str
    gates: _containers.RepeatedScalarFieldContainer[str]
    last_evaluation: GateEvaluation
    events: _containers.RepeatedCompositeFieldContainer[RolloutEvent]
    per_agent: _containers.RepeatedCompositeFieldContainer[RolloutAgent]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    selector: _containers.ScalarMap[str, str]
    bake_s: float
    min_requests: int
    max_failed_agents: int
    agent_timeout_s: float
    auto_switch: bool
    allow_downgrade: bool
    traffic: _containers.RepeatedScalarFieldContainer[int]
    traffic_percent: int
    queued: int
    rate_base: float
    rate_factor: float
    rate_max: float
    abort_failed_pct: float
    abort_min_agents: int
    judge: _containers.RepeatedScalarFieldContainer[str]
    max_bake_s: float
    min_labels: int
    def __init__(self, id: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., wave: _Optional[int] = ..., waves: _Optional[_Iterable[int]] = ..., agents: _Optional[int] = ..., assigned: _Optional[int] = ..., switched: _Optional[int] = ..., prepared: _Optional[int] = ..., strategy: _Optional[str] = ..., failed: _Optional[_Mapping[str, str]] = ..., bake_left_s: _Optional[float] = ..., reason: _Optional[str] = ..., gates: _Optional[_Iterable[str]] = ..., last_evaluation: _Optional[_Union[GateEvaluation, _Mapping]] = ..., events: _Optional[_Iterable[_Union[RolloutEvent, _Mapping]]] = ..., per_agent: _Optional[_Iterable[_Union[RolloutAgent, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., selector: _Optional[_Mapping[str, str]] = ..., bake_s: _Optional[float] = ..., min_requests: _Optional[int] = ..., max_failed_agents: _Optional[int] = ..., agent_timeout_s: _Optional[float] = ..., auto_switch: _Optional[bool] = ..., allow_downgrade: _Optional[bool] = ..., traffic: _Optional[_Iterable[int]] = ..., traffic_percent: _Optional[int] = ..., queued: _Optional[int] = ..., rate_base: _Optional[float] = ..., rate_factor: _Optional[float] = ..., rate_max: _Optional[float] = ..., abort_failed_pct: _Optional[float] = ..., abort_min_agents: _Optional[int] = ..., judge: _Optional[_Iterable[str]] = ..., max_bake_s: _Optional[float] = ..., min_labels: _Optional[int] = ...) -> None: ...

class StartExperimentRequest(_message.Message):
    __slots__ = ("model", "candidate", "selector", "split_percent", "sticky", "shadow_percent", "duration_s", "judge", "gates")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SPLIT_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STICKY_FIELD_NUMBER: _ClassVar[int]
    SHADOW_PERCENT_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    model: str
    candidate: int
    selector: _containers.ScalarMap[str, str]
    split_percent: float
    sticky: bool
    shadow_percent: float
    duration_s: float
    judge: _containers.RepeatedScalarFieldContainer[str]
    gates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., candidate: _Optional[int] = ..., selector: _Optional[_Mapping[str, str]] = ..., split_percent: _Optional[float] = ..., sticky: _Optional[bool] = ..., shadow_percent: _Optional[float] = ..., duration_s: _Optional[float] = ..., judge: _Optional[_Iterable[str]] = ..., gates: _Optional[_Iterable[str]] = ...) -> None: ...

class GetExperimentRequest(_message.Message):
    __slots__ = ("model", "id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    id: int
    def __init__(self, model: _Optional[str] = ..., id: _Optional[int] = ...) -> None: ...

class ListExperimentsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListExperimentsResponse(_message.Message):
    __slots__ = ("experiments",)
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    experiments: _containers.RepeatedCompositeFieldContainer[ExperimentStatus]
    def __init__(self, experiments: _Optional[_Iterable[_Union[ExperimentStatus, _Mapping]]] = ...) -> None: ...

class ControlExperimentRequest(_message.Message):
    __slots__ = ("model", "id", "action")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    id: int
    action: str
    def __init__(self, model: _Optional[str] = ..., id: _Optional[int] = ..., action: _Optional[str] = ...) -> None: ...

class ExperimentArm(_message.Message):
    __slots__ = ("arm", "version", "requests", "failures", "error_rate", "p50_ms", "p95_ms", "p99_ms", "agents")
    ARM_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    arm: str
    version: int
    requests: int
    failures: int
    error_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    agents: int
    def __init__(self, arm: _Optional[str] = ..., version: _Optional[int] = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ..., error_rate: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., agents: _Optional[int] = ...) -> None: ...

class ShadowDivergence(_message.Message):
    __slots__ = ("available", "note", "compared", "dropped", "shadow_failures", "top1_agreement", "abs_diff_p50", "abs_diff_p99", "rel_diff_p99", "js_p99", "shadow_latency_p99_ms")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FAILURES_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    ABS_DIFF_P50_FIELD_NUMBER: _ClassVar[int]
    ABS_DIFF_P99_FIELD_NUMBER: _ClassVar[int]
    REL_DIFF_P99_FIELD_NUMBER: _ClassVar[int]
    JS_P99_FIELD_NUMBER: _ClassVar[int]
    SHADOW_LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    available: bool
    note: str
    compared: int
    dropped: int
    shadow_failures: int
    top1_agreement: float
    abs_diff_p50: float
    abs_diff_p99: float
    rel_diff_p99: float
    js_p99: float
    shadow_latency_p99_ms: float
    def __init__(self, available: _Optional[bool] = ..., note: _Optional[str] = ..., compared: _Optional[int] = ..., dropped: _Optional[int] = ..., shadow_failures: _Optional[int] = ..., top1_agreement: _Optional[float] = ..., abs_diff_p50: _Optional[float] = ..., abs_diff_p99: _Optional[float] = ..., rel_diff_p99: _Optional[float] = ..., js_p99: _Optional[float] = ..., shadow_latency_p99_ms: _Optional[float] = ...) -> None: ...

class ExperimentStatus(_message.Message):
    __slots__ = ("id", "model", "candidate", "selector", "mode", "share_percent", "sticky", "duration_s", "state", "created_at", "ends_at", "finished_at", "reason", "actor", "arms", "shadow", "verdict", "agents_in", "agents_out", "since", "until", "events", "judge", "gates", "verdicts", "shadow_gates")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SHARE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STICKY_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDS_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    AGENTS_IN_FIELD_NUMBER: _ClassVar[int]
    AGENTS_OUT_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_GATES_FIELD_NUMBER: _ClassVar[int]
    id: int
    model: str
    candidate: int
    selector: _containers.ScalarMap[str, str]
    mode: str
    share_percent: float
    sticky: bool
    duration_s: float
    state: str
    created_at: float
    ends_at: float
    finished_at: float
    reason: str
    actor: str
    arms: _containers.RepeatedCompositeFieldContainer[ExperimentArm]
    shadow: ShadowDivergence
    verdict: str
    agents_in: _containers.RepeatedScalarFieldContainer[str]
    agents_out: _containers.RepeatedScalarFieldContainer[str]
    since: float
    until: float
    events: _containers.RepeatedCompositeFieldContainer[RolloutEvent]
    judge: _containers.RepeatedScalarFieldContainer[str]
    gates: _containers.RepeatedScalarFieldContainer[str]
    verdicts: _containers.RepeatedCompositeFieldContainer[MetricVerdict]
    shadow_gates: _containers.RepeatedCompositeFieldContainer[ShadowGateResult]
    def __init__(self, id: _Optional[int] = ..., model: _Optional[str] = ..., candidate: _Optional[int] = ..., selector: _Optional[_Mapping[str, str]] = ..., mode: _Optional[str] = ..., share_percent: _Optional[float] = ..., sticky: _Optional[bool] = ..., duration_s: _Optional[float] = ..., state: _Optional[str] = ..., created_at: _Optional[float] = ..., ends_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ..., arms: _Optional[_Iterable[_Union[ExperimentArm, _Mapping]]] = ..., shadow: _Optional[_Union[ShadowDivergence, _Mapping]] = ..., verdict: _Optional[str] = ..., agents_in: _Optional[_Iterable[str]] = ..., agents_out: _Optional[_Iterable[str]] = ..., since: _Optional[float] = ..., until: _Optional[float] = ..., events: _Optional[_Iterable[_Union[RolloutEvent, _Mapping]]] = ..., judge: _Optional[_Iterable[str]] = ..., gates: _Optional[_Iterable[str]] = ..., verdicts: _Optional[_Iterable[_Union[MetricVerdict, _Mapping]]] = ..., shadow_gates: _Optional[_Iterable[_Union[ShadowGateResult, _Mapping]]] = ...) -> None: ...

class ShadowGateResult(_message.Message):
    __slots__ = ("gate", "value", "ok", "why")
    GATE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    gate: str
    value: float
    ok: bool
    why: str
    def __init__(self, gate: _Optional[str] = ..., value: _Optional[float] = ..., ok: _Optional[bool] = ..., why: _Optional[str] = ...) -> None: ...

class RolloutHistoryRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RolloutHistoryResponse(_message.Message):
    __slots__ = ("rollouts",)
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutStatus]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[RolloutStatus, _Mapping]]] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("spec", "selector")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    selector: _containers.ScalarMap[str, str]
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., selector: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("spec", "selector", "created_at", "agents")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    selector: _containers.ScalarMap[str, str]
    created_at: float
    agents: int
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., selector: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[float] = ..., agents: _Optional[int] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class JobRunsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class JobRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[JobRun]
    def __init__(self, runs: _Optional[_Iterable[_Union[JobRun, _Mapping]]] = ...) -> None: ...

class ControlJobRequest(_message.Message):
    __slots__ = ("name", "action")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    action: str
    def __init__(self, name: _Optional[str] = ..., action: _Optional[str] = ...) -> None: ...

class BackupRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackupFile(_message.Message):
    __slots__ = ("path", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class BackupSummary(_message.Message):
    __slots__ = ("created_at", "hub", "tuf_versions", "models", "versions", "agents", "blobs", "files", "bytes", "pause_ms")
    class TufVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    HUB_FIELD_NUMBER: _ClassVar[int]
    TUF_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    created_at: float
    hub: str
    tuf_versions: _containers.ScalarMap[str, int]
    models: int
    versions: int
    agents: int
    blobs: int
    files: int
    bytes: int
    pause_ms: float
    def __init__(self, created_at: _Optional[float] = ..., hub: _Optional[str] = ..., tuf_versions: _Optional[_Mapping[str, int]] = ..., models: _Optional[int] = ..., versions: _Optional[int] = ..., agents: _Optional[int] = ..., blobs: _Optional[int] = ..., files: _Optional[int] = ..., bytes: _Optional[int] = ..., pause_ms: _Optional[float] = ...) -> None: ...

class BackupChunk(_message.Message):
    __slots__ = ("file", "data", "summary")
    FILE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    file: BackupFile
    data: bytes
    summary: BackupSummary
    def __init__(self, file: _Optional[_Union[BackupFile, _Mapping]] = ..., data: _Optional[bytes] = ..., summary: _Optional[_Union[BackupSummary, _Mapping]] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("document", "prune")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    PRUNE_FIELD_NUMBER: _ClassVar[int]
    document: str
    prune: bool
    def __init__(self, document: _Optional[str] = ..., prune: _Optional[bool] = ...) -> None: ...

class StateProblem(_message.Message):
    __slots__ = ("where", "line", "message")
    WHERE_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    where: str
    line: int
    message: str
    def __init__(self, where: _Optional[str] = ..., line: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StateDeploymentAction(_message.Message):
    __slots__ = ("entry", "line", "model", "selector", "version", "strategy", "action", "reason", "current_version", "changes", "rollout_id", "revision")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    entry: int
    line: int
    model: str
    selector: _containers.ScalarMap[str, str]
    version: int
    strategy: str
    action: str
    reason: str
    current_version: int
    changes: _containers.RepeatedCompositeFieldContainer[DesiredChange]
    rollout_id: int
    revision: int
    def __init__(self, entry: _Optional[int] = ..., line: _Optional[int] = ..., model: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., version: _Optional[int] = ..., strategy: _Optional[str] = ..., action: _Optional[str] = ..., reason: _Optional[str] = ..., current_version: _Optional[int] = ..., changes: _Optional[_Iterable[_Union[DesiredChange, _Mapping]]] = ..., rollout_id: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class StateJobAction(_message.Message):
    __slots__ = ("entry", "line", "name", "action", "reason", "fields")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    entry: int
    line: int
    name: str
    action: str
    reason: str
    fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entry: _Optional[int] = ..., line: _Optional[int] = ..., name: _Optional[str] = ..., action: _Optional[str] = ..., reason: _Optional[str] = ..., fields: _Optional[_Iterable[str]] = ...) -> None: ...

class StatePlan(_message.Message):
    __slots__ = ("problems", "deployments", "jobs", "applied", "changes")
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    problems: _containers.RepeatedCompositeFieldContainer[StateProblem]
    deployments: _containers.RepeatedCompositeFieldContainer[StateDeploymentAction]
    jobs: _containers.RepeatedCompositeFieldContainer[StateJobAction]
    applied: bool
    changes: bool
    def __init__(self, problems: _Optional[_Iterable[_Union[StateProblem, _Mapping]]] = ..., deployments: _Optional[_Iterable[_Union[StateDeploymentAction, _Mapping]]] = ..., jobs: _Optional[_Iterable[_Union[StateJobAction, _Mapping]]] = ..., applied: _Optional[bool] = ..., changes: _Optional[bool] = ...) -> None: ...

class ExportStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportStateResponse(_message.Message):
    __slots__ = ("document", "deployments", "jobs")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    document: str
    deployments: int
    jobs: int
    def __init__(self, document: _Optional[str] = ..., deployments: _Optional[int] = ..., jobs: _Optional[int] = ...) -> None: ...

class AlertRule(_message.Message):
    __slots__ = ("name", "metric", "comparison", "threshold", "for_s", "window_s", "clear_for_s", "clear_threshold", "model", "selector", "severity", "webhooks", "retrain", "min_requests", "enabled", "builtin", "no_data")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FOR_S_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FOR_S_FIELD_NUMBER: _ClassVar[int]
    CLEAR_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    WEBHOOKS_FIELD_NUMBER: _ClassVar[int]
    RETRAIN_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    NO_DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    metric: str
    comparison: str
    threshold: float
    for_s: float
    window_s: float
    clear_for_s: float
    clear_threshold: float
    model: str
    selector: _containers.ScalarMap[str, str]
    severity: str
    webhooks: _containers.RepeatedScalarFieldContainer[str]
    retrain: bool
    min_requests: int
    enabled: bool
    builtin: bool
    no_data: str
    def __init__(self, name: _Optional[str] = ..., metric: _Optional[str] = ..., comparison: _Optional[str] = ..., threshold: _Optional[float] = ..., for_s: _Optional[float] = ..., window_s: _Optional[float] = ..., clear_for_s: _Optional[float] = ..., clear_threshold: _Optional[float] = ..., model: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., severity: _Optional[str] = ..., webhooks: _Optional[_Iterable[str]] = ..., retrain: _Optional[bool] = ..., min_requests: _Optional[int] = ..., enabled: _Optional[bool] = ..., builtin: _Optional[bool] = ..., no_data: _Optional[str] = ...) -> None: ...

class AlertInstance(_message.Message):
    __slots__ = ("rule", "model", "version", "selector", "state", "since", "value", "threshold", "updated_at", "severity", "metric", "comparison")
    RULE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    rule: str
    model: str
    version: int
    selector: str
    state: str
    since: float
    value: float
    threshold: float
    updated_at: float
    severity: str
    metric: str
    comparison: str
    def __init__(self, rule: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., selector: _Optional[str] = ..., state: _Optional[str] = ..., since: _Optional[float] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., updated_at: _Optional[float] = ..., severity: _Optional[str] = ..., metric: _Optional[str] = ..., comparison: _Optional[str] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("rules", "alerts")
    RULES_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[AlertRule]
    alerts: _containers.RepeatedCompositeFieldContainer[AlertInstance]
    def __init__(self, rules: _Optional[_Iterable[_Union[AlertRule, _Mapping]]] = ..., alerts: _Optional[_Iterable[_Union[AlertInstance, _Mapping]]] = ...) -> None: ...

class AlertHistoryRequest(_message.Message):
    __slots__ = ("since_s", "model")
    SINCE_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    since_s: float
    model: str
    def __init__(self, since_s: _Optional[float] = ..., model: _Optional[str] = ...) -> None: ...

class AlertEvent(_message.Message):
    __slots__ = ("at", "rule", "model", "version", "selector", "state", "previous", "value", "threshold", "idempotency_key")
    AT_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    at: float
    rule: str
    model: str
    version: int
    selector: str
    state: str
    previous: str
    value: float
    threshold: float
    idempotency_key: str
    def __init__(self, at: _Optional[float] = ..., rule: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., selector: _Optional[str] = ..., state: _Optional[str] = ..., previous: _Optional[str] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class AlertHistoryResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AlertEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[AlertEvent, _Mapping]]] = ...) -> None: ...

class RemoveAlertRuleRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveAlertRuleResponse(_message.Message):
    __slots__ = ("builtin_restored",)
    BUILTIN_RESTORED_FIELD_NUMBER: _ClassVar[int]
    builtin_restored: bool
    def __init__(self, builtin_restored: _Optional[bool] = ...) -> None: ...

class AddWebhookRequest(_message.Message):
    __slots__ = ("name", "url", "secret", "replace")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    secret: bytes
    replace: bool
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., secret: _Optional[bytes] = ..., replace: _Optional[bool] = ...) -> None: ...

class WebhookInfo(_message.Message):
    __slots__ = ("name", "url", "created_at", "pending", "delivered", "failed", "last_error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    created_at: float
    pending: int
    delivered: int
    failed: int
    last_error: str
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., created_at: _Optional[float] = ..., pending: _Optional[int] = ..., delivered: _Optional[int] = ..., failed: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class ListWebhooksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWebhooksResponse(_message.Message):
    __slots__ = ("webhooks",)
    WEBHOOKS_FIELD_NUMBER: _ClassVar[int]
    webhooks: _containers.RepeatedCompositeFieldContainer[WebhookInfo]
    def __init__(self, webhooks: _Optional[_Iterable[_Union[WebhookInfo, _Mapping]]] = ...) -> None: ...

class RemoveWebhookRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveWebhookResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    def __init__(self, dropped: _Optional[int] = ...) -> None: ...

class CaptureFile(_message.Message):
    __slots__ = ("model", "file_id", "size", "sha256", "offset")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    model: str
    file_id: str
    size: int
    sha256: str
    offset: int
    def __init__(self, model: _Optional[str] = ..., file_id: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class CaptureChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: CaptureFile
    data: bytes
    def __init__(self, header: _Optional[_Union[CaptureFile, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CapturePart(_message.Message):
    __slots__ = ("file", "data")
    FILE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file: CaptureFile
    data: bytes
    def __init__(self, file: _Optional[_Union[CaptureFile, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CaptureFileState(_message.Message):
    __slots__ = ("have", "stored")
    HAVE_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    have: int
    stored: bool
    def __init__(self, have: _Optional[int] = ..., stored: _Optional[bool] = ...) -> None: ...

class CaptureSetting(_message.Message):
    __slots__ = ("model", "selector", "rate_bp", "exclude", "hash", "created_at", "actor")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    RATE_BP_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    selector: _containers.ScalarMap[str, str]
    rate_bp: int
    exclude: _containers.RepeatedScalarFieldContainer[str]
    hash: _containers.RepeatedScalarFieldContainer[str]
    created_at: float
    actor: str
    def __init__(self, model: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., rate_bp: _Optional[int] = ..., exclude: _Optional[_Iterable[str]] = ..., hash: _Optional[_Iterable[str]] = ..., created_at: _Optional[float] = ..., actor: _Optional[str] = ...) -> None: ...

class RemoveCaptureRequest(_message.Message):
    __slots__ = ("model", "selector")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    selector: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RemoveCaptureResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class ListCaptureRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CaptureModelFiles(_message.Message):
    __slots__ = ("model", "files", "bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    files: int
    bytes: int
    def __init__(self, model: _Optional[str] = ..., files: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class ListCaptureResponse(_message.Message):
    __slots__ = ("settings", "stored")
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    settings: _containers.RepeatedCompositeFieldContainer[CaptureSetting]
    stored: _containers.RepeatedCompositeFieldContainer[CaptureModelFiles]
    def __init__(self, settings: _Optional[_Iterable[_Union[CaptureSetting, _Mapping]]] = ..., stored: _Optional[_Iterable[_Union[CaptureModelFiles, _Mapping]]] = ...) -> None: ...

class QueryCaptureRequest(_message.Message):
    __slots__ = ("model", "sql")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    model: str
    sql: str
    def __init__(self, model: _Optional[str] = ..., sql: _Optional[str] = ...) -> None: ...

class QueryCaptureChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Outcome(_message.Message):
    __slots__ = ("request_id", "label", "value", "time")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    label: int
    value: float
    time: float
    def __init__(self, request_id: _Optional[str] = ..., label: _Optional[int] = ..., value: _Optional[float] = ..., time: _Optional[float] = ...) -> None: ...

class ReportOutcomesRequest(_message.Message):
    __slots__ = ("model", "outcomes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    model: str
    outcomes: _containers.RepeatedCompositeFieldContainer[Outcome]
    def __init__(self, model: _Optional[str] = ..., outcomes: _Optional[_Iterable[_Union[Outcome, _Mapping]]] = ...) -> None: ...

class ReportOutcomesResponse(_message.Message):
    __slots__ = ("added", "replaced")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    added: int
    replaced: int
    def __init__(self, added: _Optional[int] = ..., replaced: _Optional[int] = ...) -> None: ...

class AccuracyRequest(_message.Message):
    __slots__ = ("model", "version", "since", "output")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    since: float
    output: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., since: _Optional[float] = ..., output: _Optional[str] = ...) -> None: ...

class Interval(_message.Message):
    __slots__ = ("value", "low", "high", "present")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    value: float
    low: float
    high: float
    present: bool
    def __init__(self, value: _Optional[float] = ..., low: _Optional[float] = ..., high: _Optional[float] = ..., present: _Optional[bool] = ...) -> None: ...

class AccuracyGroup(_message.Message):
    __slots__ = ("version", "arm", "task", "labelled", "accuracy", "precision", "recall", "auc", "mae", "rmse")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    AUC_FIELD_NUMBER: _ClassVar[int]
    MAE_FIELD_NUMBER: _ClassVar[int]
    RMSE_FIELD_NUMBER: _ClassVar[int]
    version: int
    arm: str
    task: str
    labelled: int
    accuracy: Interval
    precision: Interval
    recall: Interval
    auc: Interval
    mae: Interval
    rmse: Interval
    def __init__(self, version: _Optional[int] = ..., arm: _Optional[str] = ..., task: _Optional[str] = ..., labelled: _Optional[int] = ..., accuracy: _Optional[_Union[Interval, _Mapping]] = ..., precision: _Optional[_Union[Interval, _Mapping]] = ..., recall: _Optional[_Union[Interval, _Mapping]] = ..., auc: _Optional[_Union[Interval, _Mapping]] = ..., mae: _Optional[_Union[Interval, _Mapping]] = ..., rmse: _Optional[_Union[Interval, _Mapping]] = ...) -> None: ...

class AccuracyResponse(_message.Message):
    __slots__ = ("groups", "outcomes", "unmatched", "baseline", "note")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    UNMATCHED_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[AccuracyGroup]
    outcomes: int
    unmatched: int
    baseline: Interval
    note: str
    def __init__(self, groups: _Optional[_Iterable[_Union[AccuracyGroup, _Mapping]]] = ..., outcomes: _Optional[int] = ..., unmatched: _Optional[int] = ..., baseline: _Optional[_Union[Interval, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class SetAccuracyBaselineRequest(_message.Message):
    __slots__ = ("model", "accuracy", "clear")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    model: str
    accuracy: float
    clear: bool
    def __init__(self, model: _Optional[str] = ..., accuracy: _Optional[float] = ..., clear: _Optional[bool] = ...) -> None: ...

class SetAccuracyBaselineResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...
