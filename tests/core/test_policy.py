import pytest
import torch

from sglang_depthkv.core.budgets import (DepthKVAllocator, GlobalTopKAllocator, PyramidAllocator, UniformAllocator,
                                         total_keep)
from sglang_depthkv.core.policy import POLICY_NAMES, PrunePolicy, make_policy
from sglang_depthkv.core.profile import SensitivityProfile
from sglang_depthkv.core.scorers import profile_scorer
from sglang_depthkv.core.scorers.laprox import LaProxScorer
from sglang_depthkv.core.scorers.snapkv import SnapKVScorer
from sglang_depthkv.core.scorers.streaming_llm import StreamingLLMScorer
from sglang_depthkv.core.types import LayerObservation, ModelIdentity

L, KVH, QH, D, HID, W = 3, 2, 4, 8, 16, 8


def observations(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return [LayerObservation(l, r(KVH, n, D), r(KVH, n, D), r(QH, W, D), D ** -0.5, r(HID, QH * D)) for l in range(L)]


def profile():
    ident = ModelIdentity(num_layers=L, num_attention_heads=QH, num_key_value_heads=KVH, head_dim=D, hidden_size=HID)
    return SensitivityProfile(ident, "snapkv", [0.1, 0.3, 0.5], [[1.0, 0.5, 0.2], [5.0, 2.0, 1.0], [0.1, 0.05, 0.0]])


def test_names_and_components():
    assert POLICY_NAMES == ("full", "streamingllm", "snapkv", "pyramid", "depthkv", "laprox", "kvzip")
    expect = {"full": (UniformAllocator, 1.0), "streamingllm": (UniformAllocator, 0.3), "snapkv": (UniformAllocator, 0.3),
              "pyramid": (PyramidAllocator, 0.3), "depthkv": (DepthKVAllocator, 0.3), "laprox": (GlobalTopKAllocator, 0.3)}
    for name, (alloc, b) in expect.items():
        p = make_policy(name, 0.3, profile=profile())  # profile ignored except by depthkv
        assert p.name == name and isinstance(p.allocator, alloc) and p.budget == b
    assert isinstance(make_policy("streamingllm", 0.3).scorer, StreamingLLMScorer)
    assert isinstance(make_policy("pyramid", 0.3).scorer, SnapKVScorer)
    assert isinstance(make_policy("laprox", 0.3).scorer, LaProxScorer)
    # the global top-k ranks LaProx scores over the square root of their kv head's mean; a DepthKV
    # profile's LaProx (budgets from the profile) keeps the scores in output units
    assert make_policy("laprox", 0.3).scorer.head_mean_power == 0.5
    assert profile_scorer("laprox").head_mean_power == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="h2o", budget=0.5), "unknown policy 'h2o'"),
    (dict(name="snapkv", budget=0.0), "budget"),
    (dict(name="snapkv", budget=1.01), "budget"),
    (dict(name="full", budget=-1), "budget"),
    (dict(name="depthkv", budget=0.5), "needs a sensitivity profile"),
    (dict(name="depthkv", budget=0.5, profile={"a": 1}), "SensitivityProfile"),
    (dict(name="kvzip", budget=0.5), "needs trained gates"),
    (dict(name="kvzip", budget=0.5, gates="gates.json"), "KVzipGates"),
    (dict(name="snapkv", budget=0.5, sinks=-1), "sinks"),
    (dict(name="snapkv", budget=0.5, window=-2), "window"),
    (dict(name="snapkv", budget=0.5, window=2.5), "window"),
])
def test_make_policy_errors(kwargs, match):
    name, budget = kwargs.pop("name"), kwargs.pop("budget")
    with pytest.raises(ValueError, match=match):
        make_policy(name, budget, **kwargs)


def test_short_sequences_not_pruned():
    for name in ("snapkv", "streamingllm", "laprox", "pyramid"):
        p = make_policy(name, 0.1, sinks=4, window=8)
        for n in (8, 12):
            keep = p.select(observations(n))
            assert [k.tolist() for k in keep] == [list(range(n))] * L
        assert p.keep_counts(12, L) == [12] * L


