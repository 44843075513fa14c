"""What every DepthKV attention backend does besides attention: in-forward scoring, end-of-prefill
pruning and decode-time pruning, the same for all backends (``torch_native``, ``triton``).

``DepthKVScoringMixin`` goes before SGLang's backend class in the bases. The backend:

- calls ``_init_scoring(model_runner)`` in ``__init__`` (after SGLang's ``__init__``);
- calls ``_begin_forward(forward_batch)`` in its eager ``init_forward_metadata``: it claims the
  ``ForwardBatch.init_new`` hook's request entries (extend) or the decode batch's requests
  (``--kv-decode-interval``), refusing a batch whose hook did not run;
- in ``forward_extend``, per layer and per request: ``_score_request(scoring, i, layer, q_req,
  start, m, held_kv)`` where ``held_kv()`` returns the layer's held positions / keys / values of the
  request *after* this batch's K/V were written (the observation's tokens), then ``_end_extend_layer``
  (after the last layer: ``pruning.select_own`` -> ``DepthKVAllocator.prune``);
- in ``forward_decode``, per layer: ``_feed_decode(layer, q)`` then ``_end_decode_layer`` (after the
  last layer: the due decode-time pruning events). A backend that also records decode steps
  elsewhere (triton under CUDA graphs: ``graph_decode.py``) hooks ``_before_eager_decode`` and reuses
  ``_claim_decode_reqs`` / ``_begin_decode_states``.

Held keys/values are gathered from the layer's physical buffer through the held slots
(``_held_kv``) and cast to the query dtype, so every backend hands the core scorers the same
tensors. Positions of a request's tokens are ``req_to_token`` row indices, never KV indices.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from sglang.srt.layers.radix_attention import AttentionType

from sglang_depthkv.sglang import decode_pruning as DP
from sglang_depthkv.sglang import observations as O
from sglang_depthkv.sglang import pruning as P
from sglang_depthkv.sglang.pool import DepthKVPool

HeldKV = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # positions [n], keys / values [kvh, n, d]


class ForwardScoring:
    """Per-forward scoring state: the entries, their stashes, per-layer own-token scores, and the
    host facts every layer needs (sequence lengths, request rows, per-layer held counts)."""

    def __init__(self, entries, num_layers, seq_lens: List[int], new_lens: List[int],
                 held_counts: Dict[int, List[int]]):
        self.entries = entries
        self.stashes = [None if e is None else O.get_stash(e, num_layers) for e in entries]
        self.scores: Dict[int, List[Optional[torch.Tensor]]] = {
            i: [None] * num_layers for i, e in enumerate(entries) if e is not None and e.final
        }
        self.seq_lens = seq_lens
        self.new_lens = new_lens
        self.req_pool_idx = [None if e is None else int(e.req.req_pool_idx) for e in entries]
        self.held_counts = held_counts  # entry index -> [L] held positions in [0, seq_len)


def held_counts_of(allocator, req_to_token: torch.Tensor, rows: List[int], seq_lens: List[int]) -> List[List[int]]:
    """Per request ``[L]`` held counts of positions ``[0, seq_len)``: one reduction per request
    (``DepthKVAllocator.layer_held``) and one host read for the whole batch (the only sync of
    end-of-prefill scoring). Transient memory: one request's ``[L, seq_len]`` slots at a time."""
    if not rows:
        return []
    return torch.stack([allocator.layer_held(req_to_token[r, :n]) for r, n in zip(rows, seq_lens)]).tolist()


