"""Ratios against vanilla, the PASS/FAIL checks of the issue's targets, the markdown table and the JSON.

Ratios compare a record with the vanilla record of the same workload: ``ratio_vs_vanilla`` is of
``decode_tok_s``; ``bound_ratio`` is the same ratio of the decode memory-bandwidth bounds
(``bound.py``) at the batch sizes each run actually had.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from typing import Dict, List, Optional

OK_STATUSES = ("ok",)

DEFINITIONS = {
    "decode_tok_s": "output tokens generated in decode-only steps / their wall time; a decode step is decode-only "
                    "when no prefill batch ran since the previous decode step (server log, --decode-log-interval 1: "
                    "sum(r_i) / sum(r_i / g_i) over the 'Decode batch, #running-req: r_i, ... gen throughput "
                    "(token/s): g_i' lines)",
    "peak_running_requests": "largest #running-req of any decode step of the measured requests (server log)",
    "logical_kv_tokens": "SGLang's max_total_num_tokens (/get_server_info): logical tokens the radix tree / "
                         "req_to_token may hold",
    "input_tok_s / output_tok_s / ttft / tpot": "SGLang's client (sglang.benchmark.serving): tokens / benchmark "
                                               "duration; TTFT and TPOT percentiles over requests",
    "bound": "decode memory-bandwidth bound: a step reads the weights (all but the embedding table) and the kept KV "
             "of each running request (vanilla/full: P + O/2 tokens; pruning at budget b: b*P + O/2; P/O = mean "
             "prompt/output length); bound tok/s = sum(r_i) / sum((W + r_i*kv_req)/BW) over the decode-only steps",
    "ratio_vs_vanilla": "decode_tok_s / vanilla's decode_tok_s on the same workload",
    "bound_ratio": "bound tok/s / vanilla's bound tok/s on the same workload (BW cancels)",
}

# (workload, config, metric, reference config, threshold, what)
TARGETS = (
    ("long-decode", "depthkv@0.3", "decode_tok_s", "vanilla", 2.6, "decode tok/s"),
    ("long-decode", "depthkv@0.3", "peak_running_requests", "vanilla", 3.0, "peak running requests"),
    ("long-decode", "depthkv@0.1", "decode_tok_s", "vanilla", 6.0, "decode tok/s"),
    ("prefill", "full", "input_tok_s", "vanilla", 0.95, "prefill tok/s (plugin overhead <= 5%)"),
    ("prefill", "depthkv@0.3", "input_tok_s", "full", 0.95, "prefill tok/s (scoring + compaction <= 5%)"),
)
SHORT_CHAT_MIN = 0.97


def _find(records: List[dict], workload: str, config: str) -> Optional[dict]:
    for r in records:
        if r["workload"] == workload and r["config"] == config:
            return r
    return None


def _ratio(a, b) -> Optional[float]:
    return (a / b) if (a is not None and b not in (None, 0)) else None


def add_ratios(records: List[dict]) -> None:
    for r in records:
        van = _find(records, r["workload"], "vanilla")
        ok = r["status"] in OK_STATUSES and van is not None and van["status"] in OK_STATUSES
        r["ratio_vs_vanilla"] = _ratio(r.get("decode_tok_s"), van.get("decode_tok_s")) if ok else None
        r["output_ratio_vs_vanilla"] = _ratio(r.get("output_tok_s"), van.get("output_tok_s")) if ok else None
        r["input_ratio_vs_vanilla"] = _ratio(r.get("input_tok_s"), van.get("input_tok_s")) if ok else None
        r["peak_running_ratio"] = _ratio(r.get("peak_running_requests"), van.get("peak_running_requests")) if ok else None
        r["logical_kv_ratio"] = _ratio(r.get("logical_kv_tokens"), van.get("logical_kv_tokens")) if ok else None
        r["bound_ratio"] = _ratio(r.get("bound_tok_s_per_byte_s"), van.get("bound_tok_s_per_byte_s")) if ok else None


def _check(records, workload, config, metric, ref, threshold, what) -> dict:
    name = f"{workload}: {config} {what} >= {threshold:g}x {ref}"
    r, b = _find(records, workload, config), _find(records, workload, ref)
    missing = [x for x in (r, b) if x is None or x["status"] not in OK_STATUSES]
    if r is None or b is None or missing:
        who = [f"{c} {'not in this run' if x is None else x['status'] + ((': ' + x['error']) if x.get('error') else '')}"
               for c, x in ((config, r), (ref, b)) if x is None or x["status"] not in OK_STATUSES]
        return {"name": name, "result": "N/A", "value": None, "detail": "; ".join(w.splitlines()[0] for w in who)}
    v = _ratio(r.get(metric), b.get(metric))
    if v is None:
        return {"name": name, "result": "N/A", "value": None, "detail": f"{metric} missing"}
    detail = f"{r.get(metric):.4g} vs {b.get(metric):.4g}"
    if metric == "decode_tok_s" and r.get("bound_ratio") is not None and ref == "vanilla":
        detail += f"; bandwidth bound {r['bound_ratio']:.2f}x"
    return {"name": name, "result": "PASS" if v >= threshold else "FAIL", "value": v, "detail": detail}


def checks(records: List[dict]) -> List[dict]:
    out = [_check(records, *t) for t in TARGETS]
    plugin = [r["config"] for r in records if r["workload"] == "short-chat" and r["policy"] != "vanilla"]
    for config in plugin or ["depthkv@0.3"]:
        out.append(_check(records, "short-chat", config, "output_tok_s", "vanilla", SHORT_CHAT_MIN, "output tok/s"))
    return out


def check_lines(cs: List[dict]) -> List[str]:
    return [f"{c['result']:<4}  {c['name']}: " + (f"{c['value']:.2f}x ({c['detail']})" if c["value"] is not None
                                                  else c["detail"]) for c in cs]


def _f(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(records: List[dict]) -> str:
    head = ("| workload | config | budget | logical KV tokens | peak running | input tok/s | output tok/s | "
            "decode tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | decode vs vanilla (bw bound) | cache hit | status |")
    lines = [head, "|" + "---|" * 13]
    for r in records:
        ratio = "-" if r.get("ratio_vs_vanilla") is None else (
            f"{r['ratio_vs_vanilla']:.2f}x" + (f" ({r['bound_ratio']:.2f}x)" if r.get("bound_ratio") is not None else ""))
        status = r["status"] if r["status"] in OK_STATUSES else (r["status"] + (": " + r["error"].splitlines()[0]
                                                                                if r.get("error") else ""))
        lines.append(
            f"| {r['workload']} | {r['config']} | {r['budget']:g} | {_f(r['logical_kv_tokens'], '{:d}')} | "
            f"{_f(r['peak_running_requests'], '{:d}')} | {_f(r['input_tok_s'])} | {_f(r['output_tok_s'])} | "
            f"{_f(r['decode_tok_s'])} | {_f(r['ttft_ms_p50'])} / {_f(r['ttft_ms_p99'])} | "
            f"{_f(r['tpot_ms_p50'], '{:.2f}')} / {_f(r['tpot_ms_p99'], '{:.2f}')} | {ratio} | "
            f"{_f(r.get('cache_hit_rate'), '{:.1%}')} | {status.replace('|', '/')} |")
    return "\n".join(lines)


def capacity_table(servers: Dict[str, object]) -> str:
    lines = ["| config | server | start s | --max-total-tokens | logical KV tokens | x vanilla | KV GiB | "
             "metadata GiB | per-layer capacity min / mean / max |", "|" + "---|" * 9]
    van = servers.get("vanilla")
    van_tokens = getattr(van, "logical_kv_tokens", None)
    for label, s in servers.items():
        cap = s.capacity or {}
        caps = cap.get("capacities")
        per_layer = (f"{min(caps)} / {sum(caps) / len(caps):.0f} / {max(caps)}" if caps else
                     (f"{s.logical_kv_tokens} (every layer)" if s.logical_kv_tokens else "-"))
        ratio = _ratio(s.logical_kv_tokens, van_tokens)
        status = s.status if s.status == "ok" else f"{s.status}: {s.reason}"
        lines.append(f"| {label} | {status.replace('|', '/')} | {_f(s.start_s, '{:.0f}')} | "
                     f"{_f(s.pinned_tokens, '{:d}')} | {_f(s.logical_kv_tokens, '{:d}')} | "
                     f"{_f(ratio, '{:.2f}x')} | {_f(cap.get('kv_gib'), '{:.4f}')} | "
                     f"{_f(cap.get('metadata_gib'), '{:.4f}')} | {per_layer} |")
    return "\n".join(lines)


def markdown(meta: dict, records: List[dict], servers: Dict[str, object], cs: List[dict]) -> str:
    out = [f"# Serving throughput: vanilla SGLang vs sglang-depthkv on {meta['device']}", ""]
    if meta.get("banner"):
        out += [f"**{meta['banner']}**", ""]
    out += [f"Command: `{meta['command']}`", "",
            f"Preset `{meta['preset']['name']}`: {meta['preset']['description']}. "
            f"Date {meta['date']}, commit `{meta.get('git_commit') or '?'}`.", "",
            f"Every server: `{' '.join(meta['server_common_args'])}`; plus `--max-total-tokens` (vanilla's pinned "
            "pool, and for each plugin server its logical capacity for the same KV bytes) and the `--kv-*` flags"
            + (f" (plugin servers also `{' '.join(meta['plugin_args'])}`)" if meta.get("plugin_args") else "") + ".", "",
            "Workloads (SGLang's own client, `sglang.benchmark.serving`):", ""]
    out += [f"- `{w['key']}` ({w['title']}): {w['describe']}" for w in meta["workloads"]]
    out += ["", "## Results", "", table(records), "", "## Checks (the issue's GPU targets)", "", "```"]
    out += check_lines(cs) + ["```", "", "## KV capacity per server", "", capacity_table(servers), "",
                              "## Definitions", ""]
    out += [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
    notes = sorted({n for r in records for n in r.get("notes", [])})
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if meta.get("files"):
        out += ["", "Plots: " + ", ".join(f"`{f}`" for f in meta["files"].get("png", []))]
    return "\n".join(out) + "\n"


def to_json(meta: dict, records: List[dict], servers: Dict[str, object], cs: List[dict]) -> str:
    doc = dict(meta)
    doc["definitions"] = DEFINITIONS
    doc["records"] = records
    doc["servers"] = {k: (asdict(v) if is_dataclass(v) else v) for k, v in servers.items()}
    doc["checks"] = cs
    return json.dumps(doc, indent=1, default=str)
