"""Merge a sweep that re-ran some policies into the sweep it updates.

    python -m benchmarks.accuracy.merge benchmarks/results/accuracy.json /tmp/laprox.json

Both files are ``benchmarks.accuracy.sweep`` results of the same model and protocol (tasks,
lengths, counts, seed, sinks, window, budgets). Sample by sample, the base's runs of the policies
the update ran are replaced by the update's (policies new to the base are added); every other run
and the base's full-cache run stay. The samples must be the same (task, length, index, answers,
prompt tokens), and the update's full-cache answer must equal the base's token for token, which
checks that both ran the same model and prefill. The merged file records the update's command
under ``merged`` and takes the update's profile / gate paths for the policies it ran. Written over
the base unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .sweep import _write

SAME_CONFIG = ("tasks", "lengths", "counts", "seed", "sinks", "window", "budgets")
SAME_SAMPLE = ("task", "target_tokens", "index", "seed", "answers", "n_tokens")
FILE_KEYS = {"depthkv": "profile", "depthkv_laprox": "laprox_profile", "kvzip": "gates"}


def merge(base: dict, update: dict) -> dict:
    """The merged document (``base`` and ``update`` are left unchanged); ValueError naming the first
    mismatch."""
    for doc, what in ((base, "base"), (update, "update")):
        if doc.get("format") != "sglang-depthkv-accuracy":
            raise ValueError(f"{what}: not an accuracy sweep result (format {doc.get('format')!r})")
        if not doc.get("complete"):
            raise ValueError(f"{what}: the sweep did not complete")
    if base["model"] != update["model"]:
        raise ValueError(f"models differ: base {base['model']['name']} vs update {update['model']['name']}")
    for k in SAME_CONFIG:
        if base["config"][k] != update["config"][k]:
            raise ValueError(f"config {k!r} differs: base {base['config'][k]} vs update {update['config'][k]}")
    if len(base["samples"]) != len(update["samples"]):
        raise ValueError(f"base has {len(base['samples'])} samples, update {len(update['samples'])}")
    names = list(update["config"]["policies"])
    out = json.loads(json.dumps(base))
    for i, (b, u) in enumerate(zip(out["samples"], update["samples"])):
        for k in SAME_SAMPLE:
            if b[k] != u[k]:
                raise ValueError(f"sample {i}: {k} differs: base {b[k]} vs update {u[k]}")
        bfull = [r for r in b["runs"] if r["policy"] == "full"]
        ufull = [r for r in u["runs"] if r["policy"] == "full"]
        if len(bfull) != 1 or [r["tokens"] for r in bfull] != [r["tokens"] for r in ufull]:
            raise ValueError(f"sample {i}: the full-cache answers differ (base {[r['output'] for r in bfull]} vs "
                             f"update {[r['output'] for r in ufull]}): not the same model or prefill")
        b["runs"] = [r for r in b["runs"] if r["policy"] not in names] + [r for r in u["runs"] if r["policy"] in names]
    cfg = out["config"]
    cfg["policies"] = [p for p in cfg["policies"] if p not in names] + names
    for p in names:
        if p in FILE_KEYS:
            cfg[FILE_KEYS[p]] = update["config"][FILE_KEYS[p]]
    out.setdefault("merged", []).append({"command": update["command"], "policies": names,
                                         "wall_s": update["wall_s"]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("update", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: over the base")
    args = p.parse_args(argv)
    try:
        doc = merge(json.loads(args.base.read_text()), json.loads(args.update.read_text()))
    except ValueError as e:
        raise SystemExit(f"merge: {e}") from None
    _write(args.out or args.base, doc)
    print(f"merged {', '.join(doc['merged'][-1]['policies'])} into {args.out or args.base}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
