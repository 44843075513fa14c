import pytest
import torch

from sglang_depthkv.core.selection import protect, select_top, token_scores


def test_token_scores_sum_over_heads_float32():
    h = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], dtype=torch.bfloat16)
    out = token_scores(h)
    assert out.dtype == torch.float32 and out.tolist() == [1.5, 1.0, 7.0]


def test_protect_marks_sinks_and_window():
    s = torch.arange(10, dtype=torch.float32)
    p = protect(s, 2, 3)
    assert torch.isinf(p[[0, 1, 7, 8, 9]]).all() and p[2:7].tolist() == [2, 3, 4, 5, 6]
    assert s.tolist() == list(range(10))  # input untouched
    assert torch.isinf(protect(s, 20, 0)).all() and torch.isinf(protect(s, 0, 20)).all()
    assert torch.equal(protect(s, 0, 0), s)


def test_select_top_tie_rule_lower_position_first():
    s = torch.tensor([1.0, 5.0, 3.0, 5.0, 3.0, 3.0, 0.0])
    assert select_top(s, 1).tolist() == [1]
    assert select_top(s, 2).tolist() == [1, 3]
    assert select_top(s, 3).tolist() == [1, 2, 3]  # of the three 3.0s the lowest position wins
    assert select_top(s, 4).tolist() == [1, 2, 3, 4]
    assert select_top(s, 0).tolist() == []
    assert select_top(s, 7).tolist() == list(range(7))
    assert select_top(s, 3).dtype == torch.int64


def test_select_top_all_equal_keeps_prefix():
    assert select_top(torch.zeros(9), 4).tolist() == [0, 1, 2, 3]


def test_select_top_matches_bruteforce_sort():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.randint(0, 4, (30,), generator=g).float()  # many ties
        k = int(torch.randint(0, 31, (1,), generator=g))
        ref = sorted(sorted(range(30), key=lambda t: (-s[t].item(), t))[:k])
        assert select_top(s, k).tolist() == ref


def test_protected_always_kept():
    s = torch.tensor([0.0, 0.0, 9.0, 9.0, 9.0, 0.0])
    assert select_top(protect(s, 1, 1), 3).tolist() == [0, 2, 5]


def test_nan_is_error():
    s = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="NaN"):
        select_top(s, 1)
    with pytest.raises(ValueError, match="NaN"):
        token_scores(s.reshape(1, 3))


@pytest.mark.parametrize("k", [-1, 4, 1.5])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match="k="):
        select_top(torch.zeros(3), k)


def test_shape_errors():
    with pytest.raises(ValueError, match="kv_heads, n"):
        token_scores(torch.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        select_top(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="non-negative"):
        protect(torch.zeros(3), -1, 0)
