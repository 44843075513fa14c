"""Hook: ``create_tree_cache`` builds a ``DepthKVRadixCache`` under --kv-policy
(``--disable-radix-cache`` keeps SGLang's ``ChunkCache``, which frees through our allocator)."""

import logging

from sglang_depthkv.sglang.config import settings_of


def create_tree_cache_around(orig, ctx):
    settings = settings_of(ctx.server_args)
    if settings is None or ctx.disable_radix_cache:
        return orig(ctx)
    from sglang_depthkv.patches.registry import verify_applied
    from sglang_depthkv.sglang.radix_cache import DepthKVRadixCache

    verify_applied()
    if ctx.enable_hierarchical_cache:
        raise ValueError("--enable-hierarchical-cache: not supported with --kv-policy")
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm:
        raise ValueError("--model-path: hybrid models are not supported with --kv-policy")
    cache = DepthKVRadixCache(ctx.params)
    logging.getLogger("sglang_depthkv").info("sglang-depthkv: tree cache %s", type(cache).__name__)
    return cache
