"""Bad input raises a clear ValueError before any launch (and leaves the mapping untouched)."""

import pytest
import torch

from kv_scenarios import held_mapping, make_batch, random_keep, random_kv
from sglang_depthkv.kernels import LayerKVBuffers, build_kv_indices, compact_kv, prune_kv

H, D = 2, 16


@pytest.fixture
def case():
    gen = torch.Generator().manual_seed(40)
    batch = make_batch([8, 5], gen)
    slots = [30, 30]
    mapping = held_mapping(batch, slots, gen)
    indptr, pos = random_keep(batch, 2, gen)
    freed = torch.zeros((2, 13), dtype=torch.int64)
    count = torch.zeros(2, dtype=torch.int32)
    return batch, slots, mapping, indptr, pos, freed, count, gen


def _prune(batch, mapping, indptr, pos, freed, count, **kw):
    args = dict(freed_slots=freed, freed_count=count, max_seq_len=8)
    args.update(kw)
    return prune_kv(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens, indptr, pos, **args)


def test_prune_bad_inputs(case):
    batch, slots, mapping, indptr, pos, freed, count, _ = case
    before = mapping.clone()
    with pytest.raises(ValueError, match="keep_indptr"):
        _prune(batch, mapping, indptr[:, :2], pos, freed, count)
    with pytest.raises(ValueError, match="mapping"):
        _prune(batch, mapping.float(), indptr, pos, freed, count)
    with pytest.raises(ValueError, match="seq_lens"):
        _prune(batch, mapping, indptr, pos, freed, count, max_seq_len=7)
    with pytest.raises(ValueError, match="freed_slots has room"):
        _prune(batch, mapping, indptr, pos, freed[:, :5], count)
    with pytest.raises(ValueError, match="freed_count"):
        _prune(batch, mapping, indptr, pos, freed, count.long())
    bad_pos = pos.clone()
    bad_pos[0] = 50
    with pytest.raises(ValueError, match="kept positions"):
        _prune(batch, mapping, indptr, bad_pos, freed, count)
    too_many = torch.tensor([[0, 9, 9], [9, 9, 9]])
    with pytest.raises(ValueError, match="keeps 9 tokens but the request has 8"):
        _prune(batch, mapping, too_many, torch.arange(9, dtype=torch.int32), freed, count)
    rpi = batch.req_pool_indices.clone()
    rpi[0] = 99
    with pytest.raises(ValueError, match="req_pool_indices"):
        prune_kv(mapping, batch.req_to_token, rpi, batch.seq_lens, indptr, pos, freed_slots=freed, freed_count=count,
                 max_seq_len=8)
    small = mapping[:, :10].contiguous()
    with pytest.raises(ValueError, match="mapping width"):
        _prune(batch, small, indptr, pos, freed, count)
    assert torch.equal(mapping, before)


def test_compact_bad_inputs(case):
    batch, slots, mapping, indptr, pos, freed, count, gen = case
    k = [random_kv((s, H, D), torch.float16, gen) for s in slots]
    v = [random_kv((s, H, D), torch.float16, gen) for s in slots]
    full = LayerKVBuffers([random_kv((batch.num_logical + 2, H, D), torch.float16, gen) for _ in slots],
                          [random_kv((batch.num_logical + 2, H, D), torch.float16, gen) for _ in slots])
    dst = LayerKVBuffers(k, v)
    n_keep = pos.shape[0]
    good = torch.zeros(n_keep, dtype=torch.int64)
    # unique ascending slots per layer: capacity is only 29 slots per layer, so keep it small
    for l in range(2):
        a, e = int(indptr[l, 0]), int(indptr[l, 2])
        good[a:e] = torch.arange(1, e - a + 1)
    kw = dict(source="logical", freed_slots=freed, freed_count=count, max_seq_len=8)
    call = lambda src, d, ds, **extra: compact_kv(src, d, mapping, batch.req_to_token, batch.req_pool_indices,
                                                  batch.seq_lens, indptr, pos, ds, **{**kw, **extra})
    with pytest.raises(ValueError, match="source must be"):
        call(full, dst, good, source="nowhere")
    with pytest.raises(ValueError, match="disagree"):
        call(full, LayerKVBuffers([t.float() for t in k], [t.float() for t in v]), good)
    with pytest.raises(ValueError, match="dst_slots"):
        call(full, dst, good[:-1])
    bad = good.clone()
    bad[0] = slots[0]
    with pytest.raises(ValueError, match="destination slots outside"):
        call(full, dst, bad)
    tiny = LayerKVBuffers([t[:3] for t in k], [t[:3] for t in v])
    with pytest.raises(ValueError, match="exceed the layer capacity|destination slots outside"):
        call(full, tiny, good)
    short = LayerKVBuffers([t[:5] for t in full.k], [t[:5] for t in full.v])
    with pytest.raises(ValueError, match="source slots outside"):
        call(short, dst, good)
    with pytest.raises(ValueError, match="same non-zero number"):
        LayerKVBuffers(k, v[:1])
    with pytest.raises(ValueError, match="H, D"):
        LayerKVBuffers([k[0], k[1][:, :1].contiguous()], v)


def test_index_streams_bad_inputs(case):
    batch, slots, mapping, *_ = case
    with pytest.raises(ValueError, match="seq_lens"):
        build_kv_indices(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens[:1])
    with pytest.raises(ValueError, match="out_indptr"):
        build_kv_indices(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                         out_indptr=torch.zeros((2, 2), dtype=torch.int32))
    with pytest.raises(ValueError, match="mapping width"):
        build_kv_indices(mapping[:, :4].contiguous(), batch.req_to_token, batch.req_pool_indices, batch.seq_lens)
