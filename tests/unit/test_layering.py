"""The rooms keep their floors: `common/` imports no role, roles import `common/` and `protos/` only.

Read from the source tree with `ast` (nothing is imported), so a new import
that crosses a floor fails here before a reader trips over it. The command line
(`cli/`) is the top floor and may import anything.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROLES = ("server", "worker", "client", "inference", "supervisor")
#: Room (folder) -> the rooms it may import besides itself, `common` and `protos`.
ALLOWED = {"common": (), "examples": (), **{role: () for role in ROLES}}
#: The crossings we keep, each with its reason.
EXCEPTIONS = {
    # `python -m psgrid` runs the command line: the one ground-floor file that names the top floor.
    ("common/__main__.py", "cli"),
    # `psgrid.Client` is a shortcut for users, resolved lazily (`psgrid --help` does not import the SDK).
    ("common/__init__.py", "client"),
    # `psgrid serve --follow-job` follows a training job through the client SDK, as any user would.
    ("inference/sources.py", "client"),
    # The SDK offers the serving client too (`psgrid.client.InferenceClient`), imported lazily on first use.
    ("client/__init__.py", "inference"),
}


def room_of(module: str) -> str:
    """The room a ``psgrid.*`` module lives in (``psgrid.v1`` is `protos`, the rest of ``psgrid.*`` `common`)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "common"
    top = parts[1]
    if top == "v1":
        return "protos"
    return top if top in (*ROLES, "cli", "examples") else "common"


def psgrid_imports(path: pathlib.Path) -> set[str]:
    """Every ``psgrid.*`` module ``path`` imports, at any depth (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "psgrid"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "psgrid":  # from psgrid import codec, client
                found |= {f"psgrid.{a.name}" for a in node.names}
            elif node.module.startswith("psgrid."):
                found.add(node.module)
    return found


def crossings() -> list[str]:
    bad = []
    for room, allowed in ALLOWED.items():
        for path in sorted((ROOT / room).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for module in sorted(psgrid_imports(path)):
                target = room_of(module)
                if target in (room, "common", "protos", *allowed) or (rel, target) in EXCEPTIONS:
                    continue
                bad.append(f"{rel} imports {module} ({room} -> {target})")
    return bad


def test_common_imports_no_role_and_roles_import_only_common_and_protos():
    assert crossings() == []


def test_every_documented_exception_is_still_needed():
    used = set()
    for rel, target in EXCEPTIONS:
        if any(room_of(m) == target for m in psgrid_imports(ROOT / rel)):
            used.add((rel, target))
    assert used == EXCEPTIONS


def test_the_check_sees_a_crossing():
    assert room_of("psgrid.worker.runner") == "worker" and room_of("psgrid.codec") == "common"
    assert room_of("psgrid.v1.job_pb2") == "protos" and room_of("psgrid.cli.main") == "cli"
