"""Scoring memory at long context: values and the largest tensor any op of one layer's scoring creates.

The scorers process the keys/values in chunks of ``window_attention.CHUNK`` tokens. Values are
checked against float64 formulas with ``CHUNK`` patched small (7) so that several chunks, a ragged
last chunk and chunks entirely in a window query's future are exercised on small tensors. Memory is
measured with a dispatch mode that records, per aten op, the bytes of the tensors it creates
(outputs that alias an input, i.e. views and in-place results, create nothing), at Llama-3.1-8B head
shapes: no op may create more than the bound the scorers document.
"""

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sglang_depthkv.core.scorers.laprox import LaProxScorer, output_contribution
from sglang_depthkv.core.scorers.snapkv import SnapKVScorer
from sglang_depthkv.core.scorers.window_attention import window_attention
from sglang_depthkv.core.types import LayerObservation
from sglang_depthkv.sglang import observations as O

WA = importlib.import_module("sglang_depthkv.core.scorers.window_attention")

# Llama-3.1-8B attention shapes
QH, KVH, D, HID = 32, 8, 128, 4096
GROUP = QH // KVH
F32 = 4


# ---------------------------------------------------------------------- recording allocations
VIEW_OPS = {"aten._unsafe_view.default"}  # a view whose schema carries no alias mark


class AllocationRecorder(TorchDispatchMode):
    """Per aten op, the bytes of the tensors it creates: outputs whose schema marks no alias of an
    input (a view, an in-place or ``out=`` result shares an input's storage and creates nothing)."""

    def __init__(self):
        super().__init__()
        self.ops = []  # (op name, bytes created, shapes created)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple) else (out,)
        created = []
        for ret, o in zip(func._schema.returns, outs):
            if ret.alias_info is not None or str(func) in VIEW_OPS:
                continue
            created += [t for t in (o if isinstance(o, (list, tuple)) else [o]) if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in created)
        self.ops.append((str(func), nbytes, [tuple(t.shape) for t in created]))
        return out

    def peak(self):
        """The op that created the most bytes: (name, bytes, shapes)."""
        return max(self.ops, key=lambda r: r[1])

    def over(self, limit, allowed_shape=None):
        """Ops creating more than ``limit`` bytes, leaving out one tensor of ``allowed_shape`` (a
        function's documented output) the first time an op creates exactly it."""
        bad, allowed_left = [], allowed_shape is not None
        for name, nbytes, shapes in self.ops:
            if allowed_left and shapes == [allowed_shape]:
                allowed_left = False
                continue
            if nbytes > limit:
                bad.append((name, nbytes, shapes))
        return bad


def recorded(fn, *args):
    with AllocationRecorder() as rec:
        fn(*args)
    return rec


def llama_obs(n, w, device, dtype=torch.bfloat16, seed=0):
    """One layer's observation at Llama-8B head shapes, in the serving dtype (bf16)."""
    if device == "meta":
        r = lambda *s: torch.empty(*s, dtype=dtype, device="meta")
    else:
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    return LayerObservation(layer=0, keys=r(KVH, n, D), values=r(KVH, n, D), window_queries=r(QH, w, D),
                            scaling=D ** -0.5, o_proj_weight=r(HID, QH * D) * 0.02)


def attention_bound(w, chunk):
    """``window_attention``'s transient bound in bytes: the logits of one chunk (qh·w·CHUNK), one
    chunk of keys in float32 (kvh·CHUNK·d), the window queries in float32 (qh·w·d)."""
    return F32 * max(QH * w * chunk, KVH * chunk * D, QH * w * D)


def scorer_bound(w, chunk, n):
    """SnapKV's bound: the attention's and the [qh, n] per-head results."""
    return max(attention_bound(w, chunk), F32 * QH * n)


def laprox_bound(w, chunk, n):
    """LaProx's bound: the attention's; per chunk the probabilities permuted (qh·w·CHUNK), the
    products of head pairs (qh·group·CHUNK) and the value cross terms of a sub-chunk of CHUNK // group
    tokens (group·CHUNK·d); one kv group's o_proj columns in float32 (hidden·group·d) and the Gram
    blocks of all groups (qh·group·d²); the [kvh, n] results."""
    return max(attention_bound(w, chunk), F32 * max(QH * w * chunk, QH * GROUP * chunk, GROUP * chunk * D,
                                                    HID * GROUP * D, QH * GROUP * D * D, KVH * n))


