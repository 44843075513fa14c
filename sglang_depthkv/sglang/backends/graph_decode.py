"""Decode-time pruning (``--kv-decode-interval``) under CUDA-graph decode, for the triton backend.

A captured decode graph replays kernels only: no Python runs per step, so the eager record
(``decode_pruning.record_feed``, Python tensors per request) cannot be used. Instead:

- **In the graph** (``_graph_decode_write``, per layer in ``forward_decode``): the layer's
  post-RoPE queries (and, for gate scorers with hidden states, the attention inputs kept by the
  ``self_attn`` pre-hook) of every row are written into the preallocated ``DecodeRing`` at the rows
  bound for this batch: one fixed-shape ``index_copy_`` per tensor, no host sync, no allocation.
- **Before each replay** (``_prepare_graph_decode``, from ``init_forward_metadata_out_graph``,
  i.e. SGLang's ``load_batch``; eagerly, outside what the graph replays), in this order:

  1. claim the batch's ``Req`` list (``model_runner.depthkv_pending_decode_reqs``, set by the
     ``ForwardBatch.init_new`` hook, which SGLang calls for every decode step, graph or not; real
     rows ``0 .. raw_bs-1`` are the batch's requests in order, ``raw_bs = bs - num_padding``, the
     padded tail rows are the graph's dummies) and check each state's step (``begin_step``);
  2. run the events due after the request's previous step (``G - P == I + w`` at that step): the
     state's lists are rebuilt from the ring (one gather for all due requests), then
     ``decode_pruning.prune_segment``: the same ``policy.select`` on the same observation as the
     eager path (segment keys/values through the mapping, the last ``w`` fed queries), the same
     ``DepthKVAllocator.prune``. This runs before this step's per-layer index streams are built
     (``fill_graph``), so this step attends over the pruned cache, as in the reference (which
     prunes right after feeding). An event due after a request's *last* step is not run (the
     request is finished);
  3. give every request a ring slot (records of requests that were decoded eagerly are loaded
     into it; slots of requests no longer decoding are taken back, their records spilled to the
     lists unless the request finished);
  4. ``DecodeRing.bind``: per-row write rows from ``req_pool_indices`` / ``seq_lens`` (device ops);
     padded rows write the ring's sink; count the step as fed (``end_step``).

  Host syncs: none on a step without a due event when the batch has ``seq_lens_cpu`` (else one
  copy of the lengths); a step with due events syncs inside the event (``policy.select``, the
  allocator's checks), once per event as on the eager path, after one gather of the records.
- **Eager decode batches** while the ring exists (a batch larger than the largest captured one):
  ``_before_eager_decode`` spills the batch's ring records to the lists (one gather) and frees their
  slots; the eager path then records and prunes exactly as without graphs.
- **Capture** (``in_capture`` from SGLang's capture, no requests): every row writes the sink.

Ring size: ``slots = max_bs`` of ``init_cuda_graph_state`` (the largest captured batch); memory is
logged at start-up (``DecodeRing.nbytes``: ``L * (max_bs * w + max_bs) * qh * d`` query elements,
plus ``L * (max_bs * (I + w) + max_bs) * hidden`` for gate scorers with hidden states).

Ordering on a GPU (not exercisable on CPU): the events of step ``t`` run in step ``t+1``'s
``load_batch``, on the stream SGLang then replays on, so their reads of the ring / KV written by
step ``t`` are stream-ordered after it, and their host syncs wait for it; the allocator frees them
before step ``t+1`` is launched, and step ``t+1`` no longer maps them.
"""

from __future__ import annotations

import logging
from typing import List, Optional

from sglang_depthkv.sglang import decode_pruning as DP
from sglang_depthkv.sglang.backends.scoring import host_seq_lens
from sglang_depthkv.sglang.decode_ring import DecodeRing

logger = logging.getLogger("sglang_depthkv")


