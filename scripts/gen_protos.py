"""Regenerate the Python code for protos/psgrid/v1/*.proto.

Messages only: psgrid registers its services with generic handlers (one
table per service, in each service module) and calls them through
``psgrid.rpc.ServiceClient``, so no generated stubs or servicer base classes
are needed.

The generated modules live beside the .proto files and install as
``psgrid.v1``. Run with the pinned grpcio-tools (the ``test`` extra):

    python scripts/gen_protos.py            # rewrite the generated files
    python scripts/gen_protos.py --out DIR  # write them under DIR instead
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "psgrid" / "v1"


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc on every .proto file; return the paths it wrote."""
    import grpc_tools
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "psgrid" / "v1").glob("*_pb2.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=PROTO_ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    sys.exit(main())
