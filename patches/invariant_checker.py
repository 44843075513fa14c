"""Hook: SGLang's idle pool check also runs the per-layer invariants (``sglang/invariants.py``)."""

from sglang_depthkv.sglang.config import settings_of

_logged = False


def check_all_pools_after(result, self, ps, uncached=0, **_kw):
    if settings_of(self.server_args) is None or uncached:
        return result
    from sglang_depthkv.sglang.allocator import DepthKVAllocator
    from sglang_depthkv.sglang.invariants import check

    alloc = self.token_to_kv_pool_allocator
    if not isinstance(alloc, DepthKVAllocator):
        return result
    problems = check(alloc, self.tree_cache)
    global _logged
    if not _logged:
        _logged = True
        import logging

        logging.getLogger("sglang_depthkv").info("sglang-depthkv: per-layer idle invariants checked: %s",
                                                 "ok" if not problems else "; ".join(problems))
    if not problems:
        return result
    has_leak, messages = result
    return True, list(messages) + problems
