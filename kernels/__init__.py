"""Triton kernels for ragged per-layer KV, each with a plain-torch reference (sglang_depthkv.kernels)."""

from .compaction import compact_kv, prune_kv
from .index_streams import build_kv_indices
from .layer_buffers import LayerKVBuffers
from .window_scores import output_gram, value_output_norms, window_scores

__all__ = ["LayerKVBuffers", "build_kv_indices", "compact_kv", "output_gram", "prune_kv", "value_output_norms", "window_scores"]
