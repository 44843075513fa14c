"""End-of-prefill pruning on the SGLang side: per-layer scores -> per-layer keep sets -> freed slots.

The decision is ``PrunePolicy.select``'s, applied to the tokens the request owns (positions
``[own_lo, n)``, ``own_lo`` from ``chunk_ownership``: a radix-matched prefix was already pruned by
the request that inserted it and is never re-pruned; the request's own earlier chunks of a chunked
prefill are its own), built from the same core functions
(``protect``, ``allocator.allocate``, ``select_top``), never re-implemented:

1. ``m = n - own_lo`` own tokens; ``sinks_own`` = how many of the absolute sink positions
   ``[0, sinks)`` fall inside the own segment (``sinks`` when ``own_lo == 0``);
2. not pruned at all when ``budget == 1`` or ``m <= sinks_own + window``;
3. per layer ``protect(own_scores_l, sinks_own, window)``, then
   ``allocator.allocate(m, L, budget, sinks_own, window, layer_scores)`` (scores only for
   score-dependent allocators) and ``select_top`` per layer.

With ``own_lo == 0`` (no cached prefix) this is exactly ``PrunePolicy.select`` on the request's
whole prompt (``tests/sglang_e2e/test_select_own.py`` checks it). **Budget of a request with a
cached prefix:** the budget applies to the request's own segment as if it were a sequence of ``m``
tokens (the cached prefix keeps whatever its inserter kept, it is not charged again).

``PruneRecord`` is one request's decision; ``apply_prune`` frees the dropped slots through
``DepthKVAllocator.prune``; ``dump_keep`` appends the kept positions as JSON lines to the file
named by ``SGLANG_DEPTHKV_DUMP_KEEP`` (debug / tests).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from sglang_depthkv.core.policy import PrunePolicy
from sglang_depthkv.core import selection
from sglang_depthkv.core.selection import protect, select_top

DUMP_ENV = "SGLANG_DEPTHKV_DUMP_KEEP"


def sinks_in_segment(sinks: int, own_lo: int, m: int) -> int:
    return max(0, min(int(sinks) - int(own_lo), int(m)))


def select_own(policy: PrunePolicy, own_scores: torch.Tensor, own_lo: int,
               check_nan: bool = True) -> Optional[List[torch.Tensor]]:
    """Keep sets (absolute positions, ascending int64) per layer for the own segment, from
    unprotected token scores ``own_scores [L, m]`` of positions ``own_lo .. own_lo + m - 1``.
    ``None`` when the segment is not pruned (everything kept). ``check_nan=False``: the caller has
    checked the scores for NaN already (one device read for a whole batch)."""
    if check_nan and isinstance(own_scores, torch.Tensor):
        selection.check_no_nan(own_scores.reshape(-1), "select_own")
    return select_own_many(policy, [(own_scores, own_lo)])[0]


def select_own_many(policy: PrunePolicy, segments: Sequence[Tuple[torch.Tensor, int]]
                    ) -> List[Optional[List[torch.Tensor]]]:
    """``select_own`` for every ``(own_scores, own_lo)`` of a batch (scores already checked for NaN):
    the score-dependent keep counts of all segments are read back in one device-to-host copy."""
    prepared = []
    for own_scores, own_lo in segments:
        if not isinstance(own_scores, torch.Tensor) or own_scores.dim() != 2:
            raise ValueError(f"select_own: own_scores must be [num_layers, m], got "
                             f"{getattr(own_scores, 'shape', own_scores)}")
        if int(own_lo) < 0:
            raise ValueError(f"select_own: own_lo must be >= 0, got {own_lo}")
        L, m = int(own_scores.shape[0]), int(own_scores.shape[1])
        sinks = sinks_in_segment(policy.sinks, own_lo, m)
        if not (policy.budget < 1.0 and m > sinks + policy.window):
            prepared.append(None)
            continue
        prot = torch.stack([protect(own_scores[l].float(), sinks, policy.window) for l in range(L)])
        prepared.append((prot, m, sinks, int(own_lo)))
    live = [p for p in prepared if p is not None]
    if not live:
        return [None] * len(prepared)
    L = int(live[0][0].shape[0])
    counts = iter(policy.allocator.allocate_many([(m, sinks, prot) for prot, m, sinks, _ in live], L, policy.budget,
                                                 policy.window))
    out = []
    for p in prepared:
        if p is None:
            out.append(None)
            continue
        prot, _, _, lo = p
        out.append([select_top(prot[l], int(k), check_nan=False) + lo for l, k in enumerate(next(counts))])
    return out


@dataclass
class PruneRecord:
    rid: str
    own_lo: int
    seq_len: int
    keep: Optional[List[torch.Tensor]]  # per layer absolute positions kept in [own_lo, seq_len); None = all
    freed: List[int] = field(default_factory=list)


def dropped_positions(keep: torch.Tensor, own_lo: int, seq_len: int) -> torch.Tensor:
    """Positions of ``[own_lo, seq_len)`` not in ``keep`` (ascending int64). Their number is
    host-known (``m - len(keep)``, ``keep`` unique), so no device value is read: a stable sort puts
    the dropped positions first, in order."""
    m = int(seq_len) - int(own_lo)
    kept = torch.zeros(m, dtype=torch.int8, device=keep.device)
    kept[keep.to(torch.int64) - int(own_lo)] = 1
    order = torch.sort(kept, stable=True).indices
    return order[: m - int(keep.numel())] + int(own_lo)


def apply_prune(allocator, req_to_token: torch.Tensor, req_pool_idx: int, record: PruneRecord) -> None:
    """Free, at every layer, the own positions not in ``record.keep`` (through the allocator, which
    refuses a token a layer no longer holds: a segment is pruned once)."""
    if record.keep is None:
        record.freed = [0] * allocator.num_layers
        return
    if len(record.keep) != allocator.num_layers:
        raise ValueError(f"apply_prune: {len(record.keep)} keep sets for {allocator.num_layers} layers")
    row = req_to_token[int(req_pool_idx)]
    ids = [row[dropped_positions(k, record.own_lo, record.seq_len).to(row.device)].long() for k in record.keep]
    record.freed = allocator.prune("all", ids)


_DUMP_TAGS: dict = {}  # fields added to every dump row of this process (its tp / dp rank)


def tag_dumps(**tags) -> None:
    """Add ``tags`` to every dump row this process writes (the backend tags its ranks)."""
    _DUMP_TAGS.update(tags)


def write_dump_rows(rows: Sequence[dict], path: Optional[str] = None) -> None:
    """Append ``rows`` as JSON lines to ``path`` (default: ``$SGLANG_DEPTHKV_DUMP_KEEP``; nothing when
    unset), in one ``O_APPEND`` write so the rows of several rank processes sharing the file never
    interleave."""
    path = path if path is not None else os.environ.get(DUMP_ENV)
    if not path or not rows:
        return
    data = "".join(json.dumps({**r, **_DUMP_TAGS}) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def dump_keep(record: PruneRecord, path: Optional[str] = None) -> None:
    if not (path if path is not None else os.environ.get(DUMP_ENV)):
        return
    rows = []
    for layer in range(len(record.freed)):
        kept = (list(range(record.own_lo, record.seq_len)) if record.keep is None
                else [int(p) for p in record.keep[layer].tolist()])
        rows.append({"rid": record.rid, "own_lo": record.own_lo, "seq_len": record.seq_len, "layer": layer,
                     "pruned": record.keep is not None, "kept": kept, "freed": record.freed[layer]})
    write_dump_rows(rows, path)


def own_token_scores(per_layer: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([s.float() for s in per_layer])
