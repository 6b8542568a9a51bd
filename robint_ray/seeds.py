"""Seeds derived from (seed, key, ...), one rule for the whole project.

numpy's SeedSequence mixes (seed, *keys) into 32-bit words w0, w1, ..., so every (run, epoch and rank /
shard / image) gets its own stream, independent of how the work is batched, sharded or scheduled. The
project turns the first two words into a torch seed in three ways, each pinned by results already made
(training runs, byte-identical generation shards, seeded attributions and their figures), so the caller
names its `layout` and none of them may change:

- "w0": the first word, 32 bits (training: per (seed, epoch, rank); also seeds numpy and `random`);
- "w1w0>>1": w1 and w0 as the high and low halves (numpy's first 64-bit word), shifted right by one,
  63 bits (generation: per (seed, shard index));
- "w0w1": w0 and w1 as the high and low halves, 64 bits (attributions: per (seed, image index)).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .errors import check

Layout = Literal["w0", "w1w0>>1", "w0w1"]
LAYOUTS = ("w0", "w1w0>>1", "w0w1")


def derived_seed(seed: int, *keys: int, layout: Layout) -> int:
    """The torch seed of (seed, *keys) under `layout` (see the module docstring)."""
    check(layout in LAYOUTS, f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    w0, w1 = (int(w) for w in np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, np.uint32))
    if layout == "w0":
        return w0
    if layout == "w1w0>>1":
        return (w1 << 32 | w0) >> 1
    return w0 << 32 | w1


def seeded_generator(seed: int, *keys: int, layout: Layout, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded with derived_seed(seed, *keys, layout=layout)."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, *keys, layout=layout))
