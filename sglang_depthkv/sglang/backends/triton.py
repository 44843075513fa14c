"""SGLang's ``triton`` attention backend over per-layer pruned KV (``--attention-backend triton``).

Reads. SGLang's own Triton kernels (``extend_attention_fwd``, ``decode_attention_fwd``) do the
attention over ``pool.get_key_buffer(layer)`` (the layer's physical buffer); only their page tables
change: each layer gets its own ``kv_indptr`` / ``kv_indices`` (``layer_indices.LayerIndexStreams``,
all layers in one ``kernels.build_kv_indices`` launch pair from ``req_to_token``,
``req_pool_indices``, the lengths and ``pool.mapping``), swapped into ``self.forward_metadata`` for
the layer's call. Extend: the streams cover the *prefix* (``extend_prefix_lens``): the kernel reads
the held cached prefix through them and the batch's new tokens from ``k``/``v`` directly (causal
among them), which is exactly the torch_native backend's rule (a query at position ``p`` sees every
held key at a position ``<= p``), because every new token is held at every layer (checked once per
forward: ``check_held``). Decode: the streams cover ``seq_lens``. Positions / RoPE come from the
model, never from the KV index. Writes go through the mapping in ``DepthKVPool.set_kv_buffer``.

Decode split-K. ``attn_logits`` / ``attn_lse`` are ``[bs, heads, max_kv_splits, ...]``, independent
of the lengths; the kernels take each row's KV length from the layer's ``kv_indptr`` and skip empty
splits in both stages. ``num_kv_splits`` is computed per layer (``[L, bs]``) with SGLang's
``get_num_kv_splits`` rule on that layer's held counts, all layers in one launch
(``kernels.kv_splits``), so a heavily pruned layer is not split as if it held the whole sequence
(on CPU, ``device_core_count == 0``, SGLang fills ``max_kv_splits``).

Scoring and pruning: ``scoring.DepthKVScoringMixin`` (the same steps as the torch_native backend).
After SGLang's kernel has written this batch's K/V and computed the layer's output, each request
whose prefill ends here gets its observation from the layer's held keys/values gathered through the
held slots and its window queries; after the last layer ``pruning.select_own`` decides and
``DepthKVAllocator.prune`` frees the dropped slots. Decode-time pruning (``--kv-decode-interval``)
records each step's queries per layer: eager decode batches in Python lists (``scoring.py``), CUDA-graph
decode batches in the preallocated ring of ``graph_decode.py`` (below).

CUDA graphs (decode). ``init_cuda_graph_state`` preallocates per-layer ``[L, max_bs+1]`` indptr,
``[L, cap]`` indices (``layer_indices.graph_capacity``: the real rows of a layer hold at most
``C_l`` tokens together, ``cap = min(max_bs * context_len, max C_l + max_bs)``; int32 while slot
offsets fit), ``[L, max_bs]`` held
counts, ``[L, max_num_tokens]`` ``num_kv_splits`` and SGLang's ``attn_logits`` / ``attn_lse``;
SGLang's vanilla ``[max_num_tokens * context_len]`` index buffer is not allocated.
``init_forward_metadata_out_graph`` (capture and replay) refills them in place from the (padded)
batch with device-side launches only (no host sync, no allocation of what the graph reads); at
capture it binds ``forward_metadata`` to views of those buffers, so the captured kernels of layer
``l`` read row ``l``; padded rows read one in-bounds slot (``layer_indices``). Nothing the graph
replays allocates or syncs: the per-layer swap in ``forward_decode`` is Python attribute assignment
at capture time. Decode-time pruning under CUDA graphs (``graph_decode.py``): ``init_cuda_graph_state``
also allocates the ``DecodeRing`` (one slot per captured batch row); each captured layer writes its
queries (and, for KVzip gates with hidden states, the attention inputs) with one fixed-shape
``index_copy_`` at rows bound per batch; ``init_forward_metadata_out_graph`` first runs the pruning
events due after the previous step (records rebuilt from the ring, the same ``policy.select``),
then builds the streams, so each step reads the pruned cache as the reference does. Prefill graphs /
speculative modes are refused by name.

Exercised on CPU (TRITON_INTERPRET=1, ``disable_cuda_graph``): the eager extend / decode paths with
SGLang's kernels in a real Engine (tests/sglang_e2e/test_triton_equivalence.py); the graph
metadata path without capture: a test-side start-up patch makes eager decode batches use the
preallocated buffers, bound once per batch size by ``init_forward_metadata_out_graph(...,
in_capture=True)`` and refilled in place by ``init_forward_metadata_out_graph(...)`` afterwards, and
decode-time pruning goes through the ring (one Engine run of that test: KVzip with
``kv_decode_interval``, events equal to the HF reference's); the buffer fill with padded rows against
a plain-torch gather (tests/sglang/test_triton_layer_indices.py); the ring against Python lists
(tests/sglang/test_decode_ring.py) and the ring path with eager batches in between, slots taken
back, retraction, against the eager path (tests/sglang/test_graph_decode_transitions.py). Not
exercised here: CUDA-graph capture / replay itself (the ring write recorded in a graph), SGLang's
padded replay view (``build_replay_fb_view``, ``num_padding``), ``get_num_kv_splits_triton`` with a
real ``device_core_count``, and GPU stream ordering of the end-of-prefill and decode-time mapping
updates (on CPU the forward is synchronous; see torch_native.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from sglang.srt.layers.attention.triton_backend import ForwardMetadata, TritonAttnBackend
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_depthkv.kernels.kv_splits import layer_kv_splits
from sglang_depthkv.sglang.backends.graph_decode import GraphDecodePruningMixin
from sglang_depthkv.sglang.backends.layer_indices import LayerIndexStreams, graph_capacity, index_dtype
from sglang_depthkv.sglang.backends.scoring import DepthKVScoringMixin

_EAGER_MODES = (ForwardMode.EXTEND, ForwardMode.MIXED, ForwardMode.DECODE, ForwardMode.IDLE)


def _metadata(**fields) -> ForwardMetadata:
    base = dict(attn_logits=None, attn_lse=None, max_extend_len=None, num_kv_splits=None, kv_indptr=None,
                kv_indices=None, qo_indptr=None, custom_mask=None, mask_indptr=None, window_kv_indptr=None,
                window_kv_indices=None, window_num_kv_splits=None, window_kv_offsets=None)
    base.update(fields)
    return ForwardMetadata(**base)


class DepthKVTritonAttnBackend(GraphDecodePruningMixin, DepthKVScoringMixin, TritonAttnBackend):
    def __init__(self, model_runner):
        TritonAttnBackend.__init__(self, model_runner)
        self._init_scoring(model_runner)
        name = type(self).__name__
        if self.dcp_size > 1:
            raise NotImplementedError(f"{name}: decode context parallelism is not supported")
        if self.enable_deterministic:
            raise ValueError("--enable-deterministic-inference: not supported with --kv-policy on the triton backend "
                             "(its unified extend kernel reads a prefix+new page table built from logical ids)")
        if self._translate_kv_loc is not None or self.use_sliding_window_kv_pool or self.sliding_window_size:
            raise NotImplementedError(f"{name}: unified / sliding-window pools are not per-layer DepthKV pools")
        if self.use_mla:
            raise NotImplementedError(f"{name}: MLA is refused at start-up")
        pool = self.token_to_kv_pool
        row_stride = pool.head_num * max(pool.head_dim, pool.v_head_dim)
        self.streams = LayerIndexStreams(pool.mapping, self.req_to_token,
                                         index_dtype(max(pool.layer_capacities), row_stride))
        self._layer_streams = None  # (indptr [L, bs+1], indices [L, cap], num_kv_splits [L, *] or None)
        self._graph_splits = None

    # --- metadata (eager) -----------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        if mode not in _EAGER_MODES or forward_batch.spec_info is not None:
            raise NotImplementedError(f"{type(self).__name__}: forward mode {mode.name} is not supported "
                                      "(speculative decoding is refused at start-up)")
        if mode.is_decode_or_idle():
            self._init_decode(forward_batch)
        else:
            self._init_extend(forward_batch)
        self.token_to_kv_pool.read_write_slots = False  # eager writes translate through the mapping
        self._ring_live = False
        self._begin_forward(forward_batch)

    def _init_extend(self, fb):
        bs = fb.batch_size
        self.streams.check_held(fb.out_cache_loc)
        prefix_cpu = [int(x) for x in fb.extend_prefix_lens_cpu]
        indptr, indices, _ = self.streams.build(fb.req_pool_indices, fb.extend_prefix_lens, sum(prefix_cpu))
        qo_indptr = self.qo_indptr[: bs + 1]
        qo_indptr[1:] = torch.cumsum(fb.extend_seq_lens, dim=0)
        self.forward_metadata = _metadata(qo_indptr=qo_indptr, max_extend_len=max(fb.extend_seq_lens_cpu))
        self._layer_streams = (indptr, indices, None)

    def _init_decode(self, fb):
        bs = fb.batch_size
        self.streams.check_held(fb.out_cache_loc, "the decoded token")
        cap = fb.seq_lens_sum if fb.seq_lens_sum is not None else bs * self.max_context_len
        indptr, indices, kept = self.streams.build(fb.req_pool_indices, fb.seq_lens, cap)
        splits = torch.empty((self.streams.num_layers, bs), dtype=torch.int32, device=self.device)
        self._fill_splits(splits, kept, bs)
        self.forward_metadata = _metadata(
            attn_logits=torch.empty((bs, self.num_head, self.max_kv_splits, self.v_head_dim), dtype=torch.float32,
                                    device=self.device),
            attn_lse=torch.empty((bs, self.num_head, self.max_kv_splits), dtype=torch.float32, device=self.device),
        )
        self._layer_streams = (indptr, indices, splits)

    def _fill_splits(self, splits, kept, bs):
        """``num_kv_splits`` of every layer from its held lengths: SGLang's rule, one launch."""
        if bs == 0:
            return
        cores = 0 if self.static_kv_splits else int(self.device_core_count)
        layer_kv_splits(splits, kept, num_head=self.num_head, num_kv_head=self.num_kv_head,
                        max_kv_splits=self.max_kv_splits, device_core_count=cores)

    # --- CUDA graphs (decode) -------------------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs, max_num_tokens, kv_indices_buf=None, cuda_graph_num_kv_splits_buf=None):
        if kv_indices_buf is not None or cuda_graph_num_kv_splits_buf is not None:
            raise NotImplementedError(f"{type(self).__name__}: shared graph buffers (speculative draft backends)")
        pool = self.token_to_kv_pool
        self.streams.alloc_graph(max_bs, graph_capacity(max_bs, self.max_context_len, pool.layer_capacities))
        pool.alloc_write_slots(max_num_tokens)
        L = self.streams.num_layers
        self._graph_splits = torch.full((L, max_num_tokens), self.max_kv_splits, dtype=torch.int32, device=self.device)
        self.cuda_graph_attn_logits = torch.zeros((max_num_tokens, self.num_head, self.max_kv_splits, self.v_head_dim),
                                                  dtype=torch.float32, device=self.device)
        self.cuda_graph_attn_lse = torch.zeros((max_num_tokens, self.num_head, self.max_kv_splits),
                                               dtype=torch.float32, device=self.device)
        self._init_graph_decode(max_bs)  # the decode-time pruning ring (--kv-decode-interval)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        mode = forward_batch.forward_mode
        if not mode.is_decode_or_idle() or forward_batch.spec_info is not None:
            raise NotImplementedError(f"{type(self).__name__}: CUDA graphs only for plain decode, got {mode.name}")
        if self._graph_splits is None:
            raise RuntimeError(f"{type(self).__name__}: init_forward_metadata_out_graph before init_cuda_graph_state")
        bs = forward_batch.batch_size
        self._scoring = None
        self._decode_reqs = None
        # due decode-time pruning events first: this step's streams read the pruned mapping
        self._prepare_graph_decode(forward_batch, bs, in_capture)
        indptr, indices, kept = self.streams.fill_graph(forward_batch.req_pool_indices, forward_batch.seq_lens, bs)
        self._fill_splits(self._graph_splits, kept, bs)
        pool = self.token_to_kv_pool
        pool.fill_write_slots(forward_batch.out_cache_loc, bs)
        if in_capture:
            pool.read_write_slots = True  # the captured writes read write_slots (refilled above per replay)
            self.forward_metadata = _metadata(attn_logits=self.cuda_graph_attn_logits,
                                              attn_lse=self.cuda_graph_attn_lse)
            self._layer_streams = (indptr, indices, self._graph_splits)

    # --- attention ------------------------------------------------------------------------------------------
    @contextmanager
    def _layer_view(self, layer):
        """``forward_metadata`` reads layer ``layer``'s streams for the duration of SGLang's call."""
        if self._layer_streams is None:
            raise RuntimeError(f"{type(self).__name__}: attention before init_forward_metadata")
        indptr, indices, splits = self._layer_streams
        l = layer.layer_id - self.token_to_kv_pool.start_layer
        md = self.forward_metadata
        md.kv_indptr, md.kv_indices = indptr[l], indices[l]
        if splits is not None:
            md.num_kv_splits = splits[l]
        try:
            yield
        finally:
            md.kv_indptr = md.kv_indices = md.num_kv_splits = None

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, score_mod=None,
                       aux_tensors=None):
        self._check_layer(layer)
        if k is None or v is None:
            raise NotImplementedError(f"{type(self).__name__}: extend without k/v (reads by logical id) is not supported")
        with self._layer_view(layer):
            o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks, score_mod, aux_tensors)
        self._record_layer_scaling(layer)
        self._score_extend_layer(layer, q)
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, score_mod=None,
                       aux_tensors=None):
        self._check_layer(layer)
        with self._layer_view(layer):
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, sinks, score_mod, aux_tensors)
        self._record_layer_scaling(layer)
        if self._ring_live:  # a graph (capture) or graph-buffer batch: one fixed-shape write per tensor
            self._graph_decode_write(layer, q)
        elif self._decode_reqs is not None:
            self._feed_decode(layer, q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim))
            self._end_decode_layer(layer, forward_batch)
        return o
