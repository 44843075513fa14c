"""Accuracy through the server: SmolLM2-135M-Instruct (real weights) served by SGLang on CPU, the
accuracy sweep's RULER-style tasks sent as HTTP requests to vanilla SGLang and to one plugin server
per (policy, budget), compared with the HF reference path on exactly the same samples.

    python -m benchmarks.serving_accuracy --lengths 2048,4096 --counts 2,1 \\
        --out benchmarks/results/serving_accuracy.json

Reference: the accuracy sweep itself (``python -m benchmarks.accuracy.sweep``, run here as a
subprocess on the same tasks / lengths / counts / seed / sinks / window / profile / gates), which
also dumps its per-layer kept positions (``--dump-keep``) and answer tokens. Server side, the same
samples (``tasks.make_samples``, same tokenizer, checked against the sweep's token counts) are sent
as ``input_ids`` one at a time, greedy, ``max_new_tokens`` = the task's, stop ids = the sweep's;
the answer tokens are cut with the sweep's own stop rule (``sweep.stop_rule``) and scored with
``tasks.score``. The plugin's kept sets are read back through ``SGLANG_DEPTHKV_DUMP_KEEP``.

Equivalence settings (what makes server == reference the same algorithm):
- ``--dtype float32`` (the reference's dtype), ``--attention-backend torch_native``;
- ``--chunked-prefill-size`` >= the longest prompt: every prompt in one prefill, as the reference
  (a chunked prompt is pruned whole at its final chunk too, ``sglang/chunk_ownership.py``, but one
  prefill keeps the float32 arithmetic closest to the reference's);
- ``--disable-radix-cache`` (default; ``--radix-cache`` keeps it): the prompts share their chat
  template head, which a later request would find in the tree, tree-owned and not re-pruned, and
  it would spend its budget on its own segment only;
- ``--kv-sinks`` / ``--kv-window`` = the sweep's (4 / 32), ``input_ids`` from the same tokenizer.

Writes ``--out`` (JSON, rewritten after every server, so a cut-off run keeps what it measured), and
next to it ``<stem>.md`` and ``<stem>.png`` (:mod:`benchmarks.serving_accuracy_report`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks.shown_paths import ROOT, shown

POLICIES = ("snapkv", "pyramid", "depthkv", "laprox", "kvzip", "streamingllm")
BUDGETS = (0.5, 0.3, 0.1)
DEFAULT_PROFILE = ROOT / "benchmarks" / "results" / "smollm2_profile.json"
DEFAULT_GATES = ROOT / "benchmarks" / "results" / "smollm2_gates.safetensors"
VANILLA = "vanilla"


def _ints(flag: str, s: str) -> List[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag}: expected comma-separated integers, got {s!r}") from None


def _floats(flag: str, s: str) -> List[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag}: expected comma-separated numbers, got {s!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="passkey,multikey,multivalue,vartrack")
    p.add_argument("--lengths", default="2048,4096", help="target prompt lengths in tokens")
    p.add_argument("--counts", default="2,1", help="samples per task at each length")
    p.add_argument("--policies", default=",".join(POLICIES), help="plugin policies ('' = none)")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--no-vanilla", action="store_true", help="skip the vanilla SGLang server")
    p.add_argument("--radix-cache", action="store_true",
                   help="keep SGLang's radix cache on (default off: a shared chat-template head would be a "
                        "tree-owned, never re-pruned prefix and the server would no longer match the reference)")
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="DepthKV profile (depthkv)")
    p.add_argument("--gates", type=Path, default=DEFAULT_GATES, help="KVzip gate file (kvzip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving_accuracy.json")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="reference result, kept-set dumps and server logs (default: a temporary directory, "
                        "removed at the end)")
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--start-timeout", type=float, default=600.0)
    a = p.parse_args(argv)
    from sglang_depthkv.core.tasks import TASKS

    try:
        a.lengths, a.counts = _ints("--lengths", a.lengths), _ints("--counts", a.counts)
        a.budgets = _floats("--budgets", a.budgets)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    a.tasks = [t for t in a.tasks.split(",") if t]
    if not a.tasks or any(t not in TASKS for t in a.tasks):
        p.error(f"--tasks: unknown {[t for t in a.tasks if t not in TASKS] or '(none given)'}; available {list(TASKS)}")
    if not a.lengths or len(a.lengths) != len(a.counts):
        p.error(f"--lengths has {len(a.lengths)} entries, --counts {len(a.counts)} (need the same number, >= 1)")
    if any(n < 256 or n > 8100 for n in a.lengths):
        p.error(f"--lengths must lie in [256, 8100] (SmolLM2's context is 8192 incl. the answer), got {a.lengths}")
    if any(c < 1 for c in a.counts):
        p.error(f"--counts must be >= 1, got {a.counts}")
    a.policies = [x for x in a.policies.split(",") if x]
    bad = [x for x in a.policies if x not in POLICIES]
    if bad:
        p.error(f"--policies: unknown {bad}; available {list(POLICIES)}")
    if a.policies and (not a.budgets or any(not 0 < b < 1 for b in a.budgets)):
        p.error(f"--budgets must be numbers in (0, 1) (budget 1 prunes nothing), got {a.budgets}")
    if not a.policies and a.no_vanilla:
        p.error("nothing to serve: no --policies and --no-vanilla")
    if "depthkv" in a.policies and not a.profile.is_file():
        p.error(f"--profile: depthkv needs a calibrated profile file, {a.profile} does not exist")
    if "kvzip" in a.policies and not a.gates.is_file():
        p.error(f"--gates: kvzip needs a trained gate file, {a.gates} does not exist")
    if a.sinks < 0 or a.window < 0:
        p.error(f"--sinks / --window must be >= 0, got {a.sinks} / {a.window}")
    return a


# --- configurations ---------------------------------------------------------------------------------
def configurations(args) -> List[tuple]:
    """(policy, budget) per server: vanilla first (budget 1.0), then every policy x budget."""
    out = [] if args.no_vanilla else [(VANILLA, 1.0)]
    return out + [(p, b) for p in args.policies for b in args.budgets]


def server_flags(policy: str, budget: float, args, max_prompt: int, max_new: int) -> List[str]:
    """SGLang flags of one server. ``--chunked-prefill-size`` covers the longest prompt (no chunking)."""
    chunk = -(-max_prompt // 256) * 256
    flags = ["--dtype", "float32", "--attention-backend", "torch_native", "--skip-tokenizer-init",
             "--max-total-tokens", str(chunk + max_new + 256), "--chunked-prefill-size", str(chunk),
             "--max-prefill-tokens", str(max(chunk, 16384)), "--max-running-requests", "4", "--log-level", "warning"]
    if not args.radix_cache:
        flags.append("--disable-radix-cache")
    if policy == VANILLA:
        return flags
    flags += ["--kv-policy", policy, "--kv-budget", str(budget), "--kv-sinks", str(args.sinks),
              "--kv-window", str(args.window)]
    if policy == "depthkv":
        flags += ["--kv-profile", shown(args.profile)]
    if policy == "kvzip":
        flags += ["--kv-gates", shown(args.gates)]
    return flags


# --- reference (the accuracy sweep) -----------------------------------------------------------------
def run_reference(args, work: Path) -> tuple:
    """Runs the accuracy sweep on the same configuration; returns (sweep JSON, keep dump path)."""
    out, dump = work / "reference.json", work / "reference_keep.jsonl"
    for f in (out, dump):
        if f.exists():
            f.unlink()
    cmd = [sys.executable, "-m", "benchmarks.accuracy.sweep", "--tasks", ",".join(args.tasks),
           "--lengths", ",".join(map(str, args.lengths)), "--counts", ",".join(map(str, args.counts)),
           "--policies", ",".join(args.policies), "--budgets", ",".join(map(str, args.budgets or [0.5])),
           "--seed", str(args.seed), "--sinks", str(args.sinks), "--window", str(args.window),
           "--out", str(out), "--dump-keep", str(dump)]
    if "depthkv" in args.policies:
        cmd += ["--profile", shown(args.profile)]
    if "kvzip" in args.policies:
        cmd += ["--gates", shown(args.gates)]
    print("reference: " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (work / "reference.log").write_text(proc.stdout)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"reference sweep failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}")
    doc = json.loads(out.read_text())
    if not doc.get("complete"):
        raise RuntimeError(f"reference sweep {out} is incomplete")
    return doc, dump


def reference_keeps(dump: Path, policy: str, budget: float) -> Dict[int, List[List[int]]]:
    """{sample index: per-layer kept positions} of one (policy, budget) from the sweep's dump."""
    out = {}
    with open(dump) as f:
        for line in f:
            r = json.loads(line)
            if r["policy"] == policy and abs(float(r["budget"]) - budget) < 1e-9:
                out[int(r["sample"])] = r["kept"]
    return out


