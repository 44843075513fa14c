"""Report for an accuracy sweep: markdown tables, accuracy-vs-budget plot, per-layer budget plot.

    python -m benchmarks.accuracy.report benchmarks/results/accuracy.json [--out-dir benchmarks/results]

Writes ``<stem>.md`` (mean score per policy x budget, overall / per length / per task; the
command and wall time of the sweep), ``<stem>.png`` (accuracy vs budget, one line per policy,
full cache dashed) and ``layer_budgets<suffix>.png`` (mean kept fraction per layer at one budget,
as the policies actually kept it in the sweep), where ``<stem>`` is the result file's name
(``accuracy-qwen2.5-0.5b.json`` -> ``accuracy-qwen2.5-0.5b.md``, ``layer_budgets-qwen2.5-0.5b.png``).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from .sweep import LABELS

ORDER = ("full", "snapkv", "pyramid", "depthkv", "depthkv_laprox", "laprox", "kvzip", "streamingllm")


def load(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep result {path} does not exist")
    doc = json.loads(path.read_text())
    if doc.get("format") != "sglang-depthkv-accuracy":
        raise ValueError(f"{path} is not an accuracy sweep result (format {doc.get('format')!r})")
    if not doc.get("samples"):
        raise ValueError(f"{path} holds no samples")
    return doc


def model_name(doc: dict) -> str:
    return doc.get("model", {}).get("name", "SmolLM2-135M-Instruct")


def output_paths(result: Path, out_dir: Path) -> tuple[Path, Path, Path]:
    """(markdown, accuracy plot, layer-budget plot) for a result file, named after its stem."""
    stem = result.stem
    suffix = stem[len("accuracy"):] if stem.startswith("accuracy") else "-" + stem
    return out_dir / f"{stem}.md", out_dir / f"{stem}.png", out_dir / f"layer_budgets{suffix}.png"


def aggregate(doc: dict, by: str | None = None) -> dict:
    """Mean score per (group, policy, budget); group = None, ``"length"`` (target tokens) or ``"task"``.
    Returns ``{group: {(policy, budget): (mean, count)}}``."""
    if by not in (None, "length", "task"):
        raise ValueError(f"by must be None, 'length' or 'task', got {by!r}")
    sums: dict = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for s in doc["samples"]:
        g = None if by is None else (s["target_tokens"] if by == "length" else s["task"])
        for r in s["runs"]:
            acc = sums[g][(r["policy"], float(r["budget"]))]
            acc[0] += float(r["score"])
            acc[1] += 1
    return {g: {k: (v[0] / v[1], v[1]) for k, v in d.items()} for g, d in sums.items()}


def _policies(table: dict) -> list[str]:
    names = {p for p, _ in table}
    return [p for p in ORDER if p in names] + sorted(names - set(ORDER))


def budgets_of(doc: dict) -> list[float]:
    return sorted({float(r["budget"]) for s in doc["samples"] for r in s["runs"] if not r["policy"].startswith("full")})


def markdown_table(table: dict, budgets: list[float], labels: dict | None = None) -> str:
    """Rows = policies, columns = budgets; the full cache (budget 1) spans all columns. ``labels``:
    row names beyond the sweep's own (``LABELS``)."""
    labels = {**LABELS, **(labels or {})}
    head = "| policy | " + " | ".join(f"{b:.0%}" for b in budgets) + " |"
    lines = [head, "|---|" + "---:|" * len(budgets)]
    for p in _policies(table):
        cells = []
        for b in budgets:
            key = (p, 1.0) if (p, 1.0) in table else (p, b)  # a full-cache row spans every budget
            cells.append(f"{table[key][0]:.3f}" if key in table else "–")
        lines.append(f"| {labels.get(p, p)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def depthkv_vs_uniform(table: dict, budgets: list[float]) -> list[str]:
    out = []
    for b in budgets:
        d, u = table.get(("depthkv", b)), table.get(("snapkv", b))
        if d is None or u is None:
            continue
        verdict = "beats" if d[0] > u[0] else ("ties" if d[0] == u[0] else "loses to")
        out.append(f"budget {b:.0%}: DepthKV {d[0]:.3f} {verdict} uniform SnapKV {u[0]:.3f}")
    return out


def write_markdown(doc: dict, path: Path) -> str:
    budgets = budgets_of(doc)
    overall = aggregate(doc)[None]
    n = len(doc["samples"])
    parts = [
        f"# Accuracy sweep: {model_name(doc)} (real weights, CPU float32), RULER-style tasks",
        "",
        f"Command: `{doc['command']}`  ",
        f"Wall time: {doc['wall_s']:.0f} s ({doc['wall_s'] / 60:.1f} min) for {n} samples"
        + ("" if doc.get("complete") else " (INCOMPLETE run: the sweep was cut off)") + ".  ",
        *[f"Re-run of {', '.join(m['policies'])}: `{m['command']}` ({m['wall_s'] / 60:.1f} min), merged in by "
          "`python -m benchmarks.accuracy.merge`.  " for m in doc.get("merged", [])],
        f"Tasks: {', '.join(doc['config']['tasks'])}; target lengths {doc['config']['lengths']} tokens, "
        f"{doc['config']['counts']} samples per task per length; seed {doc['config']['seed']}; "
        f"sinks {doc['config']['sinks']}, window {doc['config']['window']}. Haystack: Austen "
        f"({', '.join(doc['config']['haystack'])}). One shared prefill per sample; budget = fraction of all "
        "(layer, token) KV slots kept. Score = exact match of the expected string(s) in the greedy "
        "answer (multivalue / vartrack: fraction recalled).",
        "",
        "## Mean score, all samples",
        "",
        markdown_table(overall, budgets),
        "",
        "DepthKV vs uniform SnapKV: " + "; ".join(depthkv_vs_uniform(overall, budgets)) + ".",
        "",
    ]
    for by, title in (("length", "target length"), ("task", "task")):
        groups = aggregate(doc, by)
        for g in sorted(groups, key=lambda x: (str(type(x)), x)):
            cnt = next(iter(groups[g].values()))[1]
            cmp = depthkv_vs_uniform(groups[g], budgets)
            parts += [f"## By {title}: {g} ({cnt} samples)", "", markdown_table(groups[g], budgets), ""]
            if cmp:
                parts += ["DepthKV vs uniform SnapKV: " + "; ".join(cmp) + ".", ""]
    text = "\n".join(parts)
    Path(path).write_text(text)
    return text


def plot_accuracy(doc: dict, path: Path, labels: dict | None = None, title: str | None = None) -> None:
    """Mean score vs kept fraction, one line per policy (``labels``: names beyond ``LABELS``; rows
    whose name starts with ``full`` are horizontal dashed lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {**LABELS, **(labels or {})}
    budgets = budgets_of(doc)
    table = aggregate(doc)[None]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for p in _policies(table):
        if p.startswith("full"):
            ax.axhline(table[(p, 1.0)][0], color="black" if p == "full" else "grey", linestyle="--",
                       label=labels.get(p, p))
            continue
        xs = [b for b in budgets if (p, b) in table]
        style = ":" if p.startswith("kvpress:") else "-"
        ax.plot([x * 100 for x in xs], [table[(p, b)][0] for b in xs], style, marker="o", label=labels.get(p, p))
    ax.set_xlabel("KV budget (% of all layer x token slots kept)")
    ax.set_ylabel("mean score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks([b * 100 for b in budgets])
    ax.set_title(title or f"{model_name(doc)}, RULER-style tasks ({len(doc['samples'])} samples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layer_fractions(doc: dict, budget: float, policies=("snapkv", "pyramid", "depthkv", "laprox", "kvzip")) -> dict:
    """Mean kept fraction per layer at ``budget`` for each policy, from what the sweep kept."""
    out = {}
    for p in policies:
        rows = [[k / s["n_tokens"] for k in r["kept"]] for s in doc["samples"] for r in s["runs"]
                if r["policy"] == p and abs(float(r["budget"]) - budget) < 1e-9]
        if rows:
            out[p] = [sum(col) / len(rows) for col in zip(*rows)]
    return out


def plot_layer_budgets(doc: dict, path: Path, budget: float = 0.3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = layer_fractions(doc, budget)
    if not fr:
        raise ValueError(f"no runs at budget {budget} in the sweep")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {"snapkv": "-", "pyramid": "-", "depthkv": "-", "laprox": ":", "kvzip": ":"}
    for p, ys in fr.items():
        ax.plot(range(len(ys)), ys, styles.get(p, "-"), marker="o", markersize=3, label=LABELS.get(p, p))
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction of the prompt's tokens")
    ax.set_title(f"{model_name(doc)}: per-layer budget at {budget:.0%} kept (mean over samples)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.report")
    p.add_argument("result", type=Path)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--layer-budget", type=float, default=0.3)
    a = p.parse_args(argv)
    doc = load(a.result)
    out = a.out_dir or a.result.parent
    out.mkdir(parents=True, exist_ok=True)
    md, png, layers_png = output_paths(a.result, out)
    print(write_markdown(doc, md))
    plot_accuracy(doc, png)
    plot_layer_budgets(doc, layers_png, a.layer_budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
