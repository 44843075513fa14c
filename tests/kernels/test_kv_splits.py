"""``kernels.layer_kv_splits`` (all layers in one launch) against SGLang's own
``get_num_kv_splits_triton`` run once per layer, and against the plain-Python rule."""

import pytest
import torch

from sglang_depthkv.kernels.kv_splits import layer_kv_splits, layer_kv_splits_ref


def sglang_rows(lens, num_head, num_kv_head, max_kv_splits, cores):
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

    out = []
    for row in lens:
        t = torch.tensor(row, dtype=torch.int32)
        splits = torch.full((len(row),), -1, dtype=torch.int32)
        get_num_kv_splits_triton[(1,)](splits, t, len(row), 1, num_head, num_kv_head, max_kv_splits, cores,
                                       MAX_NUM_SEQ=256)
        out.append(splits.tolist())
    return out


@pytest.mark.parametrize("num_head,num_kv_head", [(32, 8), (8, 8), (14, 2)])
@pytest.mark.parametrize("cores", [132, 8])
def test_one_launch_equals_sglangs_rule_per_layer(num_head, num_kv_head, cores):
    g = torch.Generator().manual_seed(num_head + cores)
    lens = [[int(x) for x in torch.randint(1, hi, (7,), generator=g)] for hi in (5, 300, 40000, 2)]
    lens.append([900] * 7)  # equal lengths
    want = sglang_rows(lens, num_head, num_kv_head, 16, cores)
    splits = torch.full((len(lens), 9), -7, dtype=torch.int32)  # poisoned, wider than the batch
    layer_kv_splits(splits, torch.tensor(lens, dtype=torch.int32), num_head=num_head, num_kv_head=num_kv_head,
                    max_kv_splits=16, device_core_count=cores)
    assert splits[:, :7].tolist() == want
    assert (splits[:, 7:] == -7).all()  # nothing past the batch written
    assert layer_kv_splits_ref(lens, num_head=num_head, num_kv_head=num_kv_head, max_kv_splits=16,
                               device_core_count=cores) == want


def test_no_gpu_fills_the_maximum_like_sglang():
    splits = torch.zeros((3, 4), dtype=torch.int32)
    layer_kv_splits(splits, torch.ones((3, 2), dtype=torch.int32), num_head=4, num_kv_head=2, max_kv_splits=8,
                    device_core_count=0)
    assert (splits == 8).all()


def test_shapes_are_refused_by_name():
    with pytest.raises(ValueError, match="splits"):
        layer_kv_splits(torch.zeros((2, 1), dtype=torch.int32), torch.ones((2, 3), dtype=torch.int32), num_head=4,
                        num_kv_head=2, max_kv_splits=8, device_core_count=4)
    with pytest.raises(ValueError, match="splits"):
        layer_kv_splits(torch.zeros((2, 4), dtype=torch.int64), torch.ones((2, 3), dtype=torch.int32), num_head=4,
                        num_kv_head=2, max_kv_splits=8, device_core_count=4)
