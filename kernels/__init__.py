"""Triton kernels for ragged per-layer KV, each with a plain-torch reference (sglang_depthkv.kernels)."""

from .compaction import compact_kv, prune_kv
from .index_streams import build_kv_indices
from .layer_buffers import LayerKVBuffers

__all__ = ["LayerKVBuffers", "build_kv_indices", "compact_kv", "prune_kv"]
