from psgrid.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("inputs", "data", "id")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    inputs: _tensor_pb2.TensorSpec
    data: bytes
    id: int
    def __init__(self, inputs: _Optional[_Union[_tensor_pb2.TensorSpec, _Mapping]] = ..., data: _Optional[bytes] = ..., id: _Optional[int] = ...) -> None: ...

class PredictError(_message.Message):
    __slots__ = ("code", "error", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    error: str
    message: str
    def __init__(self, code: _Optional[str] = ..., error: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("outputs", "data", "model_version", "id", "error")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    outputs: _tensor_pb2.TensorSpec
    data: bytes
    model_version: int
    id: int
    error: PredictError
    def __init__(self, outputs: _Optional[_Union[_tensor_pb2.TensorSpec, _Mapping]] = ..., data: _Optional[bytes] = ..., model_version: _Optional[int] = ..., id: _Optional[int] = ..., error: _Optional[_Union[PredictError, _Mapping]] = ...) -> None: ...

class GetServingStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelRefusal(_message.Message):
    __slots__ = ("version", "origin", "reason", "time_unix")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    version: int
    origin: str
    reason: str
    time_unix: float
    def __init__(self, version: _Optional[int] = ..., origin: _Optional[str] = ..., reason: _Optional[str] = ..., time_unix: _Optional[float] = ...) -> None: ...

class GetServingStatusResponse(_message.Message):
    __slots__ = ("model_version", "origin", "loaded_unix", "refusals", "resident_versions", "input", "waiting", "requests", "rejected", "dropped", "batches", "examples", "max_batch_size", "batch_timeout_s")
    class WaitingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    LOADED_UNIX_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    origin: str
    loaded_unix: float
    refusals: _containers.RepeatedCompositeFieldContainer[ModelRefusal]
    resident_versions: _containers.RepeatedScalarFieldContainer[int]
    input: _tensor_pb2.TensorSpec
    waiting: _containers.ScalarMap[str, int]
    requests: int
    rejected: int
    dropped: int
    batches: int
    examples: int
    max_batch_size: int
    batch_timeout_s: float
    def __init__(self, model_version: _Optional[int] = ..., origin: _Optional[str] = ..., loaded_unix: _Optional[float] = ..., refusals: _Optional[_Iterable[_Union[ModelRefusal, _Mapping]]] = ..., resident_versions: _Optional[_Iterable[int]] = ..., input: _Optional[_Union[_tensor_pb2.TensorSpec, _Mapping]] = ..., waiting: _Optional[_Mapping[str, int]] = ..., requests: _Optional[int] = ..., rejected: _Optional[int] = ..., dropped: _Optional[int] = ..., batches: _Optional[int] = ..., examples: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., batch_timeout_s: _Optional[float] = ...) -> None: ...
