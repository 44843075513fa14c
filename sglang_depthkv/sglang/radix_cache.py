"""``DepthKVRadixCache``: SGLang's ``RadixCache`` over logical ids, carrying pruned prefixes.

The tree stays logical (node values are logical ids, as for SGLang's SWA pools). Per-layer state
lives in the allocator's mapping, so:

- ``match_prefix`` hands a later request the logical ids of a cached prefix; reading them through
  the mapping gives exactly the per-layer (pruned) KV the inserting request left behind.
- eviction frees a node's logical ids through ``DepthKVAllocator.free``, which frees exactly the
  layer slots they still hold; lock protection is SGLang's (``lock_ref``), unchanged.
- ``evict_for_layers(n)`` keeps evicting until every layer has ``n`` free slots (evicting a token
  frees nothing at layers where it was already pruned).

Pruning rule: a token segment is pruned once, by the request that inserted it, and never while
another request holds it. A request prunes positions ``[own_lo, seq_len)``: its own tokens, not yet
in the tree, plus the earlier chunks of its own chunked prefill, which SGLang inserted into the tree
(``cache_unfinished_req(chunked=True)``) but which only this request holds until its prefill ends
(``chunk_ownership``: tokens another request inserted, or a node another request matched meanwhile,
are excluded). ``prune_owned`` enforces the bound; a token a layer no longer holds cannot be pruned
twice (``DepthKVAllocator.prune`` refuses). Once the request's prefill ends, its prompt is a pruned
tree segment and is never pruned again.

Chunked prefill: intermediate chunks are inserted into the tree exactly as in vanilla SGLang, so
scheduling, locking and retraction are vanilla's; at the final chunk the request prunes its whole
own prompt, the same decision as an unchunked prefill of that prompt (the earlier chunks' window
queries and, for KVzip gates, their attention inputs are stashed on the request between chunks,
``observations.ChunkStash``). ``cache_unfinished_req`` additionally records, for
``chunk_ownership``, which positions of a chunk the tree already held.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixCache

from sglang_depthkv.sglang import chunk_ownership
from sglang_depthkv.sglang.allocator import DepthKVAllocator


class DepthKVRadixCache(RadixCache):
    def __init__(self, params):
        super().__init__(params)
        if not isinstance(self.token_to_kv_pool_allocator, DepthKVAllocator):
            raise TypeError(
                f"DepthKVRadixCache needs a DepthKVAllocator, got {type(self.token_to_kv_pool_allocator).__name__}"
            )
        if self.page_size != 1:
            raise ValueError(f"DepthKVRadixCache: page_size {self.page_size} not supported (1 only)")

    # --- chunked prefill ownership ----------------------------------------------------------------------
    def cache_unfinished_req(self, req, chunked=False):
        if self.disable or getattr(req, chunk_ownership.OWN_LO_ATTR, None) is None:
            return super().cache_unfinished_req(req, chunked=chunked)
        lo = int(req.cache_protected_len)
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        before = row[lo:len(req.get_fill_ids())].clone()
        super().cache_unfinished_req(req, chunked=chunked)
        chunk_ownership.note_chunk_insert(req, before, lo, row[lo:int(req.cache_protected_len)])

    # --- pruning ---------------------------------------------------------------------------------------
    def prune_owned(self, req, layers, positions_per_layer: Sequence[torch.Tensor]) -> List[int]:
        """Prune request-relative positions at layers; positions must be request-owned
        (``>= own_lo`` of ``chunk_ownership`` while the request is in a chunked prefill, else
        ``>= cache_protected_len``)."""
        own = getattr(req, chunk_ownership.OWN_LO_ATTR, None)
        lo = int(req.cache_protected_len if own is None else own)
        hi = int(req.kv_committed_len) if getattr(req, "kv_committed_len", None) is not None else None
        ids = []
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        for pos in positions_per_layer:
            pos = pos.long()
            if pos.numel():
                if int(pos.min()) < lo:
                    raise ValueError(
                        f"prune_owned: position {int(pos.min())} is below cache_protected_len {lo}: "
                        "tree-owned tokens are never re-pruned"
                    )
                if hi is not None and int(pos.max()) >= hi:
                    raise ValueError(f"prune_owned: position {int(pos.max())} beyond the request's {hi} tokens")
            ids.append(row[pos].long())
        return self.token_to_kv_pool_allocator.prune(layers, ids)

    # --- per-layer accounting -----------------------------------------------------------------------
    def layer_tree_sizes(self) -> Tuple[List[int], List[int]]:
        """Per layer: (evictable, protected) slots held by tree nodes (one gather per kind)."""
        alloc = self.token_to_kv_pool_allocator
        free_vals, locked_vals = [], []
        stack = [self.root_node]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is self.root_node or node.value is None or len(node.value) == 0:
                continue
            (locked_vals if node.lock_ref > 0 else free_vals).append(node.value)
        ev = alloc.held_counts(torch.cat(free_vals)) if free_vals else [0] * alloc.num_layers
        pr = alloc.held_counts(torch.cat(locked_vals)) if locked_vals else [0] * alloc.num_layers
        return ev, pr

    def evict_for_layers(self, num_tokens: int) -> None:
        """Evict until every layer has ``num_tokens`` free slots, or nothing evictable is left. Reads
        the exact per-layer counts (a host sync when a free is in flight on a GPU: the lower bound
        would make it evict more than needed); this runs only under memory pressure."""
        alloc = self.token_to_kv_pool_allocator
        while True:
            short = num_tokens - min(alloc.layer_available_sizes(exact=True))
            if short <= 0 or self.evictable_size() == 0:
                return
            before = self.evictable_size()
            self.evict(EvictParams(num_tokens=short))
            if self.evictable_size() >= before:
                return


def layer_deficit(alloc: DepthKVAllocator, tree_cache) -> int:
    """How many tokens fewer the worst layer can take than the logical space (0 if none):
    ``(available + evictable) - min_l(layer_available_l + layer_evictable_l)``. Cheap when every layer
    has at least the logical room free (no tree walk)."""
    ev = tree_cache.evictable_size() if tree_cache is not None else 0
    logical = alloc.available_size() + ev
    if alloc.min_layer_available_size() >= logical:
        return 0
    layer_ev = tree_cache.layer_tree_sizes()[0] if hasattr(tree_cache, "layer_tree_sizes") else [0] * alloc.num_layers
    worst = min(a + e for a, e in zip(alloc.layer_available_sizes(), layer_ev))
    return max(0, logical - worst)
