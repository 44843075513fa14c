"""Triton kernels for ragged per-layer KV, each with a plain-torch reference (``sglang_depthkv.kernels``).

Memory model (SGLang 0.5.17, page_size 1, NHD): layer ``l`` holds K and V in its own
``[slots_l, kv_heads, head_dim]`` buffers (slot counts differ per layer; slot 0 is a dummy), and
``mapping[l, logical_id]`` (int32/int64 ``[L, num_logical + 2]``) gives the layer-``l`` slot of a
logical token id, 0 = not held (logical id 0 is SGLang's dummy too). A request's logical ids are
``req_to_token[req_pool_indices[b], :seq_lens[b]]``. Pruning needs no kernel here: the per-layer pool
frees a pruned token's slot in place (``DepthKVAllocator.prune``), so no compaction pass exists.

API (details in each docstring):

- ``build_kv_indices(mapping [G, M], req_to_token, req_pool_indices, seq_lens, *, kept_lens=None,
  out_indptr, out_indices, kept_lens_out, capacity)``: per-layer (or per-group) FlashInfer /
  Triton-backend ``kv_indptr [G, bs+1]`` / ``kv_indices [G, cap]`` (int32), skipping pruned tokens.
  Host-known ``kept_lens`` -> one launch; ``None`` -> counted on device (two launches).
- ``layer_kv_splits(splits [L, bs], lens [L, bs], ...)`` (``kv_splits.py``): SGLang's decode split-K
  rule for every layer in one launch.
- References (tests): ``index_streams_ref``, ``kv_splits.layer_kv_splits_ref``.

Token scoring has no kernel: the core scorers (``core/scorers/``) run in torch over chunks of keys,
which bounds their memory (``window_attention.CHUNK``) and keeps the serving path's scores identical
to the reference path's.

Validation: metadata (shapes, dtypes, devices, strides) is always checked; ``validate=True``
(default) adds content checks (ids/slots/positions in range, orderings, capacities) at the cost of
one device sync. Every failure is a ``ValueError`` raised before any launch.
"""

from .index_streams import build_kv_indices
from .kv_splits import layer_kv_splits

__all__ = [
    "build_kv_indices",
    "layer_kv_splits",
]
