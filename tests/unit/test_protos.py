"""The committed generated code is exactly what scripts/gen_protos.py produces."""
from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_protos(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = {p.name: p.read_bytes() for p in gen.generate(tmp_path)}
    committed_dir = ROOT / "protos" / "psgrid" / "v1"
    committed = {p.name: p.read_bytes() for p in committed_dir.glob("*_pb2.py*")}
    assert set(fresh) == set(committed), "generated files differ: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{stale} are stale: run `make protos` and commit the result"


def test_proto_reference_matches_the_protos():
    spec = importlib.util.spec_from_file_location("gen_proto_docs", ROOT / "scripts" / "gen_proto_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = (ROOT / "docs" / "proto-reference.md").read_text()
    assert committed == gen.render(), "docs/proto-reference.md is stale: run scripts/gen_proto_docs.py"
