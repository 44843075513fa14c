"""What the soak reads back from the server: its log (batch sizes, retractions, the per-layer request
limit, leak reports) and the per-layer invariant log (``SGLANG_DEPTHKV_INVARIANT_LOG``), and the
verdicts built from them.

Peak running requests are parsed from SGLang's own scheduler log: with ``--decode-log-interval 1``
every decode step logs ``Decode batch, #running-req: N`` (N = requests in that decode batch), so
the maximum over those lines is exact; prefill lines (``Prefill batch ... #running-req: N``, the
running batch next to the new prefill) are reported separately.
"""

from __future__ import annotations

import re
from typing import List

from throughput.logparse import capacity_table  # benchmarks/ is on sys.path (soak.py)

DECODE_RE = re.compile(r"Decode batch.*?#running-req: (\d+).*?token usage: ([0-9.]+).*?#queue-req: (\d+)")
PREFILL_RE = re.compile(r"Prefill batch.*?#new-seq: (\d+).*?token usage: ([0-9.]+).*?#running-req: (\d+), "
                        r"#queue-req: (\d+)")
RETRACT_RE = re.compile(r"KV cache pool is full\. Retract requests\. #retracted_reqs: (\d+)")
CAP_RE = re.compile(r"sglang-depthkv: request length capped at (\d+) tokens \(input (\d+)\)")
LEAK_RE = re.compile(r"memory leak detected|Mem Leak Detected|per-layer slots leaked|Traceback \(most recent call last\)")


def parse_server_log(text: str) -> dict:
    decode = [(int(a), float(b), int(c)) for a, b, c in DECODE_RE.findall(text)]
    prefill = [(int(a), float(b), int(c), int(d)) for a, b, c, d in PREFILL_RE.findall(text)]
    retract = [int(x) for x in RETRACT_RE.findall(text)]
    cap = CAP_RE.search(text)
    table = capacity_table(text)  # the plugin's start-up table, parsed as the serving benchmark does
    return {
        "decode_steps_logged": len(decode),
        "peak_running_decode": max((d[0] for d in decode), default=0),
        "peak_running_prefill": max((p[2] for p in prefill), default=0),
        "prefill_batches": len(prefill),
        "peak_queue": max([d[2] for d in decode] + [p[3] for p in prefill], default=0),
        "max_logical_token_usage": max([d[1] for d in decode] + [p[1] for p in prefill], default=0.0),
        "retraction_events": len(retract),
        "retracted_requests": sum(retract),
        "request_len_cap": int(cap.group(1)) if cap else None,
        "request_input_len_cap": int(cap.group(2)) if cap else None,
        "layer_fractions": table["fractions"] if table else [],
        "layer_capacities": table["capacities"] if table else [],
        "leak_or_traceback_lines": [l.strip()[:300] for l in text.splitlines() if LEAK_RE.search(l)][:20],
    }


def invariant_verdict(records: List[dict], load_end: float) -> dict:
    """Verdict over the invariant log: (a) SGLang's idle check and (b) ours both ran after the load
    ended and passed, (c) the flush drain check freed every slot of every layer; no record anywhere
    with a violation."""
    idle = [r for r in records if r["kind"] == "idle"]
    flush = [r for r in records if r["kind"] == "flush"]
    bad = [r for r in records if not r["ok"]]
    after = [r for r in idle if r["t"] >= load_end and (not flush or r["t"] <= flush[-1]["t"])]
    last_idle = after[-1] if after else None
    drained = flush[-1] if flush else None
    out = {
        "records": len(records),
        "idle_checks": max((r["checks"] for r in records), default=0),
        "records_with_violation": len(bad),
        "first_violation": (bad[0]["violations"] or bad[0]["sglang_messages"]) if bad else None,
        "idle_after_load": last_idle is not None,
        "sglang_idle_check_passed": bool(last_idle) and not last_idle["sglang_has_leak"],
        "per_layer_idle_check_passed": bool(last_idle) and not last_idle["violations"],
        "idle_state_after_load": None if last_idle is None else {
            k: last_idle[k] for k in ("capacity", "free", "tree_evictable", "tree_protected", "available", "size",
                                     "tree_evictable_tokens", "tree_protected_tokens", "sglang_messages")},
        "flush_drain_ran": drained is not None,
        "flush_drain_passed": bool(drained) and drained["ok"]
        and drained["free"] == drained["capacity"] and drained["available"] == drained["size"],
        "flush_state": None if drained is None else {k: drained[k] for k in ("capacity", "free", "available", "size")},
        # the scheduler's per-layer pressure counters at its last record (sglang_depthkv/sglang/pressure.py)
        "pressure": records[-1].get("pressure") if records else None,
    }
    out["passed"] = (not bad and out["sglang_idle_check_passed"] and out["per_layer_idle_check_passed"]
                     and out["flush_drain_passed"])
    return out


def kept_fraction_in_tree(state: dict) -> List[float]:
    """Per layer: slots the tree holds / logical tokens it holds (1.0 = nothing pruned)."""
    tokens = state["tree_evictable_tokens"] + state["tree_protected_tokens"]
    if tokens == 0:
        return []
    return [round((e + p) / tokens, 4) for e, p in zip(state["tree_evictable"], state["tree_protected"])]
