"""Decode-time pruning: the rule the SGLang path copies.

Let ``n`` be the prompt length, ``G`` the number of tokens fed after the prompt so far (extension
tokens and decoded tokens alike), ``I = decode_interval``, ``w = policy.window``, and ``P`` the
number of fed tokens already *settled* (initially 0).

Whenever ``G - P >= I + w`` (checked after every forward call, repeated while it holds):

1. the segment is the fed tokens at positions ``n+P .. n+P+I+w-1`` (``m = I + w`` tokens); none of
   them has been dropped yet, so every layer holds all of them;
2. for every layer an observation is built over the segment only: its keys/values, the hidden
   states (attention input after the input norm) of those tokens, the window queries = the
   post-RoPE queries of the last ``w`` segment tokens, scaling and o_proj weight as at prefill;
3. ``keep = policy.select(observations)`` — the same scorer, allocator, budget, sinks and window
   as the prompt pruning, applied to the ``m``-token segment (so the first ``sinks`` and the last
   ``w`` segment tokens are always kept);
4. layer ``l`` drops the segment tokens not in ``keep[l]``; only the first ``I`` segment tokens can
   be dropped (the last ``w`` are protected);
5. ``P += I``: the first ``I`` segment tokens are settled for good (never rescored); the last ``w``
   stay unsettled and are scored again, with newer tokens, in the next segment.

Tokens fed after the event see the pruned cache; tokens fed before it saw the full one. Each event is
recorded as ``(G at the event, [dropped original positions per layer])``.
"""

from __future__ import annotations

import torch

from ..types import LayerObservation


class DecodePruner:
    def __init__(self, policy, interval: int, num_layers: int, o_proj: list):
        if policy is None:
            raise ValueError("decode-time pruning needs a policy (decode(..., policy=..., decode_interval=...))")
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"decode_interval must be a positive int, got {interval!r}")
        window = int(policy.window)
        if window < 1:
            raise ValueError(f"decode-time pruning needs policy.window >= 1, got {window}")
        self.policy, self.interval, self.window = policy, interval, window
        self.num_layers, self.o_proj = num_layers, o_proj
        self.queries = [None] * num_layers  # [qh, G-P, d]: fed, unsettled tokens
        self.hidden = [None] * num_layers  # [G-P, hidden]
        self.scalings = [None] * num_layers
        self.fed = 0  # G
        self.settled = 0  # P
        self.prompt_len = None
        self.events: list = []

    def after_feed(self, cache, queries: list, hidden: list, scalings: list) -> None:
        m = int(queries[0].shape[1])
        if self.prompt_len is None:
            self.prompt_len = cache.next_position - m
        for l in range(self.num_layers):
            self.queries[l] = queries[l] if self.queries[l] is None else torch.cat([self.queries[l], queries[l]], 1)
            self.hidden[l] = hidden[l] if self.hidden[l] is None else torch.cat([self.hidden[l], hidden[l]], 0)
            self.scalings[l] = scalings[l]
        self.fed += m
        while self.fed - self.settled >= self.interval + self.window:
            self._prune(cache)

    def _prune(self, cache) -> None:
        seg_len = self.interval + self.window
        lo = self.prompt_len + self.settled
        seg_pos = torch.arange(lo, lo + seg_len)
        obs, where = [], []
        for l in range(self.num_layers):
            idx = torch.searchsorted(cache.positions[l], seg_pos)
            if idx.max() >= cache.positions[l].numel() or not torch.equal(cache.positions[l][idx], seg_pos):
                raise RuntimeError(f"layer {l}: decode segment {lo}..{lo + seg_len - 1} is not all in the cache")
            where.append(idx)
            o = LayerObservation(
                layer=l, keys=cache.keys[l].index_select(1, idx), values=cache.values[l].index_select(1, idx),
                window_queries=self.queries[l][:, self.interval : seg_len], scaling=self.scalings[l],
                o_proj_weight=self.o_proj[l], hidden_states=self.hidden[l][:seg_len],
            )
            o.check()
            obs.append(o)
        keep = self.policy.select(obs)
        if len(keep) != self.num_layers:
            raise ValueError(f"policy returned {len(keep)} keep sets for {self.num_layers} layers")
        dropped_all = []
        for l in range(self.num_layers):
            k = torch.as_tensor(keep[l], dtype=torch.int64)
            drop = torch.ones(seg_len, dtype=torch.bool)
            drop[k] = False
            if drop[self.interval :].any():
                raise ValueError(f"layer {l}: the policy dropped a token of the protected recent window")
            alive = torch.ones(cache.positions[l].numel(), dtype=torch.bool)
            alive[where[l][drop]] = False
            dropped_all.append(cache.positions[l][~alive].clone())
            cache.keys[l] = cache.keys[l][:, alive]
            cache.values[l] = cache.values[l][:, alive]
            cache.positions[l] = cache.positions[l][alive]
            self.queries[l] = self.queries[l][:, self.interval :]
            self.hidden[l] = self.hidden[l][self.interval :]
        self.settled += self.interval
        self.events.append((self.fed, dropped_all))
