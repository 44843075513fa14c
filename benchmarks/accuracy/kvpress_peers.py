"""kvpress 0.5.5 presses on the accuracy sweep's samples: the peer columns beside our policies.

Same samples as ``benchmarks.accuracy.sweep`` (``core.tasks.make_samples`` with the same tasks,
lengths, counts and seed), the same model (``--model``: the SmolLM2-135M-Instruct or
Qwen2.5-Coder-0.5B-Instruct HF export, float32, CPU), the same protocol: the whole prompt is prefilled once under the press (the press compresses each
layer's cache after that layer's attention, so the last prompt token's logits, and the first
answer token, are the full cache's), then greedy decoding over the compressed cache with positions
continuing at the original prompt length (as kvpress's own pipeline decodes; HF ``generate`` would
continue at the compressed length and shift RoPE), stopped by the sweep's rule, scored by
``core.tasks.score``. A budget ``b`` (fraction kept) is kvpress's ``compression_ratio = 1 - b``.

kvpress needs transformers < 5.3, so this runs in its own venv (``kvpress_env.sh``), not the
project's:

    bash benchmarks/accuracy/kvpress_env.sh          # builds .venv-kvpress once
    .venv-kvpress/bin/python -m benchmarks.accuracy.kvpress_peers --out benchmarks/results/accuracy-kvpress.json

One prefill serves every press of a sample (``--prefill shared``, the default): a press's hook
compresses a layer's cache after that layer's attention and never changes the layer's output, so the
prompt's forward pass is the same under every press. The shared prefill runs it once with the full
cache and calls each press's own ``forward_hook`` on a copy of that layer's keys and values; the
head-masking presses (AdaKV, CriticalAdaKV, KVzip) leave their ``masked_key_indices`` per layer,
which are put back on the modules before that press's decoding. ``KVzipPress`` runs its own
reconstruction passes once over a copy of the full cache and its ``compress_post`` once per budget
(its scores do not depend on the budget). ``--prefill per-press`` runs kvpress's pipeline literally,
one prefill under each press, to check the shared one against: both give the same tokens
(``tests/core/test_kvpress_shared_prefill.py`` on a tiny model; every run of two SmolLM2 samples of
2k tokens).

The document has the sweep's format (``samples[].runs[]`` with ``policy`` = the press label), so
``benchmarks.accuracy.report`` can put both side by side. It is rewritten after every sample.
Each sample records ``made_by`` (prefill mode, kvpress and transformers versions). ``--reuse FILE``
(repeatable; the first file holding a sample wins) copies the runs of samples an earlier document of
the same model and versions already holds (same task, length, index, answers and prompt length,
every requested press and budget), with their ``made_by``, instead of running them again.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import types
from pathlib import Path

import torch

PRESSES = ("snapkv", "adakv_snapkv", "criticaladakv_snapkv", "pyramidkv", "streamingllm", "kvzip")
LABELS = {
    "snapkv": "kvpress SnapKVPress", "adakv_snapkv": "kvpress AdaKVPress(SnapKVPress)",
    "criticaladakv_snapkv": "kvpress CriticalAdaKVPress(SnapKVPress)", "pyramidkv": "kvpress PyramidKVPress",
    "streamingllm": "kvpress StreamingLLMPress", "kvzip": "kvpress KVzipPress",
}
BUDGETS = (0.1, 0.2, 0.3, 0.5)


def import_kvpress():
    """kvpress's package ``__init__`` imports ``datasets`` for DuoAttention only; a placeholder module
    stands in for that one import where datasets is not installed (the peers' venv, the project's
    venv with kvpress --no-deps for the score cross-checks in the tests)."""
    if "datasets" not in sys.modules:
        try:
            import datasets  # noqa: F401  (the real package, where installed)
        except ImportError:
            placeholder = types.ModuleType("datasets")
            placeholder.load_dataset = None
            sys.modules["datasets"] = placeholder
    import kvpress

    return kvpress


def make_press(name: str, budget: float):
    kp = import_kvpress()
    ratio = 1.0 - float(budget)
    if name == "snapkv":
        return kp.SnapKVPress(compression_ratio=ratio)
    if name == "adakv_snapkv":
        return kp.AdaKVPress(kp.SnapKVPress(compression_ratio=ratio))
    if name == "criticaladakv_snapkv":
        return kp.CriticalAdaKVPress(kp.SnapKVPress(compression_ratio=ratio))
    if name == "pyramidkv":
        return kp.PyramidKVPress(compression_ratio=ratio)
    if name == "streamingllm":
        return kp.StreamingLLMPress(compression_ratio=ratio)
    if name == "kvzip":
        return kp.KVzipPress(compression_ratio=ratio)
    raise ValueError(f"unknown press {name!r}; choose from {', '.join(PRESSES)}")


def check_transformers() -> None:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) >= (5, 3):
        raise SystemExit(f"kvpress 0.5.5 needs transformers < 5.3, this venv has {transformers.__version__}; "
                         "run in the venv that benchmarks/accuracy/kvpress_env.sh builds")


def _attention_modules(model) -> list:
    return [layer.self_attn for layer in model.model.layers]


def _set_masks(model, masks) -> None:
    """Put a run's per-layer ``masked_key_indices`` (kvpress's head-wise eviction, read by its attention
    patch while decoding) on the attention modules; ``None`` clears them."""
    for i, m in enumerate(_attention_modules(model)):
        m.masked_key_indices = None if masks is None else masks[i]


def _cache_copy(cache):
    """A DynamicCache holding the same keys and values (decoding concatenates into new tensors, so the
    copies never write into each other)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys, layer.values, i)
    return out


