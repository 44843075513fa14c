"""Float64 plain-torch references for ``window_scores`` and ``value_output_norms`` (full W x N
attention matrix per request; only for tests)."""

from __future__ import annotations

from typing import Optional

import torch


def window_scores_ref(q, q_indptr, k_buffer, kv_indices, kv_indptr, scaling: float,
                      head_weights: Optional[torch.Tensor] = None, dtype=torch.float64) -> torch.Tensor:
    """``[kvh, len(kv_indices)]`` in ``dtype``; columns outside the requests' ranges are NaN."""
    kvh = k_buffer.shape[1]
    qh = q.shape[1]
    gq = qh // kvh
    out = torch.full((kvh, kv_indices.shape[0]), float("nan"), dtype=dtype)
    ip, qp = kv_indptr.long().tolist(), q_indptr.long().tolist()
    for b in range(len(ip) - 1):
        a, e = ip[b], ip[b + 1]
        n, w = e - a, qp[b + 1] - qp[b]
        if n == 0:
            continue
        k = k_buffer[kv_indices[a:e].long()].to(dtype)  # [n, kvh, d]
        k = k.repeat_interleave(gq, dim=1).transpose(0, 1)  # [qh, n, d]
        qq = q[qp[b]: qp[b + 1]].to(dtype).transpose(0, 1)  # [qh, w, d]
        logits = scaling * qq @ k.transpose(1, 2)  # [qh, w, n]
        qpos = torch.arange(n - w, n)
        mask = torch.arange(n)[None, :] > qpos[:, None]
        logits = logits.masked_fill(mask[None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).mean(dim=1)  # [qh, n]
        if head_weights is not None:
            probs = probs * head_weights[:, a:e].to(dtype)
        out[:, a:e] = probs.reshape(kvh, gq, n).sum(dim=1)
    return out


def value_output_norms_ref(v_buffer, kv_indices, o_proj_weight, num_q_heads: int) -> torch.Tensor:
    """``||v[g(h), t] . W_o[:, h*d:(h+1)*d]^T||_2`` directly (no Gram matrix), float64 ``[qh, N]``."""
    kvh, d = v_buffer.shape[1], v_buffer.shape[2]
    gq = num_q_heads // kvh
    v = v_buffer[kv_indices.long()].double()  # [N, kvh, d]
    w = o_proj_weight.double()
    out = torch.empty((num_q_heads, kv_indices.shape[0]), dtype=torch.float64)
    for h in range(num_q_heads):
        out[h] = torch.linalg.vector_norm(v[:, h // gq, :] @ w[:, h * d:(h + 1) * d].T, dim=-1)
    return out
