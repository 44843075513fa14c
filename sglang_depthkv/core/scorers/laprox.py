"""LaProx scores: each token's contribution to the layer's attention output over the window queries.

Per kv group g (query heads ``H_g``: h // (q_heads // kv_heads) = g), head_dim d, ``W_h =
obs.o_proj_weight[:, h·d:(h+1)·d]`` ([hidden, d]), window attention ``p[h, i, t]``
(``window_attention``) and ``u[h, t] = v[g, t] · W_hᵀ`` (what token t's value adds to the layer
output through head h, per unit of attention):

    M[g, t]     = [ Σ_{h ∈ H_g} p[h, i, t] · u[h, t] ]_{i = 1..w}        ([w, hidden])
    s[g, t]     = ||M[g, t]||_F / √w
                = sqrt( (1/w) Σ_{a, b ∈ H_g} A[a, b, t] · v[g, t] W_aᵀ W_b v[g, t]ᵀ ),
                  A[a, b, t] = Σ_i p[a, i, t] · p[b, i, t]
    pooled[g, :] = avg_pool1d(s[g, :], kernel=pool_kernel, stride=1, padding=pool_kernel//2,
                              count_include_pad=False)               (``pooling.pool_positions``)
    score[g, t]   = pooled[g, t] / (mean_{t'} pooled[g, t'])^γ        (``head_mean_power`` γ, mean over
                                                                      the observation's n tokens)

``M[g, t]`` is token t's part of the attention output of the ``w`` window queries after ``o_proj``:
dropping the token removes it (before renormalisation), so ``s`` is the size of the error its
eviction makes in the layer output, in the output's own units. That makes scores comparable
across the heads of a layer (across layers the units differ: ``γ`` below), and the heads of a group are
summed *before* the norm, so heads that write the same direction add up and heads that cancel do
not (the inter-head terms ``a ≠ b``); a per-head norm summed over heads misses both. Measured on
SmolLM2 with the accuracy tasks (16 samples, 2k and 4k tokens, global top-k, 10 / 20% kept): 0.172 /
0.312 with the per-head norms ``Σ_h mean_i p[h, i, t] · ||u[h, t]||``, 0.266 / 0.416 with ``s``.

Heads are mixed inside a kv group only: a tensor-parallel rank that holds whole kv groups computes
exact partial scores, summed over the ranks (``core/rank_sum.py``); replicated kv heads (more ranks
than kv heads) split a group's query heads over ranks and are refused (``mixes_query_heads``).

Pooling (default kernel 7) keeps the neighbours of an attended token: unpooled, a multi-token
answer loses all but its attended token. float32 throughout.

``γ`` (``head_mean_power``, default 0: the score in output units). The output units are not the
same in every layer: the mean ``‖v·W_o‖`` grows about 90× from SmolLM2's first layer to its last,
and a global top-k over raw scores hands the last layers most of the budget. The ``laprox`` policy
(global top-k) uses ``γ = 0.5``: a token is ranked by its contribution over the square root of its
kv head's mean contribution, halfway to a purely relative score. Measured on SmolLM2's 48-sample
sweep (10 / 20% kept; uniform SnapKV 0.320 / 0.449): γ = 0 0.318 / 0.429, γ = 0.5 0.344 / 0.473,
γ = 1 0.354 / 0.442; on Qwen2.5-Coder-0.5B's (SnapKV 0.781 / 0.857): γ = 0 0.803 / 0.882, γ = 0.5
0.815 / 0.859. The mean is over the observation's tokens, one kv head at a time, so a
tensor-parallel rank that holds whole kv groups computes it exactly. DepthKV profiles calibrated with LaProx use γ = 0 (their
per-layer budgets come from the profile, not from comparing scores across layers).

Memory: the probabilities come chunk by chunk (``window_attention._chunk_probs``, the window
attention's own bound); per chunk of ``c`` keys, ``A`` is ``q_heads·group·c`` floats, and the value
cross terms are computed per kv group in sub-chunks of ``CHUNK // group`` tokens from the group's
Gram blocks ``W_aᵀ W_b`` (``[d, group²·d]``, from ``W_o`` as given, bf16 in serving, upcast one
group's columns at a time), so apart from the ``[kv_heads, n]`` result no tensor exceeds
``max(q_heads·group·CHUNK, group·CHUNK·d, hidden·group·d, group²·d²)`` floats besides the window
attention's own bound.
"""

from __future__ import annotations

import torch

from ..types import LayerObservation
from .base import Scorer
from .pooling import DEFAULT_POOL_KERNEL, check_pool_kernel, pool_positions
from .window_attention import (CHUNK, _chunk_probs, _grouped_queries, _softmax_stats, check_query_observation,
                               token_chunks)


