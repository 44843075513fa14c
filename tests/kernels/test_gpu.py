"""The same kernels compiled for CUDA (skipped on CPU by tests/conftest.py), at sizes where races and
multi-block paths would show, plus FlashInfer accepting the index streams (if flashinfer is installed)."""

import pytest
import torch

from kv_scenarios import held_mapping, make_batch
from sglang_depthkv.kernels import build_kv_indices
from sglang_depthkv.kernels.index_streams_ref import build_kv_indices_ref

pytestmark = pytest.mark.gpu
CUDA = "cuda"


def _cuda(*ts):
    return [t.to(CUDA) for t in ts]


def test_gpu_index_streams():
    gen = torch.Generator().manual_seed(50)
    batch = make_batch([3000, 0, 1500, 7], gen)
    slots = [5000, 4700, 4600]
    mapping = held_mapping(batch, slots, gen)
    mapping[torch.rand(mapping.shape, generator=gen) < 0.5] = 0  # pruned tokens
    mapping[1, batch.ids[2]] = 0  # request 2 fully pruned at layer 1
    ref_indptr, ref_streams = build_kv_indices_ref(mapping, batch.req_to_token, batch.req_pool_indices,
                                                   batch.seq_lens)
    m, r2t, rpi, sl = _cuda(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens)
    for kept in (None, (ref_indptr[:, 1:] - ref_indptr[:, :-1]).to(torch.int32).to(CUDA)):
        indptr_o, indices_o = build_kv_indices(m, r2t, rpi, sl, kept_lens=kept, capacity=sum(batch.lens))
        assert torch.equal(indptr_o.long().cpu(), ref_indptr)
        for g in range(3):
            assert torch.equal(indices_o[g, : ref_streams[g].numel()].long().cpu(), ref_streams[g])


def test_flashinfer_accepts_index_streams():
    flashinfer = pytest.importorskip("flashinfer")
    gen = torch.Generator().manual_seed(53)
    batch = make_batch([300, 17, 1000], gen)
    slots = [1400, 1400]
    mapping = held_mapping(batch, slots, gen)
    mapping[torch.rand(mapping.shape, generator=gen) < 0.5] = 0
    qh, kvh, d = 32, 8, 128
    m, r2t, rpi, sl = _cuda(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens)
    indptr, indices = build_kv_indices(m, r2t, rpi, sl, capacity=sum(batch.lens))
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=CUDA)
    for g in range(2):
        k = torch.randn((slots[g], kvh, d), device=CUDA, dtype=torch.float16)
        v = torch.randn((slots[g], kvh, d), device=CUDA, dtype=torch.float16)
        q = torch.randn((3, qh, d), device=CUDA, dtype=torch.float16)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        wrapper.plan(indptr[g], indices[g], torch.ones(3, dtype=torch.int32, device=CUDA), qh, kvh, d, 1,
                     data_type=torch.float16, q_data_type=torch.float16)
        out = wrapper.run(q, (k[:, None], v[:, None]))
        for b in range(3):
            sl_b = indices[g, int(indptr[g, b]): int(indptr[g, b + 1])].long()
            kk = k[sl_b].float().repeat_interleave(qh // kvh, 1)  # [n, qh, d]
            vv = v[sl_b].float().repeat_interleave(qh // kvh, 1)
            p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), kk) * d ** -0.5, dim=-1)
            ref = torch.einsum("hn,nhd->hd", p, vv)
            torch.testing.assert_close(out[b].float(), ref, rtol=2e-2, atol=2e-2)
