"""A fast full-cache prefill for the reference path: the same ``FullPrefill`` as
``ReferenceModel.prefill``, with attention computed by ``torch.nn.functional.scaled_dot_product_attention``
(causal, flash kernel on CPU: memory O(n), half the work of the eager reference) instead of the
eager float32 softmax.

Why: the eager reference materialises ``[q_heads, n, n]`` probabilities per layer (about 2.4 GB and
minutes per 8k-token prefill on this 2-core machine); the accuracy sweep and the demo prefill
8k-token prompts many times. What is captured is identical in meaning to the reference prefill:
post-RoPE keys/values of every layer, the last ``window`` post-RoPE queries, the scaling, the
attention input after the input norm, the o_proj weights. Values differ from the eager path only
by float32 rounding (checked in ``tests/core/test_smollm2.py`` against ``ReferenceModel.prefill``).
Decoding over the pruned cache stays on ``ReferenceModel.decode``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import FullPrefill, ReferenceModel
from .reference.hf_model import attention_implementation, decoder_layers
from .types import LayerObservation

ATTN_IMPLEMENTATION = "depthkv_sdpa_prefill"
CAPTURE_KWARG = "depthkv_sdpa_capture"


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    # transformers' argument order (wrappers such as kvpress's attention_patch pass dropout positionally)
    cap = kwargs.get(CAPTURE_KWARG)
    if cap is None:
        raise ValueError(f"attention implementation {ATTN_IMPLEMENTATION!r} needs `{CAPTURE_KWARG}`; use sdpa_prefill()")
    if query.shape[0] != 1:
        raise ValueError(f"sdpa_prefill runs one request at a time, got batch {query.shape[0]}")
    if attention_mask is not None:
        raise ValueError("sdpa_prefill expects no attention mask (plain causal prefill)")
    layer = int(module.layer_idx)
    scaling = float(module.scaling if scaling is None else scaling)
    w = min(cap["window"], query.shape[2])
    cap["keys"][layer] = key[0].detach()
    cap["values"][layer] = value[0].detach()
    cap["queries"][layer] = query[0, :, query.shape[2] - w:, :].detach().clone()
    cap["scalings"][layer] = scaling
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    return ATTN_IMPLEMENTATION


@torch.no_grad()
def sdpa_prefill(ref: ReferenceModel, input_ids, window: int = 32, capture_hidden: bool = True) -> FullPrefill:
    """``ReferenceModel.prefill`` semantics with SDPA attention (see the module docstring)."""
    if not isinstance(ref, ReferenceModel):
        raise ValueError(f"sdpa_prefill needs a ReferenceModel, got {type(ref).__name__}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be a non-empty 1-D integer sequence, got {tuple(ids.shape)} {ids.dtype}")
    ids = ids.to(device=ref.device, dtype=torch.int64)
    if int(ids.max()) >= ref.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"token ids must lie in [0, {ref.vocab_size})")
    L = ref.num_layers
    cap = {"window": window, "keys": [None] * L, "values": [None] * L, "queries": [None] * L, "scalings": [None] * L}
    hidden: list = [None] * L
    hooks = []
    if capture_hidden:
        for i, layer in enumerate(decoder_layers(ref.model)):
            def hook(_mod, _inp, out, i=i):
                hidden[i] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()
            hooks.append(layer.input_layernorm.register_forward_hook(hook))
    impl = register()
    try:
        with attention_implementation(ref.model, impl):
            pos = torch.arange(ids.shape[0], dtype=torch.int64, device=ref.device)[None]
            # logits of the last position only: the full [n, vocab] float32 logits are 1.6 GB at 8k
            out = ref.model.model(input_ids=ids[None], position_ids=pos, use_cache=False, **{CAPTURE_KWARG: cap})
            logits = ref.model.lm_head(out.last_hidden_state[:, -1:, :])[0, -1].float()
    finally:
        for h in hooks:
            h.remove()
    obs = []
    for l in range(L):
        o = LayerObservation(layer=l, keys=cap["keys"][l], values=cap["values"][l], window_queries=cap["queries"][l],
                             scaling=cap["scalings"][l], o_proj_weight=ref._o_proj[l], hidden_states=hidden[l])
        o.check()
        obs.append(o)
    return FullPrefill(input_ids=ids, logits=logits, keys=list(cap["keys"]), values=list(cap["values"]), observations=obs)
