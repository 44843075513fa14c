"""``DepthKVRadixCache``: SGLang's ``RadixCache`` over logical ids, carrying pruned prefixes.

The tree stays logical (node values are logical ids, as for SGLang's SWA pools). Per-layer state
lives in the allocator's mapping, so:

- ``match_prefix`` hands a later request the logical ids of a cached prefix; reading them through
  the mapping gives exactly the per-layer (pruned) KV the inserting request left behind.
- eviction frees a node's logical ids through ``DepthKVAllocator.free``, which frees exactly the
  layer slots they still hold; lock protection is SGLang's (``lock_ref``), unchanged.
- ``evict_for_layers(n)`` keeps evicting until every layer has ``n`` free slots (evicting a token
  frees nothing at layers where it was already pruned). ``evict`` frees its leaves in one
  allocator free group (one batched free).
- per-layer evictable slots are kept incrementally, as SGLang keeps ``evictable_size_``: every node
  carries its per-layer held counts (``depthkv_held``, a device ``[L]`` tensor); the tree total
  ``_layer_ev`` changes when a node appears unlocked (insert), locks, unlocks, splits or is
  evicted. A locked node's held counts may change (its request prunes its own chunks), so they are
  recounted when it unlocks; an unlocked node is never pruned. ``layer_evictable()`` reads the
  total (one host read, whatever the tree's size); ``layer_tree_sizes()`` walks the tree (checks).

Pruning rule: a token segment is pruned once, by the request that inserted it, and never while
another request holds it. A request prunes positions ``[own_lo, seq_len)``: its own tokens, not yet
in the tree, plus the earlier chunks of its own chunked prefill, which SGLang inserted into the tree
(``cache_unfinished_req(chunked=True)``) but which only this request holds until its prefill ends
(``chunk_ownership``: tokens another request inserted, or a node another request matched meanwhile,
are excluded). Pruning frees only positions of that segment (``observations.entries_for_batch`` sets
``own_lo``, ``pruning.apply_prune`` frees the dropped ones); a token a layer no longer holds cannot be
pruned twice (``DepthKVAllocator.prune`` refuses). Once the request's prefill ends, its prompt is a
pruned tree segment and is never pruned again.

Chunked prefill: intermediate chunks are inserted into the tree exactly as in vanilla SGLang, so
scheduling, locking and retraction are vanilla's; at the final chunk the request prunes its whole
own prompt, the same decision as an unchunked prefill of that prompt (the earlier chunks' window
queries and, for KVzip gates, their attention inputs are stashed on the request between chunks,
``observations.ChunkStash``). ``cache_unfinished_req`` additionally records, for
``chunk_ownership``, which positions of a chunk the tree already held.
"""

from __future__ import annotations

from typing import List, Tuple

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

    # --- incremental per-layer evictable counts ------------------------------------------------------
    def reset(self):
        super().reset()
        alloc = self.token_to_kv_pool_allocator
        self._layer_ev = torch.zeros(alloc.num_layers, dtype=torch.int64, device=alloc.device)

    def _insert_helper(self, node, key, value, priority=0, chunked=False):
        prefix_len, last = super()._insert_helper(node, key, value, priority, chunked)
        if last is not self.root_node and getattr(last, "depthkv_held", None) is None:  # a new, unlocked leaf
            last.depthkv_held = self.token_to_kv_pool_allocator.layer_held(last.value)
            self._layer_ev += last.depthkv_held
        return prefix_len, last

    def _split_node(self, key, child, split_len):
        held = getattr(child, "depthkv_held", None)
        new_node = super()._split_node(key, child, split_len)
        if held is not None:
            new_node.depthkv_held = self.token_to_kv_pool_allocator.layer_held(new_node.value)
            child.depthkv_held = held - new_node.depthkv_held
        return new_node

    def inc_lock_ref(self, node):
        locking = self._path(node, lambda n: n.lock_ref == 0)
        out = super().inc_lock_ref(node)
        if locking and not self.disable:
            self._layer_ev -= torch.stack([n.depthkv_held for n in locking]).sum(dim=0)
        return out

    def dec_lock_ref(self, node, params=None):
        unlocking = self._path(node, lambda n: n.lock_ref == 1)
        out = super().dec_lock_ref(node, params)
        if unlocking and not self.disable:
            for n in unlocking:  # pruned while locked (its request's own chunks): recount
                n.depthkv_held = self.token_to_kv_pool_allocator.layer_held(n.value)
            self._layer_ev += torch.stack([n.depthkv_held for n in unlocking]).sum(dim=0)
        return out

    def _path(self, node, pick):
        out = []
        while node is not None and node is not self.root_node:
            if pick(node):
                out.append(node)
            node = node.parent
        return out

    def _delete_leaf(self, node):
        super()._delete_leaf(node)
        self._layer_ev -= node.depthkv_held

    def evict(self, params):
        alloc = self.token_to_kv_pool_allocator
        group = alloc.is_not_in_free_group
        if group:
            alloc.free_group_begin()
        try:
            return super().evict(params)
        finally:
            if group:
                alloc.free_group_end()

    def layer_evictable(self) -> List[int]:
        """Per layer, slots held by evictable tree nodes (incremental; one host read)."""
        return [int(x) for x in self._layer_ev.tolist()]

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
    ``(available + evictable) - min_l(layer_available_l + layer_evictable_l)``. No tree walk (the
    per-layer evictable counts are incremental); one host read when some layer has less free room
    than the logical space, none otherwise."""
    ev = tree_cache.evictable_size() if tree_cache is not None else 0
    logical = alloc.available_size() + ev
    if alloc.min_layer_available_size() >= logical:
        return 0
    layer_ev = tree_cache.layer_evictable() if hasattr(tree_cache, "layer_evictable") else [0] * alloc.num_layers
    worst = min(a + e for a, e in zip(alloc.layer_available_sizes(), layer_ev))
    return max(0, logical - worst)
