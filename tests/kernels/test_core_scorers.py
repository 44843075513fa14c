"""The Triton window scores agree with the core's plain-torch scorers (the policy's source of truth)."""

import torch

from sglang_depthkv.core.scorers import LaProxScorer
from sglang_depthkv.core.scorers.window_attention import window_attention
from sglang_depthkv.core.types import LayerObservation
from sglang_depthkv.kernels import value_output_norms, window_scores


def _as_nhd(x):
    """[kvh, n, d] -> NHD buffer [n + 1, kvh, d] with the dummy slot 0, and the slot list 1..n."""
    kvh, n, d = x.shape
    buf = torch.cat([torch.zeros(1, kvh, d, dtype=x.dtype), x.transpose(0, 1)]).contiguous()
    return buf, torch.arange(1, n + 1, dtype=torch.int32)


def test_snapkv_and_laprox_match_core_scorers():
    gen = torch.Generator().manual_seed(30)
    kvh, qh, n, w, d, hidden = 2, 4, 45, 7, 16, 20
    obs = LayerObservation(
        layer=0,
        keys=torch.randn(kvh, n, d, generator=gen),
        values=torch.randn(kvh, n, d, generator=gen),
        window_queries=torch.randn(qh, w, d, generator=gen),
        scaling=d ** -0.5,
        o_proj_weight=torch.randn(hidden, qh * d, generator=gen) * 0.3,
    )
    kbuf, idx = _as_nhd(obs.keys)
    vbuf, _ = _as_nhd(obs.values)
    q = obs.window_queries.transpose(0, 1).contiguous()  # [w, qh, d]
    kv_indptr = torch.tensor([0, n], dtype=torch.int32)
    q_indptr = torch.tensor([0, w], dtype=torch.int32)
    kw = dict(scaling=obs.scaling, max_kv_len=n, max_window=w, split_tokens=16, block_n=16)

    snap = window_scores(q, q_indptr, kbuf, idx, kv_indptr, **kw)
    core_snap = window_attention(obs).mean(dim=1).reshape(kvh, qh // kvh, n).sum(dim=1)  # SnapKV before pooling
    torch.testing.assert_close(snap, core_snap, rtol=1e-4, atol=1e-6)

    norms = value_output_norms(vbuf, idx, obs.o_proj_weight, num_q_heads=qh, block_n=16)
    lap = window_scores(q, q_indptr, kbuf, idx, kv_indptr, head_weights=norms, **kw)
    torch.testing.assert_close(lap, LaProxScorer().score(obs), rtol=1e-4, atol=1e-6)
