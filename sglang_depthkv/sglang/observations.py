"""What the attention backend knows about each request of an extend batch, and the core
``LayerObservation`` it builds from what attention already computed (no second forward pass).

- ``ExtendEntry``: one request of an extend batch (attached to the ``ForwardBatch`` by the
  ``ForwardBatch.init_new`` hook, ``patches/pruning.py``): its rid, ``prefix_len`` (tokens already in
  the KV cache: a radix-matched prefix and/or earlier chunks), ``seq_len``, ``own_lo`` (where the
  request's own tokens begin: positions below it were inserted into the tree by another request and
  are never re-pruned; the request's own earlier chunks are above it, see ``chunk_ownership``) and
  ``final`` (its prefill ends in this batch: every request except the batch's ``chunked_req``).
  Mixed-in decode requests get no entry, and neither does the re-prefill of a retracted request
  (it already has output tokens): its prompt was pruned at its first prefill (the pruned prompt is
  in the tree and is normally matched again), and decoded tokens are never pruned at prefill
  (only decode-time pruning may drop them). If the tree evicted the pruned prompt meanwhile, the
  re-prefilled prompt is kept whole (not re-scored).
- ``ChunkStash`` (kept on the ``Req`` between chunks of a chunked prefill): per layer the last
  ``window`` queries seen so far (so a final chunk shorter than the window still has a full
  observation window) and, for scorers that use them (KVzip gates), the attention inputs of the
  request's own tokens of earlier chunks, one piece per chunk, joined once by the final chunk (a
  running concatenation would copy O(n²) rows over a long chunked prefill).
- ``build_observation``: per layer and request, keys/values = the tokens the layer holds for the
  request (held prefix + the new chunk, compacted, in position order), window queries = the last
  ``w = min(window, own tokens)`` queries (post-RoPE, as the backend receives them), LaProx's
  ``o_proj`` weight read from the model's layer. Query-agnostic scorers (recency, KVzip gates)
  score only the own segment (their scores do not depend on other tokens; the cached prefix has no
  hidden states here). Tensors keep their dtypes: the scorers upcast what they read, chunk by
  chunk (``core/scorers``), so no float32 copy of the keys, values, hidden states or ``o_proj``
  weight (64 MiB per layer for Llama-3.1-8B) is made here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from sglang_depthkv.sglang import checks

from sglang_depthkv.core.types import LayerObservation
from sglang_depthkv.sglang import chunk_ownership


@dataclass
class ExtendEntry:
    req: Any
    rid: str
    prefix_len: int
    seq_len: int
    own_lo: int
    final: bool

    @property
    def new_len(self) -> int:
        return self.seq_len - self.prefix_len


@dataclass
class ChunkStash:
    upto: int  # sequence length covered so far
    queries: List[Optional[torch.Tensor]] = field(default_factory=list)  # per layer [qh, <=w, d]
    # per layer, one [rows, hidden] piece per earlier chunk (own rows so far, in order)
    hidden: List[Optional[List[torch.Tensor]]] = field(default_factory=list)


STASH_ATTR = "_depthkv_chunk_stash"


def entries_for_batch(batch) -> List[Optional[ExtendEntry]]:
    """One entry per request of an extend ``ScheduleBatch`` (None for mixed-in decode requests)."""
    chunked = getattr(batch, "chunked_req", None)
    decoding = {id(r) for r in (getattr(batch, "decoding_reqs", None) or [])}
    prefix_lens = list(batch.prefix_lens)
    seq_lens = [int(x) for x in batch.seq_lens_cpu.tolist()]
    out: List[Optional[ExtendEntry]] = []
    for i, req in enumerate(batch.reqs):
        if id(req) in decoding or len(getattr(req, "output_ids", None) or ()) > 0:
            chunk_ownership.forget(req)
            out.append(None)  # mixed-in decode step, or the re-prefill of a retracted request
            continue
        pre = int(prefix_lens[i])
        if int(req.cache_protected_len) > pre:
            raise RuntimeError(f"request {req.rid}: cache_protected_len {req.cache_protected_len} > prefix length {pre}")
        final = req is not chunked
        own_lo = chunk_ownership.chunk_own_lo(req)
        if final:
            own_lo = chunk_ownership.unshared_start(req, own_lo)
            chunk_ownership.forget(req)
        out.append(ExtendEntry(req=req, rid=str(req.rid), prefix_len=pre, seq_len=seq_lens[i], own_lo=own_lo,
                               final=final))
    return out


def get_stash(entry: ExtendEntry, num_layers: int) -> ChunkStash:
    """The request's stash, reset when this chunk does not continue it (first chunk, retraction)."""
    st = getattr(entry.req, STASH_ATTR, None)
    if st is None or st.upto != entry.prefix_len or entry.prefix_len == entry.own_lo:
        st = ChunkStash(upto=entry.prefix_len, queries=[None] * num_layers, hidden=[None] * num_layers)
        setattr(entry.req, STASH_ATTR, st)
    return st


