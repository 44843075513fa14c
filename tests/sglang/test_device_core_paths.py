"""Device placement on the SGLang side of the core decision, no Engine: end-of-prefill selection
(``pruning.select_own``, ``dropped_positions``), the decode-time pruning state, the CUDA-graph
``DecodeRing`` and the gates loaded at start-up (``build_policy``) create their tensors on the
device of their inputs.

As in ``tests/core/test_device.py``: ``meta`` tensors (a device, no values) cannot be mixed with CPU
tensors, so a tensor created on the wrong device fails a meta run as it would fail a CUDA run, and
meta runs go through ``OneDevice`` (indexing is lax on meta: a CPU tensor indexed by a meta index
returns a CPU tensor, where CUDA raises). The NaN guard of ``core.selection`` reads values and is
stubbed for meta runs; ``dropped_positions`` runs on meta with torch's all-non-zero assumption for
``nonzero`` (so that an implementation by boolean index runs there too); the global top-k allocator's keep counts read the
scores and run on CPU, and so does the pool mapping ``prune_segment`` reads (its K/V buffers are
meta).
"""

from types import SimpleNamespace

import sys
from pathlib import Path

import pytest
import torch
import torch.fx.experimental._config as fx_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from device_modes import OneDevice, no_value_guards, one_device  # noqa: E402,F401  (fixtures)
from sglang_depthkv.core import selection
from sglang_depthkv.core.gates import FeatureSpec, KVzipGates, save_gates
from sglang_depthkv.core.policy import make_policy
from sglang_depthkv.core.profile import SensitivityProfile
from sglang_depthkv.core.scorers.kvzip import KVzipGateScorer
from sglang_depthkv.core.types import LayerObservation, ModelIdentity
from sglang_depthkv.sglang import decode_pruning as DP
from sglang_depthkv.sglang.decode_ring import DecodeRing
from sglang_depthkv.sglang.pruning import dropped_positions, select_own

L, KVH, QH, D, HID = 3, 2, 4, 8, 16
SINKS, W, I = 2, 3, 4
META = torch.device("meta")
IDENT = ModelIdentity(num_layers=L, num_attention_heads=QH, num_key_value_heads=KVH, head_dim=D, hidden_size=HID)


def profile():
    return SensitivityProfile(IDENT, "snapkv", [0.25, 0.5, 1.0], [[0.3 + l, 0.1 * (l + 1), 0.0] for l in range(L)])


def gates(use_hidden=True):
    spec = FeatureSpec(use_key=True, use_hidden=use_hidden, head_dim=D, hidden_size=HID)
    g = torch.Generator().manual_seed(0)
    return KVzipGates(IDENT, spec, torch.randn(L, KVH, spec.dim, generator=g), torch.randn(L, KVH, generator=g))


def meta_observation(layer, n, hidden=True):
    return LayerObservation(layer=layer, keys=torch.randn(KVH, n, D, device=META),
                            values=torch.randn(KVH, n, D, device=META),
                            window_queries=torch.randn(QH, W, D, device=META), scaling=D ** -0.5,
                            o_proj_weight=torch.randn(HID, QH * D, device=META),
                            hidden_states=torch.randn(n, HID, device=META) if hidden else None)


# ---------------------------------------------------------------------- end-of-prefill selection
@pytest.mark.parametrize("name", ["streamingllm", "snapkv", "pyramid", "depthkv"])
@pytest.mark.parametrize("own_lo", [0, 5])
def test_select_own_follows_meta(name, own_lo, no_value_guards):
    pol = make_policy(name, 0.4, profile=profile(), sinks=SINKS, window=W)
    keep = select_own(pol, torch.randn(L, 30, device=META, dtype=torch.bfloat16), own_lo)
    assert len(keep) == L and all(k.device == META and k.dtype == torch.int64 for k in keep)


def test_select_own_global_topk_on_cpu():
    """The global top-k keep counts read the scores: CPU, absolute positions of the own segment."""
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(L, 30, generator=g)
    keep = select_own(make_policy("laprox", 0.4, sinks=SINKS, window=W), scores, 7)
    assert all(k.device.type == "cpu" and k.dtype == torch.int64 for k in keep)
    assert all(set(range(37 - W, 37)) <= set(k.tolist()) and min(k.tolist()) >= 7 for k in keep)


def test_dropped_positions_follows_meta(one_device):
    keep = torch.arange(4, 9, device=META)
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        out = dropped_positions(keep, 2, 12)
    assert out.device == META and out.dtype == torch.int64


def test_dropped_positions_on_cpu():
    out = dropped_positions(torch.tensor([3, 5, 6], dtype=torch.int32), 2, 9)
    assert out.device.type == "cpu" and out.dtype == torch.int64 and out.tolist() == [2, 4, 7, 8]


# ---------------------------------------------------------------------- decode-time pruning state
class _Req:
    rid = "r0"
    req_pool_idx = 1
    origin_input_ids = list(range(7))


def test_decode_state_records_on_meta(one_device):
    st = DP.state_of(_Req(), L)
    for g in range(1, 6):
        DP.begin_step(st, 7 + g)
        for l in range(L):
            DP.record_feed(st, l, torch.randn(QH, 1, D, device=META), torch.randn(1, HID, device=META), 0.5, W)
        DP.end_step(st, 7 + g)
    assert all(q.device == META and q.shape == (QH, W, D) for q in st.queries)
    assert all(h.device == META and h.shape == (5, HID) for h in st.hidden)
    assert DP.prune_due(st, 2, W) and not DP.prune_due(st, I, W)


