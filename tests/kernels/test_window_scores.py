"""window_scores / value_output_norms (Triton, interpreter on CPU) against float64 torch references."""

import pytest
import torch

from sglang_depthkv.kernels import output_gram, value_output_norms, window_scores
from sglang_depthkv.kernels.window_scores_ref import value_output_norms_ref, window_scores_ref

POISON = float("nan")


def _scenario(lens, windows, qh, kvh, d, dtype, seed, slots=None):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    slots = slots or total + 9
    k_buffer = (torch.randn((slots, kvh, d), generator=gen) * 1.5).to(dtype)
    v_buffer = torch.randn((slots, kvh, d), generator=gen).to(dtype)
    perm = (torch.randperm(slots - 1, generator=gen)[:total] + 1).to(torch.int32)
    kv_indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.cumsum(torch.tensor(lens), 0)
    q_indptr = torch.zeros(len(lens) + 1, dtype=torch.int64)
    q_indptr[1:] = torch.cumsum(torch.tensor(windows), 0)
    q = (torch.randn((sum(windows), qh, d), generator=gen) * 1.5).to(dtype)
    return q, q_indptr, k_buffer, v_buffer, perm, kv_indptr


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize(
    "dtype,qh,kvh,d,lens,windows,split",
    [
        (torch.float32, 4, 2, 16, [37, 0, 80], [5, 0, 8], 32),
        (torch.float16, 6, 2, 32, [19, 64, 3], [7, 16, 3], 4096),
        (torch.bfloat16, 4, 4, 16, [50, 1], [12, 1], 16),
    ],
)
def test_window_scores_match_float64(dtype, qh, kvh, d, lens, windows, split):
    q, q_indptr, k_buffer, _, idx, kv_indptr = _scenario(lens, windows, qh, kvh, d, dtype, seed=20)
    scaling = d ** -0.5
    out = torch.full((kvh, idx.shape[0]), POISON, dtype=torch.float32)
    window_scores(q, q_indptr, k_buffer, idx, kv_indptr, scaling=scaling, max_kv_len=max(lens),
                  max_window=max(windows), out=out, split_tokens=split, block_n=16)
    ref = window_scores_ref(q, q_indptr, k_buffer, idx, kv_indptr, scaling)
    assert not torch.isnan(out).any(), "unwritten score columns"
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype] / 10)
    # mass conservation: each window query's probabilities sum to 1, so the per-request total is qh
    for b in range(len(lens)):
        if lens[b]:
            seg = out[:, int(kv_indptr[b]): int(kv_indptr[b + 1])]
            assert abs(float(seg.sum()) - qh) < 1e-2 * qh


def test_laprox_weights_match_float64():
    lens, windows, qh, kvh, d = [33, 70], [6, 9], 4, 2, 16
    q, q_indptr, k_buffer, v_buffer, idx, kv_indptr = _scenario(lens, windows, qh, kvh, d, torch.float16, seed=21)
    gen = torch.Generator().manual_seed(22)
    hidden = 24
    w_o = (torch.randn((hidden, qh * d), generator=gen) * 0.2).to(torch.float16)
    norms = torch.full((qh, idx.shape[0]), POISON, dtype=torch.float32)
    value_output_norms(v_buffer, idx, w_o, num_q_heads=qh, out=norms, block_n=16)
    ref_norms = value_output_norms_ref(v_buffer, idx, w_o, qh)
    torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-4, atol=1e-5)
    out = window_scores(q, q_indptr, k_buffer, idx, kv_indptr, scaling=d ** -0.5, max_kv_len=max(lens),
                        max_window=max(windows), head_weights=norms, split_tokens=32, block_n=16)
    ref = window_scores_ref(q, q_indptr, k_buffer, idx, kv_indptr, d ** -0.5, head_weights=ref_norms)
    torch.testing.assert_close(out.double(), ref, rtol=3e-3, atol=1e-4)


def test_output_gram_definition():
    gen = torch.Generator().manual_seed(23)
    w = torch.randn((10, 3 * 4), generator=gen)
    g = output_gram(w, 3)
    v = torch.randn(4, generator=gen, dtype=torch.float64)
    for h in range(3):
        direct = torch.linalg.vector_norm(w[:, h * 4:(h + 1) * 4].double() @ v) ** 2
        assert abs(float(v @ g[h].double() @ v) - float(direct)) < 1e-4 * float(direct)


def test_window_scores_bad_input():
    q, q_indptr, k_buffer, _, idx, kv_indptr = _scenario([10, 8], [3, 2], 4, 2, 16, torch.float16, seed=24)
    kw = dict(scaling=0.25, max_kv_len=10, max_window=3)
    with pytest.raises(ValueError, match="window"):
        window_scores(q, torch.tensor([0, 0, 5]), k_buffer, idx, kv_indptr, **kw)
    with pytest.raises(ValueError, match="dtype"):
        window_scores(q.float(), q_indptr, k_buffer, idx, kv_indptr, **kw)
    with pytest.raises(ValueError, match="multiple"):
        window_scores(q[:, :3], q_indptr, k_buffer, idx, kv_indptr, **kw)
    with pytest.raises(ValueError, match="slots"):
        bad = idx.clone()
        bad[3] = k_buffer.shape[0]
        window_scores(q, q_indptr, k_buffer, bad, kv_indptr, **kw)
    with pytest.raises(ValueError, match="max_kv_len"):
        window_scores(q, q_indptr, k_buffer, idx, kv_indptr, scaling=0.25, max_kv_len=9, max_window=3)
