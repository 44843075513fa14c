"""Hook: SGLang's idle pool check also runs the per-layer invariants (``sglang/invariants.py``).

A violation of ours turns SGLang's verdict into ``has_leak=True`` with our messages appended, so
SGLang's own ``_report_leak`` handles it (strict idle mode, SGLang's default: ``ValueError`` in the
scheduler). Every check is also recorded in the ``SGLANG_DEPTHKV_INVARIANT_LOG`` file when that is
set (``sglang/invariant_log.py``).
"""

import logging

from sglang_depthkv.sglang.config import settings_of

_logged = False


def check_all_pools_after(result, self, ps, uncached=0, **_kw):
    if settings_of(self.server_args) is None or uncached:
        return result
    from sglang_depthkv.sglang.allocator import DepthKVAllocator
    from sglang_depthkv.sglang.invariant_log import invariant_log, layer_state
    from sglang_depthkv.sglang.invariants import check, tree_layer_sizes

    alloc = self.token_to_kv_pool_allocator
    if not isinstance(alloc, DepthKVAllocator):
        return result
    sizes = tree_layer_sizes(alloc, self.tree_cache)  # one tree walk for the check and the log
    problems = check(alloc, self.tree_cache, tree_sizes=sizes)
    has_leak, messages = result
    log = invariant_log()
    if log is not None:
        log.record("idle", layer_state(alloc, self.tree_cache, sizes), problems, has_leak, messages)
    global _logged
    if not _logged or problems:
        _logged = True
        logging.getLogger("sglang_depthkv").info("sglang-depthkv: per-layer idle invariants checked: %s",
                                                 "ok" if not problems else "; ".join(problems))
    if not problems:
        return result
    return True, list(messages) + problems
