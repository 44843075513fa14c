"""Random ragged per-layer KV scenarios for the kernel tests (small sizes, seeded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch


@dataclass
class Batch:
    lens: List[int]
    rows: List[int]
    req_to_token: torch.Tensor  # [R, W] int32
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    num_logical: int  # mapping width - 2
    ids: List[torch.Tensor]


def make_batch(lens, gen, width=None, num_rows=None, spare=6) -> Batch:
    """Distinct logical ids >= 1 per token; garbage beyond each length points at *held* spare ids so a
    kernel reading past ``seq_lens`` would visibly free or move them."""
    total = sum(lens)
    num_logical = total + spare
    perm = torch.randperm(total + spare, generator=gen) + 1
    width = width or max(lens + [1]) + 3
    num_rows = num_rows or len(lens) + 2
    spare_ids = perm[total:]
    r2t = spare_ids[torch.randint(0, spare, (num_rows, width), generator=gen)].to(torch.int32)
    rows = torch.randperm(num_rows, generator=gen)[: len(lens)].tolist()
    ids, off = [], 0
    for r, n in zip(rows, lens):
        r2t[r, :n] = perm[off: off + n].to(torch.int32)
        ids.append(perm[off: off + n].long())
        off += n
    return Batch(
        lens=list(lens), rows=rows, req_to_token=r2t,
        req_pool_indices=torch.tensor(rows, dtype=torch.int64), seq_lens=torch.tensor(lens, dtype=torch.int32),
        num_logical=num_logical, ids=ids,
    )


def held_mapping(batch: Batch, slots: List[int], gen, dtype=torch.int32) -> torch.Tensor:
    """Every logical id (batch tokens and spares) held at every layer in a distinct random slot >= 1."""
    L = len(slots)
    m = torch.zeros((L, batch.num_logical + 2), dtype=dtype)
    all_ids = torch.arange(1, batch.num_logical + 1)
    for l, s in enumerate(slots):
        assert s - 1 >= all_ids.numel(), "layer too small for the scenario"
        pick = torch.randperm(s - 1, generator=gen)[: all_ids.numel()] + 1
        m[l, all_ids] = pick.to(dtype)
    return m
