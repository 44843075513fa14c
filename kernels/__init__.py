"""Triton kernels for ragged per-layer KV, each with a plain-torch reference (sglang_depthkv.kernels)."""

from .compaction import compact_kv, prune_kv
from .layer_buffers import LayerKVBuffers

__all__ = ["LayerKVBuffers", "compact_kv", "prune_kv"]
