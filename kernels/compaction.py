"""Per-layer KV compaction and pruning for a batch, all layers in one launch.

Memory model (SGLang 0.5.17, page_size 1): layer ``l`` has its own K/V buffers ``[slots_l, H, D]``
(``LayerKVBuffers``) and ``mapping[l, logical_id]`` = layer-``l`` slot, 0 = not held (logical id 0
and slot 0 are dummies). A request ``b`` owns logical ids ``req_to_token[req_pool_indices[b], :seq_lens[b]]``.

Keep sets: for layer ``l`` and request ``b`` the kept *positions* (0-based, strictly ascending, each
< ``seq_lens[b]``) are ``keep_positions[keep_indptr[l, b] : keep_indptr[l, b + 1]]``.

``prune_kv`` (no copy): kept tokens stay in their slots; for every position not kept whose logical
id is held at layer ``l``, the slot is appended to ``freed_slots[l]`` and ``mapping[l, id]`` set to 0.

``compact_kv`` (copy): kept token ``j`` of segment ``(l, b)`` is copied from its source slot to
``dst_slots[j]`` (the caller allocated them; strictly ascending within a segment, disjoint across
segments of a layer) in ``dst`` layer ``l``, and ``mapping[l, id] = dst_slots[j]``; dropped tokens
get ``mapping = 0``. Source slot: ``source="logical"`` -> the logical id itself (SGLang's full
prefill buffer, indexed by ``out_cache_loc``); ``source="mapping"`` -> the current
``mapping[l, id]`` (moving within the layer's own buffers; ``dst`` may be the very same tensors as
``src``). Freed slots: every slot previously held by the segment (``mapping[l, id] != 0`` before the
call) that is not among the segment's ``dst_slots``.

In-place (``dst`` shares storage with ``src`` at some layer): the kernel then
runs one program per (layer, request), walks positions in ascending order and loads a block's rows
before storing them (with a barrier). This is correct iff no destination slot of kept token ``j``
is the source slot of a kept token ``k > j`` of the same segment, nor a source slot of another
segment (e.g. compaction towards lower slots: both ascending and ``dst_j <= src_j``); checked when
``validate=True``.

Freed-slot output: ``freed_slots [L, F]`` (int32/int64) and ``freed_count [L]`` int32, zeroed here
and filled with atomics (order within a layer unspecified; sort if needed). No host sync: slots past
``F`` are not written but still counted, so ``freed_count[l] > F`` tells the caller it overflowed
(``validate=True`` checks ``F`` against ``sum(seq_lens)`` up front).

One launch: grid ``(L, bs, chunks)``; ``chunks = cdiv(max_seq_len, chunk_tokens)`` when not in-place,
1 otherwise. ``max_seq_len`` (host int, >= every seq len) sizes the grid without reading device data.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .layer_buffers import LayerKVBuffers, bitcopy_type
from .validation import (
    INDEX_DTYPES,
    check_batch_metadata,
    check_positive_int,
    check_row_major,
    check_tensor,
    gather_request_ids,
    check_ids_in_mapping,
)


@triton.jit
def _lower_bound(base_ptr, start, count, value, mask, steps):
    """Vectorised lower_bound of ``value`` in the ascending ``base_ptr[start : start + count]``."""
    lo = tl.zeros_like(value)
    hi = tl.zeros_like(value) + count
    for _ in range(steps):
        active = (lo < hi) & mask
        mid = (lo + hi) // 2
        v = tl.load(base_ptr + start + mid, mask=active, other=0).to(tl.int64)
        right = v < value
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (~right), mid, hi)
    return lo


@triton.jit
def _prune_compact_kernel(
    src_k_ptrs,
    src_v_ptrs,
    dst_k_ptrs,
    dst_v_ptrs,
    mapping_ptr,
    mapping_stride,
    req_to_token_ptr,
    req_to_token_stride,
    req_pool_indices_ptr,
    seq_lens_ptr,
    keep_indptr_ptr,
    keep_indptr_stride,
    keep_pos_ptr,
    dst_slots_ptr,
    freed_ptr,
    freed_stride,
    freed_cap,
    freed_count_ptr,
    chunk_tokens,
    search_steps,
    ROW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ELEM: tl.constexpr,
    MOVE: tl.constexpr,
    SRC_FROM_MAPPING: tl.constexpr,
    ORDERED: tl.constexpr,
):
    l = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.program_id(2)
    n = tl.load(seq_lens_ptr + b).to(tl.int64)
    row = tl.load(req_pool_indices_ptr + b).to(tl.int64)
    k0 = tl.load(keep_indptr_ptr + l * keep_indptr_stride + b).to(tl.int64)
    k1 = tl.load(keep_indptr_ptr + l * keep_indptr_stride + b + 1).to(tl.int64)
    nk = k1 - k0
    start = c.to(tl.int64) * chunk_tokens
    end = tl.minimum(start + chunk_tokens, n)
    map_row = mapping_ptr + l.to(tl.int64) * mapping_stride
    if MOVE:
        sk = tl.load(src_k_ptrs + l).to(tl.pointer_type(ELEM))
        sv = tl.load(src_v_ptrs + l).to(tl.pointer_type(ELEM))
        dk = tl.load(dst_k_ptrs + l).to(tl.pointer_type(ELEM))
        dv = tl.load(dst_v_ptrs + l).to(tl.pointer_type(ELEM))
    for t0 in range(start, end, BLOCK_T):
        p = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        pm = p < end
        ids = tl.load(req_to_token_ptr + row * req_to_token_stride + p, mask=pm, other=0).to(tl.int64)
        old = tl.load(map_row + ids, mask=pm, other=0).to(tl.int64)
        j = _lower_bound(keep_pos_ptr, k0, nk, p, pm, search_steps)
        found = pm & (j < nk)
        kp = tl.load(keep_pos_ptr + k0 + j, mask=found, other=-1).to(tl.int64)
        kept = found & (kp == p)
        if MOVE:
            d = tl.load(dst_slots_ptr + k0 + j, mask=kept, other=0).to(tl.int64)
            if SRC_FROM_MAPPING:
                s = old
            else:
                s = ids
            for r0 in range(0, ROW, BLOCK_R):
                col = r0 + tl.arange(0, BLOCK_R)
                m2 = kept[:, None] & (col < ROW)[None, :]
                kvals = tl.load(sk + s[:, None] * ROW + col[None, :], mask=m2)
                vvals = tl.load(sv + s[:, None] * ROW + col[None, :], mask=m2)
                if ORDERED:
                    tl.debug_barrier()
                tl.store(dk + d[:, None] * ROW + col[None, :], kvals, mask=m2)
                tl.store(dv + d[:, None] * ROW + col[None, :], vvals, mask=m2)
                if ORDERED:
                    tl.debug_barrier()
            jd = _lower_bound(dst_slots_ptr, k0, nk, old, pm & (old != 0), search_steps)
            dfound = pm & (old != 0) & (jd < nk)
            dval = tl.load(dst_slots_ptr + k0 + jd, mask=dfound, other=-1).to(tl.int64)
            is_dst = dfound & (dval == old)
            freed = pm & (old != 0) & (~is_dst)
            new = tl.where(kept, d, 0)
            tl.store(map_row + ids, new.to(mapping_ptr.dtype.element_ty), mask=pm)
        else:
            freed = pm & (old != 0) & (~kept)
            tl.store(map_row + ids, tl.zeros_like(old).to(mapping_ptr.dtype.element_ty), mask=freed)
        fi = freed.to(tl.int32)
        cnt = tl.sum(fi, axis=0)
        if cnt > 0:
            base = tl.atomic_add(freed_count_ptr + l, cnt)
            off = (base + tl.cumsum(fi, axis=0) - 1).to(tl.int64)
            tl.store(
                freed_ptr + l.to(tl.int64) * freed_stride + off,
                old.to(freed_ptr.dtype.element_ty),
                mask=freed & (off < freed_cap),
            )


def _check_common(mapping, req_to_token, req_pool_indices, seq_lens, keep_indptr, keep_positions,
                  freed_slots, freed_count, max_seq_len, num_layers, validate):
    check_tensor("mapping", mapping, dim=2, dtypes=INDEX_DTYPES)
    check_row_major("mapping", mapping)
    device = mapping.device
    if num_layers is not None and mapping.shape[0] != num_layers:
        raise ValueError(f"mapping has {mapping.shape[0]} layer rows, buffers have {num_layers} layers")
    L = mapping.shape[0]
    check_positive_int("max_seq_len", max_seq_len, 0)
    bs = check_batch_metadata(req_to_token, req_pool_indices, seq_lens, device, validate, max_seq_len)
    check_tensor("keep_indptr", keep_indptr, dim=2, dtypes=INDEX_DTYPES, device=device, shape=(L, bs + 1))
    check_row_major("keep_indptr", keep_indptr)
    check_tensor("keep_positions", keep_positions, dim=1, dtypes=INDEX_DTYPES, device=device, contiguous=True)
    check_tensor("freed_slots", freed_slots, dim=2, dtypes=INDEX_DTYPES, device=device, shape=(L, None))
    check_row_major("freed_slots", freed_slots)
    check_tensor("freed_count", freed_count, dtypes=(torch.int32,), device=device, contiguous=True, shape=(L,))
    return L, bs


def _check_segments(mapping, req_to_token, req_pool_indices, seq_lens, keep_indptr, keep_positions, freed_slots):
    """Content checks shared by prune and compact; returns (ids per request, lens, indptr list)."""
    L = mapping.shape[0]
    lens = seq_lens.long().tolist()
    ids = gather_request_ids(req_to_token, req_pool_indices, seq_lens)
    check_ids_in_mapping(ids, mapping.shape[1])
    if ids:
        allids = torch.cat(ids)
        if allids.numel() != torch.unique(allids).numel():
            raise ValueError("a logical id appears twice among the batch's tokens (shared prefixes must not be pruned twice)")
    if sum(lens) > freed_slots.shape[1]:
        raise ValueError(f"freed_slots has room for {freed_slots.shape[1]} slots per layer, the batch holds up to {sum(lens)}")
    ip = keep_indptr.long().cpu()
    npos = keep_positions.shape[0]
    kp = keep_positions.long().cpu()
    for l in range(L):
        for b, n in enumerate(lens):
            a, e = int(ip[l, b]), int(ip[l, b + 1])
            if not (0 <= a <= e <= npos):
                raise ValueError(f"keep_indptr[{l}, {b}:{b + 2}] = [{a}, {e}] is not a valid range of keep_positions (length {npos})")
            if e - a > n:
                raise ValueError(f"layer {l} request {b}: keeps {e - a} tokens but the request has {n}")
            seg = kp[a:e]
            if seg.numel():
                if int(seg.min()) < 0 or int(seg.max()) >= n:
                    raise ValueError(f"layer {l} request {b}: kept positions outside [0, {n})")
                if seg.numel() > 1 and not bool((seg[1:] > seg[:-1]).all()):
                    raise ValueError(f"layer {l} request {b}: kept positions must be strictly ascending")
    return ids, lens, ip


def _launch(src, dst, mapping, req_to_token, req_pool_indices, seq_lens, keep_indptr, keep_positions,
            dst_slots, freed_slots, freed_count, max_seq_len, chunk_tokens, move, src_from_mapping, ordered,
            row_elems, elem):
    L = mapping.shape[0]
    bs = req_pool_indices.shape[0]
    freed_count.zero_()
    if bs == 0 or max_seq_len == 0:
        return
    if ordered:
        chunk_tokens = max_seq_len
    chunks = triton.cdiv(max_seq_len, chunk_tokens)
    steps = max(1, int(max_seq_len).bit_length() + 1)
    block_r = min(triton.next_power_of_2(max(row_elems, 1)), 1024)
    block_t = 32 if move else 256
    dummy = mapping
    _prune_compact_kernel[(L, bs, chunks)](
        src.k_ptrs if move else dummy,
        src.v_ptrs if move else dummy,
        dst.k_ptrs if move else dummy,
        dst.v_ptrs if move else dummy,
        mapping,
        mapping.stride(0),
        req_to_token,
        req_to_token.stride(0),
        req_pool_indices,
        seq_lens,
        keep_indptr,
        keep_indptr.stride(0),
        keep_positions,
        dst_slots if move else keep_positions,
        freed_slots,
        freed_slots.stride(0),
        freed_slots.shape[1],
        freed_count,
        chunk_tokens,
        steps,
        ROW=row_elems,
        BLOCK_R=block_r,
        BLOCK_T=block_t,
        ELEM=elem,
        MOVE=move,
        SRC_FROM_MAPPING=src_from_mapping,
        ORDERED=ordered,
    )


def prune_kv(
    mapping: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    keep_indptr: torch.Tensor,
    keep_positions: torch.Tensor,
    *,
    freed_slots: torch.Tensor,
    freed_count: torch.Tensor,
    max_seq_len: int,
    chunk_tokens: int = 4096,
    validate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure prune, no copy (see module doc). Returns ``(freed_slots, freed_count)`` (the out tensors).

    Args: ``mapping [L, M]`` int32/int64 (updated in place), ``req_to_token [R, W]``,
    ``req_pool_indices [bs]``, ``seq_lens [bs]``, ``keep_indptr [L, bs+1]``, ``keep_positions [K]``,
    ``freed_slots [L, F]``, ``freed_count [L]`` int32, ``max_seq_len`` (host int >= every seq len).
    ``validate=True`` also checks (with one sync): request rows / seq lens / ids / kept positions in
    range, kept positions strictly ascending, no logical id in two requests, F >= sum(seq_lens),
    and every kept token actually held at its layer.
    """
    L, bs = _check_common(mapping, req_to_token, req_pool_indices, seq_lens, keep_indptr, keep_positions,
                          freed_slots, freed_count, max_seq_len, None, validate)
    check_positive_int("chunk_tokens", chunk_tokens)
    if validate and bs:
        ids, lens, ip = _check_segments(mapping, req_to_token, req_pool_indices, seq_lens, keep_indptr,
                                        keep_positions, freed_slots)
        _check_kept_held(mapping, ids, ip, keep_positions)
    _launch(None, None, mapping, req_to_token, req_pool_indices, seq_lens, keep_indptr, keep_positions, None,
            freed_slots, freed_count, max_seq_len, chunk_tokens, False, False, False, 1, tl.int32)
    return freed_slots, freed_count


