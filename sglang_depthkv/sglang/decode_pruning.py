"""Decode-time pruning on the SGLang side (``--kv-decode-interval I``): the rule of
``core/reference/decode_pruning.py``, applied per request inside the decode forward.

Per request (state ``DecodeState`` kept on the ``Req``): ``n`` = prompt length, ``G`` = tokens fed
after the prompt (the decode forward feeding position ``p`` makes ``G = p - n + 1``), ``P`` = settled
fed tokens. At every layer the fed token's post-RoPE query (and, for gate scorers, its attention
input) is appended. After the last layer, while ``G - P >= I + w``: the segment is positions
``n+P .. n+P+I+w-1``; per layer an observation over the segment only (its keys/values read through
the mapping, every one still held), window queries = the queries of its last ``w`` tokens;
``keep = policy.select(observations)`` (the core decision, unchanged); the dropped segment tokens
(only among the first ``I``) are freed with ``DepthKVAllocator.prune``; ``P += I``.

Decoded tokens are request-owned (the tree inserts them only when the request finishes), so the
pruning rule of integration I holds. Not covered: a retracted request restarts with a fresh state
(its re-prefilled decoded tokens are not re-pruned), and mixed chunked-prefill batches (decode
steps mixed into an extend batch feed no decode state).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from sglang_depthkv.core.types import LayerObservation
from sglang_depthkv.sglang.pruning import DUMP_ENV

STATE_ATTR = "_depthkv_decode_state"


@dataclass
class DecodeState:
    prompt_len: int
    settled: int = 0
    queries: List[Optional[torch.Tensor]] = field(default_factory=list)  # per layer [qh, G-P, d]
    hidden: List[Optional[torch.Tensor]] = field(default_factory=list)  # per layer [G-P, hidden]
    scalings: List[Optional[float]] = field(default_factory=list)


def state_of(req, num_layers: int) -> DecodeState:
    st = getattr(req, STATE_ATTR, None)
    if st is None:
        st = DecodeState(prompt_len=len(req.origin_input_ids), queries=[None] * num_layers,
                         hidden=[None] * num_layers, scalings=[None] * num_layers)
        setattr(req, STATE_ATTR, st)
    return st


def record_feed(st: DecodeState, local_layer: int, q: torch.Tensor, h: Optional[torch.Tensor], scaling: float):
    """q [qh, 1, d]; h [1, hidden] or None."""
    prev = st.queries[local_layer]
    st.queries[local_layer] = q.detach().clone() if prev is None else torch.cat([prev, q.detach()], 1)
    if h is not None:
        prev_h = st.hidden[local_layer]
        st.hidden[local_layer] = h.detach().clone() if prev_h is None else torch.cat([prev_h, h.detach()], 0)
    st.scalings[local_layer] = float(scaling)


def prune_due(st: DecodeState, seq_len: int, interval: int, window: int) -> bool:
    fed = seq_len - st.prompt_len
    return fed - st.settled >= interval + window


def prune_segment(st: DecodeState, policy, interval: int, req, req_to_token, pool, allocator, o_proj, seq_len: int):
    """One decode-time pruning event for one request (see the module docstring)."""
    w = int(policy.window)
    seg_len = interval + w
    lo = st.prompt_len + st.settled
    row = req_to_token[int(req.req_pool_idx), lo:lo + seg_len].long()
    obs, ids = [], []
    for l in range(pool.layer_num):
        layer_id = pool.start_layer + l
        slots = pool.translate(layer_id, row)
        if bool((slots == 0).any()):
            raise RuntimeError(f"layer {layer_id}: decode segment {lo}..{lo + seg_len - 1} of request {req.rid} "
                               "is not all held")
        k_cache, v_cache = pool.get_kv_buffer(layer_id)
        o = LayerObservation(layer=l, keys=k_cache[slots].movedim(0, 1).float(),
                             values=v_cache[slots].movedim(0, 1).float(),
                             window_queries=st.queries[l][:, interval:seg_len].float(), scaling=st.scalings[l],
                             o_proj_weight=o_proj(layer_id).float(),
                             hidden_states=None if st.hidden[l] is None else st.hidden[l][:seg_len].float())
        obs.append(o)
    keep = policy.select(obs)
    dropped = []
    for l, k in enumerate(keep):
        drop = torch.ones(seg_len, dtype=torch.bool)
        drop[k.long()] = False
        if bool(drop[interval:].any()):
            raise ValueError(f"layer {l}: the policy dropped a token of the protected recent window")
        dropped.append(torch.nonzero(drop).reshape(-1))
        ids.append(row[drop.to(row.device)])
    freed = allocator.prune("all", ids)
    for l in range(pool.layer_num):
        st.queries[l] = st.queries[l][:, interval:]
        if st.hidden[l] is not None:
            st.hidden[l] = st.hidden[l][interval:]
    st.settled += interval
    path = os.environ.get(DUMP_ENV)
    if path:
        with open(path, "a") as f:
            for l, d in enumerate(dropped):
                f.write(json.dumps({"rid": str(req.rid), "event": "decode", "fed": seq_len - st.prompt_len,
                                    "layer": l, "dropped": [int(lo + x) for x in d.tolist()],
                                    "freed": freed[l]}) + "\n")
