"""Hook: ``evict_from_tree_cache`` keeps evicting until every layer has room (per-layer admission),
and counts what the evictions freed (``sglang/pressure.py``)."""


def evict_from_tree_cache_around(orig, tree_cache, num_tokens, *args, **kwargs):
    evict_layers = getattr(tree_cache, "evict_for_layers", None)
    if evict_layers is None:  # vanilla tree caches, ChunkCache, no cache
        return orig(tree_cache, num_tokens, *args, **kwargs)
    alloc = tree_cache.token_to_kv_pool_allocator
    free_before, logical_before = alloc.layer_available_sizes(), alloc.available_size()
    out = orig(tree_cache, num_tokens, *args, **kwargs)
    evict_layers(num_tokens)
    from sglang_depthkv.sglang.pressure import COUNTERS

    COUNTERS.note_eviction(free_before, alloc.layer_available_sizes(), logical_before, alloc.available_size())
    return out
