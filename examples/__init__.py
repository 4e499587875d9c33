"""Models and datasets that psgrid jobs can name by import path, and their job specs."""
from __future__ import annotations

import pathlib

SPEC_DIR = pathlib.Path(__file__).parent


def spec_path(name: str) -> pathlib.Path:
    """The packaged job spec ``name`` (e.g. "digits")."""
    path = SPEC_DIR / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in SPEC_DIR.glob("*.toml"))
        raise ValueError(f"no example {name!r}; known: {', '.join(known)}")
    return path
