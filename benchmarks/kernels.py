"""GPU benchmark of the ragged per-layer KV kernels and of one layer's token scoring.

Prints, per kernel and per length (default 4k..128k tokens) x 32 layers x 8 kv heads x 128 dim
(bf16): median time (``triton.testing.do_bench``), achieved GB/s or TFLOP/s, and the fraction of
the device peak measured in the same run (device-to-device copy bandwidth via ``Tensor.copy_``;
for scoring, the time of one layer's full causal prefill attention of the same length via torch
SDPA). Goals: index building >= 80% of copy bandwidth at >= 32k tokens; one layer's SnapKV / LaProx
scores (the chunked torch scorers the serving path runs) <= 5% of the full prefill attention. (Pruning itself has no kernel: the per-layer pool frees a pruned
token's slot in place, so there is no compaction pass to measure.)

    python benchmarks/kernels.py --out benchmarks/results/kernels-<device>.md --json ...json

Needs CUDA (``--help`` and the formatting functions work on CPU; tests/kernels/test_bench_format.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional


@dataclass
class BenchRow:
    kernel: str
    tokens: int
    time_ms: float
    achieved: float  # in `unit`
    unit: str  # "GB/s" or "TFLOP/s"
    fraction: float  # of the measured reference (copy bandwidth, or prefill-attention time ratio)
    reference: str  # what `fraction` is relative to
    goal: str  # e.g. ">= 0.80" / "<= 0.05"
    meets_goal: Optional[bool]  # None when the goal does not apply at this size


def goal_check(kernel: str, tokens: int, fraction: float):
    """(goal text, met?) for a row; the bandwidth goal applies from 32k tokens on."""
    if kernel.endswith("scores (1 layer)"):
        return "<= 0.05", fraction <= 0.05
    if tokens >= 32768:
        return ">= 0.80", fraction >= 0.80
    return ">= 0.80 (from 32k)", None


def make_row(kernel, tokens, time_ms, achieved, unit, fraction, reference) -> BenchRow:
    goal, ok = goal_check(kernel, tokens, fraction)
    return BenchRow(kernel, tokens, float(time_ms), float(achieved), unit, float(fraction), reference, goal, ok)


def format_table(rows: List[BenchRow], device: str, copy_gbps: float, config: dict) -> str:
    """Markdown table with a header naming the device and the measured copy bandwidth."""
    lines = [
        f"# Kernel benchmark on {device}",
        "",
        f"Measured device-to-device copy bandwidth: {copy_gbps:.1f} GB/s (read + write bytes / time).",
        "Config: " + ", ".join(f"{k}={v}" for k, v in config.items()),
        "",
        "| kernel | tokens | time (ms) | achieved | fraction | of | goal | met |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        met = "-" if r.meets_goal is None else ("yes" if r.meets_goal else "NO")
        lines.append(
            f"| {r.kernel} | {r.tokens} | {r.time_ms:.4f} | {r.achieved:.1f} {r.unit} | {r.fraction:.3f} | "
            f"{r.reference} | {r.goal} | {met} |"
        )
    return "\n".join(lines) + "\n"


def to_json(rows: List[BenchRow], device: str, copy_gbps: float, config: dict) -> str:
    return json.dumps({"device": device, "copy_gbps": copy_gbps, "config": config,
                       "rows": [asdict(r) for r in rows]}, indent=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4096,8192,16384,32768,65536,131072", help="comma-separated token counts")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=32, help="observation window (queries) for the scorers")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of tokens kept per layer")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--kernels", default="index_streams,snapkv_scores,laprox_scores")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------- GPU part
def _bench(fn):
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure_copy_gbps(torch, device, nbytes=2 << 30) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _batch(torch, n, L, keep, device, gen):
    """One request of n tokens, logical ids 1..n (identity), random kept positions per layer."""
    req_to_token = torch.arange(1, n + 1, dtype=torch.int32, device=device)[None, :].contiguous()
    rpi = torch.zeros(1, dtype=torch.int64, device=device)
    seq_lens = torch.tensor([n], dtype=torch.int32, device=device)
    k = max(1, int(keep * n))
    pos = torch.stack([torch.randperm(n, generator=gen, device="cpu")[:k].sort().values for _ in range(L)])
    return req_to_token, rpi, seq_lens, k, pos


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    from sglang_depthkv.core.scorers.laprox import LaProxScorer
    from sglang_depthkv.core.scorers.snapkv import SnapKVScorer
    from sglang_depthkv.core.types import LayerObservation
    from sglang_depthkv.kernels import build_kv_indices

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    L, H, D, QH, W = args.layers, args.kv_heads, args.head_dim, args.q_heads, args.window
    config = dict(layers=L, kv_heads=H, q_heads=QH, head_dim=D, window=W, keep=args.keep, dtype="bf16",
                  torch=torch.__version__)
    copy_gbps = measure_copy_gbps(torch, dev)
    print(f"device: {name}; copy bandwidth {copy_gbps:.1f} GB/s", flush=True)
    kernels = set(args.kernels.split(","))
    rows: List[BenchRow] = []
    gen = torch.Generator().manual_seed(0)
    for n in [int(s) for s in args.sizes.split(",")]:
        r2t, rpi, seq_lens, k, pos = _batch(torch, n, L, args.keep, dev, gen)
        if "index_streams" in kernels:
            mapping = torch.zeros((L, n + 2), dtype=torch.int32, device=dev)
            for l in range(L):
                mapping[l, pos[l].to(dev).long() + 1] = torch.arange(1, k + 1, dtype=torch.int32, device=dev)
            kept = torch.full((L, 1), k, dtype=torch.int32, device=dev)
            oi = torch.empty((L, 2), dtype=torch.int32, device=dev)
            ox = torch.empty((L, n), dtype=torch.int32, device=dev)
            for mode, kl in (("host lens", kept), ("device lens", None)):
                fn = lambda kl=kl: build_kv_indices(mapping, r2t, rpi, seq_lens, kept_lens=kl, out_indptr=oi,
                                                    out_indices=ox, validate=False)
                ms = _bench(fn)
                nbytes = L * (n * 4 * 2 + k * 4) * (1 if kl is not None else 2)
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.append(make_row(f"index_streams ({mode})", n, ms, gbps, "GB/s", gbps / copy_gbps, "copy bandwidth"))
        if "snapkv_scores" in kernels or "laprox_scores" in kernels:
            keys = torch.randn((H, n, D), device=dev, dtype=torch.bfloat16)
            values = torch.randn((H, n, D), device=dev, dtype=torch.bfloat16)
            q = torch.randn((QH, W, D), device=dev, dtype=torch.bfloat16)
            w_o = torch.randn((QH * D, QH * D), device=dev, dtype=torch.bfloat16) * 0.02
            obs = LayerObservation(layer=0, keys=keys, values=values, window_queries=q, scaling=D ** -0.5,
                                   o_proj_weight=w_o)
            qf = torch.randn((1, QH, n, D), device=dev, dtype=torch.bfloat16)
            kf = keys[None].repeat_interleave(QH // H, dim=1)
            vf = values[None].repeat_interleave(QH // H, dim=1)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            prefill_ms = _bench(lambda: sdpa(qf, kf, vf, is_causal=True))
            del qf, kf, vf
            flops = 2 * 2 * W * QH * n * D
            for name, scorer, extra in (("snapkv_scores", SnapKVScorer(), 0),
                                        ("laprox_scores", LaProxScorer(), 2 * n * QH * (QH // H) * (D * D + W))):
                if name in kernels:
                    ms = _bench(lambda scorer=scorer: scorer.score(obs))
                    rows.append(make_row(f"{name} (1 layer)", n, ms, (flops + extra) / (ms * 1e-3) / 1e12, "TFLOP/s",
                                         ms / prefill_ms, "prefill attention time"))
            del keys, values
        torch.cuda.empty_cache()
        for r in rows:
            if r.tokens == n:
                print(f"{r.kernel:32s} n={n:7d} {r.time_ms:9.4f} ms {r.achieved:9.1f} {r.unit} frac={r.fraction:.3f}",
                      flush=True)
    table = format_table(rows, name, copy_gbps, config)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(rows, name, copy_gbps, config))
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
