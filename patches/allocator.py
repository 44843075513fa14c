"""Hook: ``KVCacheConfigurator._build_token_to_kv_pool_allocator`` builds a ``DepthKVAllocator``."""

import logging

from sglang_depthkv.sglang.config import settings_of


def build_allocator_around(orig, self, *args, **kwargs):
    settings = settings_of(self.server_args)
    if settings is None:
        return orig(self, *args, **kwargs)
    from sglang_depthkv.patches.registry import verify_applied
    from sglang_depthkv.sglang.allocator import DepthKVAllocator

    verify_applied()
    if kwargs.get("token_to_kv_pool_allocator") is not None:
        raise ValueError("--speculative-algorithm: a shared (draft) allocator is not supported with --kv-policy")
    logging.getLogger("sglang_depthkv").info("sglang-depthkv: allocator DepthKVAllocator")
    return DepthKVAllocator(
        kwargs["sizes"].max_total_num_tokens,
        dtype=self.kv_cache_dtype,
        device=self.device,
        kvcache=kwargs["token_to_kv_pool"],
        need_sort=False,
        exact_counts=self.ps is not None and self.ps.tp_size > 1,  # ranks schedule alike (allocator docstring)
    )
