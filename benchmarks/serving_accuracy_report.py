"""Report for ``benchmarks/serving_accuracy.py``: records (accuracy per task x policy x budget, server
and HF reference), markdown tables, accuracy-vs-budget plot (server solid, reference dashed).

    python -m benchmarks.serving_accuracy_report benchmarks/results/serving_accuracy.json

rewrites ``serving_accuracy.md`` / ``.png`` next to the JSON from its ``requests``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import List, Optional

from benchmarks.accuracy.sweep import LABELS

ORDER = ("vanilla", "snapkv", "pyramid", "depthkv", "laprox", "kvzip", "streamingllm")
NAMES = dict(LABELS, vanilla="vanilla SGLang (ref: full cache)")
TOLERANCE_POINTS = 2.0


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def records(requests: List[dict]) -> List[dict]:
    """One record per (task, policy, budget), plus task ``"all"``: mean scores of server and reference,
    their difference in points, the fraction of requests whose greedy answer tokens are identical,
    the mean token agreement, (pruning policies) the mean kept-set agreement, and the fraction of
    answers identical to vanilla SGLang's on the same sample (when vanilla was served)."""
    groups = defaultdict(list)
    vanilla = {r["sample"]: r["tokens"] for r in requests if r["policy"] == "vanilla" and "sample" in r}
    for r in requests:
        groups[(r["task"], r["policy"], float(r["budget"]))].append(r)
        groups[("all", r["policy"], float(r["budget"]))].append(r)
    out = []
    for (task, policy, budget), rs in groups.items():
        s, ref = _mean(r["score"] for r in rs), _mean(r["reference_score"] for r in rs)
        keep = [r["keep"] for r in rs if r.get("keep")]
        out.append({
            "task": task, "policy": policy, "budget": budget, "n": len(rs),
            "accuracy_server": round(s, 4), "accuracy_reference": round(ref, 4),
            "diff_points": round(100 * (s - ref), 2),
            "identical_answers": round(_mean(float(r["tokens"] == r["reference_tokens"]) for r in rs), 4),
            "token_agreement": round(_mean(r["token_agreement"] for r in rs), 4),
            "keep_layers_equal": round(_mean(k["layers_equal"] for k in keep), 4) if keep else None,
            "keep_jaccard": round(_mean(k["jaccard"] for k in keep), 4) if keep else None,
            "same_answer_as_vanilla": round(_mean(float(r["tokens"] == vanilla[r["sample"]]) for r in rs), 4)
            if all(r.get("sample") in vanilla for r in rs) else None,
        })
    order = {p: i for i, p in enumerate(ORDER)}
    out.sort(key=lambda r: (r["task"] != "all", r["task"], order.get(r["policy"], 99), -r["budget"]))
    return out


