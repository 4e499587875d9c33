"""Write docs/proto-reference.md from the comments in protos/psgrid/v1/*.proto.

    python scripts/gen_proto_docs.py            # rewrite the reference
    python scripts/gen_proto_docs.py --check    # exit 1 when it is stale
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "psgrid" / "v1"
OUT = ROOT / "docs" / "proto-reference.md"

_BLOCK = re.compile(r"^(service|message|enum)\s+(\w+)")
_RPC = re.compile(r"^rpc\s+(\w+)\s*\((stream\s+)?(\w+)\)\s*returns\s*\((stream\s+)?(\w+)\)")
_FIELD = re.compile(r"^(repeated\s+|optional\s+)?([\w.]+|map<[^>]+>)\s+(\w+)\s*=\s*(\d+);")
_VALUE = re.compile(r"^(\w+)\s*=\s*(\d+);")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_file(path: pathlib.Path) -> list[str]:
    """Markdown for one .proto file: its services, then messages and enums."""
    lines = [f"## `{path.name}`", ""]
    comment: list[str] = []
    header = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("//"):
            comment.append(line[2:].strip())
            continue
        doc = " ".join(comment)
        comment = []
        if not line or line.startswith(("syntax", "package", "import", "option")):
            if not line and not lines[2:] and doc:
                header.append(doc)
            continue
        if m := _BLOCK.match(line):
            kind, name = m.groups()
            lines += ["", f"### {kind} `{name}`", ""]
            if doc:
                lines += [doc, ""]
            if kind == "service":
                lines += ["| rpc | request | response | what |", "|---|---|---|---|"]
            elif kind == "message":
                lines += ["| field | type | # | what |", "|---|---|---|---|"]
            else:
                lines += ["| value | # | what |", "|---|---|---|"]
        elif m := _RPC.match(line):
            name, req_stream, req, resp_stream, resp = m.groups()
            lines.append(f"| `{name}` | {'stream ' if req_stream else ''}`{req}` | "
                         f"{'stream ' if resp_stream else ''}`{resp}` | {_cell(doc)} |")
        elif m := _FIELD.match(line):
            label, typ, name, number = m.groups()
            trailing = line.split("//", 1)[1].strip() if "//" in line else ""
            what = " ".join(filter(None, [doc, trailing]))
            lines.append(f"| `{name}` | {(label or '').strip()} `{typ}` | {number} | {_cell(what)} |")
        elif (m := _VALUE.match(line)) and not line.startswith("oneof"):
            lines.append(f"| `{m.group(1)}` | {m.group(2)} | {_cell(doc)} |")
    intro = [f"{' '.join(header)}", ""] if header else []
    return lines[:2] + intro + lines[2:] + [""]


def render() -> str:
    out = ["# psgrid.v1 protocol reference", "",
           "Generated from the comments in `protos/psgrid/v1/*.proto` by `scripts/gen_proto_docs.py`;",
           "do not edit by hand. Every service also serves the standard `grpc.health.v1.Health`.", ""]
    for path in sorted(PROTO_DIR.glob("*.proto")):
        out += render_file(path)
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python scripts/gen_proto_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(OUT.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
