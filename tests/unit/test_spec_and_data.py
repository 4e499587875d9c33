"""Job specs validate their values; the shard sampler deals rows as documented."""
from __future__ import annotations

import pytest
import torch

from psgrid.backoff import Backoff
from psgrid.errors import ERROR_BY_CODE, ERRORS_BY_NAME, InvalidSpec
from psgrid.examples import spec_path
from psgrid.spec import JobSpec, OptimizerSpec
from psgrid.dataset import ShardSampler

BASE = dict(model="a.b:c", dataset="d.e:f", steps=5)


@pytest.mark.parametrize("bad", [
    dict(model="not an import path"), dict(batch_size=0), dict(steps=0),
    dict(epochs=2), dict(staleness=-1), dict(num_workers=0), dict(device="tpu"),
    dict(model_kwargs={"x": object()}),
])
def test_bad_specs_are_rejected_with_the_value_named(bad):
    with pytest.raises(InvalidSpec):
        JobSpec(**{**BASE, **bad})


@pytest.mark.parametrize("bad", [dict(name="lbfgs"), dict(lr=0), dict(nesterov=True), dict(betas=(1.0, 0.9))])
def test_bad_optimizers_are_rejected(bad):
    with pytest.raises(InvalidSpec):
        OptimizerSpec(**bad)


def test_packaged_examples_parse():
    for name in ("digits", "linear"):
        spec = JobSpec.from_toml(spec_path(name))
        assert spec.num_workers == 2 and spec.epochs > 0


def test_staleness_inf_means_async():
    assert JobSpec.from_dict({**BASE, "staleness": "inf"}).staleness is None
    with pytest.raises(InvalidSpec):
        JobSpec.from_dict({**BASE, "unknown_key": 1})


def test_shards_are_disjoint_equal_and_cover_almost_everything():
    n, world = 103, 3
    samplers = [ShardSampler(n, r, world, batch_size=8, seed=4) for r in range(world)]
    shards = [set(s.shard.tolist()) for s in samplers]
    assert all(len(s) == n // world for s in shards)
    assert not (shards[0] & shards[1]) and not (shards[1] & shards[2])
    assert samplers[0].steps_per_epoch == (n // world) // 8


def test_batches_are_reproducible_and_cover_the_shard_each_epoch():
    s1 = ShardSampler(64, 1, 2, batch_size=8, seed=9)
    s2 = ShardSampler(64, 1, 2, batch_size=8, seed=9)
    epoch = torch.cat([s1.indices(i) for i in range(s1.steps_per_epoch)])
    assert sorted(epoch.tolist()) == sorted(s1.shard.tolist())
    assert all(torch.equal(s1.indices(i), s2.indices(i)) for i in range(10))
    assert not torch.equal(s1.indices(0), s1.indices(s1.steps_per_epoch))  # reshuffled


def test_backoff_is_capped_and_jittered():
    import random

    b = Backoff(initial=0.1, maximum=1.0, jitter=0.5, rng=random.Random(0))
    delays = [b.next_delay() for _ in range(10)]
    assert all(0 < d <= 1.0 for d in delays)
    assert delays[-1] >= 0.5  # capped at 1.0, jitter takes at most half
    b.reset()
    assert b.next_delay() <= 0.1


def test_every_error_has_a_real_status_code():
    import grpc

    for name, cls in ERRORS_BY_NAME.items():
        assert grpc.StatusCode[cls.code]
    for code, cls in ERROR_BY_CODE.items():
        assert cls.code == code


def test_replace_coerces_and_checks_as_from_dict_does():
    spec = JobSpec.from_dict({"model": "psgrid.examples.models:mlp", "dataset": "psgrid.examples.datasets:digits",
                              "epochs": 2})
    assert spec.replace(staleness="inf").staleness is None
    assert spec.replace(staleness="async").staleness is None
    switched = spec.replace(epochs=None, steps=50)
    assert (switched.epochs, switched.steps) == (0, 50)
    for bad in ({"staleness": "sometimes"}, {"staleness": 1.5}, {"epochs": "3"}, {"batch_size": True},
                {"epochs": None}, {"num_workrs": 2}, {"seed": 2.0}):
        with pytest.raises(InvalidSpec):
            spec.replace(**bad)
    with pytest.raises(InvalidSpec):
        JobSpec.from_dict({"model": "a.b:c", "dataset": "a.b:d", "epochs": 1, "staleness": "x"})
