"""Every error psgrid raises on purpose, and the gRPC status code of each.

The cores (store, optimizers, scheduler, worker loop) raise these; one table
(``STATUS_BY_ERROR`` via :func:`status_name`) maps them to gRPC status codes in
the server adapters, and the SDK maps status codes back to the same classes, so
users catch ``psgrid.errors.ShapeMismatch``, never ``grpc.RpcError``.
This module imports nothing from gRPC: codes are named by string.
"""
from __future__ import annotations


class PsgridError(Exception):
    """Base of all psgrid errors. ``code`` is the gRPC status code's name."""

    code = "UNKNOWN"


class InvalidArgument(PsgridError):
    """The request is malformed: the caller must change it, retrying won't help."""

    code = "INVALID_ARGUMENT"


class ShapeMismatch(InvalidArgument):
    """A tensor's shape differs from the one the server holds."""


class DtypeMismatch(InvalidArgument):
    """A tensor's dtype differs from the one the server holds."""


class MalformedPayload(InvalidArgument):
    """Payload bytes do not match their header (length, offsets, framing)."""


class PayloadCutShort(MalformedPayload):
    """A stream ended before its declared payload had all come: a malformed
    request, or (more often) a caller that cancelled or died mid-stream."""


class MalformedRequest(InvalidArgument):
    """A request's bytes do not decode as the message its method takes."""


class NonFiniteGradient(InvalidArgument):
    """A gradient holds NaN or Inf."""


class InvalidSpec(InvalidArgument):
    """A job spec or config value is out of range."""


class InvalidId(InvalidArgument, ValueError):
    """A job or worker id breaks the id rule (:func:`psgrid.limits.check_id`).

    Also a ValueError, which is what the checkpoint reader has always raised for one.
    """


class NotFound(PsgridError):
    code = "NOT_FOUND"


class UnknownJob(NotFound):
    """No job with this id exists on the server."""


class UnknownWorker(NotFound):
    """No worker with this id is registered."""


class UnknownCheckpoint(NotFound):
    """The server holds no usable checkpoint of that job at that step."""


class ResourceExhausted(PsgridError):
    code = "RESOURCE_EXHAUSTED"


class PayloadTooLarge(ResourceExhausted):
    """A declared payload is over the server's limit; nothing was allocated."""


class Overloaded(ResourceExhausted):
    """A bounded queue is full; try again later."""


class FailedPrecondition(PsgridError):
    code = "FAILED_PRECONDITION"


class JobNotRunning(FailedPrecondition):
    """The job is not in a state that accepts this call (e.g. it ended)."""


class NotReady(FailedPrecondition):
    """A pull waited its whole deadline without the consistency model letting it go."""

    code = "ABORTED"


class PushAhead(FailedPrecondition):
    """A push for a step beyond what this server holds of the worker: the server
    went back (restored from a checkpoint, or put back in step with the other
    shards) after the worker pulled. Pull again; nothing was applied."""

    code = "ABORTED"


class ShardsDiverged(FailedPrecondition):
    """A synchronous job's shards hold different steps (one restarted from an older checkpoint)."""


class NotAssigned(FailedPrecondition):
    """The worker is not part of the job it named."""


class UnknownNode(NotFound):
    """No supervised node has this name."""


class SupervisorStopped(FailedPrecondition):
    """The supervisor is shutting down or gave up: it restarts nothing any more."""


class Unauthenticated(PsgridError):
    code = "UNAUTHENTICATED"


class PermissionDenied(PsgridError):
    code = "PERMISSION_DENIED"


class Unavailable(PsgridError):
    """The server could not be reached (after retries)."""

    code = "UNAVAILABLE"


class ConnectionMistake(Unavailable):
    """A client could not reach its server because of how it was set up, found by
    :mod:`psgrid.diagnose`: ``cause`` says what is wrong, ``fix`` which flag or
    setting mends it. Retrying without the fix will not help (a server that is not
    running aside)."""

    def __init__(self, cause: str, fix: str = ""):
        super().__init__(f"{cause}: {fix}" if fix else cause)
        self.cause, self.fix = cause, fix


class ServerNotRunning(ConnectionMistake):
    """Nothing accepts connections at the address (refused, no route, unknown host)."""


class TlsMismatch(ConnectionMistake):
    """One side speaks TLS and the other plaintext."""


class CertificateProblem(ConnectionMistake):
    """TLS failed on a certificate: the server's is for another host name or from
    another CA, or the server wants a client certificate it was not given."""


class DeadlineExceeded(PsgridError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(PsgridError):
    code = "CANCELLED"


class Stopping(Cancelled):
    """The caller is stopping: its call was given up, or cancelled in flight."""


class Internal(PsgridError):
    code = "INTERNAL"


class DeviceUnavailable(InvalidArgument):
    """A worker was asked for a device this host does not have (CUDA without a GPU)."""


class JobFailed(PsgridError):
    """Raised by ``Job.wait()`` when the job ended in FAILED."""

    code = "ABORTED"


class JobCancelled(PsgridError):
    """Raised by ``Job.wait()`` when the job was cancelled."""

    code = "CANCELLED"


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


#: Every psgrid error class by name; the wire carries the name so the SDK can
#: raise the precise class. Only names in this table are ever looked up.
ERRORS_BY_NAME: dict[str, type[PsgridError]] = {
    c.__name__: c for c in [PsgridError, *_all_subclasses(PsgridError)]
}

#: The class the SDK raises for a status code when no precise name came along.
ERROR_BY_CODE: dict[str, type[PsgridError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "NOT_FOUND": NotFound,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "FAILED_PRECONDITION": FailedPrecondition,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "CANCELLED": Cancelled,
    "INTERNAL": Internal,
}
