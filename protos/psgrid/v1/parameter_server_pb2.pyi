from psgrid.v1 import job_pb2 as _job_pb2
from psgrid.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_NONE: _ClassVar[Encoding]
    ENCODING_FP16: _ClassVar[Encoding]
    ENCODING_BF16: _ClassVar[Encoding]
    ENCODING_INT8: _ClassVar[Encoding]
    ENCODING_TOPK: _ClassVar[Encoding]

class WorkerPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_PHASE_UNSPECIFIED: _ClassVar[WorkerPhase]
    WORKER_PHASE_TRAINING: _ClassVar[WorkerPhase]
    WORKER_PHASE_FINISHED: _ClassVar[WorkerPhase]
    WORKER_PHASE_EVALUATED: _ClassVar[WorkerPhase]
    WORKER_PHASE_FAILED: _ClassVar[WorkerPhase]
ENCODING_NONE: Encoding
ENCODING_FP16: Encoding
ENCODING_BF16: Encoding
ENCODING_INT8: Encoding
ENCODING_TOPK: Encoding
WORKER_PHASE_UNSPECIFIED: WorkerPhase
WORKER_PHASE_TRAINING: WorkerPhase
WORKER_PHASE_FINISHED: WorkerPhase
WORKER_PHASE_EVALUATED: WorkerPhase
WORKER_PHASE_FAILED: WorkerPhase

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("name", "host", "pid", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    host: str
    pid: int
    device: str
    def __init__(self, name: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("worker_id", "heartbeat_interval_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    heartbeat_interval_s: float
    def __init__(self, worker_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("job_id", "rank", "world_size", "spec", "start_step", "shards", "worker_names")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_NAMES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    world_size: int
    spec: _job_pb2.JobSpec
    start_step: int
    shards: _containers.RepeatedScalarFieldContainer[str]
    worker_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., spec: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., start_step: _Optional[int] = ..., shards: _Optional[_Iterable[str]] = ..., worker_names: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "job_id", "wait_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    job_id: str
    wait_s: float
    def __init__(self, worker_id: _Optional[str] = ..., job_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("assignment", "job_state")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    job_state: _job_pb2.JobState
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., job_state: _Optional[_Union[_job_pb2.JobState, str]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "clock", "final", "max_wait_s", "shm", "copy")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    COPY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    clock: int
    final: bool
    max_wait_s: float
    shm: bool
    copy: bool
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., clock: _Optional[int] = ..., final: _Optional[bool] = ..., max_wait_s: _Optional[float] = ..., shm: _Optional[bool] = ..., copy: _Optional[bool] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("job_state", "version", "step", "tensors", "clock", "ranks", "lineage", "payload", "shm", "shm_store", "store_seq")
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    SHM_STORE_FIELD_NUMBER: _ClassVar[int]
    STORE_SEQ_FIELD_NUMBER: _ClassVar[int]
    job_state: _job_pb2.JobState
    version: int
    step: int
    tensors: _tensor_pb2.TensorSetHeader
    clock: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    lineage: str
    payload: bytes
    shm: bool
    shm_store: bool
    store_seq: int
    def __init__(self, job_state: _Optional[_Union[_job_pb2.JobState, str]] = ..., version: _Optional[int] = ..., step: _Optional[int] = ..., tensors: _Optional[_Union[_tensor_pb2.TensorSetHeader, _Mapping]] = ..., clock: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ..., lineage: _Optional[str] = ..., payload: _Optional[bytes] = ..., shm: _Optional[bool] = ..., shm_store: _Optional[bool] = ..., store_seq: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("job_id", "worker_id", "seq", "base_version", "base_step", "init", "tensors", "samples", "ranks", "payload", "shm", "encoding", "topk_ratio", "payload_bytes", "tables", "row_tables")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_STEP_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    TOPK_RATIO_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    ROW_TABLES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    seq: int
    base_version: int
    base_step: int
    init: bool
    tensors: _tensor_pb2.TensorSetHeader
    samples: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    payload: bytes
    shm: bool
    encoding: Encoding
    topk_ratio: float
    payload_bytes: int
    tables: _containers.RepeatedCompositeFieldContainer[EmbeddingTable]
    row_tables: int
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., seq: _Optional[int] = ..., base_version: _Optional[int] = ..., base_step: _Optional[int] = ..., init: _Optional[bool] = ..., tensors: _Optional[_Union[_tensor_pb2.TensorSetHeader, _Mapping]] = ..., samples: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ..., payload: _Optional[bytes] = ..., shm: _Optional[bool] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., topk_ratio: _Optional[float] = ..., payload_bytes: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[EmbeddingTable, _Mapping]]] = ..., row_tables: _Optional[int] = ...) -> None: ...

class EmbeddingTable(_message.Message):
    __slots__ = ("name", "num_rows", "dim", "init", "init_scale", "optimizer", "lr", "eps", "beta1", "beta2", "initial_accumulator_value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    INIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_rows: int
    dim: int
    init: str
    init_scale: float
    optimizer: str
    lr: float
    eps: float
    beta1: float
    beta2: float
    initial_accumulator_value: float
    def __init__(self, name: _Optional[str] = ..., num_rows: _Optional[int] = ..., dim: _Optional[int] = ..., init: _Optional[str] = ..., init_scale: _Optional[float] = ..., optimizer: _Optional[str] = ..., lr: _Optional[float] = ..., eps: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ...) -> None: ...

class PullRowsRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "table", "ids")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    table: str
    ids: bytes
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., table: _Optional[str] = ..., ids: _Optional[bytes] = ...) -> None: ...

class PullRowsResponse(_message.Message):
    __slots__ = ("rows", "version")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    rows: bytes
    version: int
    def __init__(self, rows: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class TableRows(_message.Message):
    __slots__ = ("table", "ids", "grads")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    grads: bytes
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., grads: _Optional[bytes] = ...) -> None: ...

class PushRowsRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "seq", "tables", "part", "parts")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    seq: int
    tables: _containers.RepeatedCompositeFieldContainer[TableRows]
    part: int
    parts: int
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., seq: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableRows, _Mapping]]] = ..., part: _Optional[int] = ..., parts: _Optional[int] = ...) -> None: ...

class PushRowsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("push", "chunk", "pull", "shm_open", "channel_open")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    SHM_OPEN_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_OPEN_FIELD_NUMBER: _ClassVar[int]
    push: PushHeader
    chunk: bytes
    pull: PullRequest
    shm_open: ShmOpen
    channel_open: ChannelOpen
    def __init__(self, push: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., pull: _Optional[_Union[PullRequest, _Mapping]] = ..., shm_open: _Optional[_Union[ShmOpen, _Mapping]] = ..., channel_open: _Optional[_Union[ChannelOpen, _Mapping]] = ...) -> None: ...

class ChannelOpen(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class ChannelOffer(_message.Message):
    __slots__ = ("port", "ticket")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    port: int
    ticket: bytes
    def __init__(self, port: _Optional[int] = ..., ticket: _Optional[bytes] = ...) -> None: ...

class ShmOpen(_message.Message):
    __slots__ = ("job_id", "worker_id", "decline", "store")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DECLINE_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    decline: bool
    store: bool
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., decline: _Optional[bool] = ..., store: _Optional[bool] = ...) -> None: ...

class ShmOffer(_message.Message):
    __slots__ = ("push_path", "push_nonce", "pull_path", "pull_nonce", "nbytes", "store_path", "store_nonce")
    PUSH_PATH_FIELD_NUMBER: _ClassVar[int]
    PUSH_NONCE_FIELD_NUMBER: _ClassVar[int]
    PULL_PATH_FIELD_NUMBER: _ClassVar[int]
    PULL_NONCE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    STORE_PATH_FIELD_NUMBER: _ClassVar[int]
    STORE_NONCE_FIELD_NUMBER: _ClassVar[int]
    push_path: str
    push_nonce: bytes
    pull_path: str
    pull_nonce: bytes
    nbytes: int
    store_path: str
    store_nonce: bytes
    def __init__(self, push_path: _Optional[str] = ..., push_nonce: _Optional[bytes] = ..., pull_path: _Optional[str] = ..., pull_nonce: _Optional[bytes] = ..., nbytes: _Optional[int] = ..., store_path: _Optional[str] = ..., store_nonce: _Optional[bytes] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("pull", "chunk", "pushed", "error", "shm_offer", "channel_offer")
    PULL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    PUSHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_OFFER_FIELD_NUMBER: _ClassVar[int]
    pull: PullHeader
    chunk: bytes
    pushed: PushResponse
    error: StepError
    shm_offer: ShmOffer
    channel_offer: ChannelOffer
    def __init__(self, pull: _Optional[_Union[PullHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., pushed: _Optional[_Union[PushResponse, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ..., shm_offer: _Optional[_Union[ShmOffer, _Mapping]] = ..., channel_offer: _Optional[_Union[ChannelOffer, _Mapping]] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("code", "error", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    error: str
    message: str
    def __init__(self, code: _Optional[str] = ..., error: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("version", "duplicate")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    version: int
    duplicate: bool
    def __init__(self, version: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("worker_id", "job_id", "phase", "step", "total_steps", "loss", "samples", "seconds", "metrics", "error")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    job_id: str
    phase: WorkerPhase
    step: int
    total_steps: int
    loss: float
    samples: int
    seconds: float
    metrics: _containers.ScalarMap[str, float]
    error: str
    def __init__(self, worker_id: _Optional[str] = ..., job_id: _Optional[str] = ..., phase: _Optional[_Union[WorkerPhase, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., samples: _Optional[int] = ..., seconds: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ("job_state",)
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    job_state: _job_pb2.JobState
    def __init__(self, job_state: _Optional[_Union[_job_pb2.JobState, str]] = ...) -> None: ...

class OpenPartitionRequest(_message.Message):
    __slots__ = ("job_id", "spec", "worker_names", "shard_index", "shard_count")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    WORKER_NAMES_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: _job_pb2.JobSpec
    worker_names: _containers.RepeatedScalarFieldContainer[str]
    shard_index: int
    shard_count: int
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., worker_names: _Optional[_Iterable[str]] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ...) -> None: ...

class OpenPartitionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClosePartitionRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "state")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    state: _job_pb2.JobState
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ...) -> None: ...

class ClosePartitionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRestorePointsRequest(_message.Message):
    __slots__ = ("job_id", "worker_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class RestorePoint(_message.Message):
    __slots__ = ("step", "lineage")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    step: int
    lineage: str
    def __init__(self, step: _Optional[int] = ..., lineage: _Optional[str] = ...) -> None: ...

class ListRestorePointsResponse(_message.Message):
    __slots__ = ("step", "lineage", "timeline", "points", "clock")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    step: int
    lineage: str
    timeline: int
    points: _containers.RepeatedCompositeFieldContainer[RestorePoint]
    clock: int
    def __init__(self, step: _Optional[int] = ..., lineage: _Optional[str] = ..., timeline: _Optional[int] = ..., points: _Optional[_Iterable[_Union[RestorePoint, _Mapping]]] = ..., clock: _Optional[int] = ...) -> None: ...

class RollBackRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "step", "lineage", "expect_timeline")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    EXPECT_TIMELINE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    step: int
    lineage: str
    expect_timeline: int
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., step: _Optional[int] = ..., lineage: _Optional[str] = ..., expect_timeline: _Optional[int] = ...) -> None: ...

class RollBackResponse(_message.Message):
    __slots__ = ("step", "rolled_back")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    step: int
    rolled_back: bool
    def __init__(self, step: _Optional[int] = ..., rolled_back: _Optional[bool] = ...) -> None: ...
