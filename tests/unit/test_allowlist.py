"""Jobs may only name model and dataset modules under the operator's allow-list."""
from __future__ import annotations

import sys

import pytest

from psgrid.errors import PermissionDenied
from psgrid.spec import JobSpec, module_allowed, parse_allowed
from psgrid.build import import_factory


def test_prefixes_match_whole_package_names():
    allowed = ("psgrid.examples", "mylab")
    assert module_allowed("psgrid.examples.models", allowed)
    assert module_allowed("mylab", allowed) and module_allowed("mylab.nets.resnet", allowed)
    assert not module_allowed("mylabs.evil", allowed)
    assert not module_allowed("os", allowed)
    assert module_allowed("anything.at_all", ("*",))


def test_parse_allowed_defaults_to_the_examples():
    assert parse_allowed(None) == ("psgrid.examples",)
    assert parse_allowed(" a.b , c ") == ("a.b", "c")


def test_spec_check_names_the_offending_module():
    spec = JobSpec(model="psgrid.examples.models:mlp", dataset="evil.data:load", steps=1)
    with pytest.raises(PermissionDenied, match="evil.data"):
        spec.check_modules(("psgrid.examples",))
    spec.check_modules(("psgrid.examples", "evil"))


def test_a_refused_module_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "sneaky_module.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef f(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PermissionDenied):
        import_factory("sneaky_module:f", ("psgrid.examples",))
    assert not marker.exists() and "sneaky_module" not in sys.modules
    assert callable(import_factory("sneaky_module:f", ("sneaky_module",)))
    assert marker.exists()
