"""Observation-window attention scores without the ``W x N`` attention matrix (SnapKV / LaProx).

For each request ``b`` with ``n`` keys and window ``w`` (its last ``w`` positions), window query ``i``
sits at position ``n - w + i`` and sees keys ``t <= n - w + i`` (causal inside the window). With
``P[h, i, t] = softmax_t(scaling * q[h, i] . k[g(h), t])`` (GQA: ``g(h) = h // (qh // kvh)``):

    window_scores[g, t] = sum_{h in group g} (1/w) sum_i P[h, i, t] * weight[h, t]

``weight = 1`` gives SnapKV's score before its 1-D pooling (``core/scorers`` SnapKV); ``weight[h, t]
= ||v[g(h), t] . W_o[:, h*d:(h+1)*d]^T||_2`` (``value_output_norms``) gives LaProx. Output float32.

Layout (SGLang, NHD): keys of one layer live in ``k_buffer [slots, kvh, d]``; request ``b``'s keys, in
position order, are the slots ``kv_indices[kv_indptr[b] : kv_indptr[b+1]]`` (e.g. one row of
``build_kv_indices``). Window queries are ``q [total_w, qh, d]`` with ``q_indptr [bs+1]``. The output
column ``kv_indptr[b] + t`` belongs to token ``t`` of request ``b`` (columns outside the requests'
ranges are not written). Contiguous keys ``[kvh, n, d]``: pass ``k.transpose(0, 1)`` made contiguous
as the buffer and ``arange(n)`` as indices.

Algorithm: two launches, split over keys like flash-decoding. (1) per (request, kv head, row chunk,
key split): running max / sum of exp over its keys (online softmax) -> stats ``[bs, kvh, rows,
splits]``; (2) per (request, kv head, key block): combine the split stats, recompute the block's
logits and add the normalised probabilities over the window rows. Memory O(bs * heads * W * splits),
never O(W * N). Logits are computed with ``tl.dot`` in float32 accumulation (tf32 is not used for
float32 inputs).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .validation import FLOAT_DTYPES, INDEX_DTYPES, check_positive_int, check_tensor

LOG2E = 1.4426950408889634


@triton.jit
def _rows(rc, w, n, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, GQ: tl.constexpr):
    r = rc * ROWS + tl.arange(0, ROWS)
    h_local = r // BLOCK_W
    i = r % BLOCK_W
    valid = (h_local < GQ) & (i < w)
    qpos = n - w + i
    return r, h_local, i, valid, qpos


@triton.jit
def _load_q(q_ptr, q_s0, q_s1, q_start, h, i, valid, dcol, D: tl.constexpr):
    return tl.load(
        q_ptr + (q_start + i)[:, None].to(tl.int64) * q_s0 + h[:, None] * q_s1 + dcol[None, :],
        mask=valid[:, None] & (dcol < D)[None, :],
        other=0.0,
    )


@triton.jit
def _load_k(k_ptr, k_s0, k_s1, idx_ptr, kv_start, t, tm, g, dcol, D: tl.constexpr):
    slot = tl.load(idx_ptr + kv_start + t, mask=tm, other=0).to(tl.int64)
    return tl.load(
        k_ptr + slot[:, None] * k_s0 + g * k_s1 + dcol[None, :],
        mask=tm[:, None] & (dcol < D)[None, :],
        other=0.0,
    )


@triton.jit
def _window_stats_kernel(
    q_ptr, q_s0, q_s1, q_indptr, k_ptr, k_s0, k_s1, idx_ptr, kv_indptr, stats_m, stats_l,
    num_kv_heads, n_splits, split_tokens, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, GQ: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr,
    NRC: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    pid1 = tl.program_id(1)
    s = tl.program_id(2)
    g = pid1 // NRC
    rc = pid1 % NRC
    kv_start = tl.load(kv_indptr + b).to(tl.int64)
    n = tl.load(kv_indptr + b + 1).to(tl.int64) - kv_start
    q_start = tl.load(q_indptr + b).to(tl.int64)
    w = tl.load(q_indptr + b + 1).to(tl.int64) - q_start
    r, h_local, i, valid, qpos = _rows(rc, w, n, ROWS, BLOCK_W, GQ)
    h = g * GQ + h_local
    dcol = tl.arange(0, BLOCK_D)
    q = _load_q(q_ptr, q_s0, q_s1, q_start, h, i, valid, dcol, D)
    if IEEE:
        q = q.to(tl.float32)
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    lsum = tl.zeros((ROWS,), tl.float32)
    t_begin = s.to(tl.int64) * split_tokens
    t_end = tl.minimum(t_begin + split_tokens, n)
    for t0 in range(t_begin, t_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N).to(tl.int64)
        tm = t < t_end
        k = _load_k(k_ptr, k_s0, k_s1, idx_ptr, kv_start, t, tm, g, dcol, D)
        if IEEE:
            k = k.to(tl.float32)
            sc = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            sc = tl.dot(q, tl.trans(k)) * qk_scale
        vis = valid[:, None] & tm[None, :] & (t[None, :] <= qpos[:, None])
        sc = tl.where(vis, sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        lsum = lsum * tl.exp2(m - m_safe) + tl.sum(tl.exp2(sc - m_safe[:, None]), axis=1)
        m = m_new
    base = ((b.to(tl.int64) * num_kv_heads + g) * (NRC * ROWS) + r) * n_splits + s
    tl.store(stats_m + base, m)
    tl.store(stats_l + base, lsum)


@triton.jit
def _window_scores_kernel(
    q_ptr, q_s0, q_s1, q_indptr, k_ptr, k_s0, k_s1, idx_ptr, kv_indptr, stats_m, stats_l,
    weights_ptr, weights_s0, out_ptr, out_s0,
    num_kv_heads, n_splits, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, GQ: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr,
    NRC: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    kb = tl.program_id(2)
    kv_start = tl.load(kv_indptr + b).to(tl.int64)
    n = tl.load(kv_indptr + b + 1).to(tl.int64) - kv_start
    q_start = tl.load(q_indptr + b).to(tl.int64)
    w = tl.load(q_indptr + b + 1).to(tl.int64) - q_start
    t0 = kb.to(tl.int64) * BLOCK_N
    if t0 < n:
        t = t0 + tl.arange(0, BLOCK_N).to(tl.int64)
        tm = t < n
        dcol = tl.arange(0, BLOCK_D)
        k = _load_k(k_ptr, k_s0, k_s1, idx_ptr, kv_start, t, tm, g, dcol, D)
        if IEEE:
            k = k.to(tl.float32)
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for rc in range(NRC):
            r, h_local, i, valid, qpos = _rows(rc, w, n, ROWS, BLOCK_W, GQ)
            h = g * GQ + h_local
            q = _load_q(q_ptr, q_s0, q_s1, q_start, h, i, valid, dcol, D)
            if IEEE:
                q = q.to(tl.float32)
            base = ((b.to(tl.int64) * num_kv_heads + g) * (NRC * ROWS) + r) * n_splits
            m = tl.full((ROWS,), float("-inf"), tl.float32)
            for s in range(n_splits):
                m = tl.maximum(m, tl.load(stats_m + base + s))
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            lsum = tl.zeros((ROWS,), tl.float32)
            for s in range(n_splits):
                lsum += tl.load(stats_l + base + s) * tl.exp2(tl.load(stats_m + base + s) - m_safe)
            inv = tl.where(lsum > 0, 1.0 / tl.where(lsum > 0, lsum, 1.0), 0.0)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            else:
                sc = tl.dot(q, tl.trans(k)) * qk_scale
            vis = valid[:, None] & tm[None, :] & (t[None, :] <= qpos[:, None])
            p = tl.where(vis, tl.exp2(sc - m_safe[:, None]) * inv[:, None], 0.0)
            if HAS_WEIGHTS:
                wt = tl.load(weights_ptr + h[:, None].to(tl.int64) * weights_s0 + kv_start + t[None, :], mask=vis, other=0.0)
                p = p * wt
            acc += tl.sum(p, axis=0)
        wf = tl.maximum(w, 1).to(tl.float32)
        tl.store(out_ptr + g.to(tl.int64) * out_s0 + kv_start + t, acc / wf, mask=tm)


@triton.jit
def _value_norms_kernel(
    v_ptr, v_s0, v_s1, idx_ptr, total, gram_ptr, out_ptr, out_s0,
    D: tl.constexpr, BLOCK_D: tl.constexpr, GQ: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    g = h // GQ
    t = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tm = t < total
    dcol = tl.arange(0, BLOCK_D)
    dm = dcol < D
    v = _load_k(v_ptr, v_s0, v_s1, idx_ptr, 0, t, tm, g, dcol, D).to(tl.float32)
    gram = tl.load(gram_ptr + h.to(tl.int64) * D * D + dcol[:, None] * D + dcol[None, :], mask=dm[:, None] & dm[None, :], other=0.0)
    vg = tl.dot(v, gram, input_precision="ieee")
    nrm2 = tl.sum(vg * v, axis=1)
    tl.store(out_ptr + h.to(tl.int64) * out_s0 + t, tl.sqrt(tl.maximum(nrm2, 0.0)), mask=tm)


def _check_layout(name_buf, buf, kv_indices, kv_indptr):
    check_tensor(name_buf, buf, dim=3, dtypes=FLOAT_DTYPES)
    if buf.stride(2) != 1:
        raise ValueError(f"{name_buf} must have a unit stride in head_dim")
    check_tensor("kv_indices", kv_indices, dim=1, dtypes=INDEX_DTYPES, device=buf.device, contiguous=True)
    check_tensor("kv_indptr", kv_indptr, dim=1, dtypes=INDEX_DTYPES, device=buf.device, contiguous=True)
    if kv_indptr.shape[0] < 1:
        raise ValueError("kv_indptr needs at least one element")


def _check_indices_content(buf_name, buf, kv_indices, kv_indptr):
    ip = kv_indptr.long().cpu()
    if int(ip[0]) < 0 or bool((ip[1:] < ip[:-1]).any()) or int(ip[-1]) > kv_indices.shape[0]:
        raise ValueError(f"kv_indptr must be non-decreasing within [0, {kv_indices.shape[0]}], got {ip.tolist()}")
    used = kv_indices[int(ip[0]): int(ip[-1])]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= buf.shape[0]):
        raise ValueError(f"kv_indices hold slots in [{int(used.min())}, {int(used.max())}], {buf_name} has {buf.shape[0]} slots")
    return ip


def window_scores(
    q: torch.Tensor,
    q_indptr: torch.Tensor,
    k_buffer: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
    *,
    scaling: float,
    max_kv_len: int,
    max_window: int,
    head_weights: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    split_tokens: int = 4096,
    block_n: int = 64,
    validate: bool = True,
) -> torch.Tensor:
    """Per-(kv head, token) window attention mass, float32 ``[kvh, len(kv_indices)]`` (see module doc).

    Args:
        q: ``[total_w, qh, d]`` window queries (post-RoPE), bf16/fp16/fp32, same dtype as ``k_buffer``.
        q_indptr: ``[bs+1]``; request ``b``'s window is ``q[q_indptr[b]:q_indptr[b+1]]``.
        k_buffer: ``[slots, kvh, d]`` one layer's key buffer (NHD); ``qh`` a multiple of ``kvh``.
        kv_indices, kv_indptr: the request's key slots in position order, ``[bs+1]`` offsets.
        scaling: softmax scale; max_kv_len / max_window: host ints bounding every ``n`` / ``w``
            (they size the grid; no device read).
        head_weights: optional float32 ``[qh, len(kv_indices)]`` (LaProx: ``value_output_norms``).
        out: optional float32 ``[kvh, len(kv_indices)]``; allocated otherwise.
        validate: content checks with one sync: indptr monotone and in range, slots in range,
            ``1 <= w <= n`` for every non-empty request (``w = n = 0`` allowed), n / w within the
            given maxima.
    """
    _check_layout("k_buffer", k_buffer, kv_indices, kv_indptr)
    check_tensor("q", q, dim=3, dtypes=(k_buffer.dtype,), device=k_buffer.device)
    if q.stride(2) != 1:
        raise ValueError("q must have a unit stride in head_dim")
    kvh, d = k_buffer.shape[1], k_buffer.shape[2]
    qh = q.shape[1]
    if q.shape[2] != d:
        raise ValueError(f"q head_dim {q.shape[2]} != k_buffer head_dim {d}")
    if qh % kvh != 0:
        raise ValueError(f"{qh} query heads is not a multiple of {kvh} kv heads")
    bs = kv_indptr.shape[0] - 1
    check_tensor("q_indptr", q_indptr, dtypes=INDEX_DTYPES, device=k_buffer.device, contiguous=True, shape=(bs + 1,))
    if not isinstance(scaling, (int, float)) or not (float(scaling) > 0):
        raise ValueError(f"scaling must be a positive float, got {scaling!r}")
    check_positive_int("max_kv_len", max_kv_len, 0)
    check_positive_int("max_window", max_window, 1)
    check_positive_int("split_tokens", split_tokens)
    check_positive_int("block_n", block_n, 16)
    if block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    total = kv_indices.shape[0]
    if head_weights is not None:
        check_tensor("head_weights", head_weights, dtypes=(torch.float32,), device=k_buffer.device, shape=(qh, total))
        if head_weights.stride(1) != 1:
            raise ValueError("head_weights must have a unit stride in its last dimension")
    if out is None:
        out = torch.empty((kvh, total), dtype=torch.float32, device=k_buffer.device)
    check_tensor("out", out, dtypes=(torch.float32,), device=k_buffer.device, shape=(kvh, total))
    if out.stride(1) != 1:
        raise ValueError("out must have a unit stride in its last dimension")
    if validate and bs > 0:
        ip = _check_indices_content("k_buffer", k_buffer, kv_indices, kv_indptr)
        qp = q_indptr.long().cpu()
        if int(qp[0]) < 0 or bool((qp[1:] < qp[:-1]).any()) or int(qp[-1]) > q.shape[0]:
            raise ValueError(f"q_indptr must be non-decreasing within [0, {q.shape[0]}], got {qp.tolist()}")
        for b in range(bs):
            n, w = int(ip[b + 1] - ip[b]), int(qp[b + 1] - qp[b])
            if n > max_kv_len or w > max_window:
                raise ValueError(f"request {b}: n={n}, w={w} exceed max_kv_len={max_kv_len} / max_window={max_window}")
            if (n == 0 and w != 0) or (n > 0 and not 1 <= w <= n):
                raise ValueError(f"request {b}: window {w} must be in [1, n={n}] (0 only for an empty request)")
    if bs == 0 or max_kv_len == 0:
        return out
    gq = qh // kvh
    block_w = triton.next_power_of_2(max_window)
    rows_total = gq * block_w
    rows = max(16, min(64, triton.next_power_of_2(rows_total)))
    nrc = triton.cdiv(rows_total, rows)
    block_d = max(16, triton.next_power_of_2(d))
    split_tokens = triton.cdiv(split_tokens, block_n) * block_n
    n_splits = triton.cdiv(max_kv_len, split_tokens)
    stats_m = torch.empty((bs, kvh, nrc * rows, n_splits), dtype=torch.float32, device=k_buffer.device)
    stats_l = torch.empty_like(stats_m)
    qk_scale = float(scaling) * LOG2E
    # float32 inputs: exact (ieee) dot. bf16 under TRITON_INTERPRET=1: triton 3.9's interpreter
    # computes bf16 tl.dot wrongly (checked), so tiles are upcast to float32 there; compiled GPU
    # code keeps the native bf16/fp16 tensor-core dot with float32 accumulation.
    ieee = k_buffer.dtype == torch.float32 or (
        k_buffer.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    )
    common = dict(D=d, BLOCK_D=block_d, GQ=gq, BLOCK_W=block_w, ROWS=rows, NRC=nrc, BLOCK_N=block_n, IEEE=ieee)
    _window_stats_kernel[(bs, kvh * nrc, n_splits)](
        q, q.stride(0), q.stride(1), q_indptr, k_buffer, k_buffer.stride(0), k_buffer.stride(1), kv_indices, kv_indptr,
        stats_m, stats_l, kvh, n_splits, split_tokens, qk_scale, **common,
    )
    w_arg = head_weights if head_weights is not None else out
    _window_scores_kernel[(bs, kvh, triton.cdiv(max_kv_len, block_n))](
        q, q.stride(0), q.stride(1), q_indptr, k_buffer, k_buffer.stride(0), k_buffer.stride(1), kv_indices, kv_indptr,
        stats_m, stats_l, w_arg, w_arg.stride(0), out, out.stride(0), kvh, n_splits, qk_scale,
        HAS_WEIGHTS=head_weights is not None, **common,
    )
    return out


def output_gram(o_proj_weight: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """``G[h] = W_h^T W_h`` float32 ``[qh, d, d]`` with ``W_h = W_o[:, h*d:(h+1)*d]`` (so
    ``||v W_h^T||^2 = v^T G[h] v``); computed in float64, once per layer."""
    check_tensor("o_proj_weight", o_proj_weight, dim=2, dtypes=FLOAT_DTYPES)
    hidden, cols = o_proj_weight.shape
    if cols % num_q_heads:
        raise ValueError(f"o_proj_weight has {cols} input columns, not a multiple of {num_q_heads} heads")
    d = cols // num_q_heads
    w = o_proj_weight.double().reshape(hidden, num_q_heads, d).permute(1, 0, 2)  # [qh, hidden, d]
    return (w.transpose(1, 2) @ w).float().contiguous()


def value_output_norms(
    v_buffer: torch.Tensor,
    kv_indices: torch.Tensor,
    o_proj_weight: torch.Tensor,
    *,
    num_q_heads: int,
    out: Optional[torch.Tensor] = None,
    gram: Optional[torch.Tensor] = None,
    block_n: int = 64,
    validate: bool = True,
) -> torch.Tensor:
    """LaProx weights ``||v[g(h), t] . W_o[:, h*d:(h+1)*d]^T||_2`` as float32 ``[qh, len(kv_indices)]``.

    ``v_buffer [slots, kvh, d]`` (one layer, NHD), ``kv_indices`` the token slots, ``o_proj_weight
    [hidden, qh*d]``; ``gram`` (from ``output_gram``) may be passed to skip recomputing it.
    ``validate=True`` checks the slots are inside ``v_buffer`` (one sync).
    """
    check_tensor("v_buffer", v_buffer, dim=3, dtypes=FLOAT_DTYPES)
    if v_buffer.stride(2) != 1:
        raise ValueError("v_buffer must have a unit stride in head_dim")
    check_tensor("kv_indices", kv_indices, dim=1, dtypes=INDEX_DTYPES, device=v_buffer.device, contiguous=True)
    check_positive_int("num_q_heads", num_q_heads)
    kvh, d = v_buffer.shape[1], v_buffer.shape[2]
    if num_q_heads % kvh:
        raise ValueError(f"{num_q_heads} query heads is not a multiple of {kvh} kv heads")
    check_tensor("o_proj_weight", o_proj_weight, dim=2, dtypes=FLOAT_DTYPES)
    if o_proj_weight.shape[1] != num_q_heads * d:
        raise ValueError(f"o_proj_weight {tuple(o_proj_weight.shape)} does not take {num_q_heads} heads x {d} dims")
    if gram is None:
        gram = output_gram(o_proj_weight, num_q_heads).to(v_buffer.device)
    check_tensor("gram", gram, dtypes=(torch.float32,), device=v_buffer.device, contiguous=True, shape=(num_q_heads, d, d))
    total = kv_indices.shape[0]
    if out is None:
        out = torch.empty((num_q_heads, total), dtype=torch.float32, device=v_buffer.device)
    check_tensor("out", out, dtypes=(torch.float32,), device=v_buffer.device, shape=(num_q_heads, total))
    if out.stride(1) != 1:
        raise ValueError("out must have a unit stride in its last dimension")
    if validate and total and (int(kv_indices.min()) < 0 or int(kv_indices.max()) >= v_buffer.shape[0]):
        raise ValueError(f"kv_indices hold slots outside [0, {v_buffer.shape[0]})")
    if total == 0:
        return out
    _value_norms_kernel[(triton.cdiv(total, block_n), num_q_heads)](
        v_buffer, v_buffer.stride(0), v_buffer.stride(1), kv_indices, total, gram, out, out.stride(0),
        D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), GQ=num_q_heads // kvh, BLOCK_N=block_n,
    )
    return out
