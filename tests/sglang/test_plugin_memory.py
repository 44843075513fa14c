"""The plugin's device buffers besides the KV pool (``sglang/plugin_memory.py``): the model counted
in the capacity plan against the real allocations, and the numbers at Llama-3.1-8B shapes with a
128k context and decode CUDA graphs up to batch 256."""

import dataclasses

import pytest
import torch

from benchmarks.hot_path import paths as P
from benchmarks.hot_path import state as S
from benchmarks.hot_path.live_bytes import LiveBytes
from benchmarks.hot_path.sync_count import SyncCounter
from sglang_depthkv.sglang import plugin_memory as M
from sglang_depthkv.sglang.backends.layer_indices import LayerIndexStreams, graph_capacity, index_dtype
from sglang_depthkv.sglang.capacity import GIB, plan_for_bytes
from sglang_depthkv.sglang.decode_ring import DecodeRing


def shapes(**kw):
    base = dict(num_layers=4, q_heads=8, kv_heads=2, head_dim=16, hidden_size=128, context_len=300, kv_bytes=2,
                act_bytes=2, graph_max_bs=6, prefill_chunk=300, window=5, decode_interval=7, scores=True,
                gate_hidden=True)
    base.update(kw)
    return M.PluginShapes(**base)


def tensor_bytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def test_graph_items_equal_the_real_graph_buffers_and_ring():
    s = shapes()
    caps = [280, 120, 200, 90]
    mapping = torch.zeros((s.num_layers, 302), dtype=torch.int32)
    streams = LayerIndexStreams(mapping, torch.zeros((8, 400), dtype=torch.int32),
                                index_dtype(max(caps), s.kv_heads * s.head_dim))
    streams.alloc_graph(s.graph_max_bs, graph_capacity(s.graph_max_bs, s.context_len, caps))
    splits = torch.zeros((s.num_layers, s.graph_max_bs), dtype=torch.int32)  # the backend's _graph_splits
    from sglang_depthkv.sglang.pool import DepthKVPool

    pool = DepthKVPool(300, caps, torch.bfloat16, s.kv_heads, s.head_dim, s.num_layers, "cpu")
    pool.alloc_write_slots(s.graph_max_bs)
    ring = DecodeRing(num_layers=s.num_layers, slots=s.graph_max_bs, max_bs=s.graph_max_bs, window=s.window,
                      interval=s.decode_interval, q_heads=s.q_heads, head_dim=s.head_dim, hidden_size=s.hidden_size,
                      table_rows=8, dtype=torch.bfloat16, device="cpu")
    items = dict(M.graph_items(s, max(caps)))
    assert items["graph page tables"] == tensor_bytes(streams.graph_indptr, streams.graph_indices, streams.graph_kept,
                                                      splits, pool.write_slots)
    assert items["decode ring"] == tensor_bytes(ring.q, ring.h)
    assert M.graph_items(shapes(graph_max_bs=0), max(caps)) == ()  # no decode graphs: nothing


@pytest.mark.parametrize("policy", ["snapkv", "laprox"])
def test_prefill_scoring_peak_is_within_the_counted_bytes(policy):
    """One end-of-prefill batch (one request, every layer) at Llama-8B head shapes: the peak of
    tensor storage alive during it stays under ``scoring_items`` at that length."""
    n = 384
    st = S.build_state(1, n)
    reqs = S.add_requests(st, 1, n)
    live = LiveBytes()
    P.prefill_end(SyncCounter(), st, reqs, n, measure=live, policy=policy)
    s = M.PluginShapes(num_layers=S.LAYERS, q_heads=S.Q_HEADS, kv_heads=S.KV_HEADS, head_dim=S.HEAD_DIM,
                       hidden_size=4096, context_len=n, kv_bytes=2, act_bytes=2, graph_max_bs=0, prefill_chunk=n,
                       window=8, decode_interval=0, scores=True, gate_hidden=False, laprox=policy == "laprox")
    counted = M.total(M.scoring_items(s))
    assert live.peak > 0
    assert live.peak <= counted, (live.peak, counted)
    if policy == "laprox":  # LaProx's transients are counted for LaProx only
        assert counted > M.total(M.scoring_items(dataclasses.replace(s, laprox=False)))


def test_llama31_8b_128k_batch_256_buffers_are_bounded_and_counted():
    s = M.PluginShapes(num_layers=32, q_heads=32, kv_heads=8, head_dim=128, hidden_size=4096, context_len=131072,
                       kv_bytes=2, act_bytes=2, graph_max_bs=256, prefill_chunk=8192, window=32, decode_interval=128,
                       scores=True, gate_hidden=False)
    plan = plan_for_bytes(50 * GIB, [0.3] * 32, headroom=8192, bytes_per_slot=8 * 128 * 2 * 2,
                          plugin=M.items_function(s))
    items = dict(plan.plugin)
    max_c = max(plan.capacities)
    # page tables: bounded by the largest layer, not by max_bs * context (8 bytes * 32 * 256 * min(128k, C))
    unbounded = 8 * 32 * 256 * min(131072, max_c)
    assert items["graph page tables"] <= 0.4 * GIB < unbounded / 10
    assert items["decode ring"] < 2.2 * GIB  # 32 layers x (256 x 32 + 256) rows x 32 heads x 128 x bf16
    assert items["prefill scoring"] < 4 * GIB
    assert plan.total_bytes() <= 50 * GIB
    assert plan.kv_bytes() + plan.metadata_bytes() + sum(items.values()) == plan.total_bytes()
    assert "plugin buffer: graph page tables" in plan.table("snapkv", 0.3)


def test_unknown_graph_batch_is_refused_by_name():
    class Decode:
        backend, max_bs, bs = "full", None, None

    class Cfg:
        decode = Decode()

    class Args:
        disable_cuda_graph, device, cuda_graph_config, cuda_graph_max_bs = False, "cuda", Cfg(), None

    with pytest.raises(ValueError, match="cuda-graph-max-bs"):
        M.graph_max_bs(Args())
