"""``DepthKVAllocator``: SGLang's logical token allocator plus one slot allocator per layer.

- ``alloc(n)`` hands out ``n`` logical ids (SGLang's currency: ``out_cache_loc``, ``req_to_token``,
  radix values) and one slot per id at **every** layer, recorded in ``pool.mapping``. All or nothing:
  if the logical space or any layer is short, nothing is taken and ``None`` is returned (SGLang then
  evicts / retracts as usual).
- ``prune(layers, ids_per_layer)`` frees the named logical ids' slots at the named layers and zeroes
  their mapping; the logical ids stay allocated (the request still owns its positions).
  Pruning a token a layer no longer holds is an error (a token segment is pruned once).
- ``free(ids)`` frees the logical ids and exactly the layer slots they still hold.
- ``available_size()`` stays logical (SGLang's idle invariant); per layer:
  ``layer_available_size(l)`` / ``layer_available_sizes()``.

Page size 1 only (the plugin refuses ``--page-size`` > 1 at start-up).
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from sglang_depthkv.sglang.pool import DepthKVPool


class DepthKVAllocator(TokenToKVPoolAllocator):
    def __init__(self, size: int, dtype: torch.dtype, device: str, kvcache: DepthKVPool, need_sort: bool = False):
        if not isinstance(kvcache, DepthKVPool):
            raise TypeError(f"DepthKVAllocator needs a DepthKVPool, got {type(kvcache).__name__}")
        if kvcache.size != size:
            raise ValueError(f"DepthKVAllocator: size {size} != pool size {kvcache.size}")
        self.layer_capacities: List[int] = list(kvcache.layer_capacities)
        self.num_layers = len(self.layer_capacities)
        self.mapping = kvcache.mapping
        super().__init__(size, dtype, device, kvcache, need_sort)  # calls clear()

    def resize(self, config) -> None:
        raise RuntimeError("DepthKVAllocator: resizing the per-layer pool is refused (post-capture KV resize "
                           "is rejected at start-up under --kv-policy)")

    # --- state ---------------------------------------------------------------------------------
    def clear(self):
        super().clear()
        self.layer_free = [torch.arange(1, c + 1, dtype=torch.int64, device=self.device) for c in self.layer_capacities]
        self.mapping.zero_()

    def layer_available_size(self, layer: int) -> int:
        return int(self.layer_free[layer].numel())

    def layer_available_sizes(self) -> List[int]:
        return [int(f.numel()) for f in self.layer_free]

    def min_layer_available_size(self) -> int:
        return min(self.layer_available_sizes())

    def held_counts(self, logical_ids: torch.Tensor) -> List[int]:
        """Per layer, how many of ``logical_ids`` hold a slot there."""
        if logical_ids.numel() == 0:
            return [0] * self.num_layers
        return [int(v) for v in (self.mapping[:, logical_ids.long()] > 0).sum(dim=1).tolist()]

    def translate(self, layer: int, logical_ids: torch.Tensor) -> torch.Tensor:
        return self.mapping[layer][logical_ids.long()].long()

    # --- allocation -----------------------------------------------------------------------------
    def alloc(self, need_size: int):
        if need_size == 0:
            return torch.empty((0,), dtype=torch.int64, device=self.device)
        if any(f.numel() < need_size for f in self.layer_free):
            return None
        ids = super().alloc(need_size)
        if ids is None:
            return None
        for l in range(self.num_layers):
            slots = self.layer_free[l][:need_size]
            self.layer_free[l] = self.layer_free[l][need_size:]
            self.mapping[l, ids] = slots.to(torch.int32)
        return ids

    def free(self, free_index: torch.Tensor):
        if free_index.numel() == 0:
            return
        if not self.is_not_in_free_group:
            self.free_group.append(free_index)
            return
        idx = free_index.long()
        slots = self.mapping[:, idx].long()  # [L, n]
        for l in range(self.num_layers):
            held = slots[l][slots[l] > 0]
            if held.numel():
                self.layer_free[l] = torch.cat((self.layer_free[l], held))
        self.mapping[:, idx] = 0
        super().free(free_index)

    def prune(self, layers: Union[str, Sequence[int]], logical_ids_per_layer: Sequence[torch.Tensor]) -> List[int]:
        """Free the slots of ``logical_ids_per_layer[i]`` at layer ``layers[i]`` (``"all"``: every
        layer in order). Returns the number of slots freed per entry."""
        layer_list = list(range(self.num_layers)) if layers == "all" else [int(l) for l in layers]
        if len(layer_list) != len(logical_ids_per_layer):
            raise ValueError(f"prune: {len(layer_list)} layers but {len(logical_ids_per_layer)} id lists")
        # Validate everything before changing anything.
        plan = []
        for l, ids in zip(layer_list, logical_ids_per_layer):
            if not (0 <= l < self.num_layers):
                raise ValueError(f"prune: layer {l} outside [0, {self.num_layers})")
            ids = ids.long().to(self.device)
            if ids.numel() and (int(ids.min()) < 1 or int(ids.max()) > self.size):
                raise ValueError(f"prune: layer {l}: logical ids outside [1, {self.size}]")
            if ids.numel() != torch.unique(ids).numel():
                raise ValueError(f"prune: layer {l}: duplicate logical ids")
            slots = self.mapping[l][ids].long()
            if bool((slots == 0).any()):
                bad = ids[slots == 0][:5].tolist()
                raise ValueError(f"prune: layer {l} does not hold logical ids {bad} (already pruned or free)")
            plan.append((l, ids, slots))
        seen = set()
        for l, _, _ in plan:
            if l in seen:
                raise ValueError(f"prune: layer {l} named twice")
            seen.add(l)
        freed = []
        for l, ids, slots in plan:
            self.layer_free[l] = torch.cat((self.layer_free[l], slots))
            self.mapping[l, ids] = 0
            freed.append(int(slots.numel()))
        return freed
