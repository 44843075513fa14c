"""Plain-torch reference for ``build_kv_indices``: per (row, request) a list of held slots."""

from __future__ import annotations

from typing import List, Tuple

import torch


def build_kv_indices_ref(mapping, req_to_token, req_pool_indices, seq_lens) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Returns ``(kv_indptr [G, bs+1] int64, [kv_indices of row g] )`` on the CPU."""
    mapping, r2t = mapping.cpu().long(), req_to_token.cpu().long()
    G = mapping.shape[0]
    indptr = torch.zeros((G, len(seq_lens) + 1), dtype=torch.int64)
    streams = []
    for g in range(G):
        parts = []
        for b, (row, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
            slots = [int(mapping[g, int(r2t[row, p])]) for p in range(n)]
            slots = [s for s in slots if s != 0]
            parts.extend(slots)
            indptr[g, b + 1] = indptr[g, b] + len(slots)
        streams.append(torch.tensor(parts, dtype=torch.int64))
    return indptr, streams