def _check_kept_held(mapping, ids, ip, keep_positions):
    kp = keep_positions.long()
    for l in range(mapping.shape[0]):
        for b, rid in enumerate(ids):
            seg = kp[int(ip[l, b]):int(ip[l, b + 1])]
            if seg.numel() and bool((mapping[l, rid[seg]] == 0).any()):
                raise ValueError(f"layer {l} request {b}: a kept position is not held at this layer (mapping is 0)")


def compact_kv(
    src: LayerKVBuffers,
    dst: LayerKVBuffers,
    mapping: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    keep_indptr: torch.Tensor,
    keep_positions: torch.Tensor,
    dst_slots: torch.Tensor,
    *,
    source: str,
    freed_slots: torch.Tensor,
    freed_count: torch.Tensor,
    max_seq_len: int,
    chunk_tokens: int = 1024,
    validate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Copy kept K/V rows into ``dst_slots`` of each layer, rewrite the mapping, report freed slots.

    See the module doc for the semantics. Extra arguments over ``prune_kv``: ``src``/``dst``
    (``LayerKVBuffers`` with the same L, H, D, dtype as each other and ``mapping``'s L),
    ``dst_slots [K]`` (aligned with ``keep_positions``), ``source`` in {"logical", "mapping"}.
    ``validate=True`` additionally checks: source slots in ``[1, src.slots[l])`` (logical ids must
    exist in the source buffer), destination slots in ``[1, dst.slots[l])``, strictly ascending per
    segment and disjoint across segments, per-layer kept totals <= the layer's capacity
    (``dst.slots[l] - 1``), and the in-place ordering rule when ``dst`` shares storage with ``src``.
    Returns ``(freed_slots, freed_count)``.
    """
    if source not in ("logical", "mapping"):
        raise ValueError(f"source must be 'logical' or 'mapping', got {source!r}")
    if not isinstance(src, LayerKVBuffers) or not isinstance(dst, LayerKVBuffers):
        raise ValueError("src and dst must be LayerKVBuffers")
    if (src.num_layers, src.num_heads, src.head_dim, src.dtype) != (dst.num_layers, dst.num_heads, dst.head_dim, dst.dtype):
        raise ValueError(
            f"src (L={src.num_layers}, H={src.num_heads}, D={src.head_dim}, {src.dtype}) and dst "
            f"(L={dst.num_layers}, H={dst.num_heads}, D={dst.head_dim}, {dst.dtype}) disagree"
        )
    if src.device != dst.device or mapping.device != src.device:
        raise ValueError(f"src ({src.device}), dst ({dst.device}) and mapping ({mapping.device}) must share a device")
    L, bs = _check_common(mapping, req_to_token, req_pool_indices, seq_lens, keep_indptr, keep_positions,
                          freed_slots, freed_count, max_seq_len, src.num_layers, validate)
    check_tensor("dst_slots", dst_slots, dtypes=INDEX_DTYPES, device=mapping.device, contiguous=True,
                 shape=(keep_positions.shape[0],))
    check_positive_int("chunk_tokens", chunk_tokens)
    shared = dst.same_storage_as(src)
    ordered = any(shared)
    if validate and bs:
        ids, lens, ip = _check_segments(mapping, req_to_token, req_pool_indices, seq_lens, keep_indptr,
                                        keep_positions, freed_slots)
        if source == "mapping":
            _check_kept_held(mapping, ids, ip, keep_positions)
        _check_move(src, dst, mapping, ids, ip, keep_positions, dst_slots, source, shared)
    _launch(src, dst, mapping, req_to_token, req_pool_indices, seq_lens, keep_indptr, keep_positions, dst_slots,
            freed_slots, freed_count, max_seq_len, chunk_tokens, True, source == "mapping", ordered,
            src.row_elems, bitcopy_type(src.dtype))
    return freed_slots, freed_count


def _check_move(src, dst, mapping, ids, ip, keep_positions, dst_slots, source, shared):
    kp = keep_positions.long()
    ds = dst_slots.long()
    for l in range(mapping.shape[0]):
        cap = dst.slots[l] - 1
        total = 0
        dsts, srcs, owners = [], [], []
        for b, rid in enumerate(ids):
            a, e = int(ip[l, b]), int(ip[l, b + 1])
            total += e - a
            if e == a:
                continue
            seg_d = ds[a:e]
            if int(seg_d.min()) < 1 or int(seg_d.max()) >= dst.slots[l]:
                raise ValueError(f"layer {l} request {b}: destination slots outside [1, {dst.slots[l]})")
            if seg_d.numel() > 1 and not bool((seg_d[1:] > seg_d[:-1]).all()):
                raise ValueError(f"layer {l} request {b}: destination slots must be strictly ascending")
            tok = rid[kp[a:e]]
            seg_s = mapping[l, tok].long() if source == "mapping" else tok
            if int(seg_s.min()) < 1 or int(seg_s.max()) >= src.slots[l]:
                raise ValueError(f"layer {l} request {b}: source slots outside [1, {src.slots[l]}) of the source buffer")
            dsts.append(seg_d)
            srcs.append(seg_s)
            owners.append(torch.full_like(seg_d, b))
        if total > cap:
            raise ValueError(f"layer {l}: {total} kept tokens exceed the layer capacity {cap}")
        if not dsts:
            continue
        alld = torch.cat(dsts)
        if torch.unique(alld).numel() != alld.numel():
            raise ValueError(f"layer {l}: a destination slot is used twice")
        if shared[l]:
            alls, allo = torch.cat(srcs), torch.cat(owners)
            rank = torch.arange(alls.numel(), device=alls.device)
            # reverse map: source slot -> (global kept index)
            rev = torch.full((max(src.slots[l], dst.slots[l]),), -1, dtype=torch.long, device=alls.device)
            rev[alls] = rank
            hit = rev[alld]
            bad = (hit >= 0) & ((hit > rank) | (allo[hit.clamp(min=0)] != allo))
            if bool(bad.any()):
                raise ValueError(
                    f"layer {l}: in-place compaction would overwrite a source slot before it is read "
                    "(a destination equals the source of a later kept token or of another request)"
                )
