"""Device placement of the core: every tensor a scorer, layer-budget allocator, selection rule,
policy or gate creates follows the device of its inputs.

``meta`` tensors have a device and a shape but no values, and torch refuses to mix them with CPU
tensors in most ops: a tensor created without ``device=`` (a bare ``torch.arange``) fails a meta run
as it would fail a CUDA run. Indexing is lax on meta (a CPU tensor indexed by a meta index returns a
CPU tensor, where CUDA raises), so meta runs go through ``OneDevice``, which refuses any op whose
tensor arguments sit on two devices. Two kinds of op read values and cannot run on meta:

- the NaN guard of ``core.selection`` (``bool(isnan(x).any())``): stubbed for meta runs by the
  ``no_value_guards`` fixture (it creates nothing);
- the global top-k keep counts (host ints from a sort of the scores): their device part,
  ``extra_keep_counts``, runs on meta; ``allocate`` and the laprox / kvzip policies run on CPU.

CPU runs assert that outputs stay on CPU, with values against float64 formulas written out here.
"""

import math

import sys
from pathlib import Path

import pytest
import torch



sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from device_modes import OneDevice, no_value_guards, one_device  # noqa: E402,F401  (fixtures)
from sglang_depthkv.core import selection
from sglang_depthkv.core.budgets import DepthKVAllocator, GlobalTopKAllocator, PyramidAllocator, UniformAllocator
from sglang_depthkv.core.budgets import global_topk
from sglang_depthkv.core.gates import FeatureSpec, KVzipGates
from sglang_depthkv.core.policy import make_policy
from sglang_depthkv.core.profile import SensitivityProfile
from sglang_depthkv.core.scorers.full import FullScorer
from sglang_depthkv.core.scorers.kvzip import KVzipGateScorer
from sglang_depthkv.core.scorers.laprox import LaProxScorer
from sglang_depthkv.core.scorers.snapkv import SnapKVScorer
from sglang_depthkv.core.scorers.streaming_llm import StreamingLLMScorer
from sglang_depthkv.core.scorers.window_attention import window_attention
from sglang_depthkv.core.selection import protect, select_top, token_scores
from sglang_depthkv.core.types import LayerObservation, ModelIdentity

L, KVH, QH, N, D, W, HID = 3, 2, 4, 40, 8, 6, 16
SINKS = 2
META = torch.device("meta")
IDENT = ModelIdentity(num_layers=L, num_attention_heads=QH, num_key_value_heads=KVH, head_dim=D, hidden_size=HID)


def observation(layer=0, n=N, device="cpu", seed=0, hidden=True):
    """A random observation built on CPU, then moved to ``device``."""
    g = torch.Generator().manual_seed(seed + 17 * layer)
    r = lambda *s: torch.randn(*s, generator=g)
    obs = LayerObservation(layer=layer, keys=r(KVH, n, D), values=r(KVH, n, D), window_queries=r(QH, W, D),
                           scaling=D ** -0.5, o_proj_weight=r(HID, QH * D), hidden_states=r(n, HID) if hidden else None)
    return move(obs, device)


def move(obs, device):
    """``obs`` with every tensor on ``device``."""
    to = lambda t: None if t is None else t.to(device)
    return LayerObservation(obs.layer, to(obs.keys), to(obs.values), to(obs.window_queries), obs.scaling,
                            to(obs.o_proj_weight), to(obs.hidden_states))


def observations(n=N, device="cpu", seed=0):
    return [observation(l, n, device, seed) for l in range(L)]


def gates(use_hidden=True, seed=0):
    spec = FeatureSpec(use_key=True, use_hidden=use_hidden, head_dim=D, hidden_size=HID)
    g = torch.Generator().manual_seed(seed)
    return KVzipGates(IDENT, spec, torch.randn(L, KVH, spec.dim, generator=g), torch.randn(L, KVH, generator=g))


def profile():
    return SensitivityProfile(IDENT, "snapkv", [0.1, 0.3, 0.5], [[1.0, 0.5, 0.2], [5.0, 2.0, 1.0], [0.1, 0.05, 0.0]])


SCORERS = {
    "full": lambda: FullScorer(),
    "streamingllm": lambda: StreamingLLMScorer(),
    "snapkv": lambda: SnapKVScorer(),
    "snapkv-k1": lambda: SnapKVScorer(pool_kernel=1),
    "laprox": lambda: LaProxScorer(),
    "laprox-head-mean": lambda: LaProxScorer(head_mean_power=0.5),
    "kvzip-hidden": lambda: KVzipGateScorer(gates(use_hidden=True)),
    "kvzip-key-only": lambda: KVzipGateScorer(gates(use_hidden=False)),
}


