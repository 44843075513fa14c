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
- ``window_scores(q [total_w, qh, d], q_indptr, k_buffer [slots, kvh, d], kv_indices, kv_indptr, *,
  scaling, max_kv_len, max_window, head_weights=None, out=None)`` -> float32 ``[kvh, len(kv_indices)]``:
  causal window softmax mass averaged over window queries, summed over each GQA group (SnapKV before
  pooling); with ``head_weights = value_output_norms(v_buffer, kv_indices, o_proj_weight,
  num_q_heads=qh)`` it is the LaProx score. Split-K two-pass online softmax, O(W x heads) memory.
- References (tests): ``index_streams_ref``, ``window_scores_ref``.

Validation: metadata (shapes, dtypes, devices, strides) is always checked; ``validate=True``
(default) adds content checks (ids/slots/positions in range, orderings, capacities) at the cost of
one device sync. Every failure is a ``ValueError`` raised before any launch.
"""

from .index_streams import build_kv_indices
from .window_scores import output_gram, value_output_norms, window_scores

__all__ = [
    "build_kv_indices",
    "output_gram",
    "value_output_norms",
    "window_scores",
]
