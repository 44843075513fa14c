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

Ordering. On this CPU path the forward runs synchronously on the scheduler thread (SGLang's
overlap loop is on, but CPU tensors have no streams), so the mapping update and the slot frees
happen inside the prefill forward, before any later batch (including a decode batch the overlap
loop already built for these requests) reads or allocates: no later forward can see a
half-pruned mapping and no in-flight forward can still read a freed slot. The GPU backends (later
issue) must zero the mapping on the forward stream and defer CPU frees as SGLang's
``maybe_evict_swa`` does.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from torch.nn.functional import scaled_dot_product_attention

from sglang_depthkv.sglang import observations as O
from sglang_depthkv.sglang import pruning as P
from sglang_depthkv.sglang.pool import DepthKVPool


class _ForwardScoring:
    """Per-forward scoring state: the entries, their stashes and per-layer own-token scores."""

    def __init__(self, entries, num_layers):
        self.entries = entries
        self.stashes = [None if e is None else O.get_stash(e, num_layers) for e in entries]
        self.scores: Dict[int, List[Optional[torch.Tensor]]] = {
            i: [None] * num_layers for i, e in enumerate(entries) if e is not None and e.final
        }


class DepthKVTorchNativeAttnBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner):
        super().__init__(model_runner)
        if not isinstance(self.token_to_kv_pool, DepthKVPool):
            raise TypeError(
                f"DepthKVTorchNativeAttnBackend needs a DepthKVPool, got {type(self.token_to_kv_pool).__name__}"
            )
        self.model_runner = model_runner
        self.allocator = model_runner.token_to_kv_pool_allocator
        self.policy = None
        self._needs_hidden = False
        self._hidden: Dict[int, torch.Tensor] = {}
        self._hooks = []
        self._scoring: Optional[_ForwardScoring] = None
        self._decode_reqs = None  # requests of the current decode batch (decode-time pruning)
        self.decode_interval = 0
        self.prune_log: List[P.PruneRecord] = []  # last records (debug), bounded
        from sglang_depthkv.sglang.config import settings_of

        settings = settings_of(model_runner.server_args)
        if settings is not None and settings.prunes:
            self.policy = build_policy(settings, model_runner)
            self.decode_interval = int(settings.decode_interval)
            if self.decode_interval and self.policy.window < 1:
                raise ValueError("--kv-decode-interval: decode-time pruning needs --kv-window >= 1")
            gates = getattr(self.policy.scorer, "gates", None)
            self._needs_hidden = bool(gates is not None and gates.spec.use_hidden)

    # --- model access ---------------------------------------------------------------------------
    def _layer_module(self, layer_id: int):
        return self.model_runner.model.model.layers[layer_id]

    def _o_proj_weight(self, layer_id: int) -> torch.Tensor:
        return self._layer_module(layer_id).self_attn.o_proj.weight

    def _install_hidden_hooks(self):
        """Forward pre-hooks on each layer's ``self_attn`` that keep its input (the attention input
        after the input norm) for the gate scorer of the same layer."""
        if self._hooks or not self._needs_hidden:
            return
        pool = self.token_to_kv_pool
        for layer_id in range(pool.start_layer, pool.start_layer + pool.layer_num):
            def pre(_mod, args, kwargs, layer_id=layer_id):
                h = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)
                if h is None:
                    raise RuntimeError(f"layer {layer_id}: self_attn was called without hidden_states")
                self._hidden[layer_id] = h
            self._hooks.append(self._layer_module(layer_id).self_attn.register_forward_pre_hook(pre, with_kwargs=True))

    # --- reads ------------------------------------------------------------------------------------
    def _held(self, layer_id: int, req_pool_idx: int, seq_len: int):
        """Held positions (int64, ascending) and their slots at ``layer_id`` for one request row."""
        rows = self.req_to_token_pool.req_to_token[int(req_pool_idx), :seq_len]
        slots = self.token_to_kv_pool.translate(layer_id, rows)
        held = slots > 0
        return torch.nonzero(held).reshape(-1), slots[held]

    @staticmethod
    def _check_layer(layer):
        if layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY:
            raise NotImplementedError("DepthKV torch_native backend: only causal decoder self-attention")
        if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
            raise NotImplementedError("DepthKV torch_native backend: sliding-window layers are refused at start-up")

    def _attend(self, q, k_cache, v_cache, slots, kpos, qpos, layer):
        """q [qh, m, d]; keys/values at ``slots``; query at position qpos[i] sees kpos <= qpos[i]."""
        keys = k_cache[slots].movedim(0, 1)  # [kvh, n, d]
        values = v_cache[slots].movedim(0, 1)
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
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
        scoring = self._scoring_for(forward_batch)
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        prefix_lens = [int(x) for x in forward_batch.extend_prefix_lens_cpu]
        rpis = forward_batch.req_pool_indices.tolist()
        start = 0
        for i, (seq, pre, rpi) in enumerate(zip(seq_lens, prefix_lens, rpis)):
            seq, m = int(seq), int(seq) - pre
            kpos, slots = self._held(layer.layer_id, rpi, seq)
            if kpos.numel() < m or not bool((kpos[kpos.numel() - m:] == torch.arange(pre, seq)).all()):
                raise RuntimeError(f"layer {layer.layer_id}: a new token of request {i} holds no slot at this layer")
            qi = q_[start:start + m].movedim(0, 1)  # [qh, m, d]
            out, keys, values = self._attend(qi, k_cache, v_cache, slots, kpos, torch.arange(pre, seq), layer)
            o_[start:start + m] = out.movedim(0, 1)
            if scoring is not None:
                self._score_request(scoring, i, layer, kpos, keys, values, qi, start, m)
            start += m
        if scoring is not None and layer.layer_id == self.token_to_kv_pool.start_layer + self.token_to_kv_pool.layer_num - 1:
            self._finish(scoring)
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
        seq_lens = forward_batch.seq_lens_cpu.tolist() if forward_batch.seq_lens_cpu is not None \
            else forward_batch.seq_lens.tolist()
        for i, (seq, rpi) in enumerate(zip(seq_lens, forward_batch.req_pool_indices.tolist())):
            seq = int(seq)
            kpos, slots = self._held(layer.layer_id, rpi, seq)
            if kpos.numel() == 0 or int(kpos[-1]) != seq - 1:
                raise RuntimeError(f"layer {layer.layer_id}: the decoded token of request {i} holds no slot")
            out, _, _ = self._attend(q_[i:i + 1].movedim(0, 1), k_cache, v_cache, slots, kpos,
                                     torch.tensor([seq - 1]), layer)
            o_[i:i + 1] = out.movedim(0, 1)
            if self._decode_reqs is not None:
                from sglang_depthkv.sglang import decode_pruning as DP

                st = DP.state_of(self._decode_reqs[i], self.token_to_kv_pool.layer_num)
                h = self._hidden[layer.layer_id][i:i + 1] if self._needs_hidden else None
                DP.record_feed(st, layer.layer_id - self.token_to_kv_pool.start_layer, q_[i:i + 1].movedim(0, 1), h,
                               layer.scaling)
        if self._decode_reqs is not None and layer.layer_id == self.token_to_kv_pool.start_layer + self.token_to_kv_pool.layer_num - 1:
            self._finish_decode(seq_lens)
        return o

    def _finish_decode(self, seq_lens):
        from sglang_depthkv.sglang import decode_pruning as DP

        for req, seq in zip(self._decode_reqs, seq_lens):
            st = DP.state_of(req, self.token_to_kv_pool.layer_num)
            while DP.prune_due(st, int(seq), self.decode_interval, self.policy.window):
                DP.prune_segment(st, self.policy, self.decode_interval, req, self.req_to_token_pool.req_to_token,
                                 self.token_to_kv_pool, self.allocator, self._o_proj_weight, int(seq))
        self._decode_reqs = None
        self._hidden.clear()

    # --- scoring and pruning ------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self._scoring = None
        self._decode_reqs = None
        if self.policy is None:
            return
        if forward_batch.forward_mode.is_decode():
            reqs = getattr(self.model_runner, "depthkv_pending_decode_reqs", None)
            self.model_runner.depthkv_pending_decode_reqs = None
            if self.decode_interval:
                if reqs is None or len(reqs) != forward_batch.batch_size:
                    raise RuntimeError("DepthKV: decode batch without its requests (the ForwardBatch.init_new hook "
                                       "did not run); refusing to skip decode-time pruning silently")
                self._install_hidden_hooks()
                self._decode_reqs = reqs
            return
        if not forward_batch.forward_mode.is_extend():
            return
        entries = getattr(self.model_runner, "depthkv_pending_entries", None)
        self.model_runner.depthkv_pending_entries = None
        if entries is None:
            raise RuntimeError("DepthKV: extend batch without request entries (the ForwardBatch.init_new hook "
                               "did not run); refusing to skip pruning silently")
        seq = [int(x) for x in forward_batch.seq_lens_cpu.tolist()]
        if len(entries) != len(seq) or any(e is not None and e.seq_len != s for e, s in zip(entries, seq)):
            raise RuntimeError(f"DepthKV: request entries {[None if e is None else e.seq_len for e in entries]} "
                               f"do not match the forward batch's sequence lengths {seq}")
        self._install_hidden_hooks()
        self._scoring = _ForwardScoring(entries, self.token_to_kv_pool.layer_num)

    def _scoring_for(self, fb) -> Optional[_ForwardScoring]:
        return self._scoring

    def _score_request(self, scoring, i, layer, kpos, keys, values, qi, start, m):
        entry = scoring.entries[i]
        if entry is None:
            return
        local = layer.layer_id - self.token_to_kv_pool.start_layer
        st = scoring.stashes[i]
        h = None
        if self._needs_hidden:
            h = self._hidden[layer.layer_id][start:start + m]
        if not entry.final:
            O.stash_chunk(st, local, qi, h, self.policy.window)
            return
        if not self._segment_prunes(entry):
            return
        obs, own_cols = O.build_observation(
            layer.layer_id, local, entry, st, kpos, keys, values, qi, h, layer.scaling,
            self._o_proj_weight(layer.layer_id), self.policy.window, own_only=self.policy.scorer.query_agnostic,
        )
        from sglang_depthkv.core.selection import token_scores

        scoring.scores[i][local] = token_scores(self.policy.scorer.score(obs))[own_cols]

    def _segment_prunes(self, entry) -> bool:
        m = entry.seq_len - entry.own_lo
        return self.policy.budget < 1.0 and m > P.sinks_in_segment(self.policy.sinks, entry.own_lo, m) + self.policy.window

    def _finish(self, scoring):
        for i, entry in enumerate(scoring.entries):
            if entry is None:
                continue
            if not entry.final:
                scoring.stashes[i].upto = entry.seq_len
                continue
            O.clear_stash(entry)
            keep = None
            if self._segment_prunes(entry):
                keep = P.select_own(self.policy, P.own_token_scores(scoring.scores[i]), entry.own_lo)
            rec = P.PruneRecord(rid=entry.rid, own_lo=entry.own_lo, seq_len=entry.seq_len, keep=keep)
            P.apply_prune(self.allocator, self.req_to_token_pool.req_to_token, entry.req.req_pool_idx, rec)
            P.dump_keep(rec)
            self.prune_log = (self.prune_log + [rec])[-64:]
        self._scoring = None
        self._hidden.clear()


def build_policy(settings, model_runner):
    """The core ``PrunePolicy`` of the ``--kv-*`` settings (profile / gates loaded against the model)."""
    from sglang_depthkv.core.policy import make_policy
    from sglang_depthkv.core.types import ModelIdentity

    identity = ModelIdentity.from_hf_config(model_runner.model_config.hf_config)
    profile = gates = None
    if settings.profile is not None:
        from sglang_depthkv.core.profile import load_profile

        profile = load_profile(settings.profile, identity)
    if settings.gates is not None:
        from sglang_depthkv.core.gates import load_gates

        gates = load_gates(settings.gates, identity)
    return make_policy(settings.policy, settings.budget, profile=profile, gates=gates, sinks=settings.sinks,
                       window=settings.window)
