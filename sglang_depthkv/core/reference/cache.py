"""Per-layer pruned KV cache built from the full prefill.

Each layer keeps its own subset of the prefill's token positions (``keep[l]``: sorted ascending,
distinct, in ``[0, n)``), so layers hold different numbers of keys. The cache also remembers the
ORIGINAL sequence length: the next token is always at position ``next_position`` (= n after the
prefill), never at the pruned length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


def validate_keep(keep: Sequence[torch.Tensor], num_layers: int, n: int) -> list[torch.Tensor]:
    """Check a per-layer keep list; returns it as int64 tensors. ValueError naming the problem."""
    if isinstance(keep, torch.Tensor) or not isinstance(keep, (list, tuple)):
        raise ValueError(f"keep must be a list of {num_layers} 1-D index tensors, got {type(keep).__name__}")
    if len(keep) != num_layers:
        raise ValueError(f"keep has {len(keep)} entries, the model has {num_layers} layers")
    out = []
    for layer, idx in enumerate(keep):
        if not isinstance(idx, torch.Tensor):
            raise ValueError(f"keep[{layer}] is a {type(idx).__name__}, expected a LongTensor")
        if idx.dim() != 1:
            raise ValueError(f"keep[{layer}] must be 1-D, got shape {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"keep[{layer}] must hold integer positions, got dtype {idx.dtype}")
        idx = idx.to(torch.int64)
        if idx.numel():
            if int(idx.min()) < 0 or int(idx.max()) >= n:
                raise ValueError(
                    f"keep[{layer}] holds positions in [{int(idx.min())}, {int(idx.max())}], outside [0, {n})"
                )
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError(f"keep[{layer}] must be strictly ascending (sorted, no duplicates)")
        out.append(idx)
    return out


@dataclass
class PrunedCache:
    """Per-layer K/V ``[kvh, m_l, d]`` with the positions they came from, plus the next position."""

    keys: list
    values: list
    positions: list  # per layer LongTensor [m_l]: original positions of the cached tokens
    next_position: int

    @classmethod
    def from_prefill(cls, prefill, keep: Optional[Sequence[torch.Tensor]] = None) -> "PrunedCache":
        """Copy the kept positions of every layer out of ``prefill`` (a FullPrefill).
        ``keep=None`` keeps everything."""
        n = prefill.length
        num_layers = len(prefill.keys)
        device = prefill.keys[0].device
        if keep is None:
            keep = [torch.arange(n, device=device) for _ in range(num_layers)]
        keep = [idx.to(device) for idx in validate_keep(keep, num_layers, n)]
        keys = [k.index_select(1, idx) for k, idx in zip(prefill.keys, keep)]
        values = [v.index_select(1, idx) for v, idx in zip(prefill.values, keep)]
        return cls(keys=keys, values=values, positions=[idx.clone() for idx in keep], next_position=n)

    def lengths(self) -> list[int]:
        return [int(k.shape[1]) for k in self.keys]

    def total_slots(self) -> int:
        return sum(self.lengths())
