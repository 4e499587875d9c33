"""A worker's rounds under local SGD and compression (psgrid.worker.outbox): how steps count,
the pushed delta, and a round computed again counting once."""
from __future__ import annotations

import torch

from psgrid.build import build_dataset, build_model
from psgrid.codec import Pulled
from psgrid.dataset import ShardSampler
from psgrid.spec import JobSpec, JobState, OptimizerSpec
from psgrid.worker.outbox import Outbox
from psgrid.worker.step import GradientStep

SPEC = JobSpec(model="psgrid.examples.models:linear", dataset="psgrid.examples.datasets:linear_regression",
               dataset_kwargs={"n": 256}, steps=10, batch_size=8, num_workers=2, seed=3,
               sync_every=4, local_optimizer=OptimizerSpec("sgd", lr=0.1, momentum=0.9), compression="topk:0.1")


def outbox(spec: JobSpec = SPEC) -> Outbox:
    dataset = build_dataset(spec)
    sampler = ShardSampler(len(dataset.train_x), 0, 2, spec.batch_size, spec.seed)
    step = GradientStep(build_model(spec), dataset, sampler, torch.device("cpu"), world_size=2)
    return Outbox(step, spec)


def pulled(box: Outbox, weights: torch.Tensor) -> list[Pulled]:
    """Load ``weights`` into the model as a pull would, and return that pull."""
    layout = box.step.layouts[0]
    box.step.load(0, layout, weights)
    return [Pulled(JobState.RUNNING, 0, 0, layout, weights)]


def test_steps_count_local_steps_and_the_last_round_is_shorter():
    box = outbox()
    assert box.rounds == 3 and [len(box.local_range(r)) for r in range(3)] == [4, 4, 2]
    every_3 = [r for r in range(3) if box.evaluate_due(r, 3)]  # after local steps 3, 6 and 9
    assert every_3 == [0, 1, 2]
    plain = outbox(SPEC.replace(sync_every=1, local_optimizer=None))
    assert plain.rounds == 10 and [r for r in range(10) if plain.evaluate_due(r, 4)] == [3, 7]


def test_the_push_is_the_pulled_weights_minus_the_local_ones():
    box = outbox(SPEC.replace(compression="none"))
    start = box.step.initial_payload(0)
    box.compute(0, (), pulled(box, start.clone()))
    layout = box.step.layouts[0]
    delta, before = layout.views(box.payloads()[0]), layout.views(start)
    for name, p in box.step.params:
        torch.testing.assert_close(delta[name], before[name] - p.detach(), rtol=0, atol=0)
        assert delta[name].abs().max() > 0


def test_a_round_computed_again_starts_from_the_same_local_state():
    box = outbox()
    start = box.step.initial_payload(0)
    box.compute(0, (), pulled(box, start.clone()))
    first = box.payloads()[0].clone()
    box.compute(0, (), pulled(box, start.clone()))  # its push was refused, or its round started again
    assert torch.equal(box.payloads()[0], first)  # same momentum, same residual: the same push
    box.compute(1, (), pulled(box, start.clone()))  # the next round goes on from round 0's state
    assert not torch.equal(box.payloads()[0], first)
    box.compute(0, (), pulled(box, start.clone()))  # the server went back further: state afresh,
    assert torch.equal(box.payloads()[0], first)  # as round 0 was computed the first time
