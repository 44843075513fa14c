"""Window-query attention probabilities shared by SnapKV and LaProx.

For an observation with ``n`` keys and ``w`` window queries (the queries of positions
``n-w .. n-1``), query head ``h`` (kv group ``g = h // (q_heads // kv_heads)``) and window query ``i``:

    p[h, i, t] = softmax_t(scaling · q[h, i] · k[g, t])   over keys t <= n - w + i  (causal),
    p[h, i, t] = 0                                         for t > n - w + i.

Computed in float32 whatever the input dtype (bf16/fp16 inputs are upcast chunk by chunk).

Memory: the keys are read in chunks of ``CHUNK`` tokens and each kv head's keys meet the queries
of its whole group at once (no repeated keys), with an exact two-pass softmax (pass 1: per-row max
and sum of exponentials over the chunks, rescaled as the max grows; pass 2: normalised
probabilities chunk by chunk). Apart from the result, no tensor exceeds
``max(q_heads·w·CHUNK, kv_heads·CHUNK·head_dim, q_heads·w·head_dim)`` floats.
"""

from __future__ import annotations

import math
from typing import Iterator, Tuple

import torch

from ..types import LayerObservation

CHUNK = 16384  # tokens per chunk of keys/values in the scorers (bounds their transients)


def token_chunks(n: int) -> Iterator[Tuple[int, int]]:
    """``(lo, hi)`` ranges of at most ``CHUNK`` tokens covering ``0 .. n``."""
    step = max(int(CHUNK), 1)
    for lo in range(0, n, step):
        yield lo, min(lo + step, n)


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


def _grouped_queries(obs: LayerObservation) -> torch.Tensor:
    """``[kv_heads, group·w, d]`` float32: the window queries of each kv head's group (query head
    ``h`` is row block ``h % group`` of kv head ``h // group``). At most q_heads·w·d floats."""
    q = obs.window_queries.to(torch.float32)
    return q.reshape(obs.num_kv_heads, -1, q.shape[2])


def _chunk_logits(obs: LayerObservation, qg: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``[kv_heads, group·w, hi-lo]`` float32 scaled logits against keys ``lo .. hi-1``, keys in the
    future of a window query at ``-inf``. At most q_heads·w·CHUNK floats (plus kv_heads·CHUNK·d for
    the upcast keys)."""
    n, w = obs.num_tokens, obs.window
    k = obs.keys[:, lo:hi].to(torch.float32)  # [kvh, c, d]
    logits = torch.matmul(qg, k.transpose(1, 2)).mul_(float(obs.scaling))
    dev = logits.device
    query_pos = torch.arange(n - w, n, device=dev).unsqueeze(1)  # [w, 1]
    future = torch.arange(lo, hi, device=dev).unsqueeze(0) > query_pos  # [w, c]
    logits.view(obs.num_kv_heads, -1, w, hi - lo).masked_fill_(future, float("-inf"))
    return logits


def _softmax_stats(obs: LayerObservation, qg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: per-row max ``m`` and ``sum_t exp(logit - m)`` (``[kv_heads, group·w, 1]`` each).
    Chunk 0 holds key 0, which every window query sees, so ``m`` is finite after it."""
    m = s = None
    for lo, hi in token_chunks(obs.num_tokens):
        logits = _chunk_logits(obs, qg, lo, hi)
        cm = logits.amax(dim=-1, keepdim=True)
        if m is None:
            m, s = cm, logits.sub_(cm).exp_().sum(dim=-1, keepdim=True)
            continue
        new_m = torch.maximum(m, cm)
        s = s * torch.exp(m - new_m) + logits.sub_(new_m).exp_().sum(dim=-1, keepdim=True)
        m = new_m
    return m, s


def _chunk_probs(obs: LayerObservation, qg: torch.Tensor, stats, lo: int, hi: int) -> torch.Tensor:
    """Pass 2: ``[q_heads, w, hi-lo]`` probabilities of keys ``lo .. hi-1`` (in place on the logits)."""
    m, s = stats
    p = _chunk_logits(obs, qg, lo, hi).sub_(m).exp_().div_(s)
    return p.view(obs.num_q_heads, obs.window, hi - lo)


def window_attention(obs: LayerObservation) -> torch.Tensor:
    """Causal window attention probabilities ``[q_heads, w, n]`` (float32); see the module docstring.

    The result itself is q_heads·w·n floats (1 GiB at n = 128k, w = 64, 32 heads); scorers that only
    need the mean over the window use ``window_attention_mean``. Other transients as the module."""
    qg = _grouped_queries(obs)
    stats = _softmax_stats(obs, qg)
    out = torch.empty(obs.num_q_heads, obs.window, obs.num_tokens, dtype=torch.float32, device=qg.device)
    for lo, hi in token_chunks(obs.num_tokens):
        out[:, :, lo:hi] = _chunk_probs(obs, qg, stats, lo, hi)
    return out


def window_attention_mean(obs: LayerObservation) -> torch.Tensor:
    """``[q_heads, n]`` float32: ``window_attention(obs).mean(dim=1)`` without the ``[q_heads, w, n]``
    probabilities. Result q_heads·n floats; other transients as the module docstring."""
    qg = _grouped_queries(obs)
    stats = _softmax_stats(obs, qg)
    out = torch.empty(obs.num_q_heads, obs.num_tokens, dtype=torch.float32, device=qg.device)
    for lo, hi in token_chunks(obs.num_tokens):
        out[:, lo:hi] = _chunk_probs(obs, qg, stats, lo, hi).mean(dim=1)
    return out
