"""LaProx scores: window attention times the norm of each token's output contribution.

Per query head h (kv group g = h // (q_heads // kv_heads)), head_dim d, ``W_o = obs.o_proj_weight``
``[hidden, q_heads·d]``:

    a[h, t]     = mean over the w window queries of p[h, i, t]     (``window_attention``)
    c[h, t]     = a[h, t] · || v[g, t, :] · W_o[:, h·d:(h+1)·d]ᵀ ||₂
    score[g, t] = sum over h in group g of c[h, t]

No pooling. ``c`` estimates how much token t moves the layer's output, so scores are comparable
across heads and layers (the global top-k allocator relies on that). float32 throughout; the norm
is computed through the per-head Gram matrix ``W_hᵀ W_h`` ([d, d]) so the cost does not grow
with n · hidden.
"""

from __future__ import annotations

import torch

from ..types import LayerObservation
from .base import Scorer
from .window_attention import check_query_observation, window_attention


def output_norms(values: torch.Tensor, o_proj_weight: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """``[q_heads, n]``: ||v[g(h), t] · W_o[:, h·d:(h+1)·d]ᵀ||₂ in float32."""
    v = values.to(torch.float32)
    kvh, n, d = v.shape
    w = o_proj_weight.to(torch.float32).reshape(o_proj_weight.shape[0], num_q_heads, d).transpose(0, 1)  # [qh, hid, d]
    gram = torch.matmul(w.transpose(1, 2), w)  # [qh, d, d]
    v_per_q = v.repeat_interleave(num_q_heads // kvh, dim=0)  # [qh, n, d]
    sq = (torch.matmul(v_per_q, gram) * v_per_q).sum(dim=-1)  # [qh, n]
    return sq.clamp_min(0.0).sqrt()


class LaProxScorer(Scorer):
    name = "laprox"
    query_agnostic = False

    def score(self, obs: LayerObservation) -> torch.Tensor:
        check_query_observation(obs, "LaProxScorer")
        if obs.o_proj_weight is None:
            raise ValueError(f"LaProxScorer: layer {obs.layer}: the observation has no o_proj_weight "
                             "(LaProx needs the attention output projection)")
        if obs.o_proj_weight.dim() != 2 or not obs.o_proj_weight.is_floating_point():
            raise ValueError(f"LaProxScorer: layer {obs.layer}: o_proj_weight must be a 2-D float tensor, got "
                             f"{tuple(obs.o_proj_weight.shape)} {obs.o_proj_weight.dtype}")
        attn = window_attention(obs).mean(dim=1)  # [qh, n]
        contrib = attn * output_norms(obs.values, obs.o_proj_weight, obs.num_q_heads)  # [qh, n]
        kvh, n = obs.num_kv_heads, obs.num_tokens
        return contrib.reshape(kvh, obs.num_q_heads // kvh, n).sum(dim=1).contiguous()
