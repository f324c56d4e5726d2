"""SamplingParams refuses values the sampler cannot hold, when they are given rather than deep in the engine.
(The other checks of SamplingParams and the sampler are in test_generate.py.)"""

from __future__ import annotations

import pytest
import torch

from codellama.errors import UserError
from codellama.sampling import RowSampler, SamplingParams


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=2**63), "top_k"),  # the sampler's int64 tensor: was an OverflowError when the batch was built
    (dict(seed=2**64), "seed"),  # torch.Generator.manual_seed takes int64 or uint64
    (dict(seed=-(2**63) - 1), "seed"),
])
def test_values_beyond_the_samplers_integers_are_refused(kwargs, match):
    with pytest.raises(UserError, match=match):
        SamplingParams(temperature=1.0, **kwargs)


def test_the_extremes_it_accepts_build_a_sampler():
    params = [SamplingParams(temperature=1.0, top_k=2**63 - 1, seed=2**64 - 1), SamplingParams(seed=-(2**63))]
    sampler = RowSampler.build(params, torch.device("cpu"))
    assert sampler.sample(torch.zeros(2, 5)).shape == (2,)
