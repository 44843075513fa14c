"""SnapKV (Li et al. 2024) scores from the observation window.

    a[h, t]      = mean over the w window queries of p[h, i, t]   (``window_attention``: causal
                   softmax with ``scaling``, window query i at position n-w+i sees keys <= n-w+i)
    s[g, t]      = sum over the query heads h of kv group g of a[h, t]
    score[g, :]  = avg_pool1d(s[g, :], kernel=pool_kernel, stride=1, padding=pool_kernel//2,
                              count_include_pad=False)

(``pool_kernel`` 7 by default, see ``pooling``; kvpress's default is 5.) float32 throughout. Differences from kvpress 0.5.5's ``SnapKVPress`` (checked in
``tests/core/test_kvpress_crosscheck.py``): kvpress averages over the GQA group (we sum: a factor
``q_heads/kv_heads``, the same ranking); kvpress scores only the first ``n - w`` tokens, pools them
with ``count_include_pad=True`` (edge positions divided by the full kernel) and gives the window's
own tokens ``max + 1``; we pool over all ``n`` tokens with ``count_include_pad=False`` (the window
is protected by ``selection.protect`` instead). The causal rule inside the window and the
``head_dim ** -0.5`` scaling are the same, so interior positions agree exactly.

Memory: apart from the ``[q_heads, n]`` window means and ``[kv_heads, n]`` scores, the bound of
``window_attention_mean`` (chunks of ``window_attention.CHUNK`` keys): at most
``max(q_heads·w·CHUNK, kv_heads·CHUNK·head_dim, q_heads·w·head_dim)`` floats.
"""

from __future__ import annotations

import torch

from ..types import LayerObservation
from .base import Scorer
from .pooling import DEFAULT_POOL_KERNEL, check_pool_kernel, pool_positions
from .window_attention import check_query_observation, window_attention_mean


class SnapKVScorer(Scorer):
    name = "snapkv"
    query_agnostic = False
    sums_query_heads = True

    def __init__(self, pool_kernel: int = DEFAULT_POOL_KERNEL):
        self.pool_kernel = check_pool_kernel("SnapKVScorer", pool_kernel)

    def score(self, obs: LayerObservation) -> torch.Tensor:
        check_query_observation(obs, "SnapKVScorer")
        per_head = window_attention_mean(obs)  # [qh, n]: the window mean, without [qh, w, n] probabilities
        kvh, n = obs.num_kv_heads, obs.num_tokens
        per_kv = per_head.reshape(kvh, obs.num_q_heads // kvh, n).sum(dim=1)  # [kvh, n]
        return pool_positions(per_kv, self.pool_kernel)

    def __repr__(self) -> str:
        return f"SnapKVScorer(pool_kernel={self.pool_kernel})"
