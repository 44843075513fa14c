"""Equal KV bytes for vanilla and the plugin when vanilla's pool is pinned to T tokens.

SGLang turns a KV byte budget B into ``B // cell`` vanilla tokens (``DefaultPoolConfigurator``;
``cell`` = kv_heads x (k + v head dims) x layers x dtype bytes), and ``--max-total-tokens`` only caps
that count. To give every server the same bytes as a vanilla pool of T tokens, B = T x cell, and the
plugin server gets ``--max-total-tokens N`` with N its own pool plan's logical capacity for B
(``sglang_depthkv.sglang.capacity.plan_for_bytes``: per-layer capacities, headroom, mapping and free
lists, and the plugin's other device buffers (``sglang_depthkv.sglang.plugin_memory``: CUDA-graph
page tables, decode ring, scoring transients) all inside B). The server then builds exactly that plan (``plan_for_tokens(N)``); the run
checks the capacity table it logs.
"""

from __future__ import annotations

from typing import Optional

from benchmarks.throughput.model_files import dtype_bytes, head_dim, hf_config_view, kv_heads


def kv_cell_bytes(cfg: dict, dtype: Optional[str] = None) -> int:
    """SGLang's per-token KV cell (all layers), MHA/GQA: kv_heads * (head_dim + v_head_dim) * L * bytes."""
    return kv_heads(cfg) * 2 * head_dim(cfg) * int(cfg["num_hidden_layers"]) * dtype_bytes(cfg, dtype)


def plugin_settings(policy: str, budget: float, profile: Optional[str]):
    """The plugin's ``DepthKVSettings`` of a server of the run (the profile only for ``depthkv``)."""
    from sglang_depthkv.sglang.config import parse_settings

    raw = {"kv_policy": policy, "kv_budget": budget}
    if policy == "depthkv":
        raw["kv_profile"] = profile
    return parse_settings(raw)


def plugin_fractions(policy: str, budget: float, profile: Optional[str], cfg: dict, settings=None) -> list:
    """The plugin's per-layer keep fractions; ``settings``: the ``plugin_settings`` already built for
    these arguments (a DepthKV profile is then not loaded again)."""
    from sglang_depthkv.sglang.capacity import policy_layer_fractions

    settings = plugin_settings(policy, budget, profile) if settings is None else settings
    return policy_layer_fractions(settings, int(cfg["num_hidden_layers"]), hf_config_view(cfg))


def headroom(chunked_prefill_size: Optional[int], context_len: int, window: int = None, sinks: int = None) -> int:
    from sglang_depthkv.sglang.capacity import default_headroom
    from sglang_depthkv.sglang.config import DEFAULT_SINKS, DEFAULT_WINDOW

    return default_headroom(chunked_prefill_size, int(context_len), DEFAULT_WINDOW if window is None else window,
                            DEFAULT_SINKS if sinks is None else sinks)


def plugin_shapes(cfg: dict, context_len: int, chunked_prefill_size: Optional[int], dtype: Optional[str],
                  graph_max_bs: int, decode_interval: int, policy: str, budget: float,
                  profile: Optional[str] = None, settings=None):
    """``plugin_memory.PluginShapes`` of a server of the run (default window; no gate files). LaProx's
    scoring transients count as the plugin counts them (``config.scores_with_laprox``): for
    ``laprox`` and for ``depthkv`` with a profile calibrated with LaProx. ``settings`` as in
    ``plugin_fractions``."""
    from sglang_depthkv.sglang.config import DEFAULT_WINDOW, scores_with_laprox
    from sglang_depthkv.sglang.plugin_memory import PluginShapes

    settings = plugin_settings(policy, budget, profile) if settings is None else settings
    b = dtype_bytes(cfg, dtype)
    ctx = int(context_len)
    return PluginShapes(
        num_layers=int(cfg["num_hidden_layers"]), q_heads=int(cfg["num_attention_heads"]), kv_heads=kv_heads(cfg),
        head_dim=head_dim(cfg), hidden_size=int(cfg["hidden_size"]), context_len=ctx, kv_bytes=b, act_bytes=b,
        graph_max_bs=int(graph_max_bs), prefill_chunk=int(chunked_prefill_size) if chunked_prefill_size else ctx,
        window=DEFAULT_WINDOW, decode_interval=int(decode_interval),
        scores=settings.prunes, gate_hidden=False,
        laprox=settings.prunes and scores_with_laprox(settings, hf_config_view(cfg)))


def equal_bytes_plan(vanilla_tokens: int, policy: str, budget: float, profile: Optional[str], cfg: dict,
                     chunked_prefill_size: Optional[int], context_len: int, dtype: Optional[str] = None,
                     graph_max_bs: int = 0, decode_interval: int = 0):
    """The plugin's ``CapacityPlan`` for the bytes of a vanilla pool of ``vanilla_tokens`` tokens, its
    other device buffers included (decode graphs up to ``graph_max_bs``; 0: none)."""
    from sglang_depthkv.sglang.capacity import plan_for_bytes
    from sglang_depthkv.sglang.plugin_memory import items_function

    if not isinstance(vanilla_tokens, int) or vanilla_tokens < 1:
        raise ValueError(f"--vanilla-kv-tokens must be a positive integer, got {vanilla_tokens!r}")
    cell = kv_cell_bytes(cfg, dtype)
    L = int(cfg["num_hidden_layers"])
    settings = plugin_settings(policy, budget, profile)  # loads a DepthKV profile once for both uses
    shapes = plugin_shapes(cfg, context_len, chunked_prefill_size, dtype, graph_max_bs, decode_interval, policy, budget,
                           profile, settings=settings)
    return plan_for_bytes(vanilla_tokens * cell, plugin_fractions(policy, budget, profile, cfg, settings=settings),
                          headroom(chunked_prefill_size, context_len), cell // L, plugin=items_function(shapes))
