"""Our policies beside kvpress's presses on the samples both runs scored.

    python -m benchmarks.accuracy.peers_report benchmarks/results/accuracy.json \
        benchmarks/results/accuracy-kvpress.json --out benchmarks/results/accuracy-kvpress.md

Writes the markdown tables (all samples, then by length and by task) and, next to them,
``<stem>.png`` (mean score vs kept fraction, our policies solid, kvpress's presses dotted, both full
caches dashed).

Samples are matched by (task, target length, index) and must carry the same expected answers (the
same generator and seed); only samples in both documents and budgets in both are tabled. The
full-cache row of each run is shown (ours: the reference path, transformers 5.12; kvpress's: its
venv, transformers 5.2), so a difference between the two stacks is visible, not hidden.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .report import aggregate, load, markdown_table, model_name, plot_accuracy


def _key(s: dict) -> tuple:
    return (s["task"], int(s["target_tokens"]), int(s["index"]))


def merged(ours: dict, peers: dict) -> dict:
    """A sweep-format document of the common samples: our runs plus the peers' (their full cache as
    ``full (kvpress run)``)."""
    theirs = {_key(s): s for s in peers["samples"]}
    samples = []
    for s in ours["samples"]:
        t = theirs.get(_key(s))
        if t is None:
            continue
        if t["answers"] != s["answers"]:
            raise ValueError(f"sample {_key(s)}: expected answers differ ({s['answers']} vs {t['answers']}); "
                             "the two runs did not generate the same samples")
        runs = list(s["runs"]) + [dict(r, policy="full-kvpress-run" if r["policy"] == "full" else r["policy"])
                                  for r in t["runs"]]
        samples.append(dict(s, runs=runs))
    if not samples:
        raise ValueError("no sample is in both documents")
    return {"samples": samples}


def made_by_line(peers: dict) -> str:
    """How many samples ran with one prefill per press (kvpress's pipeline) and how many with the
    peers script's shared prefill (``made_by``; a sample without it ran per press, as the script did
    before it had the shared prefill)."""
    counts: dict = {}
    for s in peers["samples"]:
        mode = s.get("made_by", {}).get("prefill", "per-press")
        counts[mode] = counts.get(mode, 0) + 1
    names = {"per-press": "one prefill under each press (kvpress's pipeline)",
             "shared": "one prefill shared by every press (same tokens)"}
    return ", ".join(f"{n} samples {names.get(m, m)}" for m, n in sorted(counts.items(), key=lambda x: x[0] != "per-press"))


def write(ours: dict, peers: dict, out: Path) -> str:
    doc = merged(ours, peers)
    budgets = sorted({float(r["budget"]) for s in peers["samples"] for r in s["runs"] if r["policy"] != "full"}
                     & {float(r["budget"]) for s in ours["samples"] for r in s["runs"] if r["policy"] != "full"})
    labels = dict(peers.get("peers", {}).get("labels", {}))
    labels = {f"kvpress:{k}": v for k, v in labels.items()}
    labels["full-kvpress-run"] = "full cache (kvpress venv)"
    table = aggregate(doc)[None]
    parts = [
        f"# Our policies and kvpress's presses on the same samples: {model_name(ours)}",
        "",
        f"Ours: `{ours['command']}`  ",
        *[f"Ours, re-run of {', '.join(m['policies'])}: `{m['command']}`  " for m in ours.get("merged", [])],
        f"kvpress: `{peers['command']}` (kvpress {peers['peers']['kvpress']}, transformers "
        f"{peers['peers']['transformers']})  ",
        *(["kvpress, samples' runs copied from earlier runs (`--reuse`): "
           + ", ".join(f"{n} from `{f}`" for f, n in peers["reused"].items()) + "  "] if peers.get("reused") else []),
        *([f"kvpress prefill: {made_by_line(peers)}  "] if any("made_by" in s for s in peers["samples"]) else []),
        f"{len(doc['samples'])} common samples; budget = fraction of the KV kept (kvpress "
        "`compression_ratio = 1 - budget`). Mean score:",
        "",
        markdown_table(table, budgets, labels),
        "",
    ]
    for by, field, heading in (("length", "target_tokens", "{} tokens"), ("task", "task", "Task {}")):
        groups = aggregate(doc, by)
        if len(groups) > 1:
            for g in sorted(groups):
                n = sum(1 for s in doc["samples"] if s[field] == g)
                parts += [f"### {heading.format(g)} ({n} samples)", "", markdown_table(groups[g], budgets, labels), ""]
    full_ours, full_theirs = table.get(("full", 1.0)), table.get(("full-kvpress-run", 1.0))
    if full_ours and full_theirs:
        parts += [f"Full cache: ours {full_ours[0]:.3f}, the kvpress venv's {full_theirs[0]:.3f}.", ""]
    text = "\n".join(parts)
    out.write_text(text)
    plot_accuracy(doc, out.with_suffix(".png"), labels,
                  title=f"{model_name(ours)}: ours and kvpress 0.5.5 ({len(doc['samples'])} common samples)")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.peers_report")
    p.add_argument("ours", type=Path)
    p.add_argument("peers", type=Path)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    print(write(load(a.ours), load(a.peers), a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
