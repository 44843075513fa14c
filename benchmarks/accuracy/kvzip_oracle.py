"""KVzip with its exact scores: does a better gate close the gap to SnapKV?

The KVzip policy ranks tokens by trained gates that approximate KVzip's reconstruction score (the
most attention a context token receives while the model repeats the context, ``core.gates``). This
benchmark replaces the gates by that exact score, computed per sample with the extra
``context + repeat prompt + context`` forward pass (``core.gates.reconstruction_targets`` on the
whole prompt), and runs both under the same allocators, on the accuracy sweep's samples and
protocol (shared prefill, batched greedy decoding, ``core.tasks.score``). If the exact score does
no better than the gates, fitting the gates better cannot close the gap: the objective and the
per-layer kept sets are what cost accuracy.

Runs (``--budgets`` each, beside the full cache and uniform SnapKV):

- ``gates``: the KVzip policy as served (gate probabilities summed over kv heads, global top-k);
- ``gates_headmax``: the same gates, a token scored by its best kv head instead of the sum;
- ``exact``: KVzip's exact score, best kv head, global top-k;
- ``gates_uniform`` / ``exact_uniform``: the same scores under uniform per-layer budgets.

    python -m benchmarks.accuracy.kvzip_oracle --model qwen2.5-coder-0.5b \\
        --gates benchmarks/results/qwen2.5-0.5b_gates.safetensors \\
        --out benchmarks/results/kvzip_oracle-qwen2.5-0.5b.json

Writes ``--out`` (JSON in the sweep's run format, rewritten after every sample) and the markdown
table beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

RUNS = ("gates", "gates_headmax", "exact", "gates_uniform", "exact_uniform")
LABELS = {"full": "full cache", "snapkv": "uniform SnapKV", "gates": "KVzip gates (as served)",
          "gates_headmax": "KVzip gates, best kv head", "exact": "KVzip exact score, best kv head",
          "gates_uniform": "KVzip gates, uniform budgets", "exact_uniform": "KVzip exact score, uniform budgets"}


def head_max(scores: torch.Tensor) -> torch.Tensor:
    """``[kvh, n]`` → ``[kvh, n]`` whose sum over kv heads (the selection's token score) is the max
    over kv heads."""
    return (scores.max(dim=0, keepdim=True).values / scores.shape[0]).expand_as(scores).contiguous()


def _scorers():
    from sglang_depthkv.core.scorers.base import Scorer

    class GateHeadMax(Scorer):
        """The gates' probabilities, a token scored by its best kv head."""
        name = "kvzip_headmax"
        query_agnostic = True

        def __init__(self, gates):
            self.gates = gates

        def score(self, obs):
            return head_max(self.gates.scores(obs))

    class ExactKVzip(Scorer):
        """KVzip's exact score of the current sample (``targets``: per layer ``[kvh, n]``), best kv head."""
        name = "kvzip_exact"
        query_agnostic = True

        def __init__(self):
            self.targets = None

        def score(self, obs):
            t = self.targets[obs.layer].to(torch.float32)
            if tuple(t.shape) != (obs.num_kv_heads, obs.num_tokens):
                raise ValueError(f"exact KVzip scores {tuple(t.shape)} for layer {obs.layer}, "
                                 f"expected ({obs.num_kv_heads}, {obs.num_tokens})")
            return head_max(t)

    return GateHeadMax, ExactKVzip


def parse_args(argv=None):
    from sglang_depthkv.core.offline_models import OFFLINE_MODELS

    from .sweep import _floats, _ints

    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.kvzip_oracle", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b", choices=tuple(OFFLINE_MODELS))
    p.add_argument("--gates", type=Path, required=True, help="the model's KVzip gate file")
    p.add_argument("--tasks", default="passkey,multikey,multivalue,vartrack")
    p.add_argument("--lengths", default="2048")
    p.add_argument("--counts", default="4")
    p.add_argument("--budgets", default="0.1,0.2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    a.tasks = [t for t in a.tasks.split(",") if t]
    a.lengths, a.counts, a.budgets = _ints(a.lengths), _ints(a.counts), _floats(a.budgets)
    if len(a.lengths) != len(a.counts):
        p.error(f"--lengths {a.lengths} and --counts {a.counts} differ in length")
    if not a.gates.is_file():
        p.error(f"--gates {a.gates}: no such file")
    return a


def markdown(doc: dict) -> str:
    """Mean score per run and budget, then per run and task at the first budget (means from
    ``report.aggregate``; a full-cache row spans every budget, a run without samples shows "–")."""
    from .report import aggregate

    runs = ["full", "snapkv", *RUNS]
    budgets = doc["config"]["budgets"]
    tasks = doc["config"]["tasks"]

    def cell(table: dict, r: str, b: float) -> str:
        mean = table.get((r, 1.0) if r == "full" else (r, float(b)))
        return f"{mean[0]:.3f}" if mean else "–"

    overall, by_task = aggregate(doc).get(None, {}), aggregate(doc, "task")
    lines = [f"# KVzip with its exact scores: {doc['model']['name']}", "",
             f"Command: `{doc['command']}`  ",
             f"{len(doc['samples'])} samples ({', '.join(tasks)}; lengths {doc['config']['lengths']}, "
             f"{doc['config']['counts']} per task); wall time {doc['wall_s']} s. Mean score:", "",
             "| run | " + " | ".join(f"{b:.0%}" for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    lines += [f"| {LABELS[r]} | " + " | ".join(cell(overall, r, b) for b in budgets) + " |" for r in runs]
    lines += ["", f"By task, at {budgets[0]:.0%} kept:", "", "| run | " + " | ".join(tasks) + " |",
              "|---|" + "---:|" * len(tasks)]
    lines += [f"| {LABELS[r]} | " + " | ".join(cell(by_task.get(t, {}), r, budgets[0]) for t in tasks) + " |"
              for r in runs]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    from sglang_depthkv.core.budgets import GlobalTopKAllocator, UniformAllocator
    from sglang_depthkv.core.gates import DEFAULT_REPEAT_PROMPT, load_gates, reconstruction_targets
    from sglang_depthkv.core.policy import PrunePolicy, make_policy
    from sglang_depthkv.core.scorers.kvzip import KVzipGateScorer
    from sglang_depthkv.core.sdpa_prefill import sdpa_prefill
    from sglang_depthkv.core.tasks import score

    from .batched_decode import batched_greedy
    from .sweep import _write, load_reference, stop_rule, task_samples

    spec, tok, ref = load_reference(args.model, args.seed)
    gates = load_gates(args.gates, expected=ref.identity)
    GateHeadMax, ExactKVzip = _scorers()
    exact = ExactKVzip()
    scorers = {"gates": (KVzipGateScorer(gates), GlobalTopKAllocator), "gates_headmax": (GateHeadMax(gates), GlobalTopKAllocator),
               "exact": (exact, GlobalTopKAllocator), "gates_uniform": (KVzipGateScorer(gates), UniformAllocator),
               "exact_uniform": (exact, UniformAllocator)}
    runs = [("full", 1.0, None)] + [("snapkv", b, make_policy("snapkv", b)) for b in args.budgets]
    runs += [(r, b, PrunePolicy(r, scorers[r][0], scorers[r][1](), b)) for r in RUNS for b in args.budgets]
    repeat = tok(DEFAULT_REPEAT_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    stop = stop_rule(tok)
    samples = task_samples(tok, args.tasks, args.lengths, args.counts, args.seed)
    doc = {"format": "sglang-depthkv-kvzip-oracle", "version": 1,
           "command": "python -m benchmarks.accuracy.kvzip_oracle " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": {"name": spec.name, "gguf": spec.gguf_name, "sha256": spec.sha256, "dtype": "float32"},
           "config": {"tasks": args.tasks, "lengths": args.lengths, "counts": args.counts, "budgets": args.budgets,
                      "seed": args.seed, "gates": str(args.gates), "sinks": 4, "window": 32,
                      "torch_threads": torch.get_num_threads()},
           "samples": [], "wall_s": None, "complete": False}
    md_path = args.out.with_suffix(".md")
    for si, s in enumerate(samples):
        ids = tok(s.prompt, add_special_tokens=False, return_tensors="pt").input_ids[0]
        pf = sdpa_prefill(ref, ids, window=32)
        exact.targets, _, _ = reconstruction_targets(ref, ids, repeat)
        keeps = [None if pol is None else ref.select(pf, pol) for _, _, pol in runs]
        outs, kept = batched_greedy(ref, pf, keeps, s.max_new_tokens, done=stop)
        rec = s.to_dict() | {"n_tokens": int(ids.shape[0]), "runs": []}
        for (r, b, _), out, kp, keep in zip(runs, outs, kept, keeps):
            text = tok.decode(out, skip_special_tokens=True)
            rec["runs"].append({"policy": r, "budget": b, "output": text, "score": score(s, text), "kept": kp,
                                "layer_keep": None if keep is None else [int(k.numel()) for k in keep]})
        doc["samples"].append(rec)
        doc["wall_s"] = round(time.time() - t_start, 1)
        doc["complete"] = si == len(samples) - 1
        _write(args.out, doc)
        md_path.write_text(markdown(doc))
        print(f"[kvzip-oracle] {si + 1}/{len(samples)} {s.task} {ids.shape[0]} tokens, {doc['wall_s']} s", flush=True)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
