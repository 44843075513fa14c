"""SGLang's ``torch_native`` attention backend reading through the per-layer mapping.

SGLang's backend gathers ``k_cache[req_to_token[row, :seq_len]]``, i.e. it indexes the KV buffer by
logical id. Here the rows of the batch are translated to the layer's slots first
(``pool.mapping[layer][req_to_token[rows]]``) and handed to the unchanged SDPA code as a small
per-batch token table. Writes already go through the mapping (``DepthKVPool.set_kv_buffer``).

Seed for issue 7: this version reads every position of the sequence, so every position must still
be held at the layer; a read of a position the layer no longer holds raises instead of attending to
the dummy slot. Reading a pruned (compacted) view is issue 7's extension.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from sglang_depthkv.sglang.pool import DepthKVPool


class DepthKVTorchNativeAttnBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner):
        super().__init__(model_runner)
        if not isinstance(self.token_to_kv_pool, DepthKVPool):
            raise TypeError(
                f"DepthKVTorchNativeAttnBackend needs a DepthKVPool, got {type(self.token_to_kv_pool).__name__}"
            )
        self._layer_id = None

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self._layer_id = layer.layer_id
        return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self._layer_id = layer.layer_id
        return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)

    def _translated_table(self, req_to_token, req_pool_indices, seq_lens, encoder_lens):
        """``[bs, max_len]`` table of layer slots for the batch rows, and row indices 0..bs-1."""
        if encoder_lens is not None:
            raise NotImplementedError("DepthKV torch_native backend: encoder-decoder models are refused at start-up")
        max_len = int(seq_lens.max()) if seq_lens.numel() else 0
        rows = req_to_token[req_pool_indices.long(), :max_len]
        slots = self.token_to_kv_pool.translate(self._layer_id, rows)
        pos = torch.arange(max_len, device=slots.device).unsqueeze(0)
        valid = pos < seq_lens.to(slots.device).unsqueeze(1)
        if bool(((slots == 0) & valid).any()):
            raise RuntimeError(
                f"layer {self._layer_id}: a request reads a token this layer no longer holds "
                "(pruned reads are issue 7's backend)"
            )
        return slots, torch.arange(slots.shape[0], device=slots.device)

    def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                                 seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens=None, **kw):
        table, rows = self._translated_table(req_to_token, req_pool_indices, seq_lens, encoder_lens)
        return super()._run_sdpa_forward_extend(query, output, k_cache, v_cache, table, rows, seq_lens,
                                                extend_prefix_lens, extend_seq_lens, encoder_lens, **kw)

    def _run_sdpa_forward_decode(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                                 seq_lens, encoder_lens=None, **kw):
        table, rows = self._translated_table(req_to_token, req_pool_indices, seq_lens, encoder_lens)
        return super()._run_sdpa_forward_decode(query, output, k_cache, v_cache, table, rows, seq_lens,
                                                encoder_lens, **kw)
