"""Memory-bandwidth bound of decode: a step reads every weight once and the kept KV of every running
request, so at batch r it takes at least ``(W + r * kv_req) / BW`` seconds.

- ``W``: bytes of the weights a decode step reads: every parameter except the input embedding table
  (only r of its rows are read; a tied lm_head is read in full and counted once).
- ``kv_req``: kept KV bytes of one running request, averaged over its decode phase:
  ``kv_bytes_per_token * kept_tokens``, ``kept_tokens = P + O/2`` for vanilla and ``full``, and
  ``budget * P + O/2`` for a pruning policy (the prompt is pruned to the budget at the end of
  prefill; decoded tokens are kept, ``--kv-decode-interval 0``), with P / O the run's mean prompt /
  output length.
- The bound of a run is ``sum(r_i) / sum((W + r_i * kv_req) / BW)`` over its decode-only steps (the
  batch sizes it actually ran, ``logparse.decode_stats``). ``bound_ratio`` = bound(plugin run) /
  bound(vanilla run) on the same workload: BW cancels, so it needs no peak bandwidth.
"""

from __future__ import annotations

from typing import Iterable, Optional

from benchmarks.throughput.model_files import dtype_bytes, head_dim, kv_heads

# Peak HBM bandwidth by device name (GB/s, vendor figures); the longest matching key wins.
PEAK_BW_GBS = {
    "H200": 4800.0,
    "H100": 3350.0,  # SXM (H100 80GB HBM3)
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "H20": 4000.0,
    "A100": 2039.0,  # 80GB SXM
    "B200": 8000.0,
}


def peak_bw_gbs(device_name: str) -> Optional[float]:
    best = None
    for key, bw in PEAK_BW_GBS.items():
        if key.lower() in (device_name or "").lower() and (best is None or len(key) > len(best[0])):
            best = (key, bw)
    return None if best is None else best[1]


def llama_param_count(cfg: dict) -> dict:
    """Parameter counts of a Llama / Qwen2-style decoder: embedding, lm_head, per layer, total."""
    H, I, L, V = (int(cfg[k]) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    q = int(cfg["num_attention_heads"]) * head_dim(cfg)
    kv = kv_heads(cfg) * head_dim(cfg)
    bias = (q + 2 * kv) if cfg.get("attention_bias") or cfg.get("model_type") == "qwen2" else 0
    qk_norm = 2 * head_dim(cfg) if cfg.get("model_type") == "qwen3" else 0
    per_layer = H * (q + 2 * kv) + bias + q * H + 3 * H * I + 2 * H + qk_norm
    embed = V * H
    lm_head = 0 if cfg.get("tie_word_embeddings") else V * H
    return {"embedding": embed, "lm_head": lm_head, "per_layer": per_layer,
            "total": embed + lm_head + L * per_layer + H}


def decode_weight_bytes(cfg: dict, dtype: Optional[str] = None) -> int:
    c = llama_param_count(cfg)
    read = c["total"] - c["embedding"] + (c["embedding"] if cfg.get("tie_word_embeddings") else 0)
    return read * dtype_bytes(cfg, dtype)


def kv_bytes_per_token(cfg: dict, dtype: Optional[str] = None) -> int:
    return 2 * kv_heads(cfg) * head_dim(cfg) * int(cfg["num_hidden_layers"]) * dtype_bytes(cfg, dtype)


def kept_tokens(policy: str, budget: float, mean_prompt: float, mean_output: float) -> float:
    prompt = mean_prompt if policy in ("vanilla", "full") else budget * mean_prompt
    return prompt + mean_output / 2.0


def bound_tok_s(running: Iterable[int], weight_bytes: float, kv_req_bytes: float, bw_bytes_per_s: float = 1.0
                ) -> Optional[float]:
    running = list(running)
    if not running:
        return None
    seconds = sum((weight_bytes + r * kv_req_bytes) / bw_bytes_per_s for r in running)
    return sum(running) / seconds
