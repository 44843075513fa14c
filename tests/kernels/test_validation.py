"""Bad input raises a clear ValueError before any launch (and leaves the mapping untouched)."""

import pytest
import torch

from kv_scenarios import held_mapping, make_batch
from sglang_depthkv.kernels import build_kv_indices


@pytest.fixture
def case():
    gen = torch.Generator().manual_seed(40)
    batch = make_batch([8, 5], gen)
    return batch, held_mapping(batch, [30, 30], gen)


def test_index_streams_bad_inputs(case):
    batch, mapping = case
    before = mapping.clone()
    with pytest.raises(ValueError, match="seq_lens"):
        build_kv_indices(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens[:1])
    with pytest.raises(ValueError, match="out_indptr"):
        build_kv_indices(mapping, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                         out_indptr=torch.zeros((2, 2), dtype=torch.int32))
    with pytest.raises(ValueError, match="mapping width"):
        build_kv_indices(mapping[:, :4].contiguous(), batch.req_to_token, batch.req_pool_indices, batch.seq_lens)
    rpi = batch.req_pool_indices.clone()
    rpi[0] = 99
    with pytest.raises(ValueError, match="req_pool_indices"):
        build_kv_indices(mapping, batch.req_to_token, rpi, batch.seq_lens)
    too_long = batch.seq_lens.clone()
    too_long[1] = batch.req_to_token.shape[1] + 1
    with pytest.raises(ValueError, match="seq_lens"):
        build_kv_indices(mapping, batch.req_to_token, batch.req_pool_indices, too_long)
    with pytest.raises(ValueError, match="mapping"):
        build_kv_indices(mapping.float(), batch.req_to_token, batch.req_pool_indices, batch.seq_lens)
    assert torch.equal(mapping, before)
