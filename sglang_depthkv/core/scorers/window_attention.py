"""Window-query attention probabilities shared by SnapKV and LaProx.

For an observation with ``n`` keys and ``w`` window queries (the queries of positions
``n-w .. n-1``), query head ``h`` (kv group ``g = h // (q_heads // kv_heads)``) and window query ``i``:

    p[h, i, t] = softmax_t(scaling · q[h, i] · k[g, t])   over keys t <= n - w + i  (causal),
    p[h, i, t] = 0                                         for t > n - w + i.

Computed in float32 whatever the input dtype (bf16/fp16 inputs are upcast first).
"""

from __future__ import annotations

import math

import torch

from ..types import LayerObservation


def check_query_observation(obs: LayerObservation, who: str) -> None:
    """``obs.check()`` plus what a query-dependent scorer needs (at least one window query, a
    finite positive scaling, floating-point tensors)."""
    obs.check()
    for name in ("keys", "values", "window_queries"):
        t = getattr(obs, name)
        if not t.is_floating_point():
            raise ValueError(f"{who}: layer {obs.layer}: {name} must be floating point, got {t.dtype}")
    if obs.window < 1:
        raise ValueError(f"{who}: layer {obs.layer}: needs at least one window query, got window_queries "
                         f"{tuple(obs.window_queries.shape)}")
    s = float(obs.scaling)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"{who}: layer {obs.layer}: scaling must be finite and > 0, got {obs.scaling}")


def window_attention(obs: LayerObservation) -> torch.Tensor:
    """Causal window attention probabilities ``[q_heads, w, n]`` (float32); see the module docstring."""
    q = obs.window_queries.to(torch.float32)
    k = obs.keys.to(torch.float32)
    qh, w, _ = q.shape
    kvh, n, _ = k.shape
    group = qh // kvh
    k_per_q = k.repeat_interleave(group, dim=0)  # [qh, n, d]: query head h uses kv head h // group
    logits = torch.matmul(q, k_per_q.transpose(1, 2)) * float(obs.scaling)  # [qh, w, n]
    query_pos = torch.arange(n - w, n, device=logits.device).unsqueeze(1)  # [w, 1]
    future = torch.arange(n, device=logits.device).unsqueeze(0) > query_pos  # [w, n], on the logits' device
    logits = logits.masked_fill(future, float("-inf"))
    return torch.softmax(logits, dim=-1)
