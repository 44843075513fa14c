"""Decode-time pruning on the SGLang side (``--kv-decode-interval I``): the rule of
``core/reference/decode_pruning.py``, applied per request by the attention backend.

Per request (state ``DecodeState`` kept on the ``Req``): ``n`` = prompt length, ``G`` = tokens fed
after the prompt (the decode forward feeding position ``p`` makes ``G = p - n + 1``; ``fed`` is the
``G`` this state has recorded), ``P`` = settled fed tokens. At every layer the fed token's
post-RoPE query (and, for gate scorers, its attention input) is recorded. When ``G - P == I + w``:
the segment is positions ``n+P .. n+P+I+w-1``; per layer an observation over the segment only (its
keys/values read through the mapping, every one still held), window queries = the queries of its
last ``w`` tokens, i.e. the last ``w`` fed queries; ``keep = policy.select(observations)`` (the core
decision, unchanged); the dropped segment tokens (only among the first ``I``) are freed with
``DepthKVAllocator.prune``; ``P += I``. Feeding one token per step, ``G - P`` reaches ``I + w``
exactly (never more), so only the last ``w`` fed queries are ever read: the state keeps those
(``queries``) and the attention inputs of the unsettled tokens (``hidden``, ``G - P`` rows).

Where the record lives:

- eager decode (``record_feed`` per layer, ``end_step`` after the last layer, then the due event at
  once): Python tensors on the state;
- CUDA-graph decode (triton, ``backends/graph_decode.py``): a preallocated device ring
  (``decode_ring.DecodeRing``) written inside the graph; the state only counts (``fed``,
  ``settled``, ``ring_slot``) and its lists are rebuilt from the ring when an event is due, which
  runs before the request's next decode step reads the cache.

A state that missed a decode step (``begin_step``: the step's ``G`` is not ``fed + 1``: a retracted
request re-prefilled with its decoded tokens, or a decode step mixed into a chunked-prefill extend
batch) restarts at that step: everything fed before is settled, never pruned, and the segments
start again from there. Decoded tokens are request-owned (the tree inserts them only when the
request finishes), so the pruning rule of integration I holds. An event due after a request's last
decode step is not run on the CUDA-graph path (it would run at the next step; the request is
finished): at most ``I + w - 1`` tokens at the end of a request stay unpruned on both paths anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from sglang_depthkv.core.types import LayerObservation
from sglang_depthkv.sglang.pruning import DUMP_ENV, write_dump_rows

STATE_ATTR = "_depthkv_decode_state"


@dataclass
class DecodeState:
    prompt_len: int
    settled: int = 0  # P
    fed: int = 0  # G as recorded
    queries: List[Optional[torch.Tensor]] = field(default_factory=list)  # per layer [qh, min(w, G-P), d]
    hidden: List[Optional[torch.Tensor]] = field(default_factory=list)  # per layer [G-P, hidden]
    scalings: List[Optional[float]] = field(default_factory=list)
    ring_slot: Optional[int] = None  # CUDA-graph ring slot holding the record (None: the lists above)

    def clear_lists(self) -> None:
        self.queries = [None] * len(self.queries)
        self.hidden = [None] * len(self.hidden)


def state_of(req, num_layers: int) -> DecodeState:
    st = getattr(req, STATE_ATTR, None)
    if st is None:
        st = DecodeState(prompt_len=len(req.origin_input_ids), queries=[None] * num_layers,
                         hidden=[None] * num_layers, scalings=[None] * num_layers)
        setattr(req, STATE_ATTR, st)
    return st


def begin_step(st: DecodeState, seq_len: int) -> bool:
    """Before the decode step that feeds position ``seq_len - 1``: restart the state if it missed a
    step (see the module docstring). Returns True when it restarted."""
    g = int(seq_len) - st.prompt_len
    if g < 1:
        raise RuntimeError(f"decode step at sequence length {seq_len} of a request with a {st.prompt_len}-token prompt")
    if st.fed == g - 1:
        return False
    st.fed = st.settled = g - 1
    st.clear_lists()
    return True


def end_step(st: DecodeState, seq_len: int) -> None:
    """After the step that fed position ``seq_len - 1`` was recorded at every layer."""
    g = int(seq_len) - st.prompt_len
    if st.fed != g - 1:
        raise RuntimeError(f"decode state recorded G={st.fed}, but this step feeds G={g}")
    st.fed = g


def record_feed(st: DecodeState, local_layer: int, q: torch.Tensor, h: Optional[torch.Tensor], scaling: float,
                window: int):
    """q [qh, 1, d]; h [1, hidden] or None. Keeps the last ``window`` queries."""
    prev = st.queries[local_layer]
    q = q.detach()
    st.queries[local_layer] = q.clone() if prev is None else torch.cat([prev, q], 1)[:, -int(window):].clone()
    if h is not None:
        prev_h = st.hidden[local_layer]
        st.hidden[local_layer] = h.detach().clone() if prev_h is None else torch.cat([prev_h, h.detach()], 0)
    st.scalings[local_layer] = float(scaling)


def prune_due(st: DecodeState, interval: int, window: int) -> bool:
    return st.fed - st.settled >= interval + window


def prune_segment(st: DecodeState, policy, interval: int, req, req_to_token, pool, allocator, o_proj,
                  source: str = "lists"):
    """One decode-time pruning event for one request (see the module docstring), from the state's
    lists (``source`` names where they came from, recorded in the dump)."""
    w = int(policy.window)
    seg_len = interval + w
    if st.fed - st.settled != seg_len:
        raise RuntimeError(f"request {req.rid}: decode-time pruning with G - P = {st.fed - st.settled}, expected "
                           f"I + w = {seg_len} (one token fed per step)")
    lo = st.prompt_len + st.settled
    row = req_to_token[int(req.req_pool_idx), lo:lo + seg_len].long()
    slots_all = pool.mapping[:, row].long()  # [L, seg_len]
    if not bool((slots_all != 0).all()):
        layer = int((slots_all == 0).any(1).nonzero()[0])
        raise RuntimeError(f"layer {pool.start_layer + layer}: decode segment {lo}..{lo + seg_len - 1} of request "
                           f"{req.rid} is not all held")
    obs, ids = [], []
    for l in range(pool.layer_num):
        layer_id = pool.start_layer + l
        q, h = st.queries[l], st.hidden[l]
        if q is None or q.shape[1] != w or (h is not None and h.shape[0] != seg_len):
            raise RuntimeError(f"layer {layer_id}: request {req.rid} recorded "
                               f"{0 if q is None else q.shape[1]} window queries / "
                               f"{None if h is None else h.shape[0]} attention inputs for a {seg_len}-token segment")
        k_cache, v_cache = pool.get_kv_buffer(layer_id)
        slots = slots_all[l]
        o = LayerObservation(layer=l, keys=k_cache[slots].movedim(0, 1).float(),
                             values=v_cache[slots].movedim(0, 1).float(),
                             window_queries=q.float(), scaling=st.scalings[l],
                             o_proj_weight=o_proj(layer_id),  # LaProx casts it (no L-layer float copy here)
                             hidden_states=None if h is None else h.float())
        obs.append(o)
    keep = policy.select(obs)
    if len(keep) != pool.layer_num:
        raise ValueError(f"policy returned {len(keep)} keep sets for {pool.layer_num} layers")
    # the keep sets live on the scores' device: one copy to the host for all layers
    keep = torch.cat([k.reshape(-1).long() for k in keep]).cpu().split([int(k.numel()) for k in keep])
    dropped, row_host = [], row.cpu()
    for l, k in enumerate(keep):
        drop = torch.ones(seg_len, dtype=torch.bool)
        drop[k] = False
        if bool(drop[interval:].any()):
            raise ValueError(f"layer {l}: the policy dropped a token of the protected recent window")
        dropped.append(torch.nonzero(drop).reshape(-1))
        ids.append(row_host[drop])
    freed = allocator.prune("all", ids)
    for l in range(pool.layer_num):
        if st.hidden[l] is not None:
            st.hidden[l] = st.hidden[l][interval:]
    st.settled += interval
    if os.environ.get(DUMP_ENV):
        write_dump_rows([{"rid": str(req.rid), "event": "decode", "fed": st.fed, "source": source, "layer": l,
                          "dropped": [int(lo + x) for x in d.tolist()], "freed": freed[l]}
                         for l, d in enumerate(dropped)])
