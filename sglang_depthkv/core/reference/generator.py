"""Prefill once with the full cache, then decode many times over per-layer pruned caches.

Conventions (the SGLang path follows the same ones):
- ``prefill(input_ids)`` runs full causal attention over the ``n`` prompt tokens; its last-position
  logits choose the first generated token, so pruning never changes the first token.
- Pruning happens after the prefill: ``decode(prefill, keep, steps)`` builds a
  :class:`PrunedCache` from ``keep`` and then feeds tokens one at a time at positions
  ``n, n+1, ...`` (the ORIGINAL length, whatever each layer keeps). ``DecodeResult.logits[0]`` is the
  prefill's (or the extension's) last logits, ``logits[i]`` the logits after feeding ``tokens[i-1]``;
  ``tokens[i] = argmax(logits[i])`` (greedy; ties → lowest token id, as ``torch.argmax``).
- ``extend_ids`` (e.g. a question after a pruned context) are fed in one multi-token call over the
  pruned cache at positions ``n .. n+m-1`` with right-aligned causal attention before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..types import LayerObservation, ModelIdentity
from .attention import STATE_KWARG, AttentionState, register
from .cache import PrunedCache
from .hf_model import attention_implementation, check_supported, decoder_layers, model_identity, o_proj_weights


@dataclass
class FullPrefill:
    """Everything a policy needs from one full-cache prefill (shared by many policies)."""

    input_ids: torch.Tensor  # [n]
    logits: torch.Tensor  # [vocab], last position
    keys: list  # per layer [kvh, n, d], post-RoPE
    values: list
    observations: list  # per layer LayerObservation

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.keys)


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [steps] int64
    logits: torch.Tensor  # [steps, vocab] float32
    cache_lengths: list  # per layer, number of cached tokens at the end
    cache_positions: list = None  # per layer, original positions of the cached tokens at the end
    events: list = None  # decode-time pruning: (fed tokens after the prompt, [dropped positions per layer])


def _check_ids(ids, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what} must be integer token ids, got dtype {ids.dtype}")
    return ids.to(torch.int64)


class ReferenceModel:
    """Wraps a supported HF causal LM for pruned-cache prefill/decode, on the model's device and in its
    dtype: float32 unless ``float32_only=False`` (calibration on a GPU runs in bfloat16; the exactness
    tests and the demo keep float32).

    The wrapped model's attention implementation is switched to the reference function only for
    the duration of each call and restored afterwards, so the same model object still runs HF's
    own attention elsewhere.
    """

    def __init__(self, model, name: str = "", float32_only: bool = True):
        check_supported(model, float32_only)
        self.model = model.eval()
        self.identity: ModelIdentity = model_identity(model, name=name, float32_only=float32_only)
        self.num_layers = self.identity.num_layers
        self.vocab_size = int(model.config.vocab_size)
        self.device = next(model.parameters()).device  # token ids and positions follow the weights
        self._impl = register()
        self._o_proj = o_proj_weights(model)

    def _reference_attention(self):
        return attention_implementation(self.model, self._impl)

    @torch.no_grad()
    def _forward(self, state: AttentionState, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Feed ``ids`` at positions ``start ..``; returns logits ``[len(ids), vocab]``."""
        if int(ids.max()) >= self.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        ids = ids.to(self.device)
        pos = torch.arange(start, start + ids.shape[0], dtype=torch.int64, device=self.device)[None]
        with self._reference_attention():
            out = self.model(
                input_ids=ids[None], position_ids=pos, use_cache=False, **{STATE_KWARG: state}
            )
        return out.logits[0].float()

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def capture_forward(self, input_ids, window: int = 0, capture_hidden: bool = False,
                        prob_capture=None):
        """One full-attention forward from position 0 with captures (see ``AttentionState``).
        Returns ``(state, hidden, logits)``: hidden is per layer ``[T, hidden]`` or None."""
        ids = _check_ids(input_ids, "input_ids")
        state = AttentionState(self.num_layers, window=window, prob_capture=prob_capture)
        hidden: list = [None] * self.num_layers
        hooks = []
        if capture_hidden:
            for i, layer in enumerate(decoder_layers(self.model)):
                def hook(_mod, _inp, out, i=i):
                    hidden[i] = out[0].detach().clone()
                hooks.append(layer.input_layernorm.register_forward_hook(hook))
        try:
            logits = self._forward(state, ids, 0)
        finally:
            for h in hooks:
                h.remove()
        return state, hidden, logits

    @torch.no_grad()
    def prefill(self, input_ids, window: int = 32, capture_hidden: bool = True) -> FullPrefill:
        """Full-cache prefill; captures per-layer K/V and LayerObservations (last ``window`` queries,
        clipped to n; hidden states = attention input after the input norm if ``capture_hidden``)."""
        ids = _check_ids(input_ids, "input_ids")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        state, hidden, logits = self.capture_forward(ids, window=window, capture_hidden=capture_hidden)
        obs = []
        for l in range(self.num_layers):
            o = LayerObservation(
                layer=l, keys=state.keys[l], values=state.values[l], window_queries=state.window_queries[l],
                scaling=state.scalings[l], o_proj_weight=self._o_proj[l], hidden_states=hidden[l],
            )
            o.check()
            obs.append(o)
        return FullPrefill(input_ids=ids, logits=logits[-1], keys=list(state.keys), values=list(state.values),
                           observations=obs)

    # ------------------------------------------------------------------ extension / decode
    @torch.no_grad()
    def extend(self, cache: PrunedCache, ids, pruner=None) -> torch.Tensor:
        """Feed ``ids`` over ``cache`` (in place) at positions ``cache.next_position ..``; returns
        logits ``[len(ids), vocab]``. Right-aligned causal inside the call. With a
        :class:`DecodePruner`, the fed tokens' queries/hidden states are recorded and decode-time
        pruning runs after the call."""
        ids = _check_ids(ids, "ids")
        if len(cache.keys) != self.num_layers:
            raise ValueError(f"cache has {len(cache.keys)} layers, the model has {self.num_layers}")
        m = int(ids.shape[0])
        state = AttentionState(self.num_layers, keys=list(cache.keys), values=list(cache.values),
                               window=m if pruner is not None else 0)
        hidden: list = [None] * self.num_layers
        hooks = []
        if pruner is not None:
            for i, layer in enumerate(decoder_layers(self.model)):
                def hook(_mod, _inp, out, i=i):
                    hidden[i] = out[0].detach().clone()
                hooks.append(layer.input_layernorm.register_forward_hook(hook))
        start = cache.next_position
        try:
            logits = self._forward(state, ids, start)
        finally:
            for h in hooks:
                h.remove()
        new_pos = torch.arange(start, start + m, dtype=torch.int64, device=cache.positions[0].device)
        cache.keys, cache.values = list(state.keys), list(state.values)
        cache.positions = [torch.cat([p, new_pos]) for p in cache.positions]
        cache.next_position = start + m
        if pruner is not None:
            pruner.after_feed(cache, state.window_queries, hidden, state.scalings)
        return logits

    @torch.no_grad()
    def decode(self, prefill: FullPrefill, keep: Optional[Sequence[torch.Tensor]], steps: int,
               extend_ids=None, policy=None, decode_interval: int = 0) -> DecodeResult:
        """Greedy decode of ``steps`` tokens over the prefill pruned to ``keep`` (None: keep all).
        ``decode_interval > 0`` with a ``policy`` also prunes decoded tokens (see ``decode_pruning``)."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if prefill.num_layers != self.num_layers:
            raise ValueError(f"prefill has {prefill.num_layers} layers, the model has {self.num_layers}")
        pruner = None
        if decode_interval or policy is not None:
            from .decode_pruning import DecodePruner

            pruner = DecodePruner(policy, decode_interval, self.num_layers, self._o_proj)
        cache = PrunedCache.from_prefill(prefill, keep)
        last = prefill.logits
        if extend_ids is not None:
            last = self.extend(cache, extend_ids, pruner)[-1]
        tokens, logits = [], [last]
        tok = int(torch.argmax(last))
        tokens.append(tok)
        for _ in range(steps - 1):
            last = self.extend(cache, torch.tensor([tok]), pruner)[-1]
            logits.append(last)
            tok = int(torch.argmax(last))
            tokens.append(tok)
        return DecodeResult(tokens=torch.tensor(tokens, dtype=torch.int64), logits=torch.stack(logits),
                            cache_lengths=cache.lengths(), cache_positions=[p.clone() for p in cache.positions],
                            events=list(pruner.events) if pruner is not None else [])

    def select(self, prefill: FullPrefill, policy) -> list[torch.Tensor]:
        """The policy's per-layer keep sets for this prefill (validated)."""
        from .cache import validate_keep

        keep = policy.select(prefill.observations)
        return validate_keep(keep, self.num_layers, prefill.length)

    def run_policy(self, prefill: FullPrefill, policy, steps: int, extend_ids=None,
                   decode_interval: int = 0) -> DecodeResult:
        """``decode(prefill, policy.select(prefill.observations), steps)``; with ``decode_interval``
        the same policy also prunes decoded tokens."""
        return self.decode(prefill, self.select(prefill, policy), steps, extend_ids=extend_ids,
                           policy=policy if decode_interval else None, decode_interval=decode_interval)
