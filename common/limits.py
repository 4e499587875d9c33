"""What a caller may send: the documented limits, and one check per rule.

Every value that comes in from outside (an RPC request, a job spec, a
checkpoint's manifest) is checked with these functions before anything
changes. Each check raises InvalidArgument (or a subclass) naming the field
and quoting at most ``QUOTE_CHARS`` characters of the value (:func:`quote`),
so an error message never grows with what was sent. docs/operations.md
("Limits on what callers send") lists them.
"""
from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Mapping

from psgrid.errors import InvalidArgument, InvalidId

#: Characters of a caller's value that an error message quotes.
QUOTE_CHARS = 200
#: Steps, sequence numbers, versions, sample counts, pids: integers in [0, MAX_COUNT).
MAX_COUNT = 2**62
#: A worker's name (the supervisor names them worker-0, worker-1, ...).
MAX_NAME_CHARS = 128
#: A worker's host and device, as it registers them.
MAX_HOST_CHARS = 256
MAX_DEVICE_CHARS = 64
#: A job's display name.
MAX_JOB_NAME_CHARS = 256
#: A ``package.module:factory`` import path.
MAX_IMPORT_PATH_CHARS = 256
#: Entries in one metrics map (a progress or evaluation report), and characters of a key.
MAX_METRICS = 64
MAX_METRIC_KEY_CHARS = 64
#: Characters of a worker's failure report that are kept (the rest is cut, not refused).
MAX_ERROR_CHARS = 4000
#: ``model_kwargs`` and ``dataset_kwargs``, each as JSON.
MAX_KWARGS_JSON_BYTES = 64 << 10
#: Bytes of embedding-table rows one PullRows or LookupRows reply may carry (gRPC
#: clients refuse messages over 4 MiB; psgrid's own ask for 2 MiB at a time).
MAX_ROWS_REPLY_BYTES = (4 << 20) - (64 << 10)
#: A lineage digest (16 hex digits today).
MAX_LINEAGE_CHARS = 64

# An allowlist rather than a denylist: a job id becomes a directory name, so
# anything that could climb out of the root, hide, or need quoting is refused
# (fullmatch, since ``$`` would let a trailing newline through).
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = QUOTE_CHARS
_REPR.maxlevel = 3


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, saying how long it was.

    Every error message that quotes what a caller sent quotes it through here.
    """
    if isinstance(value, (str, bytes, bytearray)):
        text = repr(value[:limit])  # slice first: never repr megabytes
        if len(value) <= limit and len(text) <= limit + 3:
            return text
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{text[:limit]}... ({len(value)} {unit})"
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int too long to print
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}..."


def is_id(value: object) -> bool:
    """True when ``value`` follows the id rule (see :func:`check_id`)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def check_id(value: object, what: str = "job id") -> str:
    """Return ``value`` when it is a valid job or worker id; raise InvalidId otherwise.

    The one id rule, wherever an id comes in: 1-128 of ``A-Z a-z 0-9 _ . -``,
    not starting with ``.`` or ``-`` (safe as a directory name, never quoted).
    """
    if not is_id(value):
        raise InvalidId(f"{what} {quote(value)} is not valid "
                        "(1-128 of A-Z a-z 0-9 _ . -, not starting with . or -)")
    return value


def check_count(value: object, what: str) -> int:
    """Return ``value`` when it is an integer in [0, MAX_COUNT); InvalidArgument otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNT:
        raise InvalidArgument(f"{what} must be an integer in [0, 2**62), got {quote(value)}")
    return value


def check_rows_reply(count: int, table) -> None:
    """InvalidArgument when ``count`` rows of ``table`` (a psgrid.sparse.TableSpec) would
    not fit one reply (MAX_ROWS_REPLY_BYTES)."""
    if count * table.row_bytes > MAX_ROWS_REPLY_BYTES:
        raise InvalidArgument(f"table {table.name}: {count} rows of {table.row_bytes} bytes do not fit one reply "
                              f"({MAX_ROWS_REPLY_BYTES} bytes); ask for at most "
                              f"{MAX_ROWS_REPLY_BYTES // table.row_bytes} ids at a time")


def check_text(value: object, what: str, limit: int, empty: bool = True) -> str:
    """Return ``value`` when it is a printable str of at most ``limit`` characters
    (and not empty unless ``empty``); InvalidArgument otherwise."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {quote(value)}")
    if len(value) > limit:
        raise InvalidArgument(f"{what} is {len(value)} characters long, limit {limit}: {quote(value)}")
    if not value and not empty:
        raise InvalidArgument(f"{what} must not be empty")
    if not value.isprintable():
        raise InvalidArgument(f"{what} holds unprintable characters: {quote(value)}")
    return value


def check_real(value: object, what: str, minimum: float | None = None, nan: bool = False) -> float:
    """Return ``value`` when it is a finite number (NaN too when ``nan``), at least
    ``minimum`` when given; InvalidArgument otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{what} must be a number, got {quote(value)}")
    if math.isnan(value) and nan:
        return value
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" and >= {minimum}" if minimum is not None else ""
        raise InvalidArgument(f"{what} must be finite{bound}, got {quote(value)}")
    return value


def check_metrics(metrics: Mapping[str, float], what: str = "metrics") -> dict[str, float]:
    """A copy of ``metrics`` when it has at most MAX_METRICS entries, each a non-empty
    key of at most MAX_METRIC_KEY_CHARS characters and a finite value."""
    if len(metrics) > MAX_METRICS:
        raise InvalidArgument(f"{what} has {len(metrics)} entries, limit {MAX_METRICS}")
    for key, value in metrics.items():
        check_text(key, f"{what} key", MAX_METRIC_KEY_CHARS, empty=False)
        check_real(value, f"{what}[{key!r}]")
    return dict(metrics)
