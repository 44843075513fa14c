"""Decode split-K counts for every layer in one launch.

SGLang's triton backend picks ``num_kv_splits[b]`` for a decode batch with
``get_num_kv_splits_triton`` (one program over the batch: the longest and shortest sequence, the
device's core count and the head layout set a chunk size; each row gets
``max(cdiv(len_b, chunk_1), cdiv(len_b, chunk_2))``). Over a per-layer pruned cache every layer has
its own lengths, so the rule runs once per layer: ``layer_kv_splits`` does all ``L`` rows in one
launch (program ``l`` = layer ``l``), with SGLang's arithmetic unchanged (no speculative groups:
``num_group = 1``). ``layer_kv_splits_ref`` is the same rule in plain Python, for tests.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .validation import check_row_major, check_tensor


@triton.jit
def _layer_kv_splits_kernel(
    splits_ptr, splits_stride, lens_ptr, lens_stride, num_seq, num_head, num_kv_head, max_kv_splits,
    device_core_count, MAX_NUM_SEQ: tl.constexpr,
):
    l = tl.program_id(0).to(tl.int64)
    offs_seq = tl.arange(0, MAX_NUM_SEQ)
    mask_seq = offs_seq < num_seq
    seq_lens = tl.load(lens_ptr + l * lens_stride + offs_seq, mask=mask_seq, other=0)
    max_seq_len = tl.max(seq_lens)
    seq_lens = tl.load(lens_ptr + l * lens_stride + offs_seq, mask=mask_seq, other=max_seq_len)
    min_seq_len = tl.min(seq_lens)
    if max_seq_len * 8 < min_seq_len * 10:
        min_seq_len = max_seq_len
    max_kv_splits_1 = tl.minimum(tl.cdiv(max_seq_len, min_seq_len), max_kv_splits)
    kv_chunk_size_1 = tl.cdiv(max_seq_len, max_kv_splits_1)
    ext_seq_len = tl.cast(max_seq_len, tl.float32) / 64.0
    ext_device_core_count = tl.cast(device_core_count * tl.maximum(tl.log2(ext_seq_len), 1.0), tl.int32)
    block_h, num_kv_group = 16, num_head // num_kv_head
    if num_kv_group == 1:
        token_grid = num_seq * num_head
    else:
        block_h = tl.minimum(block_h, num_kv_group)
        token_grid = num_seq * tl.cdiv(num_head, block_h)
    max_kv_splits_2 = tl.minimum(tl.cdiv(ext_device_core_count, token_grid), max_kv_splits)
    kv_chunk_size_2 = tl.cdiv(max_seq_len, max_kv_splits_2)
    num_kv_splits = tl.maximum(tl.cdiv(seq_lens, kv_chunk_size_1), tl.cdiv(seq_lens, kv_chunk_size_2))
    tl.store(splits_ptr + l * splits_stride + offs_seq, num_kv_splits, mask=mask_seq)


def layer_kv_splits(splits: torch.Tensor, lens: torch.Tensor, *, num_head: int, num_kv_head: int,
                    max_kv_splits: int, device_core_count: int) -> None:
    """Fill ``splits [L, >= bs]`` (int32) from ``lens [L, bs]`` (a layer's held lengths, all >= 1),
    row by row with SGLang's rule; ``device_core_count <= 0`` (no GPU) fills ``max_kv_splits`` as
    SGLang does. No host sync, one launch."""
    check_tensor("splits", splits, dim=2, dtypes=(torch.int32,))
    check_tensor("lens", lens, dim=2, dtypes=(torch.int32, torch.int64), device=splits.device)
    check_row_major("splits", splits)
    check_row_major("lens", lens)
    L, bs = lens.shape
    if splits.shape[0] != L or splits.shape[1] < bs:
        raise ValueError(f"splits {tuple(splits.shape)} cannot hold lens {tuple(lens.shape)}")
    if device_core_count <= 0:
        splits.fill_(max_kv_splits)
        return
    if bs == 0:
        return
    sched = 256 if bs < 256 else triton.next_power_of_2(bs)
    _layer_kv_splits_kernel[(L,)](splits, splits.stride(0), lens, lens.stride(0), bs, num_head, num_kv_head,
                                  max_kv_splits, device_core_count, MAX_NUM_SEQ=sched)


def layer_kv_splits_ref(lens, *, num_head: int, num_kv_head: int, max_kv_splits: int,
                        device_core_count: int) -> list:
    """The same rule in plain Python over ``lens`` (list of per-layer lists); float32 log2 as the kernel."""
    out = []
    for row in lens:
        if device_core_count <= 0:
            out.append([max_kv_splits] * len(row))
            continue
        mx, mn = max(row), min(row)
        if mx * 8 < mn * 10:
            mn = mx
        s1 = min(-(-mx // mn), max_kv_splits)
        c1 = -(-mx // s1)
        ext = float(torch.tensor(mx, dtype=torch.float32) / 64.0)
        lg = float(torch.log2(torch.tensor(ext, dtype=torch.float32)))
        ext_cores = int(float(torch.tensor(device_core_count * max(lg, 1.0), dtype=torch.float32)))
        group = num_head // num_kv_head
        grid = len(row) * num_head if group == 1 else len(row) * math.ceil(num_head / min(16, group))
        s2 = min(-(-ext_cores // grid), max_kv_splits)
        c2 = -(-mx // s2)
        out.append([max(-(-n // c1), -(-n // c2)) for n in row])
    return out