def clear_stash(entry: ExtendEntry) -> None:
    if hasattr(entry.req, STASH_ATTR):
        delattr(entry.req, STASH_ATTR)


def _window_tail(prev: Optional[torch.Tensor], q_req: torch.Tensor, w: int) -> torch.Tensor:
    """The last ``w`` queries of ``prev`` (``[qh, <=w, d]``) followed by ``q_req`` (``[qh, m, d]``):
    only the chunk's last ``w`` queries are joined, so a chunk costs O(w), not O(m)."""
    tail = q_req[:, -w:, :]
    return tail if prev is None else torch.cat([prev, tail], dim=1)[:, -w:, :]


def _join_rows(pieces: Optional[List[torch.Tensor]], last: torch.Tensor) -> torch.Tensor:
    """``pieces`` then ``last`` along rows, in one concatenation (``last`` itself when alone)."""
    return last if not pieces else torch.cat([*pieces, last], dim=0)


def window_size(window: int, own_tokens: int) -> int:
    """Observation window: the last ``window`` queries (at least 1, as the reference path), clipped
    to the request's own tokens (the only queries computed for it)."""
    return min(max(int(window), 1), int(own_tokens))


def stash_chunk(st: ChunkStash, local_layer: int, q_req: torch.Tensor, h_req: Optional[torch.Tensor],
                window: int) -> None:
    """Record a non-final chunk at one layer: q_req [qh, m, d], h_req [m, hidden] or None. Copies
    at most ``w`` queries and the chunk's own ``m`` hidden rows (kept as a piece, never re-copied:
    O(n) over the prefill)."""
    w = max(int(window), 1)
    st.queries[local_layer] = _window_tail(st.queries[local_layer], q_req, w).detach().clone()
    if h_req is not None:
        pieces = st.hidden[local_layer]
        st.hidden[local_layer] = [*(pieces or ()), h_req.detach().clone()]


def build_observation(layer: int, local_layer: int, entry: ExtendEntry, st: ChunkStash, kpos: torch.Tensor,
                      keys: torch.Tensor, values: torch.Tensor, q_req: torch.Tensor, h_req: Optional[torch.Tensor],
                      scaling: float, o_proj_weight: Optional[torch.Tensor], window: int,
                      own_only: bool) -> tuple:
    """``(LayerObservation, own_columns)``: ``own_columns`` selects, from the observation's tokens,
    the request's own positions ``[own_lo, seq_len)`` in order. keys/values ``[kvh, n_held, d]`` at
    held positions ``kpos``; q_req ``[qh, m, d]`` (this chunk). Copies at most ``2w`` queries and,
    for hidden states, the stashed pieces plus this chunk's rows once (O(n)); keys, values, hidden
    states and the ``o_proj`` weight keep their dtypes (no float32 copies)."""
    m_own = entry.seq_len - entry.own_lo
    w = window_size(window, m_own)
    queries = _window_tail(st.queries[local_layer], q_req, w)
    if queries.shape[1] != w:
        raise RuntimeError(f"layer {layer}, request {entry.rid}: {queries.shape[1]} window queries, expected {w}")
    # every own token is held before pruning, and kpos ascends: the own tokens are the last m_own
    n_held = int(kpos.shape[0])
    if n_held < m_own:
        raise RuntimeError(f"layer {layer}, request {entry.rid}: the layer holds {n_held} tokens, fewer than its "
                           f"{m_own} own tokens before pruning")
    if checks.enabled() and not bool((kpos[n_held - m_own:] >= entry.own_lo).all()):
        raise RuntimeError(f"layer {layer}, request {entry.rid}: an own token holds no slot before pruning")
    hidden = None
    if h_req is not None:
        hidden = _join_rows(st.hidden[local_layer], h_req)
    if own_only:
        keys, values = keys[:, n_held - m_own:], values[:, n_held - m_own:]
        own_cols = torch.arange(m_own, device=kpos.device)
        if hidden is not None:
            # the stash holds the rows of every chunk since the first; own_lo may have moved past some
            # (``chunk_ownership``): the own segment is always the last m_own rows
            if hidden.shape[0] < m_own:
                raise RuntimeError(f"layer {layer}, request {entry.rid}: hidden states of {hidden.shape[0]} rows "
                                   f"for {m_own} own tokens")
            hidden = hidden[hidden.shape[0] - m_own:]
    else:
        own_cols = torch.arange(n_held - m_own, n_held, device=kpos.device)
        if hidden is not None and hidden.shape[0] != keys.shape[1]:
            raise RuntimeError(f"layer {layer}, request {entry.rid}: hidden states of a cached prefix are not "
                               "available to a scorer that reads all tokens")
    obs = LayerObservation(layer=layer, keys=keys, values=values, window_queries=queries, scaling=float(scaling),
                           o_proj_weight=o_proj_weight, hidden_states=hidden)
    obs.check()
    return obs, own_cols
