"""Accuracy sweep: RULER-style tasks on a packaged real model (``--model``: SmolLM2-135M-Instruct or
Qwen2.5-Coder-0.5B-Instruct; real weights, CPU, float32).

One prefill per sample is shared by every (policy, budget): the full-cache prefill
(:func:`sglang_depthkv.core.sdpa_prefill.sdpa_prefill`, same FullPrefill as the reference path)
gives every layer's observations; each policy selects per-layer keep sets from them
(``make_policy(name, budget, profile=, gates=)``), and the answer is decoded greedily over the
pruned cache, all (policy, budget) runs of a sample batched together
(:mod:`benchmarks.accuracy.batched_decode`: each run attends over its own pruned cache, positions
continuing at the original length; same tokens as ``ReferenceModel.decode`` run by run). Decoding stops at ``<|im_end|>``, at a blank line, or at the
task's ``max_new_tokens``. The first answer token comes from the prefill's logits for every policy.

Results are rewritten to ``--out`` after every sample, so a cut-off run keeps what it measured.

    python -m benchmarks.accuracy.sweep --profile benchmarks/results/smollm2_profile.json \
        --gates benchmarks/results/smollm2_gates.safetensors --out benchmarks/results/accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

POLICIES = ("snapkv", "pyramid", "depthkv", "laprox", "kvzip", "streamingllm", "depthkv_laprox")
BUDGETS = (0.1, 0.2, 0.3, 0.5)
LABELS = {
    "full": "full cache", "snapkv": "uniform SnapKV", "pyramid": "pyramid (SnapKV)",
    "depthkv": "DepthKV + SnapKV", "laprox": "LaProx global", "kvzip": "KVzip gates",
    "streamingllm": "StreamingLLM", "depthkv_laprox": "DepthKV + LaProx",
}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.sweep", description=__doc__.split("\n\n")[0])
    from sglang_depthkv.core.offline_models import OFFLINE_MODELS

    p.add_argument("--model", default="smollm2", choices=tuple(OFFLINE_MODELS))
    p.add_argument("--tasks", default="passkey,multikey,multivalue,vartrack")
    p.add_argument("--lengths", default="2048,4096,8000", help="target prompt lengths in tokens")
    p.add_argument("--counts", default="3,2,1", help="samples per task at each length")
    p.add_argument("--policies", default=",".join(POLICIES[:-1]),
                   help=f"comma-separated, from {','.join(POLICIES)} (depthkv_laprox: DepthKV budgets from "
                        "--laprox-profile, a profile calibrated with --scorer laprox, scoring with LaProx)")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--profile", type=Path, help="DepthKV profile JSON (needed for depthkv)")
    p.add_argument("--gates", type=Path, help="KVzip gate file (needed for kvzip)")
    p.add_argument("--laprox-profile", type=Path, help="DepthKV profile calibrated with LaProx (needed for depthkv_laprox)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy.json"))
    p.add_argument("--dump-keep", type=Path, default=None,
                   help="append every pruned run's per-layer kept positions here (JSON lines; the server-accuracy check)")
    a = p.parse_args(argv)
    from sglang_depthkv.core.tasks import TASKS

    a.tasks = [t for t in a.tasks.split(",") if t]
    bad = [t for t in a.tasks if t not in TASKS]
    if bad:
        p.error(f"--tasks: unknown {bad}; available {list(TASKS)}")
    a.lengths, a.counts = _ints(a.lengths), _ints(a.counts)
    if len(a.lengths) != len(a.counts):
        p.error(f"--lengths has {len(a.lengths)} entries, --counts {len(a.counts)}")
    if any(n < 256 or n > 8100 for n in a.lengths):
        p.error("--lengths must lie in [256, 8100] (SmolLM2's context is 8192 incl. the answer; the sweep's "
                "haystacks are sized for both models up to there)")
    a.policies = [x for x in a.policies.split(",") if x]
    bad = [x for x in a.policies if x not in POLICIES]
    if bad:
        p.error(f"--policies: unknown {bad}; available {list(POLICIES)}")
    a.budgets = _floats(a.budgets)
    if any(not 0 < b <= 1 for b in a.budgets):
        p.error("--budgets must lie in (0, 1]")
    if "depthkv" in a.policies and (a.profile is None or not a.profile.is_file()):
        p.error(f"depthkv needs --profile (a calibrated profile file), got {a.profile}")
    if "depthkv_laprox" in a.policies and (a.laprox_profile is None or not a.laprox_profile.is_file()):
        p.error(f"depthkv_laprox needs --laprox-profile (a profile calibrated with --scorer laprox), "
                f"got {a.laprox_profile}")
    if "kvzip" in a.policies and (a.gates is None or not a.gates.is_file()):
        p.error(f"kvzip needs --gates (a trained gate file), got {a.gates}")
    return a


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def stop_ids_of(tok) -> set:
    return {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}


def stop_rule(tok):
    """``done(tokens) -> bool``: end of turn, or a blank line after the answer (the sweep's decode stop;
    ``benchmarks/serving_accuracy.py`` cuts the server's tokens with the same rule)."""
    stop_ids = stop_ids_of(tok)

    def stop(tokens) -> bool:
        return tokens[-1] in stop_ids or "\n\n" in tok.decode(tokens)
    return stop


def _dump_keep(path: Path, index: int, sample, runs, keeps) -> None:
    """One JSON line per pruned (policy, budget) run of a sample: ``kept`` = per layer ascending positions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for (name, b), keep in zip(runs, keeps):
            if keep is not None:
                f.write(json.dumps({"sample": index, "task": sample.task, "target_tokens": sample.target_tokens,
                                    "index": sample.index, "policy": name, "budget": b,
                                    "kept": [k.tolist() for k in keep]}) + "\n")


def load_reference(model_name: str, seed: int):
    """(model spec, tokenizer, ReferenceModel) of a packaged model, torch seeded with ``seed``."""
    from sglang_depthkv.core.offline_models import offline_model
    from sglang_depthkv.core.reference import ReferenceModel

    torch.manual_seed(seed)
    spec = offline_model(model_name)
    model, tok = spec.load()
    return spec, tok, ReferenceModel(model, name=spec.name)


def task_samples(tok, tasks, lengths, counts, seed: int):
    """The sweep's samples: ``core.tasks.make_samples`` over the Austen haystack, in the model's chat
    template."""
    from sglang_depthkv.core.gguf_model import chat_prompt
    from sglang_depthkv.core.haystack import HAYSTACK_NOVELS, haystack_text
    from sglang_depthkv.core.tasks import make_samples

    return make_samples(tasks, dict(zip(lengths, counts)), tokenizer=tok, haystack=haystack_text(HAYSTACK_NOVELS),
                        chat=lambda u: chat_prompt(tok, u), seed=seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    from sglang_depthkv.core.haystack import HAYSTACK_NOVELS
    from sglang_depthkv.core.policy import make_policy
    from sglang_depthkv.core.sdpa_prefill import sdpa_prefill
    from sglang_depthkv.core.tasks import score

    from .batched_decode import batched_greedy

    spec, tok, ref = load_reference(args.model, args.seed)
    profiles = {}
    from sglang_depthkv.core.profile import load_profile

    if "depthkv" in args.policies:
        profiles["depthkv"] = load_profile(args.profile, expected=ref.identity)
    if "depthkv_laprox" in args.policies:
        profiles["depthkv_laprox"] = load_profile(args.laprox_profile, expected=ref.identity)
        if profiles["depthkv_laprox"].scorer != "laprox":
            raise SystemExit(f"--laprox-profile {args.laprox_profile} was calibrated with "
                             f"{profiles['depthkv_laprox'].scorer!r}, not laprox")
    gates = None
    if "kvzip" in args.policies:
        from sglang_depthkv.core.gates import load_gates

        gates = load_gates(args.gates, expected=ref.identity)
    policies = {(name, b): make_policy("depthkv" if name == "depthkv_laprox" else name, b, profile=profiles.get(name),
                                       gates=gates, sinks=args.sinks, window=args.window)
                for name in args.policies for b in args.budgets}
    stop = stop_rule(tok)
    samples = task_samples(tok, args.tasks, args.lengths, args.counts, args.seed)
    doc = {
        "format": "sglang-depthkv-accuracy", "version": 1,
        "command": "python -m benchmarks.accuracy.sweep " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": {"name": spec.name, "gguf": spec.gguf_name, "sha256": spec.sha256, "dtype": "float32",
                  "num_layers": ref.num_layers},
        "config": {"tasks": args.tasks, "lengths": args.lengths, "counts": args.counts, "policies": args.policies,
                   "budgets": args.budgets, "seed": args.seed, "sinks": args.sinks, "window": args.window,
                   "profile": str(args.profile) if args.profile else None,
                   "laprox_profile": str(args.laprox_profile) if args.laprox_profile else None,
                   "gates": str(args.gates) if args.gates else None, "haystack": list(HAYSTACK_NOVELS),
                   "torch_threads": torch.get_num_threads()},
        "samples": [], "wall_s": None, "complete": False,
    }
    for si, s in enumerate(samples):
        ids = tok(s.prompt, add_special_tokens=False, return_tensors="pt").input_ids[0]
        t0 = time.time()
        pf = sdpa_prefill(ref, ids, window=args.window)
        rec = s.to_dict() | {"n_tokens": int(ids.shape[0]), "prefill_s": round(time.time() - t0, 2), "runs": []}
        runs = [("full", 1.0, None)] + [(name, b, policies[(name, b)]) for name in args.policies for b in args.budgets]
        keeps, select_s = [], []
        for name, b, pol in runs:
            t1 = time.time()
            keeps.append(None if pol is None else ref.select(pf, pol))
            select_s.append(round(time.time() - t1, 3))
        t2 = time.time()
        outs, kept = batched_greedy(ref, pf, keeps, s.max_new_tokens, done=stop)
        rec["decode_s"] = round(time.time() - t2, 2)
        for (name, b, _), out, kp, ss in zip(runs, outs, kept, select_s):
            text = tok.decode(out, skip_special_tokens=True)
            rec["runs"].append({"policy": name, "budget": b, "output": text, "score": score(s, text),
                                "tokens": [int(t) for t in out], "kept": kp, "select_s": ss})
        if args.dump_keep is not None:
            _dump_keep(args.dump_keep, si, s, [(name, b) for name, b, _ in runs], keeps)
        del pf
        doc["samples"].append(rec)
        doc["wall_s"] = round(time.time() - t_start, 1)
        _write(args.out, doc)
        full = rec["runs"][0]
        print(f"[{si + 1}/{len(samples)}] {s.task} {rec['n_tokens']} tok: prefill {rec['prefill_s']}s, "
              f"select {sum(select_s):.1f}s, decode {rec['decode_s']}s, "
              f"full={full['score']:.2f} {full['output']!r}, "
              f"mean pruned={sum(r['score'] for r in rec['runs'][1:]) / max(1, len(rec['runs']) - 1):.2f}, "
              f"elapsed {doc['wall_s']}s", flush=True)
    doc["complete"] = True
    doc["wall_s"] = round(time.time() - t_start, 1)
    _write(args.out, doc)
    print(f"done: {len(samples)} samples in {doc['wall_s']}s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
