"""Hook: ``Scheduler.flush_cache`` first drains the tree through the allocator and checks that every
layer got all its slots back.

SGLang's flush resets the tree and then ``clear()``s the allocator, which rebuilds every free list:
a slot leaked at some layer would vanish unseen. So, when the flush will happen (the scheduler is
fully idle), this hook evicts the whole tree first (``DepthKVAllocator.free``, the eviction path)
and runs ``invariants.drained_violations``; a violation is reported like SGLang's own idle leak
check (``raise_error_or_warn`` under ``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE``: a
``ValueError`` by default) and recorded in the ``SGLANG_DEPTHKV_INVARIANT_LOG`` file (kind
``flush``). Evicting what the flush is about to drop anyway changes nothing else.
"""

import logging

from sglang_depthkv.sglang.config import settings_of

logger = logging.getLogger("sglang_depthkv")


def flush_cache_around(orig, self, *args, **kwargs):
    if settings_of(self.server_args) is None or not self.is_fully_idle():
        return orig(self, *args, **kwargs)
    from sglang.srt.environ import envs
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams
    from sglang.srt.utils.common import raise_error_or_warn

    from sglang_depthkv.sglang.allocator import DepthKVAllocator
    from sglang_depthkv.sglang.invariant_log import invariant_log, layer_state
    from sglang_depthkv.sglang.invariants import drained_violations

    alloc = self.token_to_kv_pool_allocator
    if not isinstance(alloc, DepthKVAllocator):
        return orig(self, *args, **kwargs)
    tree = self.tree_cache
    if tree is not None and tree.evictable_size() > 0:
        tree.evict(EvictParams(num_tokens=tree.evictable_size()))
    problems = drained_violations(alloc)
    if tree is not None and tree.protected_size() != 0:
        problems.append(f"tree: {tree.protected_size()} tokens still locked with no request running")
    log = invariant_log()
    if log is not None:
        log.record("flush", layer_state(alloc, tree), problems)
    logger.info("sglang-depthkv: per-layer drain check before flush: %s",
                "ok" if not problems else "; ".join(problems))
    if problems:
        raise_error_or_warn(self.invariant_checker, envs.SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE.get(),
                            "count_memory_leak_warnings",
                            "sglang-depthkv: per-layer slots leaked (drain before flush_cache): " + "; ".join(problems))
    return orig(self, *args, **kwargs)