@torch.no_grad()
def greedy_continue(model, cache, n: int, first: int, max_new_tokens: int, done) -> list[int]:
    """Greedy decoding over ``cache`` after a prompt of ``n`` tokens whose logits gave ``first``;
    positions continue at ``n``."""
    tokens = [first]
    for i in range(max_new_tokens - 1):
        if done(tokens):
            break
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                    position_ids=torch.tensor([[n + i]]))
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def _cache_entries(cache) -> int:
    return sum(int(cache.get_seq_length(layer)) for layer in range(len(cache)))


@torch.no_grad()
def shared_press_runs(model, ids: torch.Tensor, runs: list, max_new_tokens: int, done) -> list[tuple[list[int], int]]:
    """(tokens, cache entries after the prefill) of each ``(name, budget, press)`` in ``runs`` (press
    None: the full cache), from one prefill of ``ids [n]``; see the module docstring."""
    from transformers import DynamicCache

    n = int(ids.shape[0])
    mods = _attention_modules(model)
    hooked = [(k, press) for k, (name, _b, press) in enumerate(runs) if press is not None and name != "kvzip"]
    caches = {k: DynamicCache() for k, _ in hooked}
    masks = {k: [None] * len(mods) for k, _ in hooked}
    for m in mods:
        m.rotary_emb = model.model.rotary_emb  # as BasePress.__call__ does
    for _, press in hooked:
        press.post_init_from_model(model)

    def hook(module, inputs, kwargs, output):
        idx = module.layer_idx
        full = kwargs["past_key_values"].layers[idx]
        for k, press in hooked:
            caches[k].update(full.keys, full.values, idx)
            module.masked_key_indices = None
            press.forward_hook(module, inputs, dict(kwargs, past_key_values=caches[k]), output)
            masks[k][idx] = getattr(module, "masked_key_indices", None)
        module.masked_key_indices = None
        return output

    full = DynamicCache()
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in mods]
    try:
        out = model(input_ids=ids[None], past_key_values=full, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    first = int(out.logits[0, -1].argmax())

    kvzip = [(k, b) for k, (name, b, press) in enumerate(runs) if name == "kvzip"]
    if kvzip:
        scorer = runs[kvzip[0][0]][2]  # the first KVzipPress scores for all budgets
        post = scorer.compress_post

        def compress_each_budget(model_):
            scores = scorer.score_val.clone()
            for k, b in kvzip:
                scorer.score_val.copy_(scores)
                scorer.compression_ratio = 1.0 - b
                post(model_)
                masks[k] = [m.masked_key_indices for m in mods]
                _set_masks(model, None)

        scorer.compress_post = compress_each_budget
        kz_cache = _cache_copy(full)
        with scorer(model):
            # what KVzipPress's wrapped forward records from the prefill it would otherwise run again
            scorer._context_ids, scorer._cache = ids[None], kz_cache
        for k, _b in kvzip:
            caches[k] = _cache_copy(kz_cache)
    result = []
    for k, (_name, _b, press) in enumerate(runs):
        cache = _cache_copy(full) if press is None else caches.pop(k)
        kept = _cache_entries(cache)
        _set_masks(model, None if press is None else masks[k])
        try:
            result.append((greedy_continue(model, cache, n, first, max_new_tokens, done), kept))
        finally:
            _set_masks(model, None)
    return result


@torch.no_grad()
def press_greedy(model, ids: torch.Tensor, press, max_new_tokens: int, done) -> tuple[list[int], int]:
    """Prefill ``ids [n]`` under ``press`` (None: full cache), then greedy decoding with positions
    continuing at ``n``. Returns (tokens, cache entries over all layers after the prefill; AdaKV-style
    presses mask per head instead of removing, so their cache keeps every token)."""
    from transformers import DynamicCache

    n = int(ids.shape[0])
    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        out = model(input_ids=ids[None], past_key_values=cache, logits_to_keep=1)
    kept = _cache_entries(cache)
    return greedy_continue(model, cache, n, int(out.logits[0, -1].argmax()), max_new_tokens, done), kept


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.kvpress_peers", description=__doc__.split("\n\n")[0])
    from sglang_depthkv.core.offline_models import OFFLINE_MODELS

    p.add_argument("--model", default="smollm2", choices=tuple(OFFLINE_MODELS))
    p.add_argument("--tasks", default="passkey,multikey,multivalue,vartrack")
    p.add_argument("--lengths", default="2048,4096,8000")
    p.add_argument("--counts", default="3,2,1")
    p.add_argument("--presses", default=",".join(PRESSES))
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--prefill", choices=("shared", "per-press"), default="shared",
                   help="one prefill for every press of a sample (default), or one under each press")
    p.add_argument("--reuse", type=Path, action="append", default=[],
                   help="an earlier document of this script (repeatable): its samples' runs are copied, not run again")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy-kvpress.json"))
    a = p.parse_args(argv)
    a.tasks = [t for t in a.tasks.split(",") if t]
    a.lengths = [int(x) for x in a.lengths.split(",") if x]
    a.counts = [int(x) for x in a.counts.split(",") if x]
    if len(a.lengths) != len(a.counts):
        p.error(f"--lengths has {len(a.lengths)} entries, --counts {len(a.counts)}")
    a.presses = [x for x in a.presses.split(",") if x]
    bad = [x for x in a.presses if x not in PRESSES]
    if bad:
        p.error(f"--presses: unknown {bad}; available {list(PRESSES)}")
    a.budgets = [float(x) for x in a.budgets.split(",") if x]
    if any(not 0 < b < 1 for b in a.budgets):
        p.error("--budgets must lie in (0, 1) (a press removes a fraction 1 - b)")
    for f in a.reuse:
        if not f.is_file():
            p.error(f"--reuse {f}: no such file")
    return a


