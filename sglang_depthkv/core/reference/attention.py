"""The reference attention function, registered with transformers' ``AttentionInterface``.

It implements **right-aligned causal attention over whatever is in the cache**: for a call with
``q_len`` new tokens and ``kv_len`` keys in total (the layer's cached keys followed by the new
ones), query ``i`` sees keys ``0 .. kv_len - q_len + i``. This one rule serves the full prefill,
single-token decode and multi-token extension over a pruned cache, where every layer may hold a
different number of keys. Softmax in float32 with the module's ``scaling`` (same arithmetic as
transformers' eager attention).

The per-request state (:class:`AttentionState`) travels through the model's ``**kwargs`` under the
key ``depthkv_state``; the model is called with ``use_cache=False`` so that transformers keeps no
cache of its own and builds no mask (no mask function is registered for this implementation, so
``create_causal_mask`` returns ``None``). Positions are passed explicitly by the caller.

What the state can capture during a call (all batch size 1):
- ``window``: the last ``window`` post-RoPE queries of the call, per layer (observations);
- ``prob_capture = (q_lo, q_hi, k_hi)``: per layer and kv head, the max attention probability that
  each key ``t < k_hi`` receives from queries ``q_lo <= i < q_hi`` of this call, max over those
  queries and over the query heads of the kv group (KVzip reconstruction targets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

ATTN_IMPLEMENTATION = "depthkv_reference"
STATE_KWARG = "depthkv_state"


@dataclass
class AttentionState:
    """Per-layer K/V cache plus capture requests and results for one forward call sequence."""

    num_layers: int
    keys: list = field(default_factory=list)  # per layer [kvh, m, d] or None
    values: list = field(default_factory=list)
    window: int = 0  # capture the last `window` queries of the next call (0: no capture)
    window_queries: list = field(default_factory=list)  # per layer [qh, w, d]
    scalings: list = field(default_factory=list)  # per layer float
    prob_capture: Optional[tuple] = None  # (q_lo, q_hi, k_hi)
    max_probs: list = field(default_factory=list)  # per layer [kvh, k_hi]

    def __post_init__(self):
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers
        self.window_queries = [None] * self.num_layers
        self.scalings = [None] * self.num_layers
        self.max_probs = [None] * self.num_layers

    def lengths(self) -> list[int]:
        return [0 if k is None else int(k.shape[1]) for k in self.keys]


def right_aligned_causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Bool ``[q_len, kv_len]``: True where query i may see key j (j <= kv_len - q_len + i)."""
    if q_len > kv_len:
        raise ValueError(f"{q_len} queries but only {kv_len} keys")
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return j <= (kv_len - q_len) + i


def depthkv_reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface: returns ``(attn_output [b, q, qh, d], None)``.

    Argument order is transformers' own (``sdpa_attention_forward``: ``..., attention_mask, dropout,
    scaling``): wrappers such as kvpress's ``attention_patch`` pass ``dropout`` positionally."""
    state: Optional[AttentionState] = kwargs.get(STATE_KWARG)
    if state is None:
        raise ValueError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} needs the `{STATE_KWARG}` keyword argument; "
            "call the model through sglang_depthkv.core.reference.ReferenceModel"
        )
    if query.shape[0] != 1:
        raise ValueError(f"the reference path runs one request at a time, got batch {query.shape[0]}")
    if dropout:
        raise ValueError("dropout must be 0 in the reference path (model.eval())")
    layer = int(module.layer_idx)
    scaling = float(module.scaling if scaling is None else scaling)

    q = query[0]  # [qh, q_len, d]
    k_new, v_new = key[0], value[0]  # [kvh, q_len, d]
    if state.keys[layer] is not None:
        k_all = torch.cat([state.keys[layer], k_new], dim=1)
        v_all = torch.cat([state.values[layer], v_new], dim=1)
    else:
        k_all, v_all = k_new, v_new
    state.keys[layer], state.values[layer] = k_all, v_all

    qh, q_len, d = q.shape
    kvh, kv_len = k_all.shape[0], k_all.shape[1]
    group = qh // kvh
    k_rep = k_all.repeat_interleave(group, dim=0)  # head h -> kv head h // group
    v_rep = v_all.repeat_interleave(group, dim=0)
    logits = torch.matmul(q, k_rep.transpose(1, 2)) * scaling  # [qh, q_len, kv_len]
    allowed = right_aligned_causal_mask(q_len, kv_len, device=q.device)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v_rep)  # [qh, q_len, d]

    if state.window:
        w = min(state.window, q_len)
        state.window_queries[layer] = q[:, q_len - w :, :].detach().clone()
        state.scalings[layer] = scaling
    if state.prob_capture is not None:
        q_lo, q_hi, k_hi = state.prob_capture
        sub = probs[:, q_lo:q_hi, :k_hi]  # [qh, nq, k_hi]
        per_head = sub.amax(dim=1)  # [qh, k_hi]
        state.max_probs[layer] = per_head.view(kvh, group, k_hi).amax(dim=1).detach().clone()

    return out.transpose(0, 1).unsqueeze(0).contiguous(), None


def register() -> str:
    """Register the attention function (idempotent); returns its implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, depthkv_reference_attention)
    return ATTN_IMPLEMENTATION
