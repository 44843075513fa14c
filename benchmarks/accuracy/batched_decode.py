"""Greedy decode of many pruned caches of ONE prefill at once (the sweep's (policy, budget) runs).

Every run holds its own per-layer pruned cache (the kept positions of the shared prefill, as
``PrunedCache.from_prefill`` builds it) in a preallocated buffer with room for the new tokens. One
step feeds the B runs' current tokens as a batch at the same position ``n + step`` (positions
continue at the original length, as in the reference path); projections and MLPs run batched, and
attention runs per run over that run's own cache (SDPA, one query, all cached keys visible, which
is the reference path's right-aligned causal rule for a single new token). The only difference
from ``ReferenceModel.decode`` run by run is float32 rounding of the batched matmuls
(``tests/core/test_smollm2.py`` checks the tokens agree on the real model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglang_depthkv.core.reference.hf_model import attention_implementation

ATTN_IMPLEMENTATION = "depthkv_batched_decode"
STATE_KWARG = "depthkv_batch_state"


class BatchCaches:
    """Per layer, per run: K/V buffers ``[kvh, kept + steps, d]`` and the filled length."""

    def __init__(self, prefill, keeps, steps: int):
        from sglang_depthkv.core.reference import validate_keep

        n, L = prefill.length, prefill.num_layers
        self.batch = len(keeps)
        self.k = [[None] * self.batch for _ in range(L)]
        self.v = [[None] * self.batch for _ in range(L)]
        self.fill = [[0] * self.batch for _ in range(L)]
        self.kept = []
        for b, keep in enumerate(keeps):
            keep = [torch.arange(n) for _ in range(L)] if keep is None else validate_keep(keep, L, n)
            self.kept.append([int(idx.numel()) for idx in keep])
            for l, idx in enumerate(keep):
                k, v = prefill.keys[l], prefill.values[l]
                m = int(idx.numel())
                kb = k.new_empty((k.shape[0], m + steps, k.shape[2]))
                vb = v.new_empty((v.shape[0], m + steps, v.shape[2]))
                kb[:, :m] = k.index_select(1, idx)
                vb[:, :m] = v.index_select(1, idx)
                self.k[l][b], self.v[l][b], self.fill[l][b] = kb, vb, m


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    # transformers' argument order (wrappers such as kvpress's attention_patch pass dropout positionally)
    st: BatchCaches = kwargs.get(STATE_KWARG)
    if st is None:
        raise ValueError(f"attention implementation {ATTN_IMPLEMENTATION!r} needs `{STATE_KWARG}`")
    if query.shape[2] != 1 or query.shape[0] != st.batch:
        raise ValueError(f"batched decode feeds one token per run, got query {tuple(query.shape)}")
    layer = int(module.layer_idx)
    scaling = float(module.scaling if scaling is None else scaling)
    outs = []
    for b in range(st.batch):
        m = st.fill[layer][b]
        kb, vb = st.k[layer][b], st.v[layer][b]
        if m >= kb.shape[1]:
            raise ValueError(f"run {b} layer {layer}: cache buffer full ({m} tokens)")
        kb[:, m] = key[b, :, 0]
        vb[:, m] = value[b, :, 0]
        st.fill[layer][b] = m + 1
        outs.append(F.scaled_dot_product_attention(query[b:b + 1], kb[None, :, :m + 1], vb[None, :, :m + 1],
                                                   scale=scaling, enable_gqa=True))
    return torch.cat(outs, 0).transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    return ATTN_IMPLEMENTATION


@torch.no_grad()
def batched_greedy(ref, prefill, keeps, max_new_tokens: int, done=None):
    """Greedy tokens for every run (``keeps[b]``: per-layer keep sets, or None for the full cache).

    The first token of every run is the argmax of the prefill's logits. ``done(tokens) -> bool``
    marks a run finished (it keeps being fed until all are done or ``max_new_tokens`` is reached,
    its later tokens are dropped). Returns (list of token lists, per-run per-layer kept counts)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    caches = BatchCaches(prefill, keeps, max_new_tokens)
    B, n = caches.batch, prefill.length
    first = int(torch.argmax(prefill.logits))
    toks = [[first] for _ in range(B)]
    finished = [bool(done and done(t)) for t in toks]
    impl = register()
    step = 0
    with attention_implementation(ref.model, impl):
        while step < max_new_tokens - 1 and not all(finished):
            cur = torch.tensor([[t[-1]] for t in toks], dtype=torch.int64)
            pos = torch.full((B, 1), n + step, dtype=torch.int64)
            out = ref.model(input_ids=cur, position_ids=pos, use_cache=False, **{STATE_KWARG: caches})
            nxt = out.logits[:, -1].float().argmax(-1).tolist()
            for b in range(B):
                if not finished[b]:
                    toks[b].append(int(nxt[b]))
                    finished[b] = bool(done and done(toks[b]))
            step += 1
    return toks, caches.kept
