"""LaProx scores: window attention times the norm of each token's output contribution.

Per query head h (kv group g = h // (q_heads // kv_heads)), head_dim d, ``W_o = obs.o_proj_weight``
``[hidden, q_heads·d]``:

    a[h, t]     = mean over the w window queries of p[h, i, t]     (``window_attention``)
    c[h, t]     = a[h, t] · || v[g, t, :] · W_o[:, h·d:(h+1)·d]ᵀ ||₂
    s[g, t]     = sum over h in group g of c[h, t]
    score[g, :] = avg_pool1d(s[g, :], kernel=pool_kernel, stride=1, padding=pool_kernel//2,
                             count_include_pad=False)                (``pooling.pool_positions``)

``c`` estimates how much token t moves the layer's output, so scores are comparable across heads
and layers (the global top-k allocator relies on that). Pooling (default kernel 7) keeps the
neighbours of an attended token: unpooled, a multi-token answer loses all but its attended token
(measured on the accuracy tasks: LaProx under the global top-k at 10 / 20 / 30% kept, 12 samples,
0.000 / 0.167 / 0.267 unpooled, 0.104 / 0.312 / 0.413 with kernel 5, 0.146 / 0.333 / 0.513 with
kernel 7). Pooling is linear, so tensor-parallel ranks may pool their partial scores before the
rank sum. float32 throughout; the norm
is computed through the per-head Gram matrix ``W_hᵀ W_h`` ([d, d]) so the cost does not grow
with n · hidden.

Memory: ``a`` comes from ``window_attention_mean`` (no ``[q_heads, w, n]`` probabilities); the
norms are computed per kv group and per chunk of ``CHUNK`` tokens (``window_attention.CHUNK``),
from ``W_o`` as given (bf16 in serving), upcast one group's columns at a time. Apart from the
``[q_heads, n]`` results, no tensor exceeds ``max(group·CHUNK·d, hidden·group·d)`` floats besides
the window attention's own bound.
"""

from __future__ import annotations

import torch

from ..types import LayerObservation
from .base import Scorer
from .pooling import DEFAULT_POOL_KERNEL, check_pool_kernel, pool_positions
from .window_attention import check_query_observation, token_chunks, window_attention_mean


def _group_grams(o_proj_weight: torch.Tensor, g: int, group: int, d: int) -> torch.Tensor:
    """``[d, group·d]`` float32: the Gram matrices ``W_hᵀ W_h`` of kv group ``g``'s query heads side by
    side (column block ``r`` is head ``g·group + r``). Upcasts only the group's ``[hidden, group·d]``
    columns of ``W_o``: at most hidden·group·d floats."""
    cols = o_proj_weight[:, g * group * d:(g + 1) * group * d].to(torch.float32)
    w = cols.reshape(cols.shape[0], group, d).transpose(0, 1)  # [group, hidden, d]
    gram = torch.matmul(w.transpose(1, 2), w)  # [group, d, d]
    return gram.transpose(0, 1).reshape(d, group * d)


def output_norms(values: torch.Tensor, o_proj_weight: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """``[q_heads, n]``: ||v[g(h), t] · W_o[:, h·d:(h+1)·d]ᵀ||₂ in float32, as
    ``sqrt(v Gram_h vᵀ)``, per kv group and chunk of ``CHUNK`` tokens (no repeated values): apart
    from the result, at most ``max(group·CHUNK·d, hidden·group·d)`` floats."""
    kvh, n, d = values.shape
    group = num_q_heads // kvh
    out = torch.empty(kvh, group, n, dtype=torch.float32, device=values.device)
    for g in range(kvh):
        gram = _group_grams(o_proj_weight, g, group, d)
        for lo, hi in token_chunks(n):
            v = values[g, lo:hi].to(torch.float32)  # [c, d]
            proj = torch.matmul(v, gram).view(hi - lo, group, d)  # row t, block r: v[t] Gram_r
            out[g, :, lo:hi] = (proj * v.unsqueeze(1)).sum(dim=-1).T
    return out.view(num_q_heads, n).clamp_min(0.0).sqrt()


class LaProxScorer(Scorer):
    name = "laprox"
    query_agnostic = False
    sums_query_heads = True

    def __init__(self, pool_kernel: int = DEFAULT_POOL_KERNEL):
        self.pool_kernel = check_pool_kernel("LaProxScorer", pool_kernel)

    def score(self, obs: LayerObservation) -> torch.Tensor:
        check_query_observation(obs, "LaProxScorer")
        if obs.o_proj_weight is None:
            raise ValueError(f"LaProxScorer: layer {obs.layer}: the observation has no o_proj_weight "
                             "(LaProx needs the attention output projection)")
        if obs.o_proj_weight.dim() != 2 or not obs.o_proj_weight.is_floating_point():
            raise ValueError(f"LaProxScorer: layer {obs.layer}: o_proj_weight must be a 2-D float tensor, got "
                             f"{tuple(obs.o_proj_weight.shape)} {obs.o_proj_weight.dtype}")
        attn = window_attention_mean(obs)  # [qh, n]
        contrib = attn * output_norms(obs.values, obs.o_proj_weight, obs.num_q_heads)  # [qh, n]
        kvh, n = obs.num_kv_heads, obs.num_tokens
        return pool_positions(contrib.reshape(kvh, obs.num_q_heads // kvh, n).sum(dim=1), self.pool_kernel)

    def __repr__(self) -> str:
        return f"LaProxScorer(pool_kernel={self.pool_kernel})"
