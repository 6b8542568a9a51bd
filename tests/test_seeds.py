"""One rule for seeds derived from (seed, key, ...): each layout gives the numbers the project's runs,
shards and figures were made with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robint_ray.errors import InputError
from robint_ray.seeds import derived_seed, seeded_generator


@pytest.mark.parametrize(
    "seed,keys,w0,shifted,w0w1",
    [
        (0, (0,), 2968811710, 7896617691693857887, 12750949206108985319),
        (7, (3,), 3466196061, 2530781778362038830, 14887198724697508156),
        (2024, (5, 1), 2181594512, 2291504848249831112, 9369877083240144649),
    ],
)
def test_each_layout_keeps_the_numbers_it_was_made_with(seed, keys, w0, shifted, w0w1):
    assert derived_seed(seed, *keys, layout="w0") == w0
    assert derived_seed(seed, *keys, layout="w1w0>>1") == shifted
    assert derived_seed(seed, *keys, layout="w0w1") == w0w1
    # the expressions each layout replaced: training's per (seed, epoch, rank), generation's per
    # (seed, shard), attributions' per (seed, image)
    sequence = np.random.SeedSequence([seed, *keys])
    assert w0 == int(sequence.generate_state(1)[0])
    assert shifted == int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1)
    words = sequence.generate_state(2, dtype=np.uint32)
    assert w0w1 == int(words[0]) << 32 | int(words[1])


def test_seeded_generator_draws_from_the_derived_seed():
    a = torch.rand(5, generator=seeded_generator(3, 1, layout="w0w1"))
    b = torch.rand(5, generator=torch.Generator().manual_seed(derived_seed(3, 1, layout="w0w1")))
    assert torch.equal(a, b) and not torch.equal(a, torch.rand(5, generator=seeded_generator(3, 2, layout="w0w1")))
    with pytest.raises(InputError, match="layout"):
        derived_seed(3, 1, layout="w1w0")
