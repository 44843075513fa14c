"""``DepthKVPool``: one physical K/V buffer per layer, each with its own capacity, plus the mapping
logical token id -> layer slot.

- ``k_buffer[l]`` / ``v_buffer[l]``: ``[C_l + 1, head_num, head_dim]``; slot 0 is the dummy write
  target (padded tokens, and tokens the layer no longer holds), never handed out.
- ``mapping``: int32 ``[layer_num, size + page_size + 1]``; ``mapping[l, i]`` is the slot of logical
  id ``i`` at layer ``l``, 0 = not held at that layer (never allocated, pruned, or freed). The last
  column stays 0 so that a ``-1`` id (SGLang's "no previous token") maps to 0. This is SGLang's
  ``full_to_swa_index_mapping`` generalised from 2 groups to L layers. The allocator
  (``DepthKVAllocator``) is the only writer of the mapping.
- ``set_kv_buffer`` takes SGLang's logical ``out_cache_loc`` and writes through the mapping. Under
  CUDA-graph decode the graph must not translate: the backend fills ``write_slots [L, bs]`` (one
  gather of the mapping, in replay-prep, as SGLang's unified pool translates its write locations
  there) and, while capturing, sets ``read_write_slots`` so the captured writes read that buffer.
  ``get_key_buffer(layer)`` returns the *physical* buffer: a reader must translate logical ids with
  ``translate(layer, ids)`` first (``sglang/backends/torch_native.py`` does).

Not a subclass of SGLang's SWA pools (their isinstance checks would switch SWA paths on).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from sglang.srt.mem_cache.memory_pool import KVCache, unwrap_write_loc


class DepthKVPool(KVCache):
    def __init__(
        self,
        size: int,
        layer_capacities: Sequence[int],
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
        enable_memory_saver: bool = False,
        v_head_dim: Optional[int] = None,
        start_layer: Optional[int] = None,
        end_layer: Optional[int] = None,
    ):
        if size < 1:
            raise ValueError(f"DepthKVPool: size must be >= 1, got {size}")
        if len(layer_capacities) != layer_num:
            raise ValueError(f"DepthKVPool: {len(layer_capacities)} layer capacities for {layer_num} layers")
        for l, c in enumerate(layer_capacities):
            if not (1 <= int(c) <= size):
                raise ValueError(f"DepthKVPool: layer {l} capacity {c} not in [1, size={size}]")
        super().__init__(size, 1, dtype, layer_num, device, enable_memory_saver, start_layer, end_layer)
        self.head_num = head_num
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim if v_head_dim is not None else head_dim
        self.layer_capacities: List[int] = [int(c) for c in layer_capacities]
        with self.memory_saver_adapter.region("kv_cache"):
            self.k_buffer = [
                torch.zeros((c + 1, head_num, head_dim), dtype=self.store_dtype, device=device)
                for c in self.layer_capacities
            ]
            self.v_buffer = [
                torch.zeros((c + 1, head_num, self.v_head_dim), dtype=self.store_dtype, device=device)
                for c in self.layer_capacities
            ]
        self.mapping = torch.zeros((layer_num, size + self.page_size + 1), dtype=torch.int32, device=device)
        self.write_slots: Optional[torch.Tensor] = None  # [L, max graph tokens]: alloc_write_slots
        self.read_write_slots = False
        self._finalize_allocation_log(size)

    # --- layer bookkeeping -------------------------------------------------------------------
    def _local(self, layer_id: int) -> int:
        l = int(layer_id) - self.start_layer
        if not (0 <= l < self.layer_num):
            raise IndexError(f"DepthKVPool: layer {layer_id} outside [{self.start_layer}, {self.start_layer + self.layer_num})")
        return l

    def translate(self, layer_id: int, logical_ids: torch.Tensor) -> torch.Tensor:
        """Layer slots (int64) of logical ids at ``layer_id``; 0 where the layer does not hold it."""
        return self.mapping[self._local(layer_id)][logical_ids.long()].long()

    # --- CUDA-graph write slots ---------------------------------------------------------------
    def alloc_write_slots(self, max_tokens: int) -> None:
        self.write_slots = torch.zeros((self.layer_num, max(int(max_tokens), 1)), dtype=torch.int64,
                                       device=self.device)

    def fill_write_slots(self, loc: torch.Tensor, n: int) -> None:
        """Layer slots of the first ``n`` write locations at every layer (one gather, no host read)."""
        if self.write_slots is None:
            raise RuntimeError("DepthKVPool.fill_write_slots before alloc_write_slots")
        if n:
            self.write_slots[:, :n] = self.mapping[:, loc[:n].long()]

    # --- KVCache API -------------------------------------------------------------------------
    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffer[self._local(layer_id)]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffer[self._local(layer_id)]

    def get_kv_buffer(self, layer_id: int):
        l = self._local(layer_id)
        return self.k_buffer[l], self.v_buffer[l]

    def get_kv_size_bytes(self):
        k = sum(b.numel() * b.element_size() for b in self.k_buffer)
        v = sum(b.numel() * b.element_size() for b in self.v_buffer)
        return k, v

    def metadata_size_bytes(self) -> int:
        return self.mapping.numel() * self.mapping.element_size()

    def set_kv_buffer(
        self,
        layer,
        loc,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        layer_id_override: Optional[int] = None,
        **_unused,
    ) -> None:
        loc, _swa, _full = unwrap_write_loc(loc)
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        l = self._local(layer_id)
        if self.read_write_slots:
            slots = self.write_slots[l, :loc.shape[0]]
        else:
            slots = self.mapping[l][loc.long()].long()
        if cache_k.dtype != self.dtype:
            if k_scale is not None:
                cache_k = cache_k / k_scale
            if v_scale is not None:
                cache_v = cache_v / v_scale
            cache_k = cache_k.to(self.dtype)
            cache_v = cache_v.to(self.dtype)
        if self.store_dtype != self.dtype:
            cache_k = cache_k.view(self.store_dtype)
            cache_v = cache_v.view(self.store_dtype)
        self.k_buffer[l][slots] = cache_k.reshape(-1, self.head_num, self.head_dim)
        self.v_buffer[l][slots] = cache_v.reshape(-1, self.head_num, self.v_head_dim)

    def get_cpu_copy(self, indices, mamba_indices=None):
        """Per layer: (held mask, K rows, V rows) of the logical ``indices`` (retract with offload)."""
        out = []
        for l in range(self.layer_num):
            slots = self.mapping[l][indices.long()].long()
            out.append(((slots > 0).cpu(), self.k_buffer[l][slots].cpu(), self.v_buffer[l][slots].cpu()))
        return out

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None):
        """Write back a ``get_cpu_copy`` into the slots the logical ``indices`` hold now; a token the
        copy held at a layer must be held there again (else the copy would be silently dropped)."""
        for l, (held, k, v) in enumerate(kv_cache_cpu):
            slots = self.mapping[l][indices.long()].long()
            missing = held.to(slots.device) & (slots == 0)
            if bool(missing.any()):
                raise RuntimeError(f"DepthKVPool.load_cpu_copy: layer {l} lost {int(missing.sum())} held tokens")
            self.k_buffer[l][slots[held]] = k[held].to(self.device)
            self.v_buffer[l][slots[held]] = v[held].to(self.device)