def group_gram_blocks(o_proj_weight: torch.Tensor, g: int, group: int, d: int) -> torch.Tensor:
    """``[d, group·group·d]`` float32: column block ``(a, b)`` (at ``(a·group + b)·d``) is ``W_aᵀ W_b`` for
    query heads ``g·group + a`` and ``g·group + b``. Upcasts only the group's ``[hidden, group·d]``
    columns of ``W_o``."""
    cols = o_proj_weight[:, g * group * d:(g + 1) * group * d].to(torch.float32)
    gram = torch.matmul(cols.T, cols)  # [group·d, group·d], block (a, b) = W_aᵀ W_b
    return gram.view(group, d, group, d).permute(1, 0, 2, 3).reshape(d, group * group * d)


def value_cross_terms(values: torch.Tensor, gram_blocks: torch.Tensor, group: int) -> torch.Tensor:
    """``[c, group, group]`` float32: ``v_t W_aᵀ W_b v_tᵀ = u[a, t] · u[b, t]`` for the rows of
    ``values [c, d]`` (float32), from ``group_gram_blocks``. Transient: ``c·group²·d`` floats."""
    c, d = values.shape
    y = torch.matmul(values, gram_blocks).view(c, group * group, d)
    return torch.matmul(y, values.unsqueeze(-1)).view(c, group, group)


def output_contribution(obs: LayerObservation) -> torch.Tensor:
    """``[kv_heads, n]`` float32: ``s[g, t]`` of the module docstring (unpooled)."""
    kvh, n, d = obs.values.shape
    w = obs.window
    group = obs.num_q_heads // kvh
    qg = _grouped_queries(obs)
    stats = _softmax_stats(obs, qg)
    grams = [group_gram_blocks(obs.o_proj_weight, g, group, d) for g in range(kvh)]
    out = torch.empty(kvh, n, dtype=torch.float32, device=qg.device)
    sub = max(1, int(CHUNK) // group)
    for lo, hi in token_chunks(n):
        pt = _chunk_probs(obs, qg, stats, lo, hi).view(kvh, group, w, hi - lo).permute(0, 3, 1, 2)  # [kvh, c, group, w]
        a = torch.matmul(pt, pt.transpose(2, 3))  # [kvh, c, group, group]: Σ_i p[a, i, t] p[b, i, t]
        for g in range(kvh):
            for s_lo in range(lo, hi, sub):
                s_hi = min(s_lo + sub, hi)
                cross = value_cross_terms(obs.values[g, s_lo:s_hi].to(torch.float32), grams[g], group)
                out[g, s_lo:s_hi] = (a[g, s_lo - lo:s_hi - lo] * cross).sum(dim=(1, 2))
    return out.clamp_min_(0.0).div_(w).sqrt_()


class LaProxScorer(Scorer):
    name = "laprox"
    query_agnostic = False
    mixes_query_heads = True
    # the score above; profiles measured with the earlier per-head norms record none and are refused
    definition = "kv-group output Frobenius norm"

    def __init__(self, pool_kernel: int = DEFAULT_POOL_KERNEL, head_mean_power: float = 0.0):
        self.pool_kernel = check_pool_kernel("LaProxScorer", pool_kernel)
        try:
            g = float("nan") if isinstance(head_mean_power, bool) else float(head_mean_power)
        except (TypeError, ValueError):
            g = float("nan")
        if not 0.0 <= g <= 1.0:
            raise ValueError(f"LaProxScorer: head_mean_power must be in [0, 1], got {head_mean_power!r}")
        self.head_mean_power = g
        if g:
            self.definition = f"{LaProxScorer.definition} / kv-head mean^{g:g}"

    def score(self, obs: LayerObservation) -> torch.Tensor:
        check_query_observation(obs, "LaProxScorer")
        if obs.o_proj_weight is None:
            raise ValueError(f"LaProxScorer: layer {obs.layer}: the observation has no o_proj_weight "
                             "(LaProx needs the attention output projection)")
        if obs.o_proj_weight.dim() != 2 or not obs.o_proj_weight.is_floating_point():
            raise ValueError(f"LaProxScorer: layer {obs.layer}: o_proj_weight must be a 2-D float tensor, got "
                             f"{tuple(obs.o_proj_weight.shape)} {obs.o_proj_weight.dtype}")
        pooled = pool_positions(output_contribution(obs), self.pool_kernel)
        if not self.head_mean_power:
            return pooled
        mean = pooled.mean(dim=1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
        return pooled.div_(mean.pow_(self.head_mean_power))

    def __repr__(self) -> str:
        return f"LaProxScorer(pool_kernel={self.pool_kernel}, head_mean_power={self.head_mean_power:g})"
