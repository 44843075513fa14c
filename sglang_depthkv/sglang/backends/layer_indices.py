"""Per-layer ``kv_indptr`` / ``kv_indices`` (SGLang's Triton-backend page tables) over a
``DepthKVPool``: layer ``l``'s stream lists, per request, the layer-``l`` slots of the positions
``[0, lens[b])`` the layer still holds, in position order (pruned tokens skipped). Built for all
layers in one ``kernels.build_kv_indices`` launch pair (count, fill) from ``req_to_token``,
``req_pool_indices``, the lengths and ``pool.mapping``; nothing here reads a device value back.

- ``build(req_pool_indices, lens, capacity)`` (eager): fresh ``indptr [L, bs+1]`` int32,
  ``indices [L, capacity]`` and ``kept [L, bs]`` int32 (held counts). Index dtype
  (``index_dtype``): SGLang's kernels compute ``slot * row_stride`` in the index dtype, so int32
  only while the largest layer's ``(C_l + 1) * row_stride`` fits in int32, else int64 (SGLang's own).
- ``alloc_graph(max_bs, capacity)`` / ``fill_graph(req_pool_indices, seq_lens, bs)`` (CUDA graphs):
  preallocated ``[L, max_bs+1]`` / ``[L, capacity]`` / ``[L, max_bs]`` buffers refilled in place;
  returns views whose addresses do not change between fills. A request that holds nothing at a
  layer (only the padded rows of a padded graph batch: a decoded token is always held) is given
  length 1, as vanilla SGLang's padded rows read one (dummy) slot: its one entry is whatever the
  buffer holds there, always a slot index some earlier fill wrote for that layer (or 0), so
  the padded row reads finite data and never out of bounds (its output is discarded).
- ``check_held(logical_ids)``: every layer holds every given token (the batch's new tokens); a
  content check (one host sync), run only when ``sglang/checks.py`` is on.
- ``graph_capacity(max_bs, context_len, layer_capacities)``: the CUDA-graph indices width. A layer's
  real rows hold at most ``min(max_bs * context_len, C_l)`` tokens together, plus one entry per
  padded row: ``min(max_bs * context_len, max C_l + max_bs)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from sglang_depthkv.kernels import build_kv_indices
from sglang_depthkv.sglang import checks

Streams = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # indptr [L, bs+1], indices [L, cap], kept [L, bs]


def index_dtype(max_slots: int, row_stride: int) -> torch.dtype:
    """int32 when every ``slot * row_stride`` of a ``max_slots``-slot buffer fits in int32."""
    return torch.int32 if (int(max_slots) + 1) * int(row_stride) < 2 ** 31 else torch.int64


def index_dtype_bytes(max_slots: int, row_stride: int) -> int:
    return 4 if index_dtype(max_slots, row_stride) == torch.int32 else 8


def graph_capacity(max_bs: int, context_len: int, layer_capacities) -> int:
    return max(1, min(int(max_bs) * int(context_len), max(int(c) for c in layer_capacities) + int(max_bs)))


class LayerIndexStreams:
    def __init__(self, mapping: torch.Tensor, req_to_token: torch.Tensor, dtype: torch.dtype = torch.int64):
        if mapping.dim() != 2:
            raise ValueError(f"LayerIndexStreams: mapping must be [layers, ids], got shape {tuple(mapping.shape)}")
        self.mapping = mapping
        self.req_to_token = req_to_token
        self.num_layers = int(mapping.shape[0])
        self.device = mapping.device
        self.dtype = dtype
        self.graph_indptr: Optional[torch.Tensor] = None
        self.graph_indices: Optional[torch.Tensor] = None
        self.graph_kept: Optional[torch.Tensor] = None

    # --- eager ---------------------------------------------------------------------------------------
    def build(self, req_pool_indices: torch.Tensor, lens: torch.Tensor, capacity: int) -> Streams:
        """``capacity``: host-known bound on one layer's total held tokens (e.g. ``sum(lens)``)."""
        bs = int(req_pool_indices.shape[0])
        L = self.num_layers
        indptr = torch.empty((L, bs + 1), dtype=torch.int32, device=self.device)
        indices = torch.empty((L, max(int(capacity), 1)), dtype=self.dtype, device=self.device)
        kept = torch.empty((L, bs), dtype=torch.int32, device=self.device)
        if bs == 0:
            indptr.zero_()
            return indptr, indices, kept
        build_kv_indices(self.mapping, self.req_to_token, req_pool_indices, lens, kept_lens=None,
                         out_indptr=indptr, out_indices=indices, kept_lens_out=kept, validate=False)
        return indptr, indices, kept

    def check_held(self, logical_ids: torch.Tensor, what: str = "a new token of the batch") -> None:
        if logical_ids is None or logical_ids.numel() == 0 or not checks.enabled():
            return
        held = self.mapping[:, logical_ids.long()] != 0  # [L, n]
        if not bool(held.all()):
            layer, j = [int(x) for x in (~held).nonzero()[0].tolist()]
            raise RuntimeError(f"layer {layer}: {what} (logical id {int(logical_ids[j])}) holds no slot at this layer")

    # --- CUDA graphs -------------------------------------------------------------------------------------
    def alloc_graph(self, max_bs: int, capacity: int) -> None:
        L = self.num_layers
        self.graph_indptr = torch.zeros((L, max_bs + 1), dtype=torch.int32, device=self.device)
        self.graph_indices = torch.zeros((L, max(int(capacity), 1)), dtype=self.dtype, device=self.device)
        self.graph_kept = torch.zeros((L, max_bs), dtype=torch.int32, device=self.device)

    def fill_graph(self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, bs: int) -> Streams:
        """Refill the preallocated buffers for the first ``bs`` rows (no allocation of the outputs, no
        host sync); returns ``(indptr [L, bs+1], indices [L, cap], kept [L, bs])`` views."""
        if self.graph_indptr is None:
            raise RuntimeError("LayerIndexStreams.fill_graph before alloc_graph")
        if bs > self.graph_kept.shape[1]:
            raise ValueError(f"LayerIndexStreams.fill_graph: batch {bs} > graph max batch {self.graph_kept.shape[1]}")
        indptr, kept = self.graph_indptr[:, :bs + 1], self.graph_kept[:, :bs]
        if bs == 0:
            indptr.zero_()
            return indptr, self.graph_indices, kept
        rpi, lens = req_pool_indices[:bs], seq_lens[:bs]
        # rows holding nothing (only padded rows) read one entry: min_kept=1 (see the module docstring)
        build_kv_indices(self.mapping, self.req_to_token, rpi, lens, kept_lens=None, out_indptr=indptr,
                         out_indices=self.graph_indices, kept_lens_out=kept, min_kept=1, validate=False)
        return indptr, self.graph_indices, kept
