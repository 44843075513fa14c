"""Token scores summed over tensor-parallel ranks, bitwise identical on every rank.

Under tensor parallelism a rank holds ``kv_heads / tp`` kv heads of every layer (one replicated kv
head when ``tp > kv_heads``) and the matching query heads, so its token scores
(``selection.token_scores``: a sum over kv heads) are a partial sum. A layer's kept set must be the
same on every rank: the ranks' pools, allocators and radix trees stay identical only if they take
the same decisions. So before selection:

- every rank all-gathers its partial scores (one collective per call, a whole batch at once) and
  adds the gathered rows in rank order. Every rank adds the same float32 values in the same order,
  so the totals are bitwise equal whatever order the collective itself reduces in (an all-reduce's
  need not be the same on every rank). Equal totals and ``select_top``'s fixed tie rule (lower
  position first) give equal kept sets;
- with replicated kv heads, a scorer whose kv-head score is a sum over its query heads
  (``Scorer.sums_query_heads``: SnapKV) counts on every rank, since the ranks sharing a kv
  head hold distinct query heads of it; a scorer with one score per kv head (KVzip gates,
  StreamingLLM) counts only on the first rank of each replica group (the others send zeros). Either
  way the total is the single-rank sum over all heads, up to float rounding.

The scores must be sums over heads for this to be exact. A scorer that mixes the query heads of a
kv head non-linearly (``Scorer.mixes_query_heads``: LaProx) is exact while every rank holds whole
kv groups, and refused with replicated kv heads, where a group's query heads are split over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

from .scorers.base import Scorer


@dataclass(frozen=True)
class HeadShard:
    """Which kv heads a tensor-parallel rank holds (SGLang's ``QKVParallelLinear`` rule: contiguous
    blocks of ``kv_heads / size``, or kv head ``rank // (size / kv_heads)`` when replicated)."""

    rank: int
    size: int
    total_kv_heads: int

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} of size {self.size}")
        kvh = self.total_kv_heads
        if kvh < 1 or (kvh % self.size and self.size % kvh):
            raise ValueError(f"{kvh} kv heads cannot be split over {self.size} tensor-parallel ranks "
                             "(one must divide the other)")

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.total_kv_heads // self.size)

    @property
    def replicas(self) -> int:
        """Ranks that hold each kv head (1 unless ``size > total_kv_heads``)."""
        return max(1, self.size // self.total_kv_heads)

    def kv_heads(self) -> range:
        first = (self.rank // self.replicas) * self.local_kv_heads
        return range(first, first + self.local_kv_heads)

    def counts(self, scorer: Scorer) -> bool:
        """Whether this rank's partial scores enter the total (module docstring)."""
        return bool(scorer.sums_query_heads) or self.rank % self.replicas == 0


AllGather = Callable[[torch.Tensor], torch.Tensor]  # [1, k] on this rank -> [size, k], rank order


class RankScoreSum:
    """``partial -> total``: the sum of every rank's partial token scores (any shape, float32
    result), identical on every rank. ``all_gather`` is the tensor-parallel group's collective;
    every rank must call with the same shape, in the same order."""

    def __init__(self, shard: HeadShard, scorer: Scorer, all_gather: AllGather):
        if shard.replicas > 1 and scorer.mixes_query_heads:
            raise ValueError(f"{type(scorer).__name__} mixes the query heads of a kv head, and {shard.size} "
                             f"tensor-parallel ranks over {shard.total_kv_heads} kv heads split each kv head's "
                             f"query heads over {shard.replicas} ranks; use a tensor-parallel size of at most "
                             f"{shard.total_kv_heads} with this scorer")
        self.shard = shard
        self.counts = shard.counts(scorer)
        self.all_gather = all_gather

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        if not partial.is_floating_point():
            raise ValueError(f"RankScoreSum: scores must be floating point, got {partial.dtype}")
        x = partial.to(torch.float32).reshape(1, -1).contiguous()
        if not self.counts:
            x = torch.zeros_like(x)
        rows = self.all_gather(x)
        size = self.shard.size
        if tuple(rows.shape) != (size, x.shape[1]):
            raise RuntimeError(f"RankScoreSum: all-gather returned {tuple(rows.shape)}, expected {(size, x.shape[1])} "
                               "(ranks called with different score shapes?)")
        total = rows[0].clone()
        for r in range(1, size):
            total += rows[r]
        return total.view(partial.shape)

    def sum_many(self, partials: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """``self(p)`` for each of ``partials`` with one collective for all of them (a prefill
        batch's requests)."""
        if not partials:
            return []
        flat = self(torch.cat([p.to(torch.float32).reshape(-1) for p in partials]))
        return [t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in partials]), partials)]

    def __repr__(self) -> str:
        return f"RankScoreSum(rank={self.shard.rank}, size={self.shard.size}, counts={self.counts})"


__all__ = ["AllGather", "HeadShard", "RankScoreSum"]