class _Pool:
    """A layer-sliced pool: host ``mapping`` (it is read), K/V buffers and weights on meta."""

    def __init__(self, size):
        self.start_layer, self.layer_num = 0, L
        self.mapping = torch.arange(1, size + 1).repeat(L, 1)  # logical id j -> slot j + 1 at every layer
        self.kv = [(torch.randn(size + 2, KVH, D, device=META), torch.randn(size + 2, KVH, D, device=META))
                   for _ in range(L)]

    def get_kv_buffer(self, layer_id):
        return self.kv[layer_id]


class _SpyPolicy:
    """Checks the observations of a decode event and keeps all but the segment's first token."""

    window = W

    def __init__(self):
        self.seen = []

    def select(self, obs):
        for o in obs:
            o.check()
            self.seen.append({t.device for t in (o.keys, o.values, o.window_queries, o.o_proj_weight,
                                                   o.hidden_states)})
        return [torch.arange(1, I + W) for _ in obs]


class _Allocator:
    def __init__(self):
        self.ids = None

    def prune(self, layers, ids):
        self.ids = ids
        return [int(x.numel()) for x in ids]


def test_prune_segment_builds_observations_on_the_cache_device():
    req, pool, alloc, pol = _Req(), _Pool(100), _Allocator(), _SpyPolicy()
    req_to_token = torch.arange(3 * 40).reshape(3, 40)  # row 1: logical ids 40..79
    st = DP.state_of(req, L)
    for g in range(1, I + W + 1):
        DP.begin_step(st, 7 + g)
        for l in range(L):
            DP.record_feed(st, l, torch.randn(QH, 1, D, device=META), torch.randn(1, HID, device=META), 0.5, W)
        DP.end_step(st, 7 + g)
    assert DP.prune_due(st, I, W)
    o_proj = {l: torch.randn(HID, QH * D, device=META) for l in range(L)}
    DP.prune_segment(st, pol, I, req, req_to_token, pool, alloc, o_proj.__getitem__)
    assert pol.seen == [{META}] * L
    assert [x.tolist() for x in alloc.ids] == [[47]] * L and all(x.device.type == "cpu" for x in alloc.ids)
    assert st.settled == I and all(h.device == META and h.shape == (W, HID) for h in st.hidden)


# ---------------------------------------------------------------------- CUDA-graph ring
def meta_ring(hidden=True):
    return DecodeRing(num_layers=L, slots=4, max_bs=6, window=W, interval=I, q_heads=QH, head_dim=D,
                      hidden_size=HID if hidden else None, table_rows=10, dtype=torch.bfloat16, device="meta")


@pytest.mark.parametrize("batch_device", ["meta", "cpu"])
def test_ring_bind_write_read_load_on_meta(batch_device, one_device):
    """A meta ring: bound from batch tensors on its device or on the host, written, read, loaded."""
    rg = meta_ring()
    slot = rg.acquire(object(), 3, 9)
    rg.bind(torch.tensor([3, 0, 0], device=batch_device), torch.tensor([12, 1, 1], device=batch_device), 1, 3)
    assert rg.q_index.device == META and rg.h_index.device == META
    for l in range(L):
        rg.write(l, torch.randn(3, QH * D, device=META, dtype=torch.bfloat16),
                 torch.randn(3, HID, device=META, dtype=torch.bfloat16))
    (qs, hs), = rg.read([(slot, 3, 0)])
    assert all(q.device == META and q.shape == (QH, W, D) for q in qs)
    assert all(h.device == META and h.shape == (3, HID) for h in hs)
    rg.load(slot, 3, 0, [torch.randn(QH, W, D, device=META) for _ in range(L)],
            [torch.randn(3, HID, device=META) for _ in range(L)])


# ---------------------------------------------------------------------- gates on the model's device
@pytest.mark.parametrize("use_hidden", [True, False])
def test_gates_to_meta_then_score_a_meta_observation(use_hidden, one_device):
    gt = gates(use_hidden)
    moved = gt.to("meta")
    assert moved.weight.device == META and moved.bias.device == META
    assert moved.weight.dtype == torch.float32 and moved.bias.dtype == torch.float32
    assert gt.weight.device.type == "cpu" and moved.spec == gt.spec and moved.identity == gt.identity
    s = KVzipGateScorer(moved).score(meta_observation(2, 25, hidden=use_hidden))
    assert s.device == META and s.dtype == torch.float32 and s.shape == (KVH, 25)


def test_gates_on_another_device_than_the_observation_are_refused():
    with pytest.raises(ValueError, match=r"gates on cpu, observation on meta.*KVzipGates\.to"):
        gates().scores(meta_observation(0, 10))


def test_build_policy_moves_gates_to_the_model_device(tmp_path):
    from sglang_depthkv.sglang.backends.scoring import build_policy

    path = save_gates(gates(), tmp_path / "gates.safetensors")
    hf = SimpleNamespace(num_attention_heads=QH, num_hidden_layers=L, num_key_value_heads=KVH, head_dim=D,
                         hidden_size=HID, architectures=["LlamaForCausalLM"])
    from sglang.srt.distributed.parallel_state_wrapper import ParallelState

    runner = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf), device="meta", ps=ParallelState.trivial())
    settings = SimpleNamespace(policy="kvzip", budget=0.4, profile=None, gates=str(path), sinks=SINKS, window=W)
    pol = build_policy(settings, runner)
    assert pol.scorer.gates.weight.device == META and pol.scorer.gates.bias.device == META
    assert pol.scorer.score(meta_observation(1, 20)).device == META
