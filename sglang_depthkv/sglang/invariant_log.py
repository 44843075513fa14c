"""A readable record of the per-layer invariant checks, for soak runs and their clients.

When ``SGLANG_DEPTHKV_INVARIANT_LOG`` names a file, the scheduler appends one JSON line to it

- ``kind="idle"``: from the hook after SGLang's idle ``_check_all_pools``, whenever the checked state
  (per-layer free / tree-evictable / tree-protected counts, SGLang's verdict, our violations) differs
  from the last line written, or on any violation. SGLang calls the idle check on every idle loop
  turn, so identical states are counted (``checks``: idle checks so far) but not repeated.
- ``kind="flush"``: from the ``flush_cache`` hook, after the whole tree was evicted through the
  allocator and before SGLang's ``clear()`` rebuilds the free lists (``clear()`` would hide a leak):
  every layer must have all its slots free (``drained_violations``).

Each line: ``t`` (unix time), ``pid``, ``kind``, ``checks``, ``ok`` (no violation of ours and, for
``idle``, SGLang's own check passed), ``sglang_has_leak``, ``sglang_messages``, ``violations`` (ours),
and the per-layer state: ``capacity``, ``free``, ``tree_evictable``, ``tree_protected``, plus the
logical ``available`` / ``tree_evictable_tokens`` / ``tree_protected_tokens``, and ``pressure``
(the process's per-layer pressure counters so far, ``sglang/pressure.py``). Without the
environment variable nothing is written (the checks still run and still fail SGLang's check).
"""

from __future__ import annotations

import json
import os
import time
from typing import List, Optional

ENV = "SGLANG_DEPTHKV_INVARIANT_LOG"


def layer_state(alloc, tree_cache=None, tree_sizes=None) -> dict:
    """Per-layer and logical counts of ``DepthKVAllocator`` ``alloc`` and its tree, and this
    process's pressure counters (``sglang/pressure.py``). ``tree_sizes``: the tree's per-layer
    (evictable, protected) counts when the caller has them already."""
    from sglang_depthkv.sglang.invariants import tree_layer_sizes
    from sglang_depthkv.sglang.pressure import COUNTERS

    ev, pr = tree_sizes if tree_sizes is not None else tree_layer_sizes(alloc, tree_cache)
    return {
        "capacity": list(alloc.layer_capacities),
        "free": alloc.layer_available_sizes(),
        "tree_evictable": [int(x) for x in ev],
        "tree_protected": [int(x) for x in pr],
        "available": int(alloc.available_size()),
        "size": int(alloc.size),
        "tree_evictable_tokens": int(tree_cache.evictable_size()) if tree_cache is not None else 0,
        "tree_protected_tokens": int(tree_cache.protected_size()) if tree_cache is not None else 0,
        "pressure": COUNTERS.as_dict(),
    }


class InvariantLog:
    def __init__(self, path: str):
        if not path:
            raise ValueError(f"{ENV}: empty path")
        self.path = path
        self.checks = 0
        self._last_sig = None

    def record(self, kind: str, state: dict, violations: List[str], sglang_has_leak: bool = False,
               sglang_messages: Optional[List[str]] = None) -> bool:
        """Count the check; append a line if it is a flush, a violation or a new state. Returns
        whether a line was written."""
        if kind not in ("idle", "flush"):
            raise ValueError(f"InvariantLog.record: unknown kind {kind!r}")
        if kind == "idle":
            self.checks += 1
        ok = not violations and not sglang_has_leak
        sig = (kind, ok, tuple(violations), tuple(state["free"]), tuple(state["tree_evictable"]),
               tuple(state["tree_protected"]), state["available"], state["tree_evictable_tokens"])
        if kind == "idle" and ok and sig == self._last_sig:
            return False
        self._last_sig = sig
        line = {"t": time.time(), "pid": os.getpid(), "kind": kind, "checks": self.checks, "ok": ok,
                "sglang_has_leak": bool(sglang_has_leak), "sglang_messages": list(sglang_messages or []),
                "violations": list(violations), **state}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        return True


_LOG: Optional[InvariantLog] = None


def invariant_log() -> Optional[InvariantLog]:
    """The process's log if ``SGLANG_DEPTHKV_INVARIANT_LOG`` is set, else None."""
    global _LOG
    path = os.environ.get(ENV)
    if not path:
        return None
    if _LOG is None or _LOG.path != path:
        _LOG = InvariantLog(path)
    return _LOG


def read_log(path) -> List[dict]:
    """All lines of an invariant log (client side)."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON line: {exc}") from exc
    return out
