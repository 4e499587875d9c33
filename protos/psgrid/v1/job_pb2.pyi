from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_EVALUATING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_EVALUATING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class OptimizerSpec(_message.Message):
    __slots__ = ("name", "lr", "momentum", "dampening", "nesterov", "weight_decay", "beta1", "beta2", "eps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    DAMPENING_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., dampening: _Optional[float] = ..., nesterov: _Optional[bool] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "model", "model_kwargs_json", "dataset", "dataset_kwargs_json", "optimizer", "batch_size", "epochs", "steps", "staleness", "num_workers", "seed", "device", "eval_every", "sync_every", "local_optimizer", "compression", "no_error_feedback", "pull_dtype", "scale_stale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATASET_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    SYNC_EVERY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    NO_ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    PULL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCALE_STALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    model_kwargs_json: str
    dataset: str
    dataset_kwargs_json: str
    optimizer: OptimizerSpec
    batch_size: int
    epochs: int
    steps: int
    staleness: int
    num_workers: int
    seed: int
    device: str
    eval_every: int
    sync_every: int
    local_optimizer: OptimizerSpec
    compression: str
    no_error_feedback: bool
    pull_dtype: str
    scale_stale: bool
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., model_kwargs_json: _Optional[str] = ..., dataset: _Optional[str] = ..., dataset_kwargs_json: _Optional[str] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., batch_size: _Optional[int] = ..., epochs: _Optional[int] = ..., steps: _Optional[int] = ..., staleness: _Optional[int] = ..., num_workers: _Optional[int] = ..., seed: _Optional[int] = ..., device: _Optional[str] = ..., eval_every: _Optional[int] = ..., sync_every: _Optional[int] = ..., local_optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., compression: _Optional[str] = ..., no_error_feedback: _Optional[bool] = ..., pull_dtype: _Optional[str] = ..., scale_stale: _Optional[bool] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "spec", "state", "step", "total_steps", "version", "loss", "samples_per_sec", "metrics", "error", "worker_ids", "created_unix", "updated_unix", "shards", "waiting", "pushes", "bytes_pushed", "dense_bytes_pushed", "pulls", "bytes_pulled", "rows_pulled", "rows_pushed", "rows_held")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SEC_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    BYTES_PUSHED_FIELD_NUMBER: _ClassVar[int]
    DENSE_BYTES_PUSHED_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PULLED_FIELD_NUMBER: _ClassVar[int]
    ROWS_PULLED_FIELD_NUMBER: _ClassVar[int]
    ROWS_PUSHED_FIELD_NUMBER: _ClassVar[int]
    ROWS_HELD_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    state: JobState
    step: int
    total_steps: int
    version: int
    loss: float
    samples_per_sec: float
    metrics: _containers.ScalarMap[str, float]
    error: str
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    created_unix: float
    updated_unix: float
    shards: _containers.RepeatedScalarFieldContainer[str]
    waiting: str
    pushes: int
    bytes_pushed: int
    dense_bytes_pushed: int
    pulls: int
    bytes_pulled: int
    rows_pulled: int
    rows_pushed: int
    rows_held: int
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., version: _Optional[int] = ..., loss: _Optional[float] = ..., samples_per_sec: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ..., worker_ids: _Optional[_Iterable[str]] = ..., created_unix: _Optional[float] = ..., updated_unix: _Optional[float] = ..., shards: _Optional[_Iterable[str]] = ..., waiting: _Optional[str] = ..., pushes: _Optional[int] = ..., bytes_pushed: _Optional[int] = ..., dense_bytes_pushed: _Optional[int] = ..., pulls: _Optional[int] = ..., bytes_pulled: _Optional[int] = ..., rows_pulled: _Optional[int] = ..., rows_pushed: _Optional[int] = ..., rows_held: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("seq", "time_unix", "job", "kind")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_unix: float
    job: JobInfo
    kind: str
    def __init__(self, seq: _Optional[int] = ..., time_unix: _Optional[float] = ..., job: _Optional[_Union[JobInfo, _Mapping]] = ..., kind: _Optional[str] = ...) -> None: ...

class HistoryRow(_message.Message):
    __slots__ = ("step", "time_unix", "loss", "samples_per_sec", "metrics", "bytes_pushed", "bytes_pulled")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SEC_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PUSHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_PULLED_FIELD_NUMBER: _ClassVar[int]
    step: int
    time_unix: float
    loss: float
    samples_per_sec: float
    metrics: _containers.ScalarMap[str, float]
    bytes_pushed: int
    bytes_pulled: int
    def __init__(self, step: _Optional[int] = ..., time_unix: _Optional[float] = ..., loss: _Optional[float] = ..., samples_per_sec: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., bytes_pushed: _Optional[int] = ..., bytes_pulled: _Optional[int] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "name", "host", "pid", "device", "job_id", "rank", "step", "samples_per_sec", "last_seen_s", "lost")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SEC_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    name: str
    host: str
    pid: int
    device: str
    job_id: str
    rank: int
    step: int
    samples_per_sec: float
    last_seen_s: float
    lost: bool
    def __init__(self, worker_id: _Optional[str] = ..., name: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., device: _Optional[str] = ..., job_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., samples_per_sec: _Optional[float] = ..., last_seen_s: _Optional[float] = ..., lost: _Optional[bool] = ...) -> None: ...
