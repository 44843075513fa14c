"""PNG plots: output and decode-phase tok/s against the budget per workload (prefill tok/s and TTFT
for the prefill workload), and the per-layer KV capacity of every plugin server next to vanilla's.
Each figure names the device and the command."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, List


METRICS = (("output_tok_s", "output tok/s"), ("decode_tok_s", "decode-phase tok/s"))
PREFILL_METRICS = (("input_tok_s", "input (prefill) tok/s"), ("ttft_ms_p50", "TTFT p50 (ms)"))


def _footer(fig, device: str, command: str) -> None:
    width = max(60, int(fig.get_figwidth() * 21))
    fig.text(0.01, 0.005, "\n".join(textwrap.wrap(f"{device} | {command}", width)), fontsize=6, va="bottom",
             family="monospace")


def throughput_png(path: Path, records: List[dict], workloads: List[str], device: str, command: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(workloads), figsize=(4.2 * len(workloads), 7), squeeze=False)
    for j, wl in enumerate(workloads):
        rows = [r for r in records if r["workload"] == wl and r["status"] == "ok"]
        for i, (key, name) in enumerate(PREFILL_METRICS if wl == "prefill" else METRICS):
            ax = axes[i][j]
            dk = sorted((r["budget"], r[key]) for r in rows if r["policy"] == "depthkv" and r.get(key) is not None)
            if dk:
                ax.plot([b for b, _ in dk], [v for _, v in dk], "o-", label="depthkv")
            for policy, marker in (("laprox", "s"), ("snapkv", "^"), ("pyramid", "v"), ("streamingllm", "x")):
                pts = [(r["budget"], r[key]) for r in rows if r["policy"] == policy and r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker, label=policy, markersize=8)
            for policy, style in (("vanilla", "k--"), ("full", "g:")):
                v = [r[key] for r in rows if r["policy"] == policy and r.get(key) is not None]
                if v:
                    ax.axhline(v[0], color=style[0], linestyle=style[1:], label=f"{policy} (budget 1)")
            ax.set_xlim(0, 1.05)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("KV budget")
            ax.set_ylabel(name)
            ax.set_title(f"{wl}: {name}", fontsize=9)
            ax.grid(alpha=0.3)
            if not rows:
                ax.text(0.5, 0.5, "no completed run", ha="center", transform=ax.transAxes)
            elif i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"Serving throughput vs KV budget - {device}", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    _footer(fig, device, command)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def capacity_png(path: Path, servers: Dict[str, object], device: str, command: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plugin = [(k, s) for k, s in servers.items() if getattr(s, "capacity", None)]
    van = servers.get("vanilla")
    n = max(1, len(plugin))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.0, 5 * cols), 3.2 * rows + 0.9), squeeze=False)
    for idx in range(rows * cols):
        ax = axes[idx // cols][idx % cols]
        if idx >= len(plugin):
            ax.axis("off")
            if not plugin:
                ax.text(0.5, 0.5, "no plugin server came up", ha="center", transform=ax.transAxes)
            continue
        label, s = plugin[idx]
        caps = s.capacity["capacities"]
        ax.bar(range(len(caps)), caps, color="tab:blue", label="layer slots")
        ax.axhline(s.capacity["logical_tokens"], color="tab:orange", linestyle=":",
                   label=f"logical {s.capacity['logical_tokens']}")
        if van is not None and van.logical_kv_tokens:
            ax.axhline(van.logical_kv_tokens, color="k", linestyle="--", label=f"vanilla {van.logical_kv_tokens}")
        ax.set_title(f"{label}: KV {s.capacity['kv_gib']:.4g} + metadata {s.capacity['metadata_gib']:.4g} GiB", fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("KV slots (tokens)")
        ax.legend(fontsize=6)
    fig.suptitle(f"Per-layer KV capacity at equal KV bytes - {device}", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    _footer(fig, device, command)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
