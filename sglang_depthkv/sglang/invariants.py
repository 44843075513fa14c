"""Per-layer invariants of ``DepthKVAllocator`` (+ tree): run where SGLang runs its own checks.

Structural (any time): at every layer, free slots are unique, in ``[1, C_l]``, never mapped; mapped
slots are unique; free + mapped == C_l (no slot leaks); use <= capacity. Accounting (idle, or with
the request-held counts given): ``free + tree_evictable + tree_protected + held_by_requests == C_l``.
Drained (after the whole tree was evicted at idle, before a flush): every slot of every layer free.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def structural_violations(alloc) -> List[str]:
    out = []
    counted_free = alloc.layer_available_sizes(exact=True)
    for l, cap in enumerate(alloc.layer_capacities):
        free = alloc.layer_free_slots(l)
        m = alloc.mapping[l]
        mapped = m[m > 0].long()
        if free.numel() and (int(free.min()) < 1 or int(free.max()) > cap):
            out.append(f"layer {l}: free slot outside [1, {cap}]")
        if torch.unique(free).numel() != free.numel():
            out.append(f"layer {l}: {free.numel() - torch.unique(free).numel()} duplicate free slots (double free)")
        if torch.unique(mapped).numel() != mapped.numel():
            out.append(f"layer {l}: a slot is mapped by two logical ids")
        both = torch.isin(mapped, free)
        if bool(both.any()):
            out.append(f"layer {l}: {int(both.sum())} slots both free and mapped")
        if free.numel() + mapped.numel() != cap:
            out.append(f"layer {l}: free {free.numel()} + mapped {mapped.numel()} != capacity {cap} (slot leak)")
        if counted_free[l] != free.numel():
            out.append(f"layer {l}: host free count {counted_free[l]} != {free.numel()} free slots on the device")
        if int(m[-1]) != 0 or int(m[0]) != 0:
            out.append(f"layer {l}: padding entries of the mapping are not 0")
    return out


def tree_layer_sizes(alloc, tree_cache=None) -> Tuple[List[int], List[int]]:
    """Per layer (evictable, protected) slots held by the tree (zeros without a per-layer tree)."""
    if tree_cache is not None and hasattr(tree_cache, "layer_tree_sizes"):
        return tree_cache.layer_tree_sizes()
    return [0] * alloc.num_layers, [0] * alloc.num_layers


def accounting_violations(alloc, tree_cache=None, request_held: Optional[Sequence[int]] = None,
                          tree_sizes=None) -> List[str]:
    """``tree_sizes``: ``tree_layer_sizes(alloc, tree_cache)`` when the caller has it already (one tree walk)."""
    L = alloc.num_layers
    ev, pr = tree_sizes if tree_sizes is not None else tree_layer_sizes(alloc, tree_cache)
    held = list(request_held) if request_held is not None else [0] * L
    out = []
    if tree_cache is not None and hasattr(tree_cache, "layer_evictable"):
        kept = tree_cache.layer_evictable()
        if kept != list(ev):
            out.append(f"[depthkv] incremental per-layer evictable counts {kept} != tree walk {list(ev)}")
    frees = alloc.layer_available_sizes(exact=True)
    for l, cap in enumerate(alloc.layer_capacities):
        free = frees[l]
        if free + ev[l] + pr[l] + held[l] != cap:
            out.append(
                f"[depthkv layer {l}] capacity={cap}, free={free}, evictable={ev[l]}, protected={pr[l]}, "
                f"held_by_requests={held[l]}"
            )
    return out


def check(alloc, tree_cache=None, request_held=None, tree_sizes=None) -> List[str]:
    return structural_violations(alloc) + accounting_violations(alloc, tree_cache, request_held, tree_sizes)


def drained_violations(alloc) -> List[str]:
    """After the whole tree was evicted with no request running: every slot of every layer is free
    and no logical id is mapped (a slot still held here was leaked by someone)."""
    out = structural_violations(alloc)
    frees = alloc.layer_available_sizes(exact=True)
    for l, cap in enumerate(alloc.layer_capacities):
        free = frees[l]
        if free != cap:
            out.append(f"layer {l}: {cap - free} of {cap} slots still held after evicting the whole tree (slot leak)")
    if alloc.available_size() != alloc.size:
        out.append(f"logical: {alloc.size - alloc.available_size()} of {alloc.size} ids still allocated after "
                   "evicting the whole tree")
    return out
