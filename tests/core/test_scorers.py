"""Scorers against brute-force float64 formulas written out here (explicit loops, small sizes)."""

import math

import pytest
import torch

from sglang_depthkv.core.scorers import Scorer
from sglang_depthkv.core.scorers.full import FullScorer
from sglang_depthkv.core.scorers.laprox import LaProxScorer
from sglang_depthkv.core.scorers.snapkv import SnapKVScorer
from sglang_depthkv.core.scorers.streaming_llm import StreamingLLMScorer
from sglang_depthkv.core.types import LayerObservation

KVH, QH, N, D, W, HID = 2, 4, 13, 5, 4, 7  # GQA: 2 query heads per kv head


def make_obs(seed=0, dtype=torch.float32, n=N, w=W, o_proj=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 1.5).to(dtype)
    return LayerObservation(layer=3, keys=r(KVH, n, D), values=r(KVH, n, D), window_queries=r(QH, w, D),
                            scaling=D ** -0.5, o_proj_weight=r(HID, QH * D) if o_proj else None,
                            hidden_states=r(n, HID))


def brute_window_probs(obs):
    """p[h][i][t] in float64 with explicit loops: query i (position n-w+i) sees keys <= n-w+i."""
    q, k = obs.window_queries.double(), obs.keys.double()
    qh, w, d = q.shape
    kvh, n, _ = k.shape
    p = [[[0.0] * n for _ in range(w)] for _ in range(qh)]
    for h in range(qh):
        g = h // (qh // kvh)
        for i in range(w):
            last = n - w + i
            logits = [sum(q[h, i, j].item() * k[g, t, j].item() for j in range(d)) * obs.scaling
                      for t in range(last + 1)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            z = sum(e)
            for t in range(last + 1):
                p[h][i][t] = e[t] / z
    return p


def brute_snapkv(obs, kernel=7):
    p = brute_window_probs(obs)
    qh, w, n, kvh = len(p), len(p[0]), len(p[0][0]), obs.num_kv_heads
    grp = qh // kvh
    raw = [[sum(sum(p[h][i][t] for i in range(w)) / w for h in range(g * grp, (g + 1) * grp)) for t in range(n)]
           for g in range(kvh)]
    half = kernel // 2
    out = torch.zeros(kvh, n, dtype=torch.float64)
    for g in range(kvh):
        for t in range(n):
            vals = [raw[g][s] for s in range(t - half, t + half + 1) if 0 <= s < n]
            out[g, t] = sum(vals) / len(vals)
    return out


def brute_laprox(obs, kernel=7):
    """Per kv group g and token t: the [w, hidden] matrix of token t's part of the window queries'
    attention output, M[i] = sum over the group's heads h of p[h][i][t] * (v[g, t] W_h^T), by explicit
    loops; its Frobenius norm / sqrt(w), pooled."""
    p = brute_window_probs(obs)
    v, wo = obs.values.double(), obs.o_proj_weight.double()
    qh, w, n, kvh = len(p), len(p[0]), len(p[0][0]), obs.num_kv_heads
    d, hid, grp = v.shape[2], wo.shape[0], qh // kvh
    out = torch.zeros(kvh, n, dtype=torch.float64)
    for g in range(kvh):
        for t in range(n):
            m = [[0.0] * hid for _ in range(w)]
            for h in range(g * grp, (g + 1) * grp):
                u = [sum(v[g, t, j].item() * wo[o, h * d + j].item() for j in range(d)) for o in range(hid)]
                for i in range(w):
                    for o in range(hid):
                        m[i][o] += p[h][i][t] * u[o]
            out[g, t] = math.sqrt(sum(x * x for row in m for x in row) / w)
    half = kernel // 2
    pooled = torch.zeros(kvh, n, dtype=torch.float64)
    for g in range(kvh):
        for t in range(n):
            vals = [out[g, s].item() for s in range(t - half, t + half + 1) if 0 <= s < n]
            pooled[g, t] = sum(vals) / len(vals)
    return pooled


def test_laprox_mixes_the_heads_of_a_group_before_the_norm():
    """Two heads of one group writing opposite outputs cancel (a per-head norm would add them)."""
    d, n, w = 2, 5, 2
    keys = torch.zeros(1, n, d)
    values = torch.ones(1, n, d)
    wo = torch.cat([torch.eye(d), -torch.eye(d)], dim=1)  # head 1's output = -head 0's
    obs = LayerObservation(layer=0, keys=keys, values=values, window_queries=torch.zeros(2, w, d), scaling=1.0,
                           o_proj_weight=wo)
    assert LaProxScorer(pool_kernel=1).score(obs).abs().max().item() < 1e-6
    obs.o_proj_weight = torch.cat([torch.eye(d), torch.eye(d)], dim=1)  # same direction: they add
    got = LaProxScorer(pool_kernel=1).score(obs)
    torch.testing.assert_close(got.double(), brute_laprox(obs, 1), rtol=1e-5, atol=1e-7)
    assert got.min().item() > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_snapkv_matches_bruteforce(seed):
    obs = make_obs(seed)
    got = SnapKVScorer().score(obs)
    assert got.dtype == torch.float32 and got.shape == (KVH, N)
    torch.testing.assert_close(got.double(), brute_snapkv(obs), rtol=1e-5, atol=1e-7)


def test_snapkv_other_kernels_and_window_equal_sequence():
    obs = make_obs(2, n=6, w=6)  # window covers the whole sequence: fully causal
    torch.testing.assert_close(SnapKVScorer(pool_kernel=3).score(obs).double(), brute_snapkv(obs, 3), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(SnapKVScorer(pool_kernel=1).score(obs).double(), brute_snapkv(obs, 1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("kernel", [7, 3, 1])
def test_laprox_matches_bruteforce(seed, kernel):
    obs = make_obs(seed)
    got = (LaProxScorer() if kernel == 7 else LaProxScorer(pool_kernel=kernel)).score(obs)  # 7: the default
    assert got.dtype == torch.float32 and got.shape == (KVH, N)
    torch.testing.assert_close(got.double(), brute_laprox(obs, kernel), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_laprox_head_mean_power_matches_bruteforce(power):
    """``head_mean_power`` γ: the float64 brute-force score divided by its kv head's mean over the
    n tokens, to the power γ; γ = 1 makes the score blind to the scale of ``W_o``, γ = 0.5 halves
    the exponent of that scale."""
    obs = make_obs(4)
    want = brute_laprox(obs)
    want = want / want.mean(dim=1, keepdim=True) ** power
    got = LaProxScorer(head_mean_power=power).score(obs)
    assert got.dtype == torch.float32 and got.shape == (KVH, N)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    obs.o_proj_weight = obs.o_proj_weight * 16.0
    torch.testing.assert_close(LaProxScorer(head_mean_power=power).score(obs), got * 16.0 ** (1 - power),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "x", None])
def test_laprox_head_mean_power_must_lie_in_0_1(bad):
    with pytest.raises(ValueError, match="head_mean_power must be in"):
        LaProxScorer(head_mean_power=bad)


def test_laprox_definition_names_the_head_mean_power():
    assert LaProxScorer().definition == "kv-group output Frobenius norm"
    assert LaProxScorer(head_mean_power=0.5).definition == "kv-group output Frobenius norm / kv-head mean^0.5"


@pytest.mark.parametrize("bad", [0, 2, -1, 1.5, True])
def test_laprox_pool_kernel_must_be_a_positive_odd_integer(bad):
    with pytest.raises(ValueError, match="LaProxScorer: pool_kernel must be a positive odd integer"):
        LaProxScorer(pool_kernel=bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_float32(dtype):
    obs = make_obs(4, dtype=dtype)  # brute force reads the same rounded values, in float64
    s = SnapKVScorer().score(obs)
    l = LaProxScorer().score(obs)
    assert s.dtype == torch.float32 and l.dtype == torch.float32
    torch.testing.assert_close(s.double(), brute_snapkv(obs), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(l.double(), brute_laprox(obs), rtol=1e-4, atol=1e-6)


def test_streamingllm_and_full():
    obs = make_obs(5)
    s = StreamingLLMScorer().score(obs)
    assert s.dtype == torch.float32 and s.shape == (KVH, N)
    for g in range(KVH):
        assert s[g].tolist() == [float(t) for t in range(N)]
    f = FullScorer().score(obs)
    assert f.dtype == torch.float32 and f.shape == (KVH, N) and not f.any()


def test_scorer_flags():
    for cls, name, agnostic in [(FullScorer, "full", True), (StreamingLLMScorer, "streamingllm", True),
                                (SnapKVScorer, "snapkv", False), (LaProxScorer, "laprox", False)]:
        sc = cls()
        assert isinstance(sc, Scorer) and sc.name == name and sc.query_agnostic is agnostic


def test_query_agnostic_scorers_ignore_queries_and_others_do_not():
    a, b = make_obs(6), make_obs(6)
    b.window_queries = -a.window_queries
    assert torch.equal(StreamingLLMScorer().score(a), StreamingLLMScorer().score(b))
    assert not torch.allclose(SnapKVScorer().score(a), SnapKVScorer().score(b))
    assert not torch.allclose(LaProxScorer().score(a), LaProxScorer().score(b))


def test_laprox_needs_o_proj():
    with pytest.raises(ValueError, match="o_proj_weight"):
        LaProxScorer().score(make_obs(o_proj=False))


@pytest.mark.parametrize("scorer", [FullScorer(), StreamingLLMScorer(), SnapKVScorer(), LaProxScorer()],
                         ids=lambda s: s.name)
def test_bad_observation_rejected(scorer):
    obs = make_obs()
    obs.window_queries = obs.window_queries[:3]  # 3 query heads for 2 kv heads
    with pytest.raises(ValueError, match="multiple"):
        scorer.score(obs)
    obs = make_obs()
    obs.values = obs.values[:, :-1]
    with pytest.raises(ValueError, match="disagree"):
        scorer.score(obs)


def test_query_scorers_reject_empty_window_and_bad_scaling():
    obs = make_obs()
    obs.window_queries = obs.window_queries[:, :0]
    with pytest.raises(ValueError, match="window query"):
        SnapKVScorer().score(obs)
    obs = make_obs()
    obs.scaling = float("nan")
    with pytest.raises(ValueError, match="scaling"):
        LaProxScorer().score(obs)


@pytest.mark.parametrize("k", [0, 2, -1, 2.5, True])
def test_snapkv_bad_kernel(k):
    with pytest.raises(ValueError, match="pool_kernel"):
        SnapKVScorer(pool_kernel=k)
