"""Triton kernels for ragged per-layer KV, each with a plain-torch reference (sglang_depthkv.kernels)."""
