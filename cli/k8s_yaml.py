"""A small YAML writer for Kubernetes manifests: block style, stable key order, no dependency.

``psgrid k8s render`` writes plain data (dicts, lists, strings, ints, bools)
and needs nothing of YAML beyond that, so it does not pull PyYAML into
psgrid's runtime. A string that YAML could read as something else (``true``,
``7070``, ``a: b``, an empty string, a multi-line script) is written
double-quoted, in ASCII with escapes.
"""
from __future__ import annotations

import re

#: Strings written without quotes: no YAML indicator at the start (a flag's "--" is none),
#: nothing that reads as a number, boolean or null, no ": " or "#".
_PLAIN = re.compile(r"(?:[A-Za-z/_]|-[A-Za-z-])[A-Za-z0-9/_.=,:@$()+-]*\Z")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def scalar(value) -> str:
    """One YAML scalar; ValueError for a type manifests do not hold."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"cannot write {value!r} ({type(value).__name__}) as a YAML scalar")
    if _PLAIN.match(value) and value.lower() not in _RESERVED and ": " not in value \
            and not value.endswith(":"):
        return value
    return _quoted(value)


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar in ASCII: the rest as ``\\u`` + 4 or ``\\U`` + 8 hex digits."""
    out = []
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _lines(value, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        out = []
        for key, item in value.items():
            written = scalar(key)
            if len(written) > 1000:  # YAML's implicit keys end at 1024 characters: "? KEY" then ":"
                out.append(f"{pad}? {written}")
                head = f"{pad}:"
            else:
                head = f"{pad}{written}:"
            if isinstance(item, (dict, list)) and item:
                out += [head, *_lines(item, indent + (2 if isinstance(item, dict) else 0))]
            else:
                out.append(f"{head} {_inline(item)}")
        return out
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        out = []
        for item in value:
            if isinstance(item, (dict, list)) and item:
                first, *rest = _lines(item, indent + 2)
                out += [f"{pad}- {first.lstrip()}", *rest]
            else:
                out.append(f"{pad}- {_inline(item)}")
        return out
    return [pad + scalar(value)]


def _inline(value) -> str:
    if value == {}:
        return "{}"
    if value == []:
        return "[]"
    return scalar(value)


def dump(document) -> str:
    """One YAML document (a dict or list) as text ending in a newline."""
    return "\n".join(_lines(document, 0)) + "\n"


def dump_all(documents) -> str:
    """Several documents, separated by ``---``."""
    return "---\n".join(dump(d) for d in documents)
