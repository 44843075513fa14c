"""``pruning.select_own`` (the SGLang side's end-of-prefill decision) against the core's
``PrunePolicy.select`` on random observations: identical keep sets for a request without a cached
prefix, for every policy; with a cached prefix, the decision covers only the own segment and equals
a brute-force restatement of the documented rule. Plus the pruned-read attention of the backend vs
a float64 masked softmax."""

import types

import pytest
import torch

from sglang_depthkv.core.budgets.base import total_keep
from sglang_depthkv.core.gates import FeatureSpec, KVzipGates
from sglang_depthkv.core.policy import make_policy
from sglang_depthkv.core.profile import SensitivityProfile
from sglang_depthkv.core.selection import token_scores
from sglang_depthkv.core.types import LayerObservation, ModelIdentity
from sglang_depthkv.sglang.pruning import select_own

L, KVH, QH, D, HID = 4, 2, 4, 8, 16
IDENT = ModelIdentity(num_layers=L, num_attention_heads=QH, num_key_value_heads=KVH, head_dim=D, hidden_size=HID)


def observations(n, w, seed):
    g = torch.Generator().manual_seed(seed)
    return [LayerObservation(layer=l, keys=torch.randn(KVH, n, D, generator=g), values=torch.randn(KVH, n, D, generator=g),
                             window_queries=torch.randn(QH, w, D, generator=g), scaling=D ** -0.5,
                             o_proj_weight=torch.randn(HID, QH * D, generator=g),
                             hidden_states=torch.randn(n, HID, generator=g)) for l in range(L)]


def policy(name, budget, sinks=2, window=6):
    prof = SensitivityProfile(IDENT, "snapkv", [0.25, 0.5, 1.0], [[0.3 + l, 0.1 * (l + 1), 0.0] for l in range(L)])
    spec = FeatureSpec(True, True, D, HID)
    g = torch.Generator().manual_seed(3)
    gates = KVzipGates(IDENT, spec, torch.randn(L, KVH, spec.dim, generator=g), torch.zeros(L, KVH))
    return make_policy(name, budget, profile=prof, gates=gates, sinks=sinks, window=window)


@pytest.mark.parametrize("name", ["streamingllm", "snapkv", "pyramid", "depthkv", "laprox", "kvzip"])
@pytest.mark.parametrize("n, budget", [(30, 0.4), (53, 0.25), (8, 0.3), (9, 0.5)])
def test_no_prefix_equals_policy_select(name, n, budget):
    pol = policy(name, budget)
    obs = observations(n, min(pol.window, n), seed=n)
    expect = pol.select(obs)
    scores = torch.stack([token_scores(pol.scorer.score(o)) for o in obs])
    got = select_own(pol, scores, 0)
    if not pol.prunes(n):
        assert got is None and all(e.tolist() == list(range(n)) for e in expect)
        return
    assert [g.tolist() for g in got] == [e.tolist() for e in expect]


@pytest.mark.parametrize("name", ["streamingllm", "snapkv", "laprox"])
def test_cached_prefix_prunes_own_segment_only(name):
    pol = policy(name, 0.4, sinks=4, window=6)
    lo, n = 3, 40
    m = n - lo
    g = torch.Generator().manual_seed(11)
    scores = torch.rand(L, m, generator=g)
    got = select_own(pol, scores, lo)
    sinks_own = 1  # absolute sinks [0, 4) inside [3, 40): position 3
    assert sum(len(k) for k in got) == total_keep(m, L, 0.4, sinks_own, 6)
    for l, k in enumerate(got):
        k = k.tolist()
        assert k == sorted(k) and min(k) >= lo and max(k) < n
        assert {3} | set(range(n - 6, n)) <= set(k)  # own sink + window protected
        if name != "laprox":  # uniform allocator: the top scores among the unprotected own positions
            rest = [p for p in k if p != 3 and p < n - 6]
            free = torch.tensor([float(scores[l, p - lo]) for p in range(4, n - 6)])
            top = (torch.sort(free, descending=True, stable=True).indices[:len(rest)] + 4).sort().values.tolist()
            assert rest == top
    assert select_own(pol, torch.rand(L, 6), 30) is None  # 6 own tokens <= 0 own sinks + 6 window: kept whole


def test_pruned_read_attention_vs_float64():
    """Held keys only (compacted, position order), query at position p sees held keys at positions <= p,
    GQA group h // (qh / kvh): the backend's ``_attend`` vs a float64 softmax over the same rule."""
    from sglang_depthkv.sglang.backends.torch_native import DepthKVTorchNativeAttnBackend

    g = torch.Generator().manual_seed(5)
    cap, n, pre = 40, 30, 22  # 22 cached positions (some pruned) + 8 new ones
    k_cache = torch.randn(cap + 1, KVH, D, generator=g)
    v_cache = torch.randn(cap + 1, KVH, D, generator=g)
    k_cache[0] = float("nan")  # the dummy slot must never be read
    v_cache[0] = float("nan")
    held_pos = torch.tensor(sorted(set(range(n)) - {1, 5, 6, 11, 17, 20}))
    slots = torch.randperm(cap, generator=g)[: held_pos.numel()] + 1
    qpos = torch.arange(pre, n)
    q = torch.randn(QH, qpos.numel(), D, generator=g)
    layer = types.SimpleNamespace(scaling=0.37, tp_q_head_num=QH, tp_k_head_num=KVH)
    out, keys, _ = DepthKVTorchNativeAttnBackend._attend(None, q, k_cache, v_cache, slots, held_pos, qpos, layer)
    assert keys.shape == (KVH, held_pos.numel(), D)
    for h in range(QH):
        kv = h // (QH // KVH)
        for i, p in enumerate(qpos.tolist()):
            vis = held_pos <= p
            kk = k_cache[slots[vis], kv].double()
            vv = v_cache[slots[vis], kv].double()
            prob = torch.softmax(kk @ q[h, i].double() * 0.37, dim=0)
            torch.testing.assert_close(out[h, i].double(), prob @ vv, atol=1e-5, rtol=1e-5)
