"""``DepthKVAllocator``: SGLang's logical token allocator plus one slot allocator per layer, with no
device read on the hot path.

- ``alloc(n)`` hands out ``n`` logical ids (SGLang's currency: ``out_cache_loc``, ``req_to_token``,
  radix values) and one slot per id at **every** layer, recorded in ``pool.mapping``. All or nothing:
  if the logical space or any layer is short, nothing is taken and ``None`` is returned (SGLang then
  evicts / retracts as usual).
- ``prune(layers, ids_per_layer)`` frees the named logical ids' slots at the named layers and zeroes
  their mapping; the logical ids stay allocated (the request still owns its positions). Pruning a
  token a layer no longer holds is an error (a token segment is pruned once), checked when content
  checks are on (``sglang/checks.py``).
- ``free(ids)`` frees the logical ids and exactly the layer slots they still hold.
- ``available_size()`` stays logical (SGLang's idle invariant); per layer:
  ``layer_available_size(l)`` / ``layer_available_sizes()``.

Layout. Every layer's free slots are a stack in one preallocated int32 buffer (layer ``l`` owns
``[off_l, off_l + C_l)``, one extra trash entry at the end); ``_top`` (device, ``[L]``) counts the
free slots per layer. ``alloc`` pops ``n`` from every layer, ``free`` / ``prune`` push, each as a
fixed number of batched tensor ops over all layers, whatever the number of layers or tokens.

Host counts. Scheduling reads the per-layer free counts on the host. ``alloc`` and ``prune`` change
them by host-known amounts (``n``, the number of pruned ids). ``free`` does not know how many of the
ids a layer still held without reading the mapping back, so it leaves the host count as a lower
bound and queues a non-blocking copy of ``_top`` into pinned memory (with an event); a later read
takes it once the event has completed (plus the exact changes made since). A caller that needs more
than the lower bound (``alloc`` short by it) waits for the copy: one host sync, only under memory
pressure with a free still in flight. On CPU the copy is complete at once, so every count is exact.

Under tensor parallelism (``exact_counts=True``) every read waits for the snapshot: each rank's
scheduler decides admission and retraction from these counts on its own, and a lower bound that
depends on when a copy completed could differ between ranks and split their batches. Exact counts
cost one host sync per read after a free, on the GPU only.

Page size 1 only (the plugin refuses ``--page-size`` > 1 at start-up).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from sglang_depthkv.sglang import checks
from sglang_depthkv.sglang.pool import DepthKVPool


class DepthKVAllocator(TokenToKVPoolAllocator):
    def __init__(self, size: int, dtype: torch.dtype, device: str, kvcache: DepthKVPool, need_sort: bool = False,
                 exact_counts: bool = False):
        if not isinstance(kvcache, DepthKVPool):
            raise TypeError(f"DepthKVAllocator needs a DepthKVPool, got {type(kvcache).__name__}")
        if kvcache.size != size:
            raise ValueError(f"DepthKVAllocator: size {size} != pool size {kvcache.size}")
        self.layer_capacities: List[int] = list(kvcache.layer_capacities)
        self.num_layers = len(self.layer_capacities)
        self.mapping = kvcache.mapping
        self._offsets = [0]
        for c in self.layer_capacities:
            self._offsets.append(self._offsets[-1] + c)
        total = self._offsets[-1]
        self._trash = total
        self._stack = torch.zeros(total + 1, dtype=torch.int32, device=device)
        self._off = torch.tensor(self._offsets[:-1], dtype=torch.int64).to(device)
        self._top = torch.zeros(self.num_layers, dtype=torch.int64, device=device)
        self._on_cuda = torch.device(device).type == "cuda"
        self.exact_counts = bool(exact_counts)  # every host count read waits for the snapshot (module docstring)
        self._snap = torch.zeros(self.num_layers, dtype=torch.int64, pin_memory=self._on_cuda)
        super().__init__(size, dtype, device, kvcache, need_sort)  # calls clear()

    def resize(self, config) -> None:
        raise RuntimeError("DepthKVAllocator: resizing the per-layer pool is refused (post-capture KV resize "
                           "is rejected at start-up under --kv-policy)")

    # --- state ---------------------------------------------------------------------------------
    def clear(self):
        super().clear()
        for l, c in enumerate(self.layer_capacities):  # stack bottom .. top = C_l .. 1: pops give 1, 2, ...
            o = self._offsets[l]
            self._stack[o:o + c] = torch.arange(c, 0, -1, dtype=torch.int32, device=self.device)
        self._top.copy_(torch.tensor(self.layer_capacities, dtype=torch.int64))
        self._free = list(self.layer_capacities)  # host counts: exact, or a lower bound (module docstring)
        self._pending = None  # event (CUDA) / True (CPU) of the snapshot copy in flight
        self._since_snap = [0] * self.num_layers  # exact changes made after the snapshot was queued
        self._dirty = False  # a free not yet covered by a snapshot
        self.mapping.zero_()

    def _note(self, deltas: Sequence[int]) -> None:
        for l, d in enumerate(deltas):
            self._free[l] += d
            if self._pending is not None:
                self._since_snap[l] += d

    def _queue_snapshot(self) -> None:
        self._snap.copy_(self._top, non_blocking=True)
        self._since_snap = [0] * self.num_layers
        self._dirty = False
        if self._on_cuda:
            self._pending = torch.cuda.Event()
            self._pending.record()
        else:
            self._pending = True

    def _poll(self, wait: bool = False) -> None:
        """Take the snapshot if its copy has completed (``wait``: wait for it, queueing one if a free
        is not covered yet; always under ``exact_counts``); a free made after it was queued queues the
        next one."""
        wait = wait or self.exact_counts
        if wait and self._dirty and self._pending is None:
            self._queue_snapshot()
        while self._pending is not None:
            if self._on_cuda:
                if wait:
                    self._pending.synchronize()
                elif not self._pending.query():
                    return
            snap = self._snap.tolist()
            self._free = [s + d for s, d in zip(snap, self._since_snap)]
            self._pending = None
            if self._dirty:
                self._queue_snapshot()

    def layer_available_size(self, layer: int) -> int:
        self._poll()
        return self._free[layer]

    def layer_available_sizes(self, exact: bool = False) -> List[int]:
        """Free slots per layer; a lower bound while a free's count is in flight on a GPU, exact
        with ``exact=True`` (may wait for the device)."""
        self._poll(wait=exact)
        return list(self._free)

    def min_layer_available_size(self) -> int:
        self._poll()
        return min(self._free)

    def layer_free_slots(self, layer: int) -> torch.Tensor:
        """The free slots of a layer (reads the device count back: checks and tests only)."""
        o = self._offsets[layer]
        return self._stack[o:o + int(self._top[layer])]

    def layer_held(self, logical_ids: torch.Tensor) -> torch.Tensor:
        """Per layer, how many of ``logical_ids`` hold a slot there: int64 ``[L]`` on the device (no
        host read)."""
        if logical_ids.numel() == 0:
            return torch.zeros(self.num_layers, dtype=torch.int64, device=self.mapping.device)
        return (self.mapping[:, logical_ids.long()] > 0).sum(dim=1)

    def held_counts(self, logical_ids: torch.Tensor) -> List[int]:
        """``layer_held`` on the host (one host sync)."""
        return [int(v) for v in self.layer_held(logical_ids).tolist()]

    def translate(self, layer: int, logical_ids: torch.Tensor) -> torch.Tensor:
        return self.mapping[layer][logical_ids.long()].long()

    # --- allocation -----------------------------------------------------------------------------
    def alloc(self, need_size: int):
        if need_size == 0:
            return torch.empty((0,), dtype=torch.int64, device=self.device)
        if need_size > len(self.free_pages):
            return None
        if min(self._free) < need_size:
            self._poll()
            if min(self._free) < need_size and (self._dirty or self._pending is not None):
                self._poll(wait=True)
            if min(self._free) < need_size:
                return None
        ids = super().alloc(need_size)
        if ids is None:
            return None
        j = torch.arange(need_size, dtype=torch.int64, device=self.device)
        src = self._off[:, None] + (self._top[:, None] - 1 - j[None, :])  # [L, n]: the top n of each stack
        self.mapping[:, ids] = self._stack[src]
        self._top -= need_size
        self._note([-need_size] * self.num_layers)
        return ids

    def free(self, free_index: torch.Tensor):
        if free_index.numel() == 0:
            return
        if not self.is_not_in_free_group:
            self.free_group.append(free_index)
            return
        idx = free_index.long()
        slots = self.mapping[:, idx]  # [L, n], 0 where the layer no longer holds the id
        held = slots > 0
        pos = self._off[:, None] + self._top[:, None] + torch.cumsum(held, dim=1) - 1
        dest = torch.where(held, pos, self._trash)  # not-held entries all land on the trash entry
        self._stack[dest.reshape(-1)] = slots.reshape(-1)
        self._top += held.sum(dim=1)
        self.mapping[:, idx] = 0
        super().free(free_index)
        self._dirty = True
        if self._pending is None:
            self._queue_snapshot()

    def prune(self, layers: Union[str, Sequence[int]], logical_ids_per_layer: Sequence[torch.Tensor]) -> List[int]:
        """Free the slots of ``logical_ids_per_layer[i]`` at layer ``layers[i]`` (``"all"``: every
        layer in order). Returns the number of slots freed per entry (host-known: the ids' counts)."""
        layer_list = list(range(self.num_layers)) if layers == "all" else [int(l) for l in layers]
        if len(layer_list) != len(logical_ids_per_layer):
            raise ValueError(f"prune: {len(layer_list)} layers but {len(logical_ids_per_layer)} id lists")
        if len(set(layer_list)) != len(layer_list):
            dup = next(l for l in layer_list if layer_list.count(l) > 1)
            raise ValueError(f"prune: layer {dup} named twice")
        for l in layer_list:
            if not (0 <= l < self.num_layers):
                raise ValueError(f"prune: layer {l} outside [0, {self.num_layers})")
        id_lists = [ids.reshape(-1).long().to(self.device) for ids in logical_ids_per_layer]
        counts = [int(ids.numel()) for ids in id_lists]
        if checks.enabled():
            for l, ids in zip(layer_list, id_lists):
                self._check_prune(l, ids)
        total = sum(counts)
        if total:
            self._push_pruned(layer_list, id_lists, counts, total)
        deltas = [0] * self.num_layers
        for l, c in zip(layer_list, counts):
            deltas[l] = c
        self._note(deltas)
        return counts

    def _push_pruned(self, layer_list, id_lists, counts, total) -> None:
        """One batched push of every named layer's pruned slots (no host read; one small
        host-to-device copy of the per-layer counts)."""
        ids = torch.cat(id_lists)
        starts = [0]
        for c in counts[:-1]:
            starts.append(starts[-1] + c)
        meta = torch.tensor([layer_list, counts, starts], dtype=torch.int64).to(self.device)
        layer_t, count_t, start_t = meta[0], meta[1], meta[2]
        layer_of = torch.repeat_interleave(layer_t, count_t, output_size=total)
        rank = torch.arange(total, dtype=torch.int64, device=self.device) - torch.repeat_interleave(
            start_t, count_t, output_size=total)
        slots = self.mapping[layer_of, ids]
        self._stack[self._off[layer_of] + self._top[layer_of] + rank] = slots
        self.mapping[layer_of, ids] = 0
        self._top.index_add_(0, layer_t, count_t)

    def _check_prune(self, l: int, ids: torch.Tensor) -> None:
        """Content checks (device reads): ids in range, unique, held at layer ``l``."""
        if not ids.numel():
            return
        if int(ids.min()) < 1 or int(ids.max()) > self.size:
            raise ValueError(f"prune: layer {l}: logical ids outside [1, {self.size}]")
        if ids.numel() != torch.unique(ids).numel():
            raise ValueError(f"prune: layer {l}: duplicate logical ids")
        slots = self.mapping[l][ids]
        if bool((slots == 0).any()):
            bad = ids[slots == 0][:5].tolist()
            raise ValueError(f"prune: layer {l} does not hold logical ids {bad} (already pruned or free)")
