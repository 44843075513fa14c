"""Host time of one whole decode step through SGLang's real Engine, vanilla vs the plugin, on a tiny
model with Llama-3.1-8B's layer count (32 layers; hidden 128, 4 query / 2 kv heads, so the CPU's
own compute is small), batch 64, ``attention_backend="triton"`` (the plugin's CUDA backend), eager
decode (no graphs on CPU). During decode the Triton kernels are launched but their interpreted
bodies skipped (``step_patch/sitecustomize.py``): what is left is the host work of a step
(scheduler, batch preparation, allocation, the model's torch ops, attention metadata, the plugin's
per-layer swaps and writes). The step time is the median interval between the starts of
consecutive decode forwards of the full batch.

    python -m benchmarks.hot_path.decode_step     # prints one JSON line per side and the ratio
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BATCH, PROMPT, NEW_TOKENS, LAYERS = 64, 24, 48, 32


def engine_kwargs(plugin: bool) -> dict:
    kw = dict(device="cpu", skip_tokenizer_init=True, disable_cuda_graph=True, dtype="float32",
              attention_backend="triton", triton_attention_num_kv_splits=2, max_total_tokens=16384,
              max_running_requests=BATCH, chunked_prefill_size=4096, mem_fraction_static=0.3, log_level="error")
    if plugin:
        kw.update(kv_policy="snapkv", kv_budget=0.5, kv_window=4, kv_sinks=2)
    return kw


def run_side(model: str, plugin: bool, log: str) -> None:
    """In the subprocess: one Engine, one batch of ``BATCH`` requests, greedy ``NEW_TOKENS`` tokens."""
    import sglang

    eng = sglang.Engine(model_path=model, **engine_kwargs(plugin))
    try:
        ids = [[(7 * b + 3 * t) % 500 + 1 for t in range(PROMPT)] for b in range(BATCH)]
        eng.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                                     "ignore_eos": True})
    finally:
        eng.shutdown()


def step_ms(log: str) -> float:
    times = [float(x) for x in Path(log).read_text().split()]
    deltas = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    if len(deltas) < 8:
        raise RuntimeError(f"only {len(deltas)} full-batch decode steps were timed")
    return statistics.median(deltas[2:])  # the first steps warm caches


def measure(model: str, plugin: bool, timeout: int = 1200) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "steps.txt")
        env = dict(os.environ, HOT_PATH_STEP_LOG=log, HOT_PATH_BATCH=str(BATCH), SGLANG_DEPTHKV_CHECKS="0",
                   PYTHONPATH=os.pathsep.join(p for p in (str(HERE / "step_patch"), str(ROOT),
                                                          os.environ.get("PYTHONPATH")) if p))
        cmd = [sys.executable, "-m", "benchmarks.hot_path.decode_step", "--side", "plugin" if plugin else "vanilla",
               "--model", model, "--log", log]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
        if proc.returncode != 0:
            raise RuntimeError(f"decode-step run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        return step_ms(log)


def tiny_model(root: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny_model

    return str(save_tiny_model(root / "llama32", "llama", seed=0, num_hidden_layers=LAYERS))


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=("vanilla", "plugin"))
    ap.add_argument("--model")
    ap.add_argument("--log")
    ap.add_argument("--repeats", type=int, default=2, help="Engine runs per side, alternating (median taken)")
    args = ap.parse_args(argv)
    if args.side:
        run_side(args.model, args.side == "plugin", args.log)
        return 0
    print(json.dumps(engine_record(args.repeats)))
    return 0


def engine_record(repeats: int = 2) -> dict:
    """Both sides ``repeats`` times, alternating; the median step time of each side."""
    runs = {"vanilla": [], "plugin": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp))
        for _ in range(repeats):
            runs["vanilla"].append(measure(model, False))
            runs["plugin"].append(measure(model, True))
    vanilla, plugin = statistics.median(runs["vanilla"]), statistics.median(runs["plugin"])
    return {"path": "decode_step_engine", "layers": LAYERS, "batch": BATCH, "syncs": None, "sync_kinds": {},
            "aten_ops": None, "host_ms": plugin, "vanilla_host_ms": vanilla, "host_ratio_vs_vanilla": plugin / vanilla,
            "runs_ms": runs}


if __name__ == "__main__":
    sys.exit(main())
