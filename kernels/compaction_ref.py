"""Plain-torch references for ``prune_kv`` / ``compact_kv`` (sequential, one token at a time).

They work on copies and return new tensors, so a test can run them on the inputs before the kernel
mutates them. Freed slots are returned per layer as sorted lists (the kernel's order is unspecified).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def _segments(keep_indptr, keep_positions, l, b):
    a, e = int(keep_indptr[l, b]), int(keep_indptr[l, b + 1])
    return [int(x) for x in keep_positions[a:e].tolist()], a


def prune_ref(mapping, req_to_token, req_pool_indices, seq_lens, keep_indptr, keep_positions
              ) -> Tuple[torch.Tensor, List[List[int]]]:
    """Returns ``(new_mapping, freed_per_layer_sorted)``."""
    mapping = mapping.clone().cpu()
    r2t = req_to_token.cpu()
    L = mapping.shape[0]
    freed: List[List[int]] = [[] for _ in range(L)]
    for l in range(L):
        for b, (row, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
            kept, _ = _segments(keep_indptr, keep_positions, l, b)
            kept_set = set(kept)
            for p in range(n):
                i = int(r2t[row, p])
                slot = int(mapping[l, i])
                if p not in kept_set and slot != 0:
                    freed[l].append(slot)
                    mapping[l, i] = 0
    return mapping, [sorted(f) for f in freed]


def compact_ref(src_k: Sequence[torch.Tensor], src_v: Sequence[torch.Tensor], dst_k: Sequence[torch.Tensor],
                dst_v: Sequence[torch.Tensor], mapping, req_to_token, req_pool_indices, seq_lens, keep_indptr,
                keep_positions, dst_slots, source: str, inplace: bool = False):
    """Returns ``(new_dst_k, new_dst_v, new_mapping, freed_per_layer_sorted)`` (lists per layer).

    All reads of source rows happen before any write (a snapshot), which is the meaning the kernel
    must reproduce whenever its in-place ordering rule holds. With ``inplace=True`` the destination
    starts from the (snapshotted) source tensors, as when ``dst`` is ``src``.
    """
    src_k = [t.clone().cpu() for t in src_k]
    src_v = [t.clone().cpu() for t in src_v]
    out_k = [t.clone() for t in src_k] if inplace else [t.clone().cpu() for t in dst_k]
    out_v = [t.clone() for t in src_v] if inplace else [t.clone().cpu() for t in dst_v]
    old_map = mapping.clone().cpu()
    new_map = old_map.clone()
    r2t = req_to_token.cpu()
    L = old_map.shape[0]
    freed: List[List[int]] = [[] for _ in range(L)]
    for l in range(L):
        for b, (row, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
            kept, a = _segments(keep_indptr, keep_positions, l, b)
            dsts = [int(x) for x in dst_slots[a:a + len(kept)].tolist()]
            dst_of = dict(zip(kept, dsts))
            held = []
            for p in range(n):
                i = int(r2t[row, p])
                old = int(old_map[l, i])
                if old != 0:
                    held.append(old)
                if p in dst_of:
                    s = old if source == "mapping" else i
                    d = dst_of[p]
                    out_k[l][d] = src_k[l][s]
                    out_v[l][d] = src_v[l][s]
                    new_map[l, i] = d
                else:
                    new_map[l, i] = 0
            dset = set(dsts)
            freed[l].extend(s for s in held if s not in dset)
    return out_k, out_v, new_map, [sorted(f) for f in freed]
