"""SGLang's ``torch_native`` attention backend over per-layer pruned KV, with in-forward scoring and
end-of-prefill pruning.

Reads. Each layer attends over the tokens it still holds for the request: ``req_to_token`` row ->
``pool.mapping[layer]`` -> held slots (mapping > 0), compacted in position order. Extend: query of
position ``p`` sees every held key at a position ``<= p`` (the held cached prefix and the new chunk,
causal among the new tokens); decode: the new token sees every held key. Positions / RoPE come from
the model (``forward_batch.positions``), never from the KV index, so pruning does not shift them.
The new tokens of a batch are always held at every layer (the allocator gives each new token a slot
at every layer); anything else is an error, never a silent read of the dummy slot.

Scoring (``--kv-policy`` pruning with budget < 1). The ``ForwardBatch.init_new`` hook's entries
(claimed in ``init_forward_metadata``) name each request's prefill state. At every layer of an extend
batch, for each request whose prefill ends in this batch, the core ``LayerObservation`` is built
from the keys/values this layer just read, the last ``window`` queries (earlier chunks' queries
are stashed on the request) and ``o_proj.weight`` of the model's layer (LaProx), and the configured
core scorer turns it into token scores of the request's own positions. After the last layer's
attention, ``pruning.select_own`` turns the per-layer scores into keep sets (``PrunePolicy.select``'s
rules) and ``DepthKVAllocator.prune`` frees the dropped slots at once.
These steps (and decode-time pruning) live in ``backends/scoring.py``, shared with the triton backend.

Ordering. On this CPU path the forward runs synchronously on the scheduler thread (SGLang's
overlap loop is on, but CPU tensors have no streams), so the mapping update and the slot frees
happen inside the prefill forward, before any later batch (including a decode batch the overlap
loop already built for these requests) reads or allocates: no later forward can see a
half-pruned mapping and no in-flight forward can still read a freed slot. The GPU backends (later
issue) must zero the mapping on the forward stream and defer CPU frees as SGLang's
``maybe_evict_swa`` does.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from torch.nn.functional import scaled_dot_product_attention

from sglang_depthkv.sglang.backends.scoring import DepthKVScoringMixin, build_policy, host_seq_lens  # noqa: F401


class DepthKVTorchNativeAttnBackend(DepthKVScoringMixin, TorchNativeAttnBackend):
    def __init__(self, model_runner):
        TorchNativeAttnBackend.__init__(self, model_runner)
        self._init_scoring(model_runner)

    # --- reads ------------------------------------------------------------------------------------
    def _attend(self, q, k_cache, v_cache, slots, kpos, qpos, layer):
        """q [qh, m, d]; keys/values at ``slots``; query at position qpos[i] sees kpos <= qpos[i]."""
        keys, values = DepthKVScoringMixin._gather_kv(k_cache, v_cache, slots, q.dtype)
        mask = kpos.unsqueeze(0) <= qpos.unsqueeze(1)  # [m, n]
        out = scaled_dot_product_attention(
            q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, scale=layer.scaling,
            enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
        ).squeeze(0)
        return out, keys, values

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self._check_layer(layer)
        o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        k_cache, v_cache = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        scoring = self._scoring
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        prefix_lens = [int(x) for x in forward_batch.extend_prefix_lens_cpu]
        rpis = forward_batch.req_pool_indices.tolist()
        start = 0
        for i, (seq, pre, rpi) in enumerate(zip(seq_lens, prefix_lens, rpis)):
            seq, m = int(seq), int(seq) - pre
            kpos, slots = self._held(layer.layer_id, rpi, seq)
            if kpos.numel() < m or not bool((kpos[kpos.numel() - m:] == torch.arange(pre, seq, device=kpos.device)).all()):
                raise RuntimeError(f"layer {layer.layer_id}: a new token of request {i} holds no slot at this layer")
            qi = q_[start:start + m].movedim(0, 1)  # [qh, m, d]
            out, keys, values = self._attend(qi, k_cache, v_cache, slots, kpos, torch.arange(pre, seq, device=kpos.device), layer)
            o_[start:start + m] = out.movedim(0, 1)
            if scoring is not None:
                self._score_request(scoring, i, layer, qi, start, m, lambda: (kpos, keys, values))
            start += m
        self._end_extend_layer(scoring, layer)
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self._check_layer(layer)
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        k_cache, v_cache = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        seq_lens = host_seq_lens(forward_batch, forward_batch.batch_size)
        for i, (seq, rpi) in enumerate(zip(seq_lens, forward_batch.req_pool_indices.tolist())):
            seq = int(seq)
            kpos, slots = self._held(layer.layer_id, rpi, seq)
            if kpos.numel() == 0 or int(kpos[-1]) != seq - 1:
                raise RuntimeError(f"layer {layer.layer_id}: the decoded token of request {i} holds no slot")
            out, _, _ = self._attend(q_[i:i + 1].movedim(0, 1), k_cache, v_cache, slots, kpos,
                                     torch.tensor([seq - 1], device=kpos.device), layer)
            o_[i:i + 1] = out.movedim(0, 1)
        self._feed_decode(layer, q_)
        self._end_decode_layer(layer, forward_batch)
        return o

    # --- scoring and pruning ------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self._begin_forward(forward_batch)