# ---------------------------------------------------------------------- float64 references
def ref_probs(obs):
    """``[qh, w, n]`` float64: query head h uses kv head h // group; window query i (position
    n-w+i) sees keys t <= n-w+i."""
    q, k = obs.window_queries.double(), obs.keys.double()
    qh, w, _ = q.shape
    kvh, n, _ = k.shape
    k = k[torch.arange(qh) // (qh // kvh)]
    logits = torch.einsum("hid,htd->hit", q, k) * obs.scaling
    future = torch.arange(n)[None, :] > (n - w + torch.arange(w))[:, None]
    return torch.softmax(logits.masked_fill(future, -math.inf), dim=-1)


def ref_contribution(obs):
    """``[kvh, n]`` float64: ||M[g, t]||_F / sqrt(w) with M[g, t] = sum over the group's heads of
    p[h, :, t] ⊗ (v[g, t] W_hᵀ), by the full [w, hidden] products."""
    p, v, wo = ref_probs(obs), obs.values.double(), obs.o_proj_weight.double()
    qh, kvh, d, w = obs.num_q_heads, obs.num_kv_heads, v.shape[2], obs.window
    grp = qh // kvh
    u = torch.stack([v[h // grp] @ wo[:, h * d:(h + 1) * d].T for h in range(qh)])  # [qh, n, hidden]
    m = torch.einsum("hit,hto->htio", p, u).reshape(kvh, grp, obs.num_tokens, w, -1).sum(dim=1)
    return m.flatten(2).norm(dim=-1) / math.sqrt(w)


def ref_pool(s, kernel):
    """Mean over the positions of each window that exist (float64, by slicing)."""
    half, n = kernel // 2, s.shape[1]
    return torch.stack([s[:, max(0, t - half):t + half + 1].mean(dim=1) for t in range(n)], dim=1)


def ref_snapkv(obs, kernel=7):
    a = ref_probs(obs).mean(dim=1)
    return ref_pool(a.reshape(obs.num_kv_heads, -1, obs.num_tokens).sum(dim=1), kernel)


def ref_laprox(obs, kernel=7):
    return ref_pool(ref_contribution(obs), kernel)


def small_obs(n, w, kvh=2, qh=6, d=5, hid=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 1.5).to(dtype)
    return LayerObservation(layer=1, keys=r(kvh, n, d), values=r(kvh, n, d), window_queries=r(qh, w, d),
                            scaling=d ** -0.5, o_proj_weight=r(hid, qh * d))


# ---------------------------------------------------------------------- values, several chunks
SIZES = [(30, 1), (30, 4), (30, 9), (28, 7), (7, 3), (5, 5), (3, 2)]  # (n, w), CHUNK = 7


@pytest.fixture
def chunk7(monkeypatch):
    monkeypatch.setattr(WA, "CHUNK", 7, raising=False)


@pytest.mark.parametrize("n,w", SIZES)
@pytest.mark.parametrize("kvh,qh", [(2, 6), (3, 3)])
def test_window_attention_chunked_matches_float64(chunk7, n, w, kvh, qh):
    obs = small_obs(n, w, kvh=kvh, qh=qh)
    p = window_attention(obs)
    assert p.dtype == torch.float32 and p.shape == (qh, w, n)
    torch.testing.assert_close(p.double(), ref_probs(obs), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n,w", SIZES)
def test_window_attention_mean_chunked_matches_float64(chunk7, n, w):
    obs = small_obs(n, w)
    a = WA.window_attention_mean(obs)
    assert a.dtype == torch.float32 and a.shape == (obs.num_q_heads, n)
    torch.testing.assert_close(a.double(), ref_probs(obs).mean(dim=1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n,w", SIZES)
@pytest.mark.parametrize("kvh,qh", [(2, 6), (3, 3), (1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_contribution_chunked_matches_float64(chunk7, n, w, kvh, qh, dtype):
    """CHUNK 7: several key chunks, and value sub-chunks of 7 // group tokens (1 with 6 heads a group)."""
    obs = small_obs(n, w, kvh=kvh, qh=qh, dtype=dtype)
    got = output_contribution(obs)
    assert got.dtype == torch.float32 and got.shape == (kvh, n)
    torch.testing.assert_close(got.double(), ref_contribution(obs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,w", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scorers_chunked_match_float64(chunk7, n, w, dtype):
    obs = small_obs(n, w, dtype=dtype)
    torch.testing.assert_close(SnapKVScorer().score(obs).double(), ref_snapkv(obs), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(LaProxScorer().score(obs).double(), ref_laprox(obs), rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_scores(monkeypatch):
    """Chunked (CHUNK 7) and single-chunk scores of the same observation agree to float32 rounding."""
    obs = small_obs(40, 6, dtype=torch.bfloat16, seed=3)
    whole = [SnapKVScorer().score(obs), LaProxScorer().score(obs), window_attention(obs)]
    monkeypatch.setattr(WA, "CHUNK", 7, raising=False)
    chunked = [SnapKVScorer().score(obs), LaProxScorer().score(obs), window_attention(obs)]
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_llama_shapes_cpu_values(monkeypatch):
    """The chunked path at Llama-8B head shapes (bf16 inputs) against float64."""
    monkeypatch.setattr(WA, "CHUNK", 64, raising=False)
    obs = llama_obs(200, 8, "cpu", seed=1)
    torch.testing.assert_close(window_attention(obs).double(), ref_probs(obs), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(LaProxScorer().score(obs).double(), ref_laprox(obs), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------- memory, Llama-8B shapes
# (device, CHUNK): CPU runs the kernels at a small CHUNK (n = 4·CHUNK keeps [qh, n, d] above every
# bound term); meta has shapes without storage, so it runs the production CHUNK at n = 4·CHUNK.
MEMORY_CASES = [("cpu", 256), ("meta", None)]
W = 32  # the policy's default window


def chunk_for(monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(WA, "CHUNK", chunk, raising=False)
    return int(getattr(WA, "CHUNK", chunk or 16384))


@pytest.mark.parametrize("device,chunk", MEMORY_CASES)
def test_window_attention_transients_bounded(monkeypatch, device, chunk):
    c = chunk_for(monkeypatch, chunk)
    n = 4 * c
    rec = recorded(window_attention, llama_obs(n, W, device))
    bad = rec.over(attention_bound(W, c), allowed_shape=(QH, W, n))
    assert not bad, f"ops over {attention_bound(W, c)} bytes at n={n}: {bad[:4]}"


@pytest.mark.parametrize("device,chunk", MEMORY_CASES)
@pytest.mark.parametrize("scorer,bound", [(SnapKVScorer(), scorer_bound), (LaProxScorer(), laprox_bound)],
                         ids=["snapkv", "laprox"])
def test_scorer_transients_bounded(monkeypatch, device, chunk, scorer, bound):
    """No [qh, w, n] tensor either: the scorers need only one chunk of the probabilities."""
    c = chunk_for(monkeypatch, chunk)
    n = 4 * c
    limit = bound(W, c, n)
    rec = recorded(scorer.score, llama_obs(n, W, device))
    bad = rec.over(limit)
    assert not bad, f"{scorer!r}: ops over {limit} bytes at n={n} (peak {rec.peak()}): {bad[:4]}"


# ---------------------------------------------------------------------- chunked-prefill stash
def test_chunked_stash_copies_linearly_and_keeps_dtypes():
    """k chunks of m rows: the KVzip hidden states are copied once per chunk and joined once
    (O(n)), window queries cost O(w) per chunk, and the observation keeps the inputs' dtypes (the
    scorers upcast what they read, per chunk)."""
    qh, kvh, d, hid, w, m, k = 4, 2, 8, 64, 4, 16, 8
    n = m * k
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)
    qs, hs = [r(qh, m, d) for _ in range(k)], [r(m, hid) for _ in range(k)]
    keys, values, wo = r(kvh, n, d), r(kvh, n, d), r(hid, qh * d)
    req = SimpleNamespace(rid="r")
    entry = lambda j: O.ExtendEntry(req=req, rid="r", prefix_len=j * m, seq_len=(j + 1) * m, own_lo=0,
                                    final=j == k - 1)
    with AllocationRecorder() as rec:
        for j in range(k - 1):
            st = O.get_stash(entry(j), 1)
            O.stash_chunk(st, 0, qs[j], hs[j], w)
            st.upto = (j + 1) * m
        st = O.get_stash(entry(k - 1), 1)
        obs, own = O.build_observation(5, 0, entry(k - 1), st, torch.arange(n), keys, values, qs[-1], hs[-1],
                                       d ** -0.5, wo, w, own_only=True)
    assert torch.equal(obs.hidden_states, torch.cat(hs))
    assert torch.equal(obs.window_queries, torch.cat(qs, 1)[:, -w:])
    assert torch.equal(obs.keys, keys) and torch.equal(own, torch.arange(n))
    assert obs.o_proj_weight is wo and obs.keys.dtype == obs.values.dtype == obs.hidden_states.dtype == torch.bfloat16
    es = 2  # bf16
    hidden_bytes = sum(b for _, b, shapes in rec.ops if shapes and all(len(s) == 2 and s[-1] == hid for s in shapes))
    assert hidden_bytes <= 2 * n * hid * es, f"hidden states copied {hidden_bytes} bytes for {n * hid * es}"
    query_bytes = sum(b for _, b, shapes in rec.ops if shapes and all(len(s) == 3 and s[0] == qh for s in shapes))
    assert query_bytes <= k * 3 * qh * w * d * es, f"window queries copied {query_bytes} bytes"
