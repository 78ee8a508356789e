"""Sampling: greedy is argmax; seeds reproduce; top-k and top-p never pick outside their set."""

import pytest
import torch

from p2pllm.errors import UsageError
from p2pllm.model.sampling import Sampler, SamplingParams


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert Sampler(SamplingParams()).sample(logits) == 1


def test_same_seed_same_draws():
    logits = torch.randn(100)
    a = Sampler(SamplingParams(temperature=1.0, seed=42))
    b = Sampler(SamplingParams(temperature=1.0, seed=42))
    assert [a.sample(logits) for _ in range(50)] == [b.sample(logits) for _ in range(50)]


def test_top_k_only_draws_the_k_best():
    logits = torch.arange(50, dtype=torch.float32)
    s = Sampler(SamplingParams(temperature=5.0, top_k=3, seed=0))
    assert {s.sample(logits) for _ in range(300)} <= {47, 48, 49}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=1))
    drawn = {s.sample(logits) for _ in range(400)}
    assert drawn == {0, 1}


@pytest.mark.parametrize("params", [SamplingParams(temperature=-1), SamplingParams(top_k=-2),
                                    SamplingParams(top_p=0.0), SamplingParams(top_p=1.5),
                                    SamplingParams(seed=-3)])
def test_bad_parameters_are_usage_errors(params):
    with pytest.raises(UsageError):
        params.validate()
