"""Hook: ``evict_from_tree_cache`` keeps evicting until every layer has room (per-layer admission)."""


def evict_from_tree_cache_around(orig, tree_cache, num_tokens, *args, **kwargs):
    out = orig(tree_cache, num_tokens, *args, **kwargs)
    evict_layers = getattr(tree_cache, "evict_for_layers", None)
    if evict_layers is not None:
        evict_layers(num_tokens)
    return out