def wanted_runs(presses, budgets) -> set:
    """The (policy, budget) runs a sample of this script holds: the full cache and every press at
    every budget."""
    return {("full", 1.0)} | {(f"kvpress:{p}", float(b)) for p in presses for b in budgets}


def reusable(doc: dict, model_name: str, versions: dict, presses, budgets) -> dict:
    """(task, target length, index) -> sample record (with ``made_by``) of an earlier document whose
    runs cover the full cache and every press at every budget; ValueError if the document is not
    this script's, or of another model or kvpress / transformers version."""
    if doc.get("format") != "sglang-depthkv-accuracy" or "peers" not in doc:
        raise ValueError("--reuse: not a document of benchmarks.accuracy.kvpress_peers")
    if doc["model"]["name"] != model_name:
        raise ValueError(f"--reuse: its model is {doc['model']['name']}, this run's {model_name}")
    theirs = {k: doc["peers"][k] for k in versions}
    if theirs != versions:
        raise ValueError(f"--reuse: made with {theirs}, this run has {versions}")
    made_by = dict(versions, prefill=doc["config"].get("prefill", "per-press"))
    want = wanted_runs(presses, budgets)
    out = {}
    for s in doc["samples"]:
        have = {(r["policy"], float(r["budget"])) for r in s["runs"]}
        if want <= have:
            out[(s["task"], int(s["target_tokens"]), int(s["index"]))] = dict(s, made_by=s.get("made_by", made_by))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    check_transformers()
    kvpress = import_kvpress()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.accuracy.sweep import _write, stop_rule, task_samples
    from sglang_depthkv.core.offline_models import offline_model
    from sglang_depthkv.core.tasks import score

    spec = offline_model(args.model)
    path = spec.export_dir()
    if not spec.export_complete(path):
        raise SystemExit(f"{path}: no complete {spec.name} HF export; run `python -m sglang_depthkv export-model "
                         f"{args.model}` in the project's venv first")
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    if getattr(model.config, "head_dim", None) is None:
        # CriticalKV reads config.head_dim, which Qwen2's config leaves out (it is hidden / heads)
        model.config.head_dim = model.config.hidden_size // model.config.num_attention_heads
    stop = stop_rule(tok)
    samples = task_samples(tok, args.tasks, args.lengths, args.counts, args.seed)
    if args.limit is not None:
        samples = samples[: args.limit]

    doc = {"format": "sglang-depthkv-accuracy", "version": 1,
           "command": "python -m benchmarks.accuracy.kvpress_peers " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": {"name": spec.name, "export": path.name, "dtype": "float32",
                     "num_layers": int(model.config.num_hidden_layers)},
           "peers": {"kvpress": getattr(kvpress, "__version__", "0.5.5"), "transformers": transformers.__version__,
                     "labels": {k: LABELS[k] for k in args.presses}},
           "config": {"tasks": args.tasks, "lengths": args.lengths, "counts": args.counts, "presses": args.presses,
                      "budgets": args.budgets, "seed": args.seed, "torch_threads": torch.get_num_threads(),
                      "prefill": args.prefill},
           "samples": [], "wall_s": None, "complete": False}
    versions = {k: doc["peers"][k] for k in ("kvpress", "transformers")}
    old = {}  # sample key -> (file name, record)
    if args.reuse:
        import json

        doc["reused"] = {}
        for f in args.reuse:
            for key, rec in reusable(json.loads(f.read_text()), spec.name, versions, args.presses, args.budgets).items():
                old.setdefault(key, (f.name, rec))
            doc["reused"].setdefault(f.name, 0)
    t_start = time.time()
    L = int(model.config.num_hidden_layers)
    for si, s in enumerate(samples):
        ids = tok(s.prompt, add_special_tokens=False, return_tensors="pt").input_ids[0]
        n = int(ids.shape[0])
        rec = s.to_dict() | {"n_tokens": n, "runs": []}
        src, prev = old.get((s.task, int(s.target_tokens), int(s.index)), (None, None))
        if prev is not None and prev["answers"] == rec["answers"] and prev["n_tokens"] == n:
            keep = wanted_runs(args.presses, args.budgets)
            rec = dict(prev, runs=[r for r in prev["runs"] if (r["policy"], float(r["budget"])) in keep])
            doc["samples"].append(rec)
            doc["reused"][src] += 1
            _write(args.out, doc)
            print(f"[{si + 1}/{len(samples)}] {s.task} {n} tok: reused from {src}", flush=True)
            continue
        rec["made_by"] = dict(versions, prefill=args.prefill)
        t0 = time.time()
        runs = [("full", 1.0, None)] + [(p, b, make_press(p, b)) for p in args.presses for b in args.budgets]
        if args.prefill == "shared":
            outs = shared_press_runs(model, ids, runs, s.max_new_tokens, stop)
        else:
            outs = [press_greedy(model, ids, press, s.max_new_tokens, stop) for _name, _b, press in runs]
        for (name, b, press), (out, kept) in zip(runs, outs):
            text = tok.decode(out, skip_special_tokens=True)
            rec["runs"].append({"policy": "full" if press is None else f"kvpress:{name}", "budget": b, "output": text,
                                "score": score(s, text), "tokens": out, "cache_fraction": round(kept / (L * n), 4)})
        rec["wall_s"] = round(time.time() - t0, 1)
        doc["samples"].append(rec)
        doc["wall_s"] = round(time.time() - t_start, 1)
        _write(args.out, doc)
        print(f"[{si + 1}/{len(samples)}] {s.task} {n} tok: {rec['wall_s']}s, full={rec['runs'][0]['score']:.2f}, "
              f"mean press={sum(r['score'] for r in rec['runs'][1:]) / max(1, len(rec['runs']) - 1):.2f}", flush=True)
    doc["complete"] = True
    doc["wall_s"] = round(time.time() - t_start, 1)
    _write(args.out, doc)
    print(f"done: {len(samples)} samples in {doc['wall_s']}s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
