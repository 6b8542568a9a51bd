"""Work cut into shards: consecutive pieces of at most `size` items, each the unit of one Ray task.

Every fan-out of the package plans its shards here (evaluation batches, attribution images, generated
images, FID images, inversions), so a shard means the same thing everywhere: the index-th piece,
items start..stop-1.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import check


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first item
    stop: int  # one past the last

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        """The file a stored shard is written to (generation: OUT/shards/shard-00000.npz)."""
        return f"shard-{self.index:05d}.npz"


def consecutive_shards(n: int, size: int) -> list[Shard]:
    """Shards covering items 0..n-1 in order, each of `size` items but the last (which may be smaller)."""
    check(size >= 1, f"shard size must be >= 1, got {size}")
    return [Shard(i, start, min(start + size, n)) for i, start in enumerate(range(0, n, size))]