def scorer_on(name, device):
    sc = SCORERS[name]()
    if isinstance(sc, KVzipGateScorer):
        sc = KVzipGateScorer(sc.gates.to(device))
    return sc


# ---------------------------------------------------------------------- scorers
def test_window_attention_follows_meta(one_device):
    p = window_attention(observation(device=META))
    assert p.device == META and p.shape == (QH, W, N) and p.dtype == torch.float32


@pytest.mark.parametrize("name", list(SCORERS))
def test_scorer_follows_meta(name, one_device):
    out = scorer_on(name, META).score(observation(layer=1, device=META, hidden=name != "kvzip-key-only"))
    assert out.device == META and out.shape == (KVH, N) and out.dtype == torch.float32


def brute_window_probs(obs):
    """``[qh, w, n]`` float64, explicit causal loop: window query i (position n-w+i) sees keys <= n-w+i."""
    q, k = obs.window_queries.double(), obs.keys.double()
    qh, w, _ = q.shape
    kvh, n, _ = k.shape
    p = torch.zeros(qh, w, n, dtype=torch.float64)
    for h in range(qh):
        for i in range(w):
            last = n - w + i
            logits = [float(q[h, i] @ k[h // (qh // kvh), t]) * obs.scaling for t in range(last + 1)]
            top = max(logits)
            e = [math.exp(x - top) for x in logits]
            for t in range(last + 1):
                p[h, i, t] = e[t] / sum(e)
    return p


def brute_gate_scores(gt, obs):
    """sigmoid(w·[r/||r||, h/||h||] + b) per (kv head, token), r_i = |(k_i, k_{i+d/2})| the key's
    norm in each RoPE plane, float64 loops."""
    w, b = gt.weight[obs.layer].double(), gt.bias[obs.layer].double()
    out = torch.zeros(KVH, obs.num_tokens, dtype=torch.float64)
    for g in range(KVH):
        for t in range(obs.num_tokens):
            k = obs.keys[g, t].double()
            half = k.numel() // 2
            r = torch.tensor([math.sqrt(float(k[i]) ** 2 + float(k[i + half]) ** 2) for i in range(half)],
                             dtype=torch.float64)
            x = [r / r.norm()]
            if gt.spec.use_hidden:
                h = obs.hidden_states[t].double()
                x.append(h / h.norm())
            out[g, t] = 1.0 / (1.0 + math.exp(-(float(torch.cat(x) @ w[g]) + float(b[g]))))
    return out


def test_scorers_on_cpu_stay_on_cpu_with_their_values():
    obs = observation(layer=2, n=13)
    p = window_attention(obs)
    assert p.device.type == "cpu"
    torch.testing.assert_close(p.double(), brute_window_probs(obs), rtol=1e-5, atol=1e-7)
    f = FullScorer().score(obs)
    assert f.device.type == "cpu" and f.dtype == torch.float32 and not f.any()
    s = StreamingLLMScorer().score(obs)
    assert s.device.type == "cpu" and s.tolist() == [[float(t) for t in range(13)]] * KVH
    for use_hidden in (True, False):
        gt = gates(use_hidden)
        sc = KVzipGateScorer(gt.to("cpu")).score(obs)
        assert sc.device.type == "cpu" and sc.dtype == torch.float32
        torch.testing.assert_close(sc.double(), brute_gate_scores(gt, obs), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- observations
@pytest.mark.parametrize("field", ["values", "window_queries", "o_proj_weight", "hidden_states"])
def test_observation_check_names_a_field_on_another_device(field):
    obs = observation(device=META)
    setattr(obs, field, torch.empty_like(getattr(obs, field), device="cpu"))  # meta has no data to copy
    with pytest.raises(ValueError, match=f"{field} on cpu, keys on meta"):
        obs.check()


# ---------------------------------------------------------------------- selection
def test_selection_follows_meta(no_value_guards):
    head = torch.randn(KVH, N, device=META, dtype=torch.bfloat16)
    s = token_scores(head)
    assert s.device == META and s.dtype == torch.float32 and s.shape == (N,)
    p = protect(s, SINKS, W)
    assert p.device == META and p.shape == (N,)
    k = select_top(p, 10)
    assert k.device == META and k.dtype == torch.int64 and k.shape == (10,)


def test_selection_on_cpu_values():
    g = torch.Generator().manual_seed(5)
    head = torch.randint(0, 4, (KVH, N), generator=g).to(torch.bfloat16)
    s = token_scores(head)
    assert s.device.type == "cpu" and s.tolist() == [float(sum(head[:, t].double())) for t in range(N)]
    p = protect(s, SINKS, W)
    assert p.device.type == "cpu"
    assert p.tolist() == [math.inf if t < SINKS or t >= N - W else s[t].item() for t in range(N)]
    k = select_top(p, 15)
    best = sorted(range(N), key=lambda t: (-p[t].item(), t))[:15]
    assert k.device.type == "cpu" and k.dtype == torch.int64 and k.tolist() == sorted(best)


# ---------------------------------------------------------------------- layer budgets
@pytest.mark.parametrize("alloc", [UniformAllocator(), PyramidAllocator(), DepthKVAllocator(profile())],
                         ids=lambda a: a.name)
def test_static_allocators_give_host_counts(alloc):
    """Static allocators take no tensor: their counts are host ints (never a device tensor)."""
    k = alloc.allocate(N, L, 0.4, SINKS, W)
    assert all(type(x) is int for x in k) and sum(k) == round(0.4 * N * L)


def test_global_topk_device_part_follows_meta(one_device):
    s = torch.randn(L, N, device=META)
    counts = global_topk.extra_keep_counts(s, SINKS + W, N, 20)
    assert counts.device == META and counts.dtype == torch.int64 and counts.shape == (L,)


def brute_extra(scores, lo, cap, extra):
    """Per layer, how many of the ``extra`` best (score desc, layer asc, position asc) candidates
    beyond its ``lo`` best tokens it takes, at most ``cap - lo`` (plain Python)."""
    counts = [0] * len(scores)
    cands = []
    for l, row in enumerate(scores):
        ranked = sorted(range(len(row)), key=lambda t: (-row[t], t))
        cands += [(-row[t], l, t) for t in ranked[lo:cap]]
    for _, l, _ in sorted(cands)[:extra]:
        counts[l] += 1
    return counts


def test_global_topk_on_cpu_values():
    g = torch.Generator().manual_seed(2)
    raw = torch.randint(0, 6, (L, N), generator=g).double()  # ties across layers and positions
    s = torch.stack([protect(r, SINKS, W) for r in raw])
    lo = SINKS + W
    for cap, extra in [(N, 20), (N, 0), (lo + 9, 25)]:
        counts = global_topk.extra_keep_counts(s, lo, cap, extra)
        assert counts.device.type == "cpu" and counts.tolist() == brute_extra(s.tolist(), lo, cap, extra)
    k = GlobalTopKAllocator().allocate(N, L, 0.4, SINKS, W, s)
    assert all(type(x) is int for x in k)
    assert k == [lo + c for c in brute_extra(s.tolist(), lo, N, round(0.4 * N * L) - L * lo)]


# ---------------------------------------------------------------------- policies
@pytest.mark.parametrize("name", ["full", "streamingllm", "snapkv", "pyramid", "depthkv"])
def test_policy_select_follows_meta(name, no_value_guards):
    pol = make_policy(name, 0.4, profile=profile(), sinks=SINKS, window=W)
    keep = pol.select(observations(device=META))
    assert len(keep) == L and all(k.device == META and k.dtype == torch.int64 for k in keep)
    if name != "full":
        assert sum(k.shape[0] for k in keep) == round(0.4 * N * L)


@pytest.mark.parametrize("name", ["streamingllm", "laprox", "kvzip"])
def test_unpruned_policy_keeps_all_on_meta(name, one_device):
    """A sequence no longer than sinks + window is kept whole, on the observations' device."""
    pol = make_policy(name, 0.4, gates=gates().to(META), sinks=SINKS, window=W)
    keep = pol.select(observations(n=SINKS + W, device=META))
    assert all(k.device == META and k.dtype == torch.int64 and k.shape == (SINKS + W,) for k in keep)


def brute_global_select(layer_scores, budget):
    """Keep sets of a global top-k policy from protected scores ``[L][n]`` (plain Python)."""
    lo, n = SINKS + W, len(layer_scores[0])
    extra = brute_extra(layer_scores, lo, n, round(budget * n * len(layer_scores)) - len(layer_scores) * lo)
    return [sorted(sorted(range(n), key=lambda t: (-row[t], t))[:lo + c]) for row, c in zip(layer_scores, extra)]


@pytest.mark.parametrize("name", ["laprox", "kvzip"])
def test_global_topk_policies_on_cpu(name):
    """Their keep counts read the scores (host ints), so they run on CPU: keep sets stay there."""
    gt = gates()
    pol = make_policy(name, 0.4, gates=gt.to("cpu"), sinks=SINKS, window=W)
    obs = observations(seed=3)
    keep = pol.select(obs)
    assert all(k.device.type == "cpu" and k.dtype == torch.int64 for k in keep)
    scorer = LaProxScorer(head_mean_power=0.5) if name == "laprox" else KVzipGateScorer(gt)
    prot = [protect(token_scores(scorer.score(o)), SINKS, W).tolist() for o in obs]
    assert [k.tolist() for k in keep] == brute_global_select(prot, 0.4)