def server_keeps(dump: Path) -> Dict[str, List[List[int]]]:
    """{rid: per-layer kept positions} of the end-of-prefill pruning rows of a server's dump."""
    rows: Dict[str, Dict[int, List[int]]] = {}
    if dump.exists():
        with open(dump) as f:
            for line in f:
                r = json.loads(line)
                if r.get("event") == "decode":
                    continue
                if r["own_lo"] != 0:
                    raise RuntimeError(f"request {r['rid']} pruned from position {r['own_lo']}, not 0: a cached prefix "
                                       "or a chunked prefill; the server is not run as the reference")
                rows.setdefault(r["rid"], {})[int(r["layer"])] = r["kept"]
    return {rid: [d[l] for l in sorted(d)] for rid, d in rows.items()}


def keep_agreement(server: List[List[int]], ref: List[List[int]]) -> dict:
    """Per-layer kept sets: fraction of layers identical, mean Jaccard, tokens kept by one side only."""
    if len(server) != len(ref):
        raise RuntimeError(f"server kept sets for {len(server)} layers, reference {len(ref)}")
    equal, jac, diff = 0, 0.0, 0
    for s, r in zip(server, ref):
        a, b = set(s), set(r)
        equal += a == b
        jac += len(a & b) / max(1, len(a | b))
        diff += len(a ^ b)
    n = len(ref)
    return {"layers_equal": equal / n, "jaccard": jac / n, "sym_diff": diff}