class DepthKVScoringMixin:
    """Scoring / pruning state and steps shared by the DepthKV attention backends."""

    # start-up calibration (runner_calibration.py) sets it for one prefill: it takes the end-of-prefill
    # own-token scores {entry index: [L, m]} instead of pruning
    score_observer: Optional[Callable[[Dict[int, torch.Tensor]], None]] = None

    def _init_scoring(self, model_runner) -> None:
        if not isinstance(self.token_to_kv_pool, DepthKVPool):
            raise TypeError(f"{type(self).__name__} needs a DepthKVPool, got {type(self.token_to_kv_pool).__name__}")
        self.model_runner = model_runner
        self.allocator = model_runner.token_to_kv_pool_allocator
        self.policy = None
        self._needs_hidden = False
        self._hidden: Dict[int, torch.Tensor] = {}
        self._hooks = []
        self._scoring: Optional[ForwardScoring] = None
        self._decode_reqs = None  # requests of the current decode batch (decode-time pruning)
        self.decode_interval = 0
        self.prune_log: List[P.PruneRecord] = []  # last records (debug), bounded
        from sglang_depthkv.sglang.config import settings_of

        settings = settings_of(model_runner.server_args)
        ps = model_runner.ps
        P.tag_dumps(tp_rank=int(ps.tp_rank), dp_rank=None if ps.dp_rank is None else int(ps.dp_rank))
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

    # --- layers and held tokens -------------------------------------------------------------------
    def _check_layer(self, layer):
        name = type(self).__name__
        if layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY:
            raise NotImplementedError(f"{name}: only causal decoder self-attention")
        if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
            raise NotImplementedError(f"{name}: sliding-window layers are refused at start-up")

    def _is_last_layer(self, layer) -> bool:
        pool = self.token_to_kv_pool
        return layer.layer_id == pool.start_layer + pool.layer_num - 1

    def _held(self, layer_id: int, req_pool_idx: int, seq_len: int, count: Optional[int] = None):
        """Held positions (int64, ascending) and their slots at ``layer_id`` for one request row.
        With the host-known ``count`` of held positions no device value is read (scatter
        compaction); without it, one ``nonzero``."""
        rows = self.req_to_token_pool.req_to_token[int(req_pool_idx), :seq_len]
        slots = self.token_to_kv_pool.translate(layer_id, rows)
        held = slots > 0
        if count is None:
            kpos = torch.nonzero(held).reshape(-1)
            return kpos, slots[kpos]
        dest = torch.where(held, torch.cumsum(held, dim=0) - 1, count)  # not held -> the trash entry
        kpos = torch.empty(count + 1, dtype=torch.int64, device=slots.device)
        kpos.scatter_(0, dest, torch.arange(seq_len, dtype=torch.int64, device=slots.device))
        kpos = kpos[:count]
        return kpos, slots[kpos]

    @staticmethod
    def _gather_kv(k_cache, v_cache, slots, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys / values ``[kvh, n, d]`` at ``slots`` of a layer buffer, in ``dtype``."""
        keys = k_cache[slots].movedim(0, 1)
        values = v_cache[slots].movedim(0, 1)
        if keys.dtype != dtype:
            keys, values = keys.to(dtype), values.to(dtype)
        return keys, values

    def _held_kv(self, layer_id: int, req_pool_idx: int, seq_len: int, dtype, count: Optional[int] = None) -> HeldKV:
        kpos, slots = self._held(layer_id, req_pool_idx, seq_len, count)
        k_cache, v_cache = self.token_to_kv_pool.get_kv_buffer(layer_id)
        keys, values = self._gather_kv(k_cache, v_cache, slots, dtype)
        return kpos, keys, values

    # --- per forward --------------------------------------------------------------------------------
    def _begin_forward(self, forward_batch) -> None:
        """Claim the hook's entries (extend) / requests (decode) for this forward (eager path)."""
        self._scoring = None
        self._decode_reqs = None
        if self.policy is None:
            return
        if forward_batch.forward_mode.is_decode():
            reqs = self._claim_decode_reqs(forward_batch.batch_size)
            if reqs is not None:
                self._install_hidden_hooks()
                states = self._begin_decode_states(reqs, host_seq_lens(forward_batch, len(reqs)))
                self._before_eager_decode(reqs, states)
                self._run_due_decode_events(reqs, states)
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
        pool = self.token_to_kv_pool
        pruning = [i for i, e in enumerate(entries) if e is not None and e.final and self._segment_prunes(e)]
        counts = held_counts_of(self.allocator, self.req_to_token_pool.req_to_token,
                                [int(entries[i].req.req_pool_idx) for i in pruning], [seq[i] for i in pruning])
        new = [int(x) for x in forward_batch.extend_seq_lens_cpu]
        self._scoring = ForwardScoring(entries, pool.layer_num, seq, new, dict(zip(pruning, counts)))

    # --- end-of-prefill scoring and pruning -----------------------------------------------------------
    def _score_request(self, scoring: ForwardScoring, i: int, layer, q_req: torch.Tensor, start: int, m: int,
                       held_kv: Callable[[], HeldKV]) -> None:
        """Request ``i`` of an extend batch at one layer: q_req ``[qh, m, d]`` (its new tokens, rows
        ``start .. start+m`` of the batch); ``held_kv()`` is called only when an observation is built."""
        entry = scoring.entries[i]
        if entry is None:
            return
        local = layer.layer_id - self.token_to_kv_pool.start_layer
        st = scoring.stashes[i]
        h = None
        if self._needs_hidden:
            h = self._hidden[layer.layer_id][start:start + m]
        if not entry.final:
            O.stash_chunk(st, local, q_req, h, self.policy.window)
            return
        if not self._segment_prunes(entry):
            return
        kpos, keys, values = held_kv()
        obs, own_cols = O.build_observation(
            layer.layer_id, local, entry, st, kpos, keys, values, q_req, h, layer.scaling,
            self._o_proj_weight(layer.layer_id), self.policy.window, own_only=self.policy.scorer.query_agnostic,
        )
        from sglang_depthkv.core.selection import token_scores

        scoring.scores[i][local] = token_scores(self.policy.scorer.score(obs), check_nan=False)[own_cols]

    def _score_extend_layer(self, layer, q: torch.Tensor) -> None:
        """One layer of an extend forward after its attention: score every request whose prefill
        ends here (``q`` the batch's queries ``[tokens, qh * d]``), then, after the last layer, prune.
        Host facts come from the forward's ``ForwardScoring``; no device value is read."""
        scoring = self._scoring
        if scoring is not None:
            q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
            local = layer.layer_id - self.token_to_kv_pool.start_layer
            start = 0
            for i, entry in enumerate(scoring.entries):
                m = scoring.new_lens[i]
                if entry is not None:
                    counts = scoring.held_counts.get(i)  # None: the request does not prune (no observation)
                    held_kv = (lambda i=i, counts=counts: self._held_kv(
                        layer.layer_id, scoring.req_pool_idx[i], scoring.seq_lens[i], q.dtype,
                        None if counts is None else counts[local]))
                    self._score_request(scoring, i, layer, q_[start:start + m].movedim(0, 1), start, m, held_kv)
                start += m
        self._end_extend_layer(scoring, layer)

    def _segment_prunes(self, entry) -> bool:
        m = entry.seq_len - entry.own_lo
        return self.policy.budget < 1.0 and m > P.sinks_in_segment(self.policy.sinks, entry.own_lo, m) + self.policy.window

    def _end_extend_layer(self, scoring: Optional[ForwardScoring], layer) -> None:
        if scoring is not None and self._is_last_layer(layer):
            self._finish(scoring)

    def _finish(self, scoring: ForwardScoring):
        own = {i: P.own_token_scores(scoring.scores[i]) for i, e in enumerate(scoring.entries)
               if e is not None and e.final and self._segment_prunes(e)}
        keeps = {}
        if self.score_observer is not None:
            self.score_observer(own)
            own = {}
        if own:  # one NaN check and (global top-k) one read of the keep counts for the whole batch
            from sglang_depthkv.core.selection import check_no_nan

            order = list(own)
            if self.policy.score_sum is not None:  # tensor parallelism: one all-gather for the batch
                own = dict(zip(order, self.policy.score_sum.sum_many([own[i] for i in order])))
            check_no_nan(torch.cat([s.reshape(-1) for s in own.values()]), "DepthKV token scores")
            keeps = dict(zip(order, P.select_own_many(
                self.policy, [(own[i], scoring.entries[i].own_lo) for i in order])))
        for i, entry in enumerate(scoring.entries):
            if entry is None:
                continue
            if not entry.final:
                scoring.stashes[i].upto = entry.seq_len
                continue
            O.clear_stash(entry)
            rec = P.PruneRecord(rid=entry.rid, own_lo=entry.own_lo, seq_len=entry.seq_len, keep=keeps.get(i))
            P.apply_prune(self.allocator, self.req_to_token_pool.req_to_token, entry.req.req_pool_idx, rec)
            if self.score_observer is None:
                P.dump_keep(rec)
            self.prune_log = (self.prune_log + [rec])[-64:]
        self._scoring = None
        self._hidden.clear()

    # --- decode-time pruning --------------------------------------------------------------------------
    def _claim_decode_reqs(self, batch_size: int):
        """The decode batch's ``Req`` list handed over by the ``ForwardBatch.init_new`` hook (None when
        decode-time pruning is off); refuses a batch whose hook did not run."""
        reqs = getattr(self.model_runner, "depthkv_pending_decode_reqs", None)
        self.model_runner.depthkv_pending_decode_reqs = None
        if self.policy is None or not self.decode_interval:
            return None
        if reqs is None or len(reqs) != batch_size:
            raise RuntimeError("DepthKV: decode batch without its requests (the ForwardBatch.init_new hook "
                               "did not run); refusing to skip decode-time pruning silently")
        return reqs

    def _begin_decode_states(self, reqs, seq_lens) -> List[DP.DecodeState]:
        states = []
        for req, seq in zip(reqs, seq_lens):
            st = DP.state_of(req, self.token_to_kv_pool.layer_num)
            DP.begin_step(st, int(seq))
            states.append(st)
        return states

    def _before_eager_decode(self, reqs, states) -> None:
        """Hook for backends that also record decode steps elsewhere (triton: the CUDA-graph ring)."""

    def _run_due_decode_events(self, reqs, states, source: str = "lists") -> None:
        for req, st in zip(reqs, states):
            while DP.prune_due(st, self.decode_interval, self.policy.window):
                DP.prune_segment(st, self.policy, self.decode_interval, req, self.req_to_token_pool.req_to_token,
                                 self.token_to_kv_pool, self.allocator, self._o_proj_weight, source=source)

    def _feed_decode(self, layer, q: torch.Tensor) -> None:
        """Record each decode request's query ``q [bs, qh, d]`` (and attention input) at this layer."""
        if self._decode_reqs is None:
            return
        local = layer.layer_id - self.token_to_kv_pool.start_layer
        for i, req in enumerate(self._decode_reqs):
            st = DP.state_of(req, self.token_to_kv_pool.layer_num)
            h = self._hidden[layer.layer_id][i:i + 1] if self._needs_hidden else None
            DP.record_feed(st, local, q[i:i + 1].movedim(0, 1), h, layer.scaling, self.policy.window)

    def _end_decode_layer(self, layer, forward_batch) -> None:
        if self._decode_reqs is not None and self._is_last_layer(layer):
            self._finish_decode(host_seq_lens(forward_batch, len(self._decode_reqs)))

    def _finish_decode(self, seq_lens):
        states = []
        for req, seq in zip(self._decode_reqs, seq_lens):
            st = DP.state_of(req, self.token_to_kv_pool.layer_num)
            DP.end_step(st, int(seq))
            states.append(st)
        self._run_due_decode_events(self._decode_reqs, states)
        self._decode_reqs = None
        self._hidden.clear()


def host_seq_lens(forward_batch, n: int) -> List[int]:
    """The first ``n`` sequence lengths on the host (``seq_lens_cpu`` when the batch has it, else one
    device-to-host copy)."""
    lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
    return [int(x) for x in lens[:n].tolist()]


def build_policy(settings, model_runner):
    """The core ``PrunePolicy`` of the ``--kv-*`` settings (profile / gates loaded against the model;
    the gates moved once to the model's device, where the observations live). Under tensor
    parallelism the gates are cut to this rank's kv heads and the policy sums token scores over the
    ranks (``tensor_parallel.py``)."""
    from sglang_depthkv.core.policy import make_policy
    from sglang_depthkv.core.types import ModelIdentity

    from sglang_depthkv.sglang.tensor_parallel import head_shard, rank_score_sum

    identity = ModelIdentity.from_hf_config(model_runner.model_config.hf_config)
    shard = head_shard(model_runner)
    profile = gates = None
    if settings.profile is not None:
        from sglang_depthkv.core.profile import load_profile

        profile = load_profile(settings.profile, identity)
    if settings.gates is not None:
        from sglang_depthkv.core.gates import load_gates

        gates = load_gates(settings.gates, identity).to(model_runner.device)
        if shard is not None:
            gates = gates.shard(shard.kv_heads())
    policy = make_policy(settings.policy, settings.budget, profile=profile, gates=gates, sinks=settings.sinks,
                         window=settings.window)
    if shard is not None:
        policy.score_sum = rank_score_sum(shard, policy.scorer)
    return policy
