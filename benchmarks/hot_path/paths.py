"""The plugin's hot paths, each run once under a ``SyncCounter`` (``sync_count.py``) over a
``ServingState`` (``state.py``), calling the same functions the serving path calls:

- ``decode_graph``: the step's ``alloc`` of the decoded tokens, replay-prep (``fill_graph``, the
  one-launch split-K counts and the write-slot gather, i.e.
  ``DepthKVTritonAttnBackend.init_forward_metadata_out_graph`` without decode-time pruning) and what
  the graph replays of the plugin (``set_kv_buffer`` per layer through the write slots);
- ``decode_eager``: ``alloc``, the eager decode metadata (``check_held``, ``build``, splits, split-K
  buffers) and ``set_kv_buffer`` per layer;
- ``request_finish``: a batch of finishing requests through ``DepthKVRadixCache.cache_finished_req``
  inside SGLang's free group (their prompts are in the tree already: every id is freed);
- ``prefill_end``: one extend batch whose prefills all end: per layer the scoring of every request
  (``_score_extend_layer``: held K/V, observation, SnapKV scores) and after the last layer the
  keep decision and ``DepthKVAllocator.prune`` (``select_own_many``, ``apply_prune``);
  ``prefill_end_laprox``: the same with LaProx scores and the global top-k (score-dependent keep
  counts, read back once per batch);
- ``admission``: ``PrefillAdder``'s per-layer deficit (``layer_deficit``) with the tree holding the
  finished prompts and the layers short;
- ``evict``: ``evict_from_tree_cache`` with the plugin's per-layer top-up.
Triton kernels run in the interpreter on CPU; a launch counts as one op (what a GPU sees), its
interpreted body is not counted.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from benchmarks.hot_path import state as S


@contextmanager
def launches_as_ops(counter):
    """While counting, an interpreted Triton launch is one op; its body is neither counted nor
    tagged (the interpreter's own host copies are not the kernel's)."""
    from triton.runtime.interpreter import InterpretedFunction

    orig = InterpretedFunction.run

    def run(self, *args, **kwargs):
        path = counter.path
        if path is not None:
            counter.ops[path] += 1
        counter.path = None
        try:
            return orig(self, *args, **kwargs)
        finally:
            counter.path = path

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = orig


def _batch_tensors(st, reqs, counter):
    rpi = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64).to("cpu")  # device
    seq_lens_cpu = torch.tensor([int(r.kv_committed_len) for r in reqs], dtype=torch.int64)
    counter.mark_host(seq_lens_cpu)
    return rpi, seq_lens_cpu


def _decode_step_alloc(st, reqs, rpi, seq_lens_cpu):
    out = st.alloc.alloc(len(reqs))
    st.r2t.req_to_token[rpi, seq_lens_cpu.to("cpu")] = out.to(torch.int32)
    return out


def _kv(bs, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(bs, S.KV_HEADS, S.HEAD_DIM, generator=g).to(S.DTYPE).to("cpu")
    return k, k.clone()


def _decode_step(counter, st, reqs, path, seed, metadata, graph=False):
    """One decode step of ``reqs`` counted under ``path``: the step's ``alloc``, ``metadata(rpi,
    seq_lens, seq_lens_cpu, out)`` (the backend's per-step preparation) and ``set_kv_buffer`` per
    layer (``graph``: through the prepared write slots, as the captured writes)."""
    rpi, seq_cpu = _batch_tensors(st, reqs, counter)
    k, v = _kv(len(reqs), seed)
    with counter.count(path):
        out = _decode_step_alloc(st, reqs, rpi, seq_cpu)
        metadata(rpi, (seq_cpu + 1).to("cpu"), seq_cpu + 1, out)
        st.pool.read_write_slots = graph
        for l in range(S.LAYERS):
            st.pool.set_kv_buffer(None, out, k, v, layer_id_override=l)
        st.pool.read_write_slots = False
    for r in reqs:
        r.kv_committed_len += 1
    return out


def _splits(splits, kept):
    from sglang_depthkv.kernels.kv_splits import layer_kv_splits

    layer_kv_splits(splits, kept, num_head=S.Q_HEADS, num_kv_head=S.KV_HEADS, max_kv_splits=S.MAX_KV_SPLITS,
                    device_core_count=S.CORES)


def decode_graph(counter, st, reqs, graph_splits):
    def replay_prep(rpi, seq_lens, seq_cpu, out):
        _, _, kept = st.streams.fill_graph(rpi, seq_lens, len(reqs))
        _splits(graph_splits, kept)
        st.pool.fill_write_slots(out, len(reqs))

    return _decode_step(counter, st, reqs, "decode_graph", 1, replay_prep, graph=True)


def decode_eager(counter, st, reqs):
    bs = len(reqs)

    def eager_metadata(rpi, seq_lens, seq_cpu, out):
        st.streams.check_held(out, "the decoded token")
        _, _, kept = st.streams.build(rpi, seq_lens, int(seq_cpu.sum()))
        _splits(torch.empty((S.LAYERS, bs), dtype=torch.int32, device="cpu"), kept)
        torch.empty((bs, S.Q_HEADS, S.MAX_KV_SPLITS, S.HEAD_DIM), dtype=torch.float32, device="cpu")
        torch.empty((bs, S.Q_HEADS, S.MAX_KV_SPLITS), dtype=torch.float32, device="cpu")

    return _decode_step(counter, st, reqs, "decode_eager", 2, eager_metadata)


def request_finish(counter, st, reqs):
    with counter.count("request_finish"):
        st.alloc.free_group_begin()
        for r in reqs:
            st.tree.cache_finished_req(r, kv_len_to_handle=int(r.kv_committed_len))
            st.r2t.free(r)
        st.alloc.free_group_end()


class _ScoringHost:
    """The backends' scoring mixin over the state's pools, with a SnapKV policy (no model)."""

    def __new__(cls, st, policy):
        from sglang_depthkv.sglang.backends.scoring import DepthKVScoringMixin

        class Host(DepthKVScoringMixin):
            pass

        h = Host()
        h.token_to_kv_pool, h.allocator, h.req_to_token_pool = st.pool, st.alloc, st.r2t
        h.model_runner = h
        h.policy, h.decode_interval = policy, 0
        h._needs_hidden, h._hidden, h._hooks = False, {}, []
        h._scoring = h._decode_reqs = None
        h.prune_log = []
        h.depthkv_pending_entries = None
        h._o_proj_weight = lambda layer_id: None
        return h


def prefill_end(counter, st, reqs, prompt, measure=None, policy="snapkv", path="prefill_end"):
    """``measure``: an optional context manager around the counted block (e.g. ``LiveBytes``);
    ``policy``: ``snapkv`` (per-layer budgets fixed on the host) or ``laprox`` (one global top-k:
    score-dependent keep counts)."""
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    from sglang_depthkv.core.policy import make_policy
    from sglang_depthkv.sglang.observations import ExtendEntry

    host = _ScoringHost(st, make_policy(policy, 0.3, sinks=4, window=8))
    if policy == "laprox":
        w_o = torch.randn(S.Q_HEADS * S.HEAD_DIM, S.Q_HEADS * S.HEAD_DIM, generator=torch.Generator().manual_seed(4))
        w_o = (w_o * 0.02).to(S.DTYPE).to("cpu")
        host._o_proj_weight = lambda layer_id: w_o
    bs = len(reqs)
    rpi, seq_cpu = _batch_tensors(st, reqs, counter)
    fb = ForwardBatch(forward_mode=ForwardMode.EXTEND, batch_size=bs, input_ids=None, req_pool_indices=rpi,
                      seq_lens=seq_cpu.to("cpu"), out_cache_loc=None, seq_lens_sum=int(seq_cpu.sum()),
                      seq_lens_cpu=seq_cpu, extend_seq_lens_cpu=[prompt] * bs, extend_prefix_lens_cpu=[0] * bs)
    layers = [RadixAttention(S.Q_HEADS, S.HEAD_DIM, S.HEAD_DIM ** -0.5, S.KV_HEADS, l) for l in range(S.LAYERS)]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(bs * prompt, S.Q_HEADS * S.HEAD_DIM, generator=g).to(S.DTYPE).to("cpu")
    for l in range(S.LAYERS):  # the batch's K/V, written as the forward does
        ids = torch.cat([st.r2t.req_to_token[r.req_pool_idx, :prompt] for r in reqs]).long()
        st.pool.set_kv_buffer(None, ids, *_kv(ids.numel(), 10 + l), layer_id_override=l)
    host.depthkv_pending_entries = [ExtendEntry(req=r, rid=str(r.rid), prefix_len=0, seq_len=prompt, own_lo=0,
                                                final=True) for r in reqs]
    with counter.count(path), (measure if measure is not None else nullcontext()):
        host._begin_forward(fb)
        for layer in layers:
            host._score_extend_layer(layer, q)
    return host.prune_log


def admission(counter, st):
    from sglang_depthkv.sglang.radix_cache import layer_deficit

    with counter.count("admission"):
        return layer_deficit(st.alloc, st.tree)


def evict(counter, st, num_tokens):
    from sglang.srt.mem_cache.common import evict_from_tree_cache

    from sglang_depthkv.patches.evict import evict_from_tree_cache_around

    with counter.count("evict"):
        evict_from_tree_cache_around(evict_from_tree_cache, st.tree, num_tokens)
