"""Global top-k layer budgets (LaProx / KVzip): one top-k over all (layer, token) pairs.

``layer_scores`` ``[L, n]`` are the per-layer token scores after ``protect`` (+inf on sinks and
window), so the scores must be comparable across layers (LaProx's output-contribution scores and
KVzip's gate probabilities are). With ``lo = min_keep(n, sinks, window)``,
``cap = max(lo, min(n, floor(max_fraction·n)))`` and ``T = total_keep(...)``:

1. every layer first keeps its ``lo`` best tokens (the protected ones: sinks + window);
2. the other ``T − L·lo`` slots go to the best remaining (layer, token) pairs over all layers,
   each layer taking at most ``cap − lo`` more, ordered by score descending, then layer index
   ascending, then position ascending (the shared tie rule extended across layers).

Returns the counts ``k_l`` (Σ = T exactly); the policy then keeps ``select_top(layer_scores[l],
k_l)`` in each layer, which is exactly the set chosen here. NaN scores → ValueError.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .base import LayerBudgetAllocator, _check_int, min_keep, total_keep


def extra_keep_counts(scores: torch.Tensor, lo: int, cap: int, extra: int) -> torch.Tensor:
    """Step 2 on the scores' device: per layer, how many of the ``extra`` best candidates beyond
    its ``lo`` best tokens it takes (at most ``cap - lo``). ``scores [L, n]`` float; int64 ``[L]``."""
    L = scores.shape[0]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # per layer, tie → lower position
    cand_pos = order[:, lo:cap]  # [L, cap - lo]: candidates in rank order
    cand_score = torch.gather(scores, 1, cand_pos)
    cand_layer = torch.arange(L, device=scores.device).unsqueeze(1).expand_as(cand_pos)
    score, layer, pos = cand_score.reshape(-1), cand_layer.reshape(-1), cand_pos.reshape(-1)
    # lexicographic order (score desc, layer asc, position asc) by stable sorts, last key first
    perm = torch.sort(pos, stable=True).indices
    perm = perm[torch.sort(layer[perm], stable=True).indices]
    perm = perm[torch.sort(score[perm], descending=True, stable=True).indices]
    chosen = layer[perm[:extra]]
    counts = torch.zeros(L, dtype=torch.int64, device=scores.device)
    return counts.scatter_add_(0, chosen, torch.ones_like(chosen))  # a bincount with a fixed output size


class GlobalTopKAllocator(LayerBudgetAllocator):
    name = "global_topk"
    score_dependent = True

    def __init__(self, max_fraction: float = 1.0):
        f = float(max_fraction) if not isinstance(max_fraction, bool) else float("nan")
        if not (0.0 < f <= 1.0):
            raise ValueError(f"GlobalTopKAllocator: max_fraction must be in (0, 1], got {max_fraction!r}")
        self.max_fraction = f

    def allocate(self, n: int, num_layers: int, budget: float, sinks: int, window: int,
                 layer_scores: Optional[torch.Tensor] = None) -> list[int]:
        L = _check_int("num_layers", num_layers, 1)
        n = _check_int("n", n)
        if layer_scores is None:
            raise ValueError("GlobalTopKAllocator needs layer_scores [num_layers, n] (protected token scores)")
        if not isinstance(layer_scores, torch.Tensor) or tuple(layer_scores.shape) != (L, n):
            shape = tuple(layer_scores.shape) if isinstance(layer_scores, torch.Tensor) else type(layer_scores).__name__
            raise ValueError(f"GlobalTopKAllocator: layer_scores must be [{L}, {n}], got {shape}")
        if not layer_scores.is_floating_point():
            raise ValueError(f"GlobalTopKAllocator: layer_scores must be floating point, got {layer_scores.dtype}")
        if torch.isnan(layer_scores).any():
            raise ValueError("GlobalTopKAllocator: layer_scores contain NaN")
        return self.allocate_many([(n, sinks, layer_scores)], L, budget, window)[0]

    def allocate_many(self, segments, num_layers: int, budget: float, window: int) -> list[list[int]]:
        """Keep counts of every ``(n, sinks, layer_scores)`` segment; the device counts of all of
        them come back in one device-to-host copy (the caller checked the scores for NaN)."""
        L = _check_int("num_layers", num_layers, 1)
        out, pending = [], []
        for n, sinks, layer_scores in segments:
            n = _check_int("n", n)
            if not isinstance(layer_scores, torch.Tensor) or tuple(layer_scores.shape) != (L, n):
                raise ValueError(f"GlobalTopKAllocator: layer_scores must be [{L}, {n}]")
            lo, extra = self._plan(n, L, budget, sinks, window)
            out.append([lo] * L)
            if extra:
                pending.append((len(out) - 1, lo, extra_keep_counts(
                    layer_scores.detach().to(torch.float32), lo, self._cap(n, lo), extra)))
        if pending:
            read = torch.stack([c for _, _, c in pending]).tolist()  # one device-to-host copy
            for (i, lo, _), counts in zip(pending, read):
                out[i] = [lo + int(c) for c in counts]
        return out

    def _cap(self, n: int, lo: int) -> int:
        return max(lo, min(n, int(math.floor(self.max_fraction * n))))

    def _plan(self, n: int, L: int, budget: float, sinks: int, window: int):
        """(lo, extra): every layer's protected minimum, and the slots the global top-k hands out."""
        total = total_keep(n, L, budget, sinks, window)
        lo = min_keep(n, sinks, window)
        cap = self._cap(n, lo)
        if L * cap < total:
            raise ValueError(f"GlobalTopKAllocator: max_fraction {self.max_fraction} caps {L} layers at {cap} tokens "
                             f"each, fewer than the {total} slots budget {budget} keeps")
        return lo, total - L * lo

    def __repr__(self) -> str:
        return f"GlobalTopKAllocator(max_fraction={self.max_fraction:g})"
