"""Per-layer (or per layer-group) FlashInfer / Triton-backend index streams in one launch.

Generalises SGLang's ``create_flashinfer_kv_indices_triton``: for every mapping row ``g`` (a layer or
a group of layers with equal budgets) and request ``b``,

    kv_indices[g, kv_indptr[g, b] : kv_indptr[g, b + 1]] =
        [mapping[g, req_to_token[req_pool_indices[b], p]] for p in range(seq_lens[b]) if that != 0]

i.e. the layer-``g`` slots of the tokens the layer still holds, in position order, skipping pruned
tokens; ``kv_indptr[g]`` is the exclusive prefix sum of the kept lengths. With page_size 1 this is
exactly what ``BatchDecodeWithPagedKVCacheWrapper.plan(indptr, indices, last_page_len=ones, ...)``
and the Triton backend take for layer ``g``'s buffer ``[slots_g, H, D]``.

Two ways to get the kept lengths ``[G, bs]``:
- ``kept_lens`` given (known on the host in advance, e.g. from the allocator): one launch, each
  program sums its own prefix of ``kept_lens[g, :b]`` so there is no separate device prefix sum;
- ``kept_lens=None``: counted on the device (a counting launch, then the fill launch), written to
  ``kept_lens_out`` if given. No host sync in either mode.

Outputs are preallocated-friendly (``out_indptr [G, bs+1]`` int32, ``out_indices [G, cap]`` int32),
so nothing is allocated inside when they are passed (CUDA graphs). Only ``min(count, kept_lens)``
entries are written per segment, never past ``cap``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .validation import (
    INDEX_DTYPES,
    check_batch_metadata,
    check_ids_in_mapping,
    check_positive_int,
    check_row_major,
    check_tensor,
    gather_request_ids,
)


@triton.jit
def _count_held_kernel(
    mapping_ptr, mapping_stride, req_to_token_ptr, req_to_token_stride, req_pool_indices_ptr, seq_lens_ptr,
    kept_ptr, kept_stride, BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    b = tl.program_id(1)
    n = tl.load(seq_lens_ptr + b).to(tl.int64)
    row = tl.load(req_pool_indices_ptr + b).to(tl.int64)
    map_row = mapping_ptr + g.to(tl.int64) * mapping_stride
    total = tl.zeros((), dtype=tl.int32)
    for t0 in range(0, n, BLOCK):
        p = t0 + tl.arange(0, BLOCK).to(tl.int64)
        pm = p < n
        ids = tl.load(req_to_token_ptr + row * req_to_token_stride + p, mask=pm, other=0).to(tl.int64)
        slot = tl.load(map_row + ids, mask=pm, other=0)
        total += tl.sum((pm & (slot != 0)).to(tl.int32), axis=0)
    tl.store(kept_ptr + g * kept_stride + b, total)


@triton.jit
def _fill_indices_kernel(
    mapping_ptr, mapping_stride, req_to_token_ptr, req_to_token_stride, req_pool_indices_ptr, seq_lens_ptr,
    kept_ptr, kept_stride, indptr_ptr, indptr_stride, indices_ptr, indices_stride, cap,
    BLOCK: tl.constexpr, BLOCK_BS: tl.constexpr,
):
    g = tl.program_id(0)
    b = tl.program_id(1)
    kept_row = kept_ptr + g * kept_stride
    acc = tl.zeros((), dtype=tl.int64)
    for i0 in range(0, b, BLOCK_BS):
        o = i0 + tl.arange(0, BLOCK_BS)
        acc += tl.sum(tl.load(kept_row + o, mask=o < b, other=0).to(tl.int64), axis=0)
    limit = tl.load(kept_row + b).to(tl.int64)
    if b == 0:
        tl.store(indptr_ptr + g * indptr_stride, tl.zeros((), dtype=indptr_ptr.dtype.element_ty))
    tl.store(indptr_ptr + g * indptr_stride + b + 1, (acc + limit).to(indptr_ptr.dtype.element_ty))
    n = tl.load(seq_lens_ptr + b).to(tl.int64)
    row = tl.load(req_pool_indices_ptr + b).to(tl.int64)
    map_row = mapping_ptr + g.to(tl.int64) * mapping_stride
    out_row = indices_ptr + g.to(tl.int64) * indices_stride
    written = tl.zeros((), dtype=tl.int64)
    for t0 in range(0, n, BLOCK):
        p = t0 + tl.arange(0, BLOCK).to(tl.int64)
        pm = p < n
        ids = tl.load(req_to_token_ptr + row * req_to_token_stride + p, mask=pm, other=0).to(tl.int64)
        slot = tl.load(map_row + ids, mask=pm, other=0)
        held = pm & (slot != 0)
        hi = held.to(tl.int64)
        pos = written + tl.cumsum(hi, axis=0) - 1
        dst = acc + pos
        tl.store(out_row + dst, slot.to(indices_ptr.dtype.element_ty), mask=held & (pos < limit) & (dst < cap))
        written += tl.sum(hi, axis=0)


def build_kv_indices(
    mapping: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    kept_lens: Optional[torch.Tensor] = None,
    out_indptr: Optional[torch.Tensor] = None,
    out_indices: Optional[torch.Tensor] = None,
    kept_lens_out: Optional[torch.Tensor] = None,
    capacity: Optional[int] = None,
    min_kept: int = 0,
    validate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Build ``(kv_indptr [G, bs+1], kv_indices [G, cap])`` for all mapping rows in one launch.

    Args:
        mapping: ``[G, M]`` int32/int64, 0 = pruned/not held (a layer's or a layer group's row).
        req_to_token, req_pool_indices, seq_lens: SGLang's batch tensors (``[R, W]``, ``[bs]``, ``[bs]``).
        kept_lens: ``[G, bs]`` int32/int64 on the device: number of held tokens per (row, request); if
            ``None`` they are counted on the device (two launches) into ``kept_lens_out`` (int32
            ``[G, bs]``, allocated if not given).
        out_indptr: int32/int64 ``[G, bs+1]``; out_indices: int32/int64 ``[G, cap]``. Allocated
            (int32) when not given; then ``capacity`` (host int) sets ``cap``, default
            ``bs * req_to_token.shape[1]``.
        min_kept: with ``kept_lens=None``, counted lengths below it are raised to it before the fill
            (CUDA-graph padded rows: length 1, reading whatever the buffer holds there).
        validate: content checks with one sync: request rows, seq lens <= req_to_token width, ids
            inside the mapping width, and with ``kept_lens`` given, that each equals the actual
            held count and that ``sum(kept_lens[g]) <= cap``.
    """
    check_tensor("mapping", mapping, dim=2, dtypes=INDEX_DTYPES)
    check_row_major("mapping", mapping)
    device = mapping.device
    G = mapping.shape[0]
    bs = check_batch_metadata(req_to_token, req_pool_indices, seq_lens, device, validate)
    if kept_lens is not None:
        check_tensor("kept_lens", kept_lens, dtypes=INDEX_DTYPES, device=device, shape=(G, bs))
        check_row_major("kept_lens", kept_lens)
    if kept_lens_out is not None:
        check_tensor("kept_lens_out", kept_lens_out, dtypes=(torch.int32,), device=device, shape=(G, bs))
        check_row_major("kept_lens_out", kept_lens_out)
    if out_indptr is None:
        out_indptr = torch.empty((G, bs + 1), dtype=torch.int32, device=device)
    check_tensor("out_indptr", out_indptr, dtypes=INDEX_DTYPES, device=device, shape=(G, bs + 1))
    check_row_major("out_indptr", out_indptr)
    if out_indices is None:
        cap = capacity if capacity is not None else bs * req_to_token.shape[1]
        check_positive_int("capacity", cap, 0)
        out_indices = torch.empty((G, cap), dtype=torch.int32, device=device)
    elif capacity is not None and capacity != out_indices.shape[1]:
        raise ValueError(f"capacity {capacity} disagrees with out_indices width {out_indices.shape[1]}")
    check_tensor("out_indices", out_indices, dim=2, dtypes=INDEX_DTYPES, device=device, shape=(G, None))
    check_row_major("out_indices", out_indices)
    cap = out_indices.shape[1]
    if validate and bs:
        ids = gather_request_ids(req_to_token, req_pool_indices, seq_lens)
        check_ids_in_mapping(ids, mapping.shape[1])
        if kept_lens is not None:
            actual = torch.stack([(mapping[:, i] != 0).sum(dim=1) for i in ids], dim=1)  # [G, bs]
            if not torch.equal(actual.cpu(), kept_lens.long().cpu()):
                bad = (actual.cpu() != kept_lens.long().cpu()).nonzero()[0].tolist()
                raise ValueError(
                    f"kept_lens[{bad[0]}, {bad[1]}] = {int(kept_lens[bad[0], bad[1]])} but the mapping holds "
                    f"{int(actual[bad[0], bad[1]])} tokens of that request"
                )
            worst = int(kept_lens.long().sum(dim=1).max())
            if worst > cap:
                raise ValueError(f"kv_indices capacity {cap} < {worst} kept tokens of one layer")
    if bs == 0:
        out_indptr.zero_()
        return out_indptr, out_indices
    grid = (G, bs)
    if kept_lens is None:
        if kept_lens_out is None:
            kept_lens_out = torch.empty((G, bs), dtype=torch.int32, device=device)
        _count_held_kernel[grid](
            mapping, mapping.stride(0), req_to_token, req_to_token.stride(0), req_pool_indices, seq_lens,
            kept_lens_out, kept_lens_out.stride(0), BLOCK=512,
        )
        if min_kept > 0:
            kept_lens_out.clamp_(min=int(min_kept))
        kept_lens = kept_lens_out
    _fill_indices_kernel[grid](
        mapping, mapping.stride(0), req_to_token, req_to_token.stride(0), req_pool_indices, seq_lens,
        kept_lens, kept_lens.stride(0), out_indptr, out_indptr.stride(0), out_indices, out_indices.stride(0), cap,
        BLOCK=512, BLOCK_BS=128,
    )
    return out_indptr, out_indices