def check_keep(keep, n, counts, sinks, window):
    for k, c in zip(keep, counts):
        assert k.dtype == torch.int64 and k.numel() == c
        assert torch.all(k[1:] > k[:-1])  # ascending, unique
        assert set(range(sinks)) | set(range(n - window, n)) <= set(k.tolist())


@pytest.mark.parametrize("name", ["streamingllm", "snapkv", "pyramid", "depthkv", "laprox"])
def test_select_exact_budget(name):
    n, b, sinks, window = 64, 0.4, 2, 8
    p = make_policy(name, b, profile=profile(), sinks=sinks, window=window)
    keep = p.select(observations(n))
    assert sum(k.numel() for k in keep) == total_keep(n, L, b, sinks, window)
    check_keep(keep, n, [k.numel() for k in keep], sinks, window)


def test_streamingllm_keeps_sinks_plus_recent():
    n = 50
    keep = make_policy("streamingllm", 0.5, sinks=3, window=5).select(observations(n))
    assert keep[0].tolist() == [0, 1, 2] + list(range(n - 22, n))


def test_snapkv_selection_is_top_of_scores():
    n, sinks, window = 40, 1, 8
    obs = observations(n, seed=3)
    keep = make_policy("snapkv", 0.5, sinks=sinks, window=window).select(obs)
    for o, k in zip(obs, keep):
        s = SnapKVScorer().score(o).double().sum(0)
        s[:sinks] = float("inf")
        s[n - window:] = float("inf")
        ref = sorted(sorted(range(n), key=lambda t: (-s[t].item(), t))[: k.numel()])
        assert k.tolist() == ref


@pytest.mark.parametrize("scorer, other", [("laprox", SnapKVScorer), ("snapkv", LaProxScorer)])
def test_depthkv_serves_with_the_scorer_its_profile_was_calibrated_with(scorer, other):
    """The profile's sensitivities measured one scorer's pruning: DepthKV keeps by that scorer's
    scores (float64 brute force per layer at the DepthKV keep counts), not another's."""
    n, sinks, window = 40, 1, 8
    prof = profile()
    prof.scorer = scorer
    pol = make_policy("depthkv", 0.4, profile=prof, sinks=sinks, window=window)
    assert type(pol.scorer).__name__ == {"laprox": "LaProxScorer", "snapkv": "SnapKVScorer"}[scorer]
    obs = observations(n, seed=5)
    keep = pol.select(obs)

    def brute(sc):
        out = []
        for o, k in zip(obs, keep):
            s = sc.score(o).double().sum(0)
            s[:sinks] = float("inf")
            s[n - window:] = float("inf")
            out.append(sorted(sorted(range(n), key=lambda t: (-s[t].item(), t))[: k.numel()]))
        return out

    assert [k.tolist() for k in keep] == brute(type(pol.scorer)())
    assert [k.tolist() for k in keep] != brute(other())


def test_full_keeps_everything_and_budget_forced():
    p = make_policy("full", 0.2)
    assert p.budget == 1.0
    assert [k.numel() for k in p.select(observations(100))] == [100] * L


def test_select_input_errors():
    p = make_policy("snapkv", 0.5)
    with pytest.raises(ValueError, match="no layer observations"):
        p.select([])
    obs = observations(60)
    with pytest.raises(ValueError, match="layer order"):
        p.select(obs[1:])
    obs[2] = observations(61)[2]
    with pytest.raises(ValueError, match="different token count"):
        p.select(obs)
    lp = make_policy("laprox", 0.5)
    with pytest.raises(ValueError, match="layer_scores"):
        lp.keep_counts(100, L)
    with pytest.raises(ValueError, match="Scorer"):
        PrunePolicy("x", object(), UniformAllocator(), 0.5)
