"""build_kv_indices (Triton, interpreter on CPU) against the torch reference and SGLang's own kernel."""

import pytest
import torch

from kv_scenarios import held_mapping, make_batch
from sglang_depthkv.kernels import build_kv_indices
from sglang_depthkv.kernels.index_streams_ref import build_kv_indices_ref

POISON = -5


def _pruned_mapping(batch, slots, gen, dtype=torch.int32):
    m = held_mapping(batch, slots, gen, dtype=dtype)
    drop = torch.rand(m.shape, generator=gen) < 0.4
    m[drop] = 0
    if len(batch.ids) > 1 and batch.ids[1].numel():
        m[1, batch.ids[1]] = 0  # request 1 fully pruned at layer 1
    return m


def _check(indptr, indices, ref_indptr, ref_streams):
    assert torch.equal(indptr.long().cpu(), ref_indptr)
    for g, stream in enumerate(ref_streams):
        n = stream.numel()
        assert torch.equal(indices[g, :n].long().cpu(), stream), f"row {g}"
        assert bool((indices[g, n:] == POISON).all()), f"row {g}: wrote past the stream"


@pytest.mark.parametrize("host_lens", [True, False])
@pytest.mark.parametrize("map_dtype", [torch.int32, torch.int64])
def test_indices_match_reference(host_lens, map_dtype):
    gen = torch.Generator().manual_seed(10)
    batch = make_batch([17, 30, 0, 600, 1], gen)
    slots = [700, 680, 660]
    mapping = _pruned_mapping(batch, slots, gen, map_dtype)
    ref_indptr, ref_streams = build_kv_indices_ref(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens)
    G, bs = len(slots), len(batch.lens)
    cap = sum(batch.lens) + 5
    out_indptr = torch.full((G, bs + 1), POISON, dtype=torch.int32)
    out_indices = torch.full((G, cap), POISON, dtype=torch.int32)
    kept = (ref_indptr[:, 1:] - ref_indptr[:, :-1]).to(torch.int32) if host_lens else None
    kept_out = torch.full((G, bs), POISON, dtype=torch.int32)
    indptr, indices = build_kv_indices(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                                       kept_lens=kept, out_indptr=out_indptr, out_indices=out_indices,
                                       kept_lens_out=None if host_lens else kept_out)
    assert indptr is out_indptr and indices is out_indices
    _check(indptr, indices, ref_indptr, ref_streams)
    assert int(ref_indptr[1, 2] - ref_indptr[1, 1]) == 0  # fully pruned request present
    if not host_lens:
        assert torch.equal(kept_out.long(), ref_indptr[:, 1:] - ref_indptr[:, :-1])


def test_identity_mapping_matches_sglang_kernel():
    """Without pruning and with mapping = identity, every row equals SGLang's
    create_flashinfer_kv_indices_triton stream (the kernel this one generalises)."""
    from sglang.kernels.ops.kvcache.kv_indices import create_flashinfer_kv_indices_triton

    gen = torch.Generator().manual_seed(11)
    batch = make_batch([5, 0, 40, 13], gen)
    G = 2
    width = batch.num_logical + 2
    mapping = torch.arange(width, dtype=torch.int32).repeat(G, 1)
    bs = len(batch.lens)
    sg_indptr = torch.zeros(bs + 1, dtype=torch.int32)
    sg_indptr[1:] = torch.cumsum(batch.seq_lens, 0)
    sg_indices = torch.full((int(sg_indptr[-1]),), POISON, dtype=torch.int32)
    create_flashinfer_kv_indices_triton[(bs,)](
        batch.req_to_token, batch.req_pool_indices, batch.seq_lens, sg_indptr, None, sg_indices,
        batch.req_to_token.shape[1],
    )
    indptr, indices = build_kv_indices(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                                       capacity=int(sg_indptr[-1]))
    for g in range(G):
        assert torch.equal(indptr[g], sg_indptr)
        assert torch.equal(indices[g], sg_indices)


def test_wrong_kept_lens_rejected():
    gen = torch.Generator().manual_seed(12)
    batch = make_batch([6, 4], gen)
    mapping = _pruned_mapping(batch, [40, 40], gen)
    _, streams = build_kv_indices_ref(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens)
    kept = torch.full((2, 2), 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="kept_lens"):
        build_kv_indices(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens, kept_lens=kept)
    with pytest.raises(ValueError, match="kept_lens"):
        build_kv_indices(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                         kept_lens=torch.zeros((3, 2), dtype=torch.int32))
    with pytest.raises(ValueError, match="capacity"):
        real = torch.tensor([[int((mapping[g, i] != 0).sum()) for i in batch.ids] for g in range(2)], dtype=torch.int32)
        build_kv_indices(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens, kept_lens=real,
                         out_indices=torch.zeros((2, 1), dtype=torch.int32))
