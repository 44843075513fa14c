"""``DepthKVRadixCache``: SGLang's ``RadixCache`` over logical ids, carrying pruned prefixes.

The tree stays logical (node values are logical ids, as for SGLang's SWA pools). Per-layer state
lives in the allocator's mapping, so:

- ``match_prefix`` hands a later request the logical ids of a cached prefix; reading them through
  the mapping gives exactly the per-layer (pruned) KV the inserting request left behind.
- eviction frees a node's logical ids through ``DepthKVAllocator.free``, which frees exactly the
  layer slots they still hold; lock protection is SGLang's (``lock_ref``), unchanged.
- ``evict_for_layers(n)`` keeps evicting until every layer has ``n`` free slots (evicting a token
  frees nothing at layers where it was already pruned).

Pruning rule (enforced by ``prune_owned``): a request prunes only the tokens it owns, positions
``[req.cache_protected_len, seq_len)`` (not in the tree, so no other request can hold them); once a
segment is inserted into the tree it is never pruned again (another request may hold it). A token a
layer no longer holds cannot be pruned twice (``DepthKVAllocator.prune`` refuses).

Chunked prefill: intermediate chunks are inserted into the tree exactly as in vanilla SGLang
(``cache_unfinished_req(chunked=True)``), so they become tree-owned (``cache_protected_len`` moves
past them) and, by the rule above, are never pruned; a chunked request prunes only its last chunk
(plus its decode tokens). A ChunkCache-like variant that kept the chunks request-owned (to prune the
whole prompt once) was tried and dropped: under per-layer pressure, a retracted request's chunked
re-prefill then produced wrong final-token logits (tests/sglang/test_engine_e2e.py pressure run,
cause not found in the time available), while vanilla insertion matches transformers exactly.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixCache

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

    # --- pruning (the only entry for issue 7) --------------------------------------------------------
    def prune_owned(self, req, layers, positions_per_layer: Sequence[torch.Tensor]) -> List[int]:
        """Prune request-relative positions at layers; positions must be request-owned."""
        lo = int(req.cache_protected_len)
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
        """Evict until every layer has ``num_tokens`` free slots, or nothing evictable is left."""
        alloc = self.token_to_kv_pool_allocator
        while True:
            short = num_tokens - alloc.min_layer_available_size()
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
