"""The limits on what callers send: one check per rule, short error messages (issue 12, items 4, 5, 7)."""
from __future__ import annotations

import math

import pytest

from psgrid import checkpoints, limits, messages
from psgrid.errors import InvalidArgument, InvalidId, InvalidSpec
from psgrid.spec import JobSpec, OptimizerSpec

BASE = dict(model="psgrid.examples.models:mlp", dataset="psgrid.examples.datasets:digits", steps=1)


def test_quote_cuts_what_it_quotes_and_says_how_long_it_was():
    assert limits.quote("abc") == "'abc'"
    long = limits.quote("x" * 16_000)
    assert len(long) < 250 and "16000 characters" in long
    assert len(limits.quote(b"\0" * 10**6)) < 250
    assert len(limits.quote(list(range(10**5)))) < 250
    assert len(limits.quote({"a": [[[[["deep"]]]]]})) < 250
    assert limits.quote(10**5000) == "<int>"  # too long even to print


@pytest.mark.parametrize("bad", ["..", ".", "", "-rf", "../../x", "a/b", "job\n", "x" * 129, None, 7, "é"])
def test_one_id_rule_refuses_what_could_not_be_a_directory_name(bad):
    with pytest.raises(InvalidId) as info:
        limits.check_id(bad)
    assert isinstance(info.value, InvalidArgument) and isinstance(info.value, ValueError)
    assert len(str(info.value)) < 400
    assert not limits.is_id(bad)


def test_the_checkpoint_store_applies_the_same_rule(tmp_path):
    for good in ["job-1a2b", "a", "A_b.c-d", "x" * 128]:
        assert limits.check_id(good) == good
    with pytest.raises(InvalidId):
        checkpoints.CheckpointReader(tmp_path).load_latest("../x")
    assert checkpoints.check_id is limits.check_id


@pytest.mark.parametrize("value", [-1, 2**62, 2**64 - 1, True, 1.0, "1", None])
def test_counts_are_integers_in_0_to_2_62(value):
    with pytest.raises(InvalidArgument):
        limits.check_count(value, "seq")


def test_counts_accept_their_range():
    assert limits.check_count(0, "seq") == 0 and limits.check_count(2**62 - 1, "seq") == 2**62 - 1


@pytest.mark.parametrize("value,nan,minimum", [
    (math.inf, False, None), (-math.inf, True, None), (math.nan, False, None), (-1.0, False, 0.0), ("1", False, None),
])
def test_reals_must_be_finite(value, nan, minimum):
    with pytest.raises(InvalidArgument):
        limits.check_real(value, "loss", minimum=minimum, nan=nan)


def test_a_nan_is_allowed_only_where_it_says_none():
    assert math.isnan(limits.check_real(math.nan, "loss", nan=True))


@pytest.mark.parametrize("metrics", [
    {f"m{i}": 1.0 for i in range(limits.MAX_METRICS + 1)}, {"k" * 65: 1.0}, {"": 1.0},
    {"a\nb": 1.0}, {"a": math.inf}, {"a": math.nan},
])
def test_metric_maps_are_bounded(metrics):
    with pytest.raises(InvalidArgument) as info:
        limits.check_metrics(metrics)
    assert len(str(info.value)) < 400


def test_text_is_bounded_printable_and_quoted_short():
    with pytest.raises(InvalidArgument) as info:
        limits.check_text("n" * 3_000_000, "worker name", limits.MAX_NAME_CHARS)
    assert len(str(info.value)) < 400
    with pytest.raises(InvalidArgument):
        limits.check_text("", "worker name", limits.MAX_NAME_CHARS, empty=False)
    with pytest.raises(InvalidArgument):
        limits.check_text("tab\t", "worker name", limits.MAX_NAME_CHARS)
    assert limits.check_text("worker-0", "worker name", limits.MAX_NAME_CHARS) == "worker-0"


@pytest.mark.parametrize("change", [
    dict(lr=math.inf), dict(eps=math.inf), dict(momentum=math.nan), dict(weight_decay=math.nan),
    dict(dampening=math.nan), dict(lr="0.1"), dict(betas=(0.9,)), dict(betas=(0.9, math.nan)),
])
def test_optimizer_settings_must_be_finite_numbers(change):
    with pytest.raises(InvalidSpec):
        OptimizerSpec(**change)


@pytest.mark.parametrize("path", [
    "psgrid.examples..models:mlp", "psgrid.examples.models:mlp\n", ".a:b", "a.:b", "a:b:c", "a:" + "b" * 300,
])
def test_import_paths_have_no_empty_part(path):
    with pytest.raises(InvalidSpec):
        JobSpec(**{**BASE, "model": path})


@pytest.mark.parametrize("change", [
    dict(name="n" * (limits.MAX_JOB_NAME_CHARS + 1)), dict(batch_size=2**31), dict(steps=2**62),
    dict(model_kwargs={"k": "v" * limits.MAX_KWARGS_JSON_BYTES}),
])
def test_job_specs_are_bounded(change):
    with pytest.raises(InvalidSpec):
        JobSpec(**{**BASE, **change})


def test_deeply_nested_kwargs_are_an_invalid_spec():
    nested: dict = {}
    for _ in range(5000):
        nested = {"a": nested}
    with pytest.raises(InvalidSpec):
        JobSpec(**{**BASE, "model_kwargs": nested})


@pytest.mark.parametrize("text", [
    "[" * 100_000, "[" * 5000 + "]" * 5000, '{"n": ' + "1" * 5000 + "}", '{"k": "' + "v" * 70_000 + '"}',
])
def test_kwargs_json_that_cannot_be_parsed_is_an_invalid_spec(text):
    with pytest.raises(InvalidSpec) as info:
        messages._kwargs(text, "model_kwargs")
    assert len(str(info.value)) < 500
