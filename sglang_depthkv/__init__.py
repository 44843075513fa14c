"""sglang-depthkv: per-layer KV-cache pruning under one global memory budget, as an SGLang plugin.

Layers (lower never imports higher): ``core`` (engine-agnostic torch) -> ``kernels`` (Triton + torch
references) -> ``sglang`` (pool, allocator, radix cache, attention backends) -> ``patches``
(SGLang hook registrations).
"""

__version__ = "0.1.0"