class GraphDecodePruningMixin:
    """Goes before ``DepthKVScoringMixin`` in the bases (overrides ``_before_eager_decode``)."""

    decode_ring: Optional[DecodeRing] = None
    _ring_live = False  # the next decode forward(s) write the ring (graph or graph-buffer batches)

    def _init_graph_decode(self, max_bs: int) -> None:
        self._layer_scalings: List[Optional[float]] = [None] * self.token_to_kv_pool.layer_num
        self.decode_ring = None
        if self.policy is None or not self.decode_interval:
            return
        self._ring_reqs: List[Optional[object]] = [None] * max_bs  # slot -> its request (finished check)
        mc = self.model_runner.model_config
        pool = self.token_to_kv_pool
        self.decode_ring = DecodeRing(
            num_layers=pool.layer_num, slots=max_bs, max_bs=max_bs, window=int(self.policy.window),
            interval=self.decode_interval, q_heads=self.num_head, head_dim=int(mc.head_dim),
            hidden_size=int(mc.hidden_size) if self._needs_hidden else None,
            table_rows=int(self.req_to_token_pool.req_to_token.shape[0]), dtype=self.model_runner.dtype,
            device=self.device)
        logger.info("sglang-depthkv: decode-time pruning through the CUDA-graph ring: %d slots, window %d, "
                    "interval %d, %s, %.4f GiB", max_bs, self.policy.window, self.decode_interval,
                    "queries + attention inputs" if self._needs_hidden else "queries",
                    self.decode_ring.nbytes / 2**30)

    def _record_layer_scaling(self, layer) -> None:
        if self.decode_ring is not None:
            self._layer_scalings[layer.layer_id - self.token_to_kv_pool.start_layer] = float(layer.scaling)

    # --- before a replay ------------------------------------------------------------------------------------
    def _prepare_graph_decode(self, fb, bs: int, in_capture: bool) -> None:
        ring = self.decode_ring
        self._ring_live = ring is not None
        # SGLang's capture builds its ForwardBatch directly (no ForwardBatch.init_new hook, so no
        # requests were handed over): dummy rows only
        if in_capture and getattr(self.model_runner, "depthkv_pending_decode_reqs", None) is None:
            self.model_runner.depthkv_pending_decode_reqs = None
            if ring is not None:
                self._install_hidden_hooks()
                ring.bind(fb.req_pool_indices, fb.seq_lens, 0, bs)
            return
        raw_bs = bs - int(getattr(fb, "num_padding", 0) or 0)
        if raw_bs == 0:  # an idle batch
            self.model_runner.depthkv_pending_decode_reqs = None
            if ring is not None:
                ring.bind(fb.req_pool_indices, fb.seq_lens, 0, bs)
            return
        reqs = self._claim_decode_reqs(raw_bs)
        if reqs is None:
            return
        if ring is None:
            raise RuntimeError("DepthKV: CUDA-graph decode with --kv-decode-interval before init_cuda_graph_state")
        self._install_hidden_hooks()
        lens = host_seq_lens(fb, raw_bs)
        states = self._begin_decode_states(reqs, lens)
        self._run_due_from_ring(reqs, states)
        self._take_slots(reqs, states)
        ring.bind(fb.req_pool_indices, fb.seq_lens, raw_bs, bs)
        for st, seq in zip(states, lens):
            DP.end_step(st, seq)  # the replay records this step at every layer

    def _run_due_from_ring(self, reqs, states) -> None:
        due = [i for i, st in enumerate(states) if DP.prune_due(st, self.decode_interval, self.policy.window)]
        in_ring = [i for i in due if states[i].ring_slot is not None]
        if in_ring:
            self._rebuild_lists([states[i] for i in in_ring])
        for i in due:
            st = states[i]
            source = "ring" if st.ring_slot is not None else "lists"
            while DP.prune_due(st, self.decode_interval, self.policy.window):
                DP.prune_segment(st, self.policy, self.decode_interval, reqs[i], self.req_to_token_pool.req_to_token,
                                 self.token_to_kv_pool, self.allocator, self._o_proj_weight, source=source)
            if st.ring_slot is not None:
                st.clear_lists()  # the ring stays the record (its rows of fed indices >= P are unchanged)

    def _rebuild_lists(self, states) -> None:
        """The states' lists from their ring records (one gather for all)."""
        if any(s is None for s in self._layer_scalings):
            raise RuntimeError("DepthKV: a decode-time record read before every layer's attention scaling was seen")
        got = self.decode_ring.read([(st.ring_slot, st.fed, st.settled) for st in states])
        for st, (queries, hidden) in zip(states, got):
            st.queries = list(queries)
            st.hidden = list(hidden) if hidden is not None else [None] * len(queries)
            st.scalings = list(self._layer_scalings)

    def _take_slots(self, reqs, states) -> None:
        ring = self.decode_ring
        need = [i for i, st in enumerate(states) if st.ring_slot is None]
        if len(need) > ring.free_slots():
            self._reclaim_slots({id(st) for st in states})
        for i, (req, st) in enumerate(zip(reqs, states)):
            if st.ring_slot is None:
                st.ring_slot = ring.acquire(st, int(req.req_pool_idx), st.prompt_len)
                ring.load(st.ring_slot, st.fed, st.settled, st.queries, st.hidden if self._needs_hidden else None)
                st.clear_lists()
            elif ring.slot_rpi[st.ring_slot] != int(req.req_pool_idx):  # re-admitted into another req row
                ring.assign(st.ring_slot, int(req.req_pool_idx), st.prompt_len)
            self._ring_reqs[st.ring_slot] = req

    def _reclaim_slots(self, keep_ids) -> None:
        """Take back the slots of requests not in this batch (finished, retracted); the record of an
        unfinished one is spilled to its lists first."""
        ring = self.decode_ring
        gone = [slot for slot, st in enumerate(ring.owner) if st is not None and id(st) not in keep_ids]
        self._spill([ring.owner[slot] for slot in gone if not self._ring_reqs[slot].finished()])
        for slot in gone:
            if ring.owner[slot] is not None:
                ring.owner[slot].ring_slot = None
                ring.release(slot)

    def _spill(self, states) -> None:
        """Move these ring-resident records to the states' lists and free their slots."""
        with_records = [st for st in states if st.fed > st.settled]
        if with_records:
            self._rebuild_lists(with_records)
        for st in states:
            self.decode_ring.release(st.ring_slot)
            st.ring_slot = None

    # --- eager decode batches ----------------------------------------------------------------------------------
    def _before_eager_decode(self, reqs, states) -> None:
        self._ring_live = False
        if self.decode_ring is not None:
            self._spill([st for st in states if st.ring_slot is not None])

    # --- in the graph ----------------------------------------------------------------------------------------------
    def _graph_decode_write(self, layer, q) -> None:
        local = layer.layer_id - self.token_to_kv_pool.start_layer
        h = self._hidden.get(layer.layer_id) if self._needs_hidden else None
        self.decode_ring.write(local, q, h)
