"""Device memory the plugin allocates besides the KV pool and its metadata, counted before the pool
is sized (``DepthKVPoolConfigurator``), so the capacity table and SGLang's memory check see it.

Named items, bytes each (``L`` layers, ``C`` the largest layer capacity, ``B`` the largest captured
decode batch, ``T`` the context length, ``w`` the window, ``I`` the decode interval):

- CUDA-graph decode buffers (only with decode CUDA graphs): per-layer page tables
  ``L * graph_capacity(B, T, C)`` indices (int32 while slot offsets fit, else int64), ``L * (B+1)``
  indptr, ``L * B`` held counts, ``L * B`` split counts (int32), ``L * B`` write slots (int64);
- the decode ring (decode CUDA graphs with ``--kv-decode-interval``): ``L * (B*w + B) * qh * d``
  query-dtype elements, plus ``L * (B*(I+w) + B) * hidden`` for gates with hidden states;
- end-of-prefill scoring, one request and one layer at a time, at ``n = min(T, min_l C_l)`` held
  tokens (a longer prompt is refused: the request-length cap is the smallest layer's capacity), the
  scorers working over chunks of ``c = min(CHUNK, n)`` keys (``core/scorers/window_attention.py``):
  the held positions and slots (``56 n``), keys and values gathered in the KV dtype
  (``2 * kvh * n * d * kv_bytes``), one chunk of window logits (``2 * qh * w * c * 4 +
  kvh * c * d * 4``), per-head scores (``(4 qh + 2 kvh) * n * 4``), when the policy scores with
  LaProx its output contributions (one chunk of probabilities permuted ``qh * w * c * 4``, products of head pairs
  ``qh * group * c * 4``, value cross terms ``min(c, CHUNK // group) * group² * d * 4``, Gram
  blocks ``qh * group * d² * 4``, one group's ``o_proj`` columns ``hidden * group * d * 4``) or one
  chunk of gate features
  (``c * hidden * 4``), the per-layer held-count read (``L * n * 5``) and the own-token scores of
  every layer kept until the last layer (``L * (T + P) * 4``, ``P`` the prefill chunk: one chunked
  request plus whole prompts inside one chunk);
- KVzip gates with hidden states: the attention inputs of the chunks of a chunked prompt kept until
  its final chunk (``L * T * hidden * act_bytes``) and of the current batch (``L * P * hidden *
  act_bytes``).

Nothing here is allocated by this module: it is the model the allocations are checked against
(``tests/sglang/test_plugin_memory.py`` allocates the real buffers at small sizes and compares).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

Items = Tuple[Tuple[str, int], ...]


@dataclass(frozen=True)
class PluginShapes:
    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    context_len: int
    kv_bytes: int  # bytes of one K (or V) element in the pool
    act_bytes: int  # bytes of one activation element (queries, hidden states)
    graph_max_bs: int  # 0: no decode CUDA graphs
    prefill_chunk: int  # tokens of one prefill batch (chunked_prefill_size, or the context)
    window: int
    decode_interval: int
    scores: bool  # the policy scores tokens (anything but full / budget 1)
    gate_hidden: bool  # KVzip gates that read hidden states
    laprox: bool = False  # scores with LaProx (--kv-policy laprox, or a DepthKV profile calibrated with it)


def graph_items(s: PluginShapes, max_capacity: int) -> Items:
    from sglang_depthkv.sglang.backends.layer_indices import graph_capacity, index_dtype_bytes

    if s.graph_max_bs <= 0:
        return ()
    L, B = s.num_layers, s.graph_max_bs
    cap = graph_capacity(B, s.context_len, [max_capacity])
    idx = index_dtype_bytes(max_capacity, s.kv_heads * s.head_dim)
    items = [("graph page tables", L * (cap * idx + 4 * (B + 1) + 4 * B + 4 * B + 8 * B))]
    if s.decode_interval > 0 and s.scores:
        q = L * (B * s.window + B) * s.q_heads * s.head_dim * s.act_bytes
        if s.gate_hidden:
            q += L * (B * (s.decode_interval + s.window) + B) * s.hidden_size * s.act_bytes
        items.append(("decode ring", q))
    return tuple(items)


def scoring_items(s: PluginShapes, capacities: Sequence[int] = ()) -> Items:
    """At ``n`` = the longest prompt a request can have: the context, or less when the smallest
    layer caps the request length (``patches/request_limits.py``)."""
    if not s.scores:
        return ()
    from sglang_depthkv.core.scorers.window_attention import CHUNK

    n = min([s.context_len] + [int(c) for c in capacities])
    L, w = s.num_layers, max(1, s.window)
    c = min(int(CHUNK), n)
    group = s.q_heads // s.kv_heads
    one_layer = (n * 56  # held positions / slots (int64 working set)
                 + 2 * s.kv_heads * n * s.head_dim * s.kv_bytes  # held K, V gathered
                 + 2 * s.q_heads * w * c * 4 + s.kv_heads * c * s.head_dim * 4  # one chunk of window logits
                 + 4 * s.q_heads * n * 4 + 2 * s.kv_heads * n * 4  # per-head / per-kv-head scores
                 + c * s.hidden_size * 4)  # gate features of one chunk
    if s.laprox:
        one_layer += (s.q_heads * w * c * 4 + s.q_heads * group * c * 4  # permuted probabilities, head pairs
                      + min(c, int(CHUNK) // group) * group * group * s.head_dim * 4  # value cross terms
                      + s.q_heads * group * s.head_dim ** 2 * 4 + s.hidden_size * group * s.head_dim * 4)  # Gram
    items = [("prefill scoring", one_layer + L * n * 5 + L * (n + s.prefill_chunk) * 4)]
    if s.gate_hidden:
        items.append(("gate hidden states", L * (n + s.prefill_chunk) * s.hidden_size * s.act_bytes))
    return tuple(items)


def plugin_items(s: PluginShapes, capacities: Sequence[int]) -> Items:
    return graph_items(s, max(int(c) for c in capacities)) + scoring_items(s, capacities)


def items_function(s: PluginShapes) -> Callable[[Sequence[int]], Items]:
    """``capacities -> items`` for the capacity plan (the graph tables grow with the largest layer)."""
    return lambda capacities: plugin_items(s, capacities)


def total(items: Items) -> int:
    return sum(b for _, b in items)


def shapes_of(kvc, settings, gate_hidden: bool = False, laprox: bool = False) -> PluginShapes:
    """The shapes of a ``KVCacheConfigurator`` (SGLang's) and the plugin's settings, per rank: under
    tensor parallelism a rank scores and stores only its own query / kv heads."""
    sa, mc = kvc.server_args, kvc.model_config
    tp = int(kvc.ps.attn_tp_size) if kvc.ps is not None else 1
    hf = mc.hf_config
    kv_bytes = kvc.kv_cache_dtype.itemsize if hasattr(kvc.kv_cache_dtype, "itemsize") else 2
    act_bytes = kvc.model_dtype.itemsize if hasattr(kvc.model_dtype, "itemsize") else 2
    context = int(mc.context_len)
    chunk = getattr(sa, "chunked_prefill_size", None)
    return PluginShapes(
        num_layers=int(kvc.layer_info.num_effective_layers), q_heads=int(mc.num_attention_heads) // tp,
        kv_heads=int(mc.get_num_kv_heads(tp)), head_dim=int(mc.head_dim), hidden_size=int(hf.hidden_size),
        context_len=context, kv_bytes=int(kv_bytes), act_bytes=int(act_bytes),
        graph_max_bs=graph_max_bs(sa),
        prefill_chunk=int(chunk) if chunk and chunk > 0 else context, window=int(settings.window),
        decode_interval=int(settings.decode_interval), scores=bool(settings.prunes),
        gate_hidden=bool(gate_hidden and settings.prunes), laprox=bool(laprox and settings.prunes),
    )


def graph_max_bs(server_args) -> int:
    """Largest captured decode batch, 0 without decode CUDA graphs."""
    from sglang_depthkv.sglang.config import is_cuda_device

    if getattr(server_args, "disable_cuda_graph", False) or not is_cuda_device(getattr(server_args, "device", "")):
        return 0
    cfg = getattr(server_args, "cuda_graph_config", None)
    dec = getattr(cfg, "decode", None)
    if dec is None or getattr(dec, "backend", None) == "disabled":
        return 0
    bs: List[int] = list(getattr(dec, "bs", None) or [])
    mx = getattr(dec, "max_bs", None) or (max(bs) if bs else None) or getattr(server_args, "cuda_graph_max_bs", None)
    if not mx:
        raise ValueError("cuda graph config: decode graphs are on but their largest batch is unknown; "
                         "set --cuda-graph-max-bs")
    return int(mx)
