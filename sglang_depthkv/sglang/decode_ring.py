"""Preallocated device record of decode steps for decode-time pruning under CUDA-graph decode.

Decode-time pruning reads, when a request's event is due, the post-RoPE queries of its last ``w``
fed tokens at every layer and (gate scorers with hidden states) the attention inputs of its
``I + w`` unsettled tokens (``decode_pruning``). A captured graph cannot append to Python lists, so
each slot of this ring holds one request's record at fixed addresses:

- ``q [L, slots * w + max_bs, qh, d]``: slot ``s``, fed index ``j`` (0-based) at row
  ``s * w + j % w``;
- ``h [L, slots * (I + w) + max_bs, hidden]`` (only with hidden states): row
  ``s * (I + w) + j % (I + w)``;
- the last ``max_bs`` rows of each are the *sink*: padded row ``r`` of a graph batch writes row
  ``slots * len + r``, never read.

Which slot and fed index a batch row writes comes from two tables indexed by ``req_pool_idx``
(``slot_of``, ``prompt_len_of``, set host-side when a request takes a slot): ``bind`` turns the
batch's ``req_pool_indices`` / ``seq_lens`` (device) into per-row write rows ``q_index`` /
``h_index`` with device ops only (fed index of the row = ``seq_len - prompt_len - 1``), refilled
before each replay; ``write(layer, q, h)`` is the one op inside the graph per layer: a fixed-shape
``index_copy_`` at those rows (no host sync, no allocation). ``read`` (rebuild the records of some
requests, one gather) and ``load`` (write records kept elsewhere into a slot) run outside the
graph. Slots are handed out by ``acquire`` / ``release`` (host bookkeeping only).

Memory: ``L * (slots * w + max_bs) * qh * d`` elements of the query dtype, plus
``L * (slots * (I + w) + max_bs) * hidden`` with hidden states (``nbytes``). Pure torch: no SGLang
import; ``tests/sglang/test_decode_ring.py`` checks it against Python lists of the fed tensors.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


class DecodeRing:
    def __init__(self, *, num_layers: int, slots: int, max_bs: int, window: int, interval: int, q_heads: int,
                 head_dim: int, hidden_size: Optional[int], table_rows: int, dtype: torch.dtype,
                 device: torch.device):
        for name, v in (("num_layers", num_layers), ("slots", slots), ("max_bs", max_bs), ("window", window),
                        ("interval", interval), ("q_heads", q_heads), ("head_dim", head_dim),
                        ("table_rows", table_rows)):
            if int(v) < 1:
                raise ValueError(f"DecodeRing: {name} must be >= 1, got {v}")
        if hidden_size is not None and int(hidden_size) < 1:
            raise ValueError(f"DecodeRing: hidden_size must be >= 1 or None, got {hidden_size}")
        self.num_layers, self.slots, self.max_bs = int(num_layers), int(slots), int(max_bs)
        self.qlen, self.hlen = int(window), int(interval) + int(window)
        self.q_heads, self.head_dim = int(q_heads), int(head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        L = self.num_layers
        self.q = torch.zeros((L, self.slots * self.qlen + self.max_bs, self.q_heads, self.head_dim), dtype=dtype,
                             device=self.device)
        self.h = None
        if hidden_size is not None:
            self.h = torch.zeros((L, self.slots * self.hlen + self.max_bs, int(hidden_size)), dtype=dtype,
                                 device=self.device)
        self.q_index = torch.zeros(self.max_bs, dtype=torch.int64, device=self.device)
        self.h_index = torch.zeros(self.max_bs, dtype=torch.int64, device=self.device)
        sink_rows = torch.arange(self.max_bs, dtype=torch.int64, device=self.device)
        self._q_sink = self.slots * self.qlen + sink_rows
        self._h_sink = self.slots * self.hlen + sink_rows
        self.slot_of = torch.zeros(int(table_rows), dtype=torch.int64, device=self.device)
        self.prompt_len_of = torch.zeros(int(table_rows), dtype=torch.int64, device=self.device)
        self._free: List[int] = list(range(self.slots - 1, -1, -1))
        self.owner: List[Optional[object]] = [None] * self.slots
        self.slot_rpi: List[Optional[int]] = [None] * self.slots  # the table row pointing at each slot

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + (0 if self.h is None else self.h.numel() * self.h.element_size())

    # --- slots (host) ------------------------------------------------------------------------------------
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self, owner, req_pool_idx: int, prompt_len: int) -> int:
        """A free slot for ``owner``; the tables map ``req_pool_idx`` to it (device writes of two
        scalars, stream-ordered, no host sync)."""
        if not self._free:
            raise RuntimeError(f"DecodeRing: all {self.slots} slots are taken")
        slot = self._free.pop()
        self.owner[slot] = owner
        self.assign(slot, req_pool_idx, prompt_len)
        return slot

    def assign(self, slot: int, req_pool_idx: int, prompt_len: int) -> None:
        if not (0 <= int(req_pool_idx) < self.slot_of.numel()):
            raise ValueError(f"DecodeRing: req_pool_idx {req_pool_idx} outside [0, {self.slot_of.numel()})")
        self.slot_of[int(req_pool_idx)] = int(slot)
        self.prompt_len_of[int(req_pool_idx)] = int(prompt_len)
        self.slot_rpi[int(slot)] = int(req_pool_idx)

    def release(self, slot: int) -> None:
        if self.owner[slot] is None:
            raise RuntimeError(f"DecodeRing: slot {slot} is not taken")
        self.owner[slot] = None
        self.slot_rpi[slot] = None
        self._free.append(int(slot))

    # --- graph-side ----------------------------------------------------------------------------------------
    def bind(self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, raw_bs: int, bs: int) -> None:
        """Refill the per-row write rows for a batch of ``bs`` rows whose first ``raw_bs`` are real
        (device ops only). Padded rows (and every row when ``raw_bs == 0``: a capture) write the sink."""
        if not (0 <= raw_bs <= bs <= self.max_bs):
            raise ValueError(f"DecodeRing.bind: need 0 <= raw_bs {raw_bs} <= bs {bs} <= max_bs {self.max_bs}")
        if raw_bs:  # batch tensors on the host too (a no-op when they are on the ring's device)
            rpi = req_pool_indices[:raw_bs].to(device=self.device, dtype=torch.int64)
            fed0 = seq_lens[:raw_bs].to(device=self.device, dtype=torch.int64) - self.prompt_len_of[rpi] - 1
            slot = self.slot_of[rpi]
            self.q_index[:raw_bs] = slot * self.qlen + torch.remainder(fed0, self.qlen)
            self.h_index[:raw_bs] = slot * self.hlen + torch.remainder(fed0, self.hlen)
        if bs > raw_bs:
            self.q_index[raw_bs:bs] = self._q_sink[raw_bs:bs]
            self.h_index[raw_bs:bs] = self._h_sink[raw_bs:bs]

    def write(self, layer: int, q: torch.Tensor, h: Optional[torch.Tensor]) -> None:
        """Inside the graph: row ``i`` of ``q`` (``[bs, qh * d]`` or ``[bs, qh, d]``; and ``h [bs,
        hidden]``) at its bound row, for local layer ``layer``."""
        q = q.reshape(-1, self.q_heads, self.head_dim)
        bs = int(q.shape[0])
        if q.dtype != self.dtype:
            raise TypeError(f"DecodeRing.write: query dtype {q.dtype}, ring dtype {self.dtype}")
        self.q[layer].index_copy_(0, self.q_index[:bs], q)
        if self.h is not None:
            if h is None or int(h.shape[0]) != bs:
                raise RuntimeError(f"DecodeRing.write: layer {layer}: attention inputs "
                                   f"{None if h is None else tuple(h.shape)} for {bs} rows")
            self.h[layer].index_copy_(0, self.h_index[:bs], h.to(self.dtype))

    # --- outside the graph --------------------------------------------------------------------------------
    def _rows(self, slot: int, first: int, last: int, length: int) -> List[int]:
        return [slot * length + j % length for j in range(first, last)]

    def read(self, records: Sequence[Tuple[int, int, int]]) -> List[Tuple[List[torch.Tensor], Optional[List[torch.Tensor]]]]:
        """``records``: ``(slot, fed, settled)`` per request. Returns per request the queries of fed
        indices ``max(settled, fed - w) .. fed-1`` per layer ``[qh, n, d]`` and (with hidden states)
        the attention inputs of ``settled .. fed-1`` per layer ``[m, hidden]`` (one gather each)."""
        qrows, hrows, spans = [], [], []
        for slot, fed, settled in records:
            if not (0 <= settled <= fed and fed - settled <= self.hlen):
                raise ValueError(f"DecodeRing.read: fed {fed}, settled {settled} (at most {self.hlen} unsettled)")
            qr = self._rows(slot, max(settled, fed - self.qlen), fed, self.qlen)
            hr = self._rows(slot, settled, fed, self.hlen) if self.h is not None else []
            spans.append((len(qr), len(hr)))
            qrows += qr
            hrows += hr
        qg = self.q.index_select(1, torch.tensor(qrows, dtype=torch.int64, device=self.device))
        hg = None
        if self.h is not None:
            hg = self.h.index_select(1, torch.tensor(hrows, dtype=torch.int64, device=self.device))
        out, qa, ha = [], 0, 0
        for nq, nh in spans:
            qs = [qg[l, qa:qa + nq].movedim(0, 1) for l in range(self.num_layers)]
            hs = None if hg is None else [hg[l, ha:ha + nh] for l in range(self.num_layers)]
            out.append((qs, hs))
            qa, ha = qa + nq, ha + nh
        return out

    def load(self, slot: int, fed: int, settled: int, queries: Sequence[Optional[torch.Tensor]],
             hidden: Optional[Sequence[Optional[torch.Tensor]]]) -> None:
        """Write a record kept elsewhere into ``slot``: per layer the queries ``[qh, n, d]`` of the last
        ``n = min(w, fed - settled)`` fed tokens and (hidden states) ``[fed - settled, hidden]``."""
        nq, nh = min(self.qlen, fed - settled), fed - settled
        if nq == 0:
            return
        if nh > self.hlen:
            raise ValueError(f"DecodeRing.load: {nh} unsettled tokens > {self.hlen}")
        qrows = torch.tensor(self._rows(slot, fed - nq, fed, self.qlen), dtype=torch.int64, device=self.device)
        for l in range(self.num_layers):
            q = queries[l]
            if q is None or q.shape[1] != nq:
                raise RuntimeError(f"DecodeRing.load: layer {l}: {None if q is None else q.shape[1]} queries, "
                                   f"expected {nq}")
            self.q[l].index_copy_(0, qrows, q.movedim(0, 1).to(device=self.device, dtype=self.dtype))
        if self.h is not None:
            hrows = torch.tensor(self._rows(slot, settled, fed, self.hlen), dtype=torch.int64, device=self.device)
            for l in range(self.num_layers):
                h = None if hidden is None else hidden[l]
                if h is None or h.shape[0] != nh:
                    raise RuntimeError(f"DecodeRing.load: layer {l}: {None if h is None else h.shape[0]} attention "
                                       f"inputs, expected {nh}")
                self.h[l].index_copy_(0, hrows, h.to(device=self.device, dtype=self.dtype))
