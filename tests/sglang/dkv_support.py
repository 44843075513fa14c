"""Real SGLang memory classes + our pool/allocator/tree, built in-process on CPU for unit tests."""

import torch


def build(capacities=(24, 12, 16), size=24, heads=2, dim=4, tree=True):
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from sglang_depthkv.sglang.allocator import DepthKVAllocator
    from sglang_depthkv.sglang.pool import DepthKVPool
    from sglang_depthkv.sglang.radix_cache import DepthKVRadixCache

    pool = DepthKVPool(size, list(capacities), torch.float32, heads, dim, len(capacities), "cpu")
    alloc = DepthKVAllocator(size, torch.float32, "cpu", pool)
    r2t = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    cache = None
    if tree:
        cache = DepthKVRadixCache(CacheInitParams(disable=False, req_to_token_pool=r2t,
                                                  token_to_kv_pool_allocator=alloc, page_size=1))
    return pool, alloc, r2t, cache


def write_kv(pool, ids, seed):
    """Write distinct K/V rows for logical ``ids`` at every layer; returns {(layer, id): (k, v)}."""
    g = torch.Generator().manual_seed(seed)
    ref = {}
    for l in range(pool.layer_num):
        k = torch.randn(len(ids), pool.head_num, pool.head_dim, generator=g)
        v = torch.randn(len(ids), pool.head_num, pool.head_dim, generator=g)
        pool.set_kv_buffer(None, ids, k, v, layer_id_override=l)
        for j, i in enumerate(ids.tolist()):
            ref[(l, i)] = (k[j].clone(), v[j].clone())
    return ref


def make_profile(path, num_layers=4, scorer="snapkv", **identity_overrides):
    from sglang_depthkv.core.profile import SensitivityProfile, save_profile
    from sglang_depthkv.core.types import ModelIdentity

    ident = dict(num_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_size=128,
                 architecture="LlamaForCausalLM")
    ident.update(identity_overrides)
    sens = [[0.5 + l, 0.1 * (l + 1), 0.0] for l in range(ident["num_layers"])]
    from sglang_depthkv.core.scorers import profile_scorer, scorer_record

    return save_profile(SensitivityProfile(ModelIdentity(**ident), scorer, [0.25, 0.5, 1.0], sens,
                                           calibration=scorer_record(profile_scorer(scorer))), path)