def token_agreement(a: List[int], b: List[int]) -> float:
    """Common-prefix length over the longer answer (1.0 = identical greedy answers)."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k / max(1, len(a), len(b))


def cut(tokens: List[int], done) -> List[int]:
    for i in range(len(tokens)):
        if done(tokens[: i + 1]):
            return tokens[: i + 1]
    return list(tokens)


# --- one server ---------------------------------------------------------------------------------------
def serve_one(model_dir: Path, policy: str, budget: float, args, samples, prompts, ref_doc, ref_dump, tok,
              work: Path, log_dir: Path) -> tuple:
    from benchmarks.accuracy.sweep import stop_ids_of, stop_rule
    from sglang_depthkv.core.tasks import score
    from benchmarks.server import SGLangServer

    from sglang_depthkv.sglang.pruning import DUMP_ENV

    tag = f"{policy}-{budget:g}"
    dump = work / f"server-{tag}.keep.jsonl"
    if dump.exists():
        dump.unlink()
    max_new = max(s.max_new_tokens for s in samples)
    flags = server_flags(policy, budget, args, max(len(p) for p in prompts), max_new)
    done, stop_ids = stop_rule(tok), sorted(stop_ids_of(tok))
    ref_policy = "full" if policy == VANILLA else policy
    out, t0 = [], time.time()
    env = {} if policy == VANILLA else {DUMP_ENV: str(dump)}
    with SGLangServer(model_dir, flags, log_path=log_dir / f"server-{tag}.log", env=env,
                      start_timeout=args.start_timeout, cwd=ROOT) as srv:
        start_s = time.time() - t0
        for si, (s, ids) in enumerate(zip(samples, prompts)):
            rid = f"{tag}-{s.task}-{s.target_tokens}-{s.index}"
            t1 = time.time()
            r = srv.generate({"input_ids": ids, "rid": rid, "sampling_params": {
                "temperature": 0.0, "max_new_tokens": s.max_new_tokens, "stop_token_ids": stop_ids}},
                timeout=args.request_timeout)
            toks = cut([int(t) for t in r["output_ids"]], done)
            text = tok.decode(toks, skip_special_tokens=True)
            ref_run = next(x for x in ref_doc["samples"][si]["runs"]
                           if x["policy"] == ref_policy and abs(float(x["budget"]) - (1.0 if policy == VANILLA else budget)) < 1e-9)
            out.append({"policy": policy, "budget": budget, "rid": rid, "sample": si, "task": s.task,
                        "target_tokens": s.target_tokens, "index": s.index, "n_tokens": len(ids),
                        "prompt_tokens": r["meta_info"].get("prompt_tokens"),
                        "cached_tokens": r["meta_info"].get("cached_tokens"),
                        "output": text, "tokens": toks, "score": score(s, text),
                        "reference_output": ref_run["output"], "reference_tokens": ref_run["tokens"],
                        "reference_score": ref_run["score"],
                        "token_agreement": token_agreement(toks, ref_run["tokens"]),
                        "request_s": round(time.time() - t1, 2)})
            print(f"  [{tag}] {s.task} {len(ids)} tok: server {out[-1]['score']:.2f} {text!r} | reference "
                  f"{ref_run['score']:.2f} {ref_run['output']!r} ({out[-1]['request_s']} s)", flush=True)
    if policy != VANILLA:
        got, want = server_keeps(dump), reference_keeps(ref_dump, policy, budget)
        for rec in out:
            if rec["sample"] in want:
                if rec["rid"] not in got:
                    raise RuntimeError(f"{rec['rid']}: the reference pruned this prompt, the server dumped no kept sets")
                rec["keep"] = keep_agreement(got[rec["rid"]], want[rec["sample"]])
                rec["kept_server"] = [len(k) for k in got[rec["rid"]]]
        dump.unlink(missing_ok=True)
    return out, {"policy": policy, "budget": budget, "flags": flags, "start_s": round(start_s, 1),
                 "wall_s": round(time.time() - t0, 1)}


# --- the run --------------------------------------------------------------------------------------------
def device_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import sglang

    return {"cpu": cpu, "cores": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
            "cuda": bool(torch.cuda.is_available()), "torch": torch.__version__, "sglang": sglang.__version__,
            "python": platform.python_version()}


def code_version() -> dict:
    def git(*a):
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    from transformers import AutoTokenizer

    from sglang_depthkv.core.tasks import make_samples
    from benchmarks.serving_accuracy_report import records, write_report
    from sglang_depthkv.core.haystack import HAYSTACK_NOVELS, haystack_text
    from sglang_depthkv.core.smollm2 import GGUF_SHA256, MODEL_NAME, chat_prompt, export_hf_dir

    own_work = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="serving-accuracy-")) if own_work else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    log_dir = work / "logs"
    try:
        model_dir = export_hf_dir()
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        ref_doc, ref_dump = run_reference(args, work)
        samples = make_samples(args.tasks, dict(zip(args.lengths, args.counts)), tokenizer=tok,
                               haystack=haystack_text(HAYSTACK_NOVELS), chat=lambda u: chat_prompt(tok, u),
                               seed=args.seed)
        prompts = [tok(s.prompt, add_special_tokens=False).input_ids for s in samples]
        if len(samples) != len(ref_doc["samples"]):
            raise RuntimeError(f"{len(samples)} samples here, {len(ref_doc['samples'])} in the reference")
        for s, ids, r in zip(samples, prompts, ref_doc["samples"]):
            if (s.task, s.target_tokens, s.index, len(ids)) != (r["task"], r["target_tokens"], r["index"], r["n_tokens"]):
                raise RuntimeError(f"sample {s.task}/{s.target_tokens}/{s.index} ({len(ids)} tokens) is not the "
                                   f"reference's {r['task']}/{r['target_tokens']}/{r['index']} ({r['n_tokens']} tokens)")
        doc = {
            "format": "sglang-depthkv-serving-accuracy", "version": 1,
            "command": "python -m benchmarks.serving_accuracy " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": device_info(), "code": code_version(),
            "model": {"name": MODEL_NAME, "sha256": GGUF_SHA256, "dtype": "float32", "path": str(model_dir)},
            "config": {"tasks": args.tasks, "lengths": args.lengths, "counts": args.counts, "policies": args.policies,
                       "budgets": args.budgets, "vanilla": not args.no_vanilla, "radix_cache": args.radix_cache,
                       "seed": args.seed, "sinks": args.sinks, "window": args.window,
                       "profile": shown(args.profile) if "depthkv" in args.policies else None,
                       "gates": shown(args.gates) if "kvzip" in args.policies else None},
            "reference": {"command": ref_doc["command"], "wall_s": ref_doc["wall_s"]},
            "samples": [s.to_dict() | {"n_tokens": len(ids)} for s, ids in zip(samples, prompts)],
            "servers": [], "requests": [], "records": [], "wall_s": None, "complete": False,
        }
        print(f"reference: {len(samples)} samples in {ref_doc['wall_s']} s", flush=True)
        for policy, budget in configurations(args):
            reqs, info = serve_one(model_dir, policy, budget, args, samples, prompts, ref_doc, ref_dump, tok, work,
                                   log_dir)
            doc["requests"] += reqs
            doc["servers"].append(info)
            doc["records"] = records(doc["requests"])
            doc["wall_s"] = round(time.time() - t_start, 1)
            _write(args.out, doc)
            print(f"{policy} {budget:g}: server {sum(r['score'] for r in reqs) / len(reqs):.3f}, reference "
                  f"{sum(r['reference_score'] for r in reqs) / len(reqs):.3f} ({info['wall_s']} s); "
                  f"elapsed {doc['wall_s']} s", flush=True)
        doc["complete"] = True
        doc["wall_s"] = round(time.time() - t_start, 1)
        _write(args.out, doc)
        print(write_report(doc, args.out))
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
