"""Hook: SGLang's idle pool check also runs the per-layer invariants (``sglang/invariants.py``).

How much runs: with content checks on (``SGLANG_DEPTHKV_CHECKS=1``, as in the tests) every idle
check is the full one (structural: every layer's free stack and mapping scanned; accounting). Off
(production), the per-layer accounting check (one tree walk and one read of the free counts) runs at
most once every ``SGLANG_DEPTHKV_IDLE_CHECK_S`` seconds (default 30; 0: every idle turn), so a busy
server's idle turns stay as cheap as vanilla's.

A violation of ours turns SGLang's verdict into ``has_leak=True`` with our messages appended, so
SGLang's own ``_report_leak`` handles it (strict idle mode, SGLang's default: ``ValueError`` in the
scheduler). Every check is also recorded in the ``SGLANG_DEPTHKV_INVARIANT_LOG`` file when that is
set (``sglang/invariant_log.py``).
"""

import logging
import os
import time

from sglang_depthkv.sglang.config import settings_of

_logged = False
_last_light = None
PERIOD_ENV = "SGLANG_DEPTHKV_IDLE_CHECK_S"


def _light_check_due() -> bool:
    global _last_light
    period = float(os.environ.get(PERIOD_ENV, "30"))
    now = time.monotonic()
    if _last_light is not None and now - _last_light < period:
        return False
    _last_light = now
    return True


def check_all_pools_after(result, self, ps, uncached=0, **_kw):
    if settings_of(self.server_args) is None or uncached:
        return result
    from sglang_depthkv.sglang import checks
    from sglang_depthkv.sglang.allocator import DepthKVAllocator
    from sglang_depthkv.sglang.invariant_log import invariant_log, layer_state
    from sglang_depthkv.sglang.invariants import accounting_violations, check, tree_layer_sizes

    alloc = self.token_to_kv_pool_allocator
    if not isinstance(alloc, DepthKVAllocator):
        return result
    full = checks.enabled()
    if not full and not _light_check_due():
        return result
    sizes = tree_layer_sizes(alloc, self.tree_cache)  # one tree walk for the check and the log
    if full:
        problems = check(alloc, self.tree_cache, tree_sizes=sizes)
    else:
        problems = accounting_violations(alloc, self.tree_cache, tree_sizes=sizes)
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