def _table(recs: List[dict], task: str, budgets: List[float], cell) -> str:
    by = {(r["policy"], r["budget"]): r for r in recs if r["task"] == task}
    lines = ["| policy | " + " | ".join(f"{b:.0%}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for p in [p for p in ORDER if any(k[0] == p for k in by)]:
        cells = []
        for b in budgets:
            r = by.get((p, 1.0) if p == "vanilla" else (p, b))
            cells.append("–" if r is None else cell(r))
        lines.append(f"| {NAMES.get(p, p)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(recs: List[dict], budgets: List[float]) -> dict:
    overall = [r for r in recs if r["task"] == "all"]
    off = [r for r in overall if abs(r["diff_points"]) > TOLERANCE_POINTS]
    by = {(r["policy"], r["budget"]): r for r in overall}
    dvu = []
    for b in budgets:
        d, u = by.get(("depthkv", b)), by.get(("snapkv", b))
        if d and u:
            s, ref = d["accuracy_server"] - u["accuracy_server"], d["accuracy_reference"] - u["accuracy_reference"]
            dvu.append({"budget": b, "depthkv": d["accuracy_server"], "uniform": u["accuracy_server"],
                        "depthkv_ge_uniform": s >= 0, "margin_server": round(s, 4), "margin_reference": round(ref, 4)})
    return {"within_points": TOLERANCE_POINTS, "all_within": not off,
            "outside": [{k: r[k] for k in ("policy", "budget", "accuracy_server", "accuracy_reference", "diff_points")}
                        for r in off],
            "depthkv_vs_uniform": dvu}


def common_flags(doc: dict) -> List[str]:
    """The servers' SGLang flags without the plugin's ``--kv-*`` part."""
    if not doc["servers"]:
        return []
    flags = doc["servers"][0]["flags"]
    return flags[: flags.index("--kv-policy")] if "--kv-policy" in flags else list(flags)


def depthkv_losses(doc: dict, budget: float) -> List[str]:
    """Samples where DepthKV and uniform SnapKV score differently at ``budget`` (server), with the
    full cache's (vanilla's) score and answer on the same sample."""
    by = {(r["policy"], r["budget"], r["sample"]): r for r in doc["requests"]}
    out = []
    for si in sorted({r["sample"] for r in doc["requests"]}):
        d, u, v = by.get(("depthkv", budget, si)), by.get(("snapkv", budget, si)), by.get(("vanilla", 1.0, si))
        if d and u and d["score"] != u["score"]:
            out.append(f"{d['task']} ({d['n_tokens']} tok): DepthKV {d['score']:.2f} `{d['output']!r}`, uniform "
                       f"{u['score']:.2f} `{u['output']!r}`"
                       + (f", vanilla {v['score']:.2f} `{v['output']!r}`" if v else ""))
    return out


def depthkv_vs_uniform_text(doc: dict, ck: dict) -> List[str]:
    lines = ["DepthKV vs uniform SnapKV (server): " + "; ".join(
        f"{d['budget']:.0%}: {d['depthkv']:.3f} vs {d['uniform']:.3f} "
        f"({'≥' if d['depthkv_ge_uniform'] else '<'})" for d in ck["depthkv_vs_uniform"]) + ".", ""]
    for d in ck["depthkv_vs_uniform"]:
        if not d["depthkv_ge_uniform"]:
            lines += [f"Where DepthKV < uniform ({d['budget']:.0%}), the samples that differ:", ""]
            lines += [f"- {x}" for x in depthkv_losses(doc, d["budget"])] + [""]
            same = {r["policy"]: r.get("same_answer_as_vanilla") for r in doc["records"]
                    if r["task"] == "all" and r["budget"] == d["budget"]}
            if same.get("depthkv") is not None and same.get("snapkv") is not None:
                lines += [f"Answers identical to vanilla's (full cache) at {d['budget']:.0%}: DepthKV "
                          f"{same['depthkv']:.0%}, uniform {same['snapkv']:.0%} of the requests.", ""]
    return lines


def markdown(doc: dict) -> str:
    recs = doc["records"]
    budgets = sorted({r["budget"] for r in recs if r["policy"] != "vanilla"}, reverse=True) or [1.0]
    n = len(doc["samples"])
    cfg, dev = doc["config"], doc["device"]
    ck = checks(recs, budgets)
    fmt = lambda r: f"{r['accuracy_server']:.3f} / {r['accuracy_reference']:.3f}"  # noqa: E731
    wall = doc.get("wall_s") or 0
    parts = [
        "# Accuracy through the server: SmolLM2-135M-Instruct served by SGLang (CPU, float32)", "",
        f"Command: `{doc['command']}`  ",
        f"Wall time: {wall:.0f} s ({wall / 60:.1f} min) for {n} samples x {len(doc['servers'])} servers, reference "
        f"sweep included ({doc['reference']['wall_s']:.0f} s)" + ("" if doc.get("complete") else " (INCOMPLETE run)") + ".  ",
        f"Device: {dev['cpu']}, {dev['cores']} cores, OMP_NUM_THREADS={dev['omp_threads']}, CUDA {dev['cuda']}; "
        f"torch {dev['torch']}, sglang {dev['sglang']}. Code: {doc['code']['commit']}"
        + (" (dirty tree)" if doc["code"].get("dirty") else "") + ".  ",
        f"Reference: `{doc['reference']['command']}` (HF reference path, same samples).", "",
        f"Tasks {', '.join(cfg['tasks'])}; target lengths {cfg['lengths']} tokens x {cfg['counts']} samples per task "
        f"(seed {cfg['seed']}; prompt lengths {min(s['n_tokens'] for s in doc['samples'])}–"
        f"{max(s['n_tokens'] for s in doc['samples'])} tokens); sinks {cfg['sinks']}, window {cfg['window']}. "
        "One server per row and budget (`python -m sglang.launch_server`, real HTTP requests with `input_ids` "
        "from the reference's tokenizer, greedy, one request at a time), flags: "
        f"`{' '.join(common_flags(doc))}` (+ `--kv-*` for the plugin). "
        + ("Radix cache ON." if cfg["radix_cache"] else
           "`--disable-radix-cache`: the prompts share their chat-template head, which the tree would hand a later "
           "request as a tree-owned prefix, never re-pruned (the request's budget then covers only its own "
           "segment) — not the reference's decision.")
        + " `--chunked-prefill-size` covers the longest prompt: every prompt in one prefill, as the reference.", "",
        "## Mean score, server / HF reference (all samples)", "",
        _table(recs, "all", budgets, fmt), "",
        f"Check (|server − reference| <= {TOLERANCE_POINTS:g} points at every policy and budget): "
        + ("**holds**." if ck["all_within"] else "**fails** at " + "; ".join(
            f"{o['policy']} {o['budget']:.0%} ({o['diff_points']:+.1f})" for o in ck["outside"]) + "."), "",
        *depthkv_vs_uniform_text(doc, ck),
        "## Agreement with the reference", "",
        "Cells: identical greedy answers (fraction of requests) · kept sets identical (fraction of layers, "
        "mean over requests) · mean Jaccard of the kept sets.", "",
        _table(recs, "all", budgets, lambda r: f"{r['identical_answers']:.2f}"
               + ("" if r["keep_layers_equal"] is None else f" · {r['keep_layers_equal']:.2f} · {r['keep_jaccard']:.3f}")),
        "",
    ]
    if any(r.get("same_answer_as_vanilla") is not None for r in recs):
        parts += ["## Answers identical to vanilla SGLang's (full cache), server", "",
                  "Fraction of requests whose greedy answer tokens equal vanilla's on the same sample.", "",
                  _table(recs, "all", budgets, lambda r: "–" if r.get("same_answer_as_vanilla") is None
                         else f"{r['same_answer_as_vanilla']:.2f}"), ""]
    for task in sorted({r["task"] for r in recs} - {"all"}):
        parts += [f"## Task {task}: server / reference", "", _table(recs, task, budgets, fmt), ""]
    diff = [r for r in doc["requests"] if r["tokens"] != r["reference_tokens"]]
    parts += ["## Requests whose answers differ from the reference", ""]
    if not diff:
        parts += ["None: every request's greedy answer tokens equal the reference's.", ""]
    else:
        parts += ["| request | server | reference | score s / r | kept layers equal · Jaccard |", "|---|---|---|---|---|"]
        for r in diff:
            k = r.get("keep")
            parts.append(f"| {r['rid']} | `{r['output']!r}` | `{r['reference_output']!r}` | {r['score']:.2f} / "
                         f"{r['reference_score']:.2f} | " + ("–" if not k else f"{k['layers_equal']:.2f} · {k['jaccard']:.3f}")
                         + " |")
        parts.append("")
    return "\n".join(parts)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = {(r["policy"], r["budget"]): r for r in doc["records"] if r["task"] == "all"}
    budgets = sorted({b for p, b in overall if p != "vanilla"})
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    if ("vanilla", 1.0) in overall:
        r = overall[("vanilla", 1.0)]
        ax.axhline(r["accuracy_server"], color="black", label="vanilla SGLang")
        ax.axhline(r["accuracy_reference"], color="black", linestyle="--", label="HF full cache")
    for i, p in enumerate(p for p in ORDER if p != "vanilla" and any(k[0] == p for k in overall)):
        xs = [b for b in budgets if (p, b) in overall]
        color = f"C{i}"
        ax.plot([x * 100 for x in xs], [overall[(p, b)]["accuracy_server"] for b in xs], marker="o", color=color,
                label=f"{NAMES.get(p, p)} (server)")
        ax.plot([x * 100 for x in xs], [overall[(p, b)]["accuracy_reference"] for b in xs], marker="x", color=color,
                linestyle="--", alpha=0.7, label=f"{NAMES.get(p, p)} (HF reference)")
    ax.set_xlabel("KV budget (% of all layer x token slots kept)")
    ax.set_ylabel("mean score")
    ax.set_ylim(-0.02, 1.02)
    if budgets:
        ax.set_xticks([b * 100 for b in budgets])
    ax.set_title(f"SmolLM2-135M-Instruct via SGLang server (solid) vs HF reference (dashed), {len(doc['samples'])} samples",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(doc: dict, json_path: Path) -> str:
    json_path = Path(json_path)
    doc["checks"] = checks(doc["records"], sorted({r["budget"] for r in doc["records"] if r["policy"] != "vanilla"}))
    json_path.write_text(json.dumps(doc, indent=1))
    text = markdown(doc)
    json_path.with_suffix(".md").write_text(text)
    plot(doc, json_path.with_suffix(".png"))
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving_accuracy_report")
    p.add_argument("result", type=Path)
    a = p.parse_args(argv)
    if not a.result.is_file():
        p.error(f"{a.result} does not exist")
    doc = json.loads(a.result.read_text())
    if doc.get("format") != "sglang-depthkv-serving-accuracy":
        p.error(f"{a.result} is not a serving-accuracy result (format {doc.get('format')!r})")
    doc["records"] = records(doc["requests"])
    print(write_report(doc, a.result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
