"""Host syncs, aten ops and host time of the plugin's hot paths, at Llama-3.1-8B attention shapes.

    python -m benchmarks.hot_path.run --out benchmarks/results/hot_path.json

Writes ``hot_path.json`` (records ``{path, layers, batch, syncs, sync_kinds, aten_ops, host_ms,
host_ratio_vs_vanilla}``) and ``hot_path.md``. ``host_ms`` / the ratio are given on ``decode_graph``
rows: the host work of one CUDA-graph decode step (the step's ``alloc`` and replay-prep; the graph
body costs the host nothing) of the plugin against vanilla SGLang's (``TokenToKVPoolAllocator.alloc``,
the triton backend's ``kv_indptr`` cumsum, ``create_flashinfer_kv_indices_triton`` and
``get_num_kv_splits_triton``), both with Triton kernel bodies skipped (this CPU interprets them; a
GPU launches them asynchronously), median of repeated steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.hot_path import paths as P
from benchmarks.hot_path import state as S
from benchmarks.hot_path.sync_count import SyncCounter

BATCHES = (1, 16, 64)
PROMPT = 48
TARGETS = {"decode_graph": 0, "decode_eager": 0, "request_finish": 0, "prefill_end": 8, "prefill_end_laprox": 8}


def count_paths(batch: int) -> dict:
    """One run of every path at ``batch``: ``{path: (syncs, kinds, aten_ops)}``."""
    c = SyncCounter()
    with c.tracking(), P.launches_as_ops(c):
        st = S.build_state(batch, PROMPT)
        a = S.add_requests(st, batch, PROMPT)
        P.prefill_end(c, st, a, PROMPT)
        lap = S.add_requests(st, batch, PROMPT, first_token=10 ** 6)
        P.prefill_end(c, st, lap, PROMPT, policy="laprox", path="prefill_end_laprox")
        for r in lap:  # out of the way of the decode paths
            st.alloc.free(st.r2t.req_to_token[r.req_pool_idx, :PROMPT].long())
            st.r2t.free(r)
        st.reqs, st.seq_lens = st.reqs[:batch], st.seq_lens[:batch]
        st.streams.alloc_graph(batch, batch * (PROMPT + 8))
        st.pool.alloc_write_slots(batch)
        splits = torch.empty((S.LAYERS, batch), dtype=torch.int32, device="cpu")
        P.decode_graph(c, st, a, splits)
        P.decode_eager(c, st, a)
        for r in a:
            st.tree.cache_finished_req(r, kv_len_to_handle=int(r.kv_committed_len))
            st.r2t.free(r)
        b = S.add_requests(st, batch, PROMPT)  # the same prompts: finishing frees every id
        for r in b:
            r.kv_committed_len = PROMPT
        P.request_finish(c, st, b)
        P.admission(c, st)
        P.evict(c, st, st.alloc.available_size() + st.tree.evictable_size() // 2)
    return {p: (c.syncs[p], dict(c.sync_kinds.get(p, {})), c.ops[p]) for p in c.syncs}


@contextmanager
def kernel_bodies_skipped():
    from triton.runtime.interpreter import InterpretedFunction

    orig = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *a, **k: None
    try:
        yield
    finally:
        InterpretedFunction.run = orig


def _median_ms(step, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        undo = step()
        times.append((time.perf_counter() - t0) * 1e3)
        undo()
    return statistics.median(times)


def host_ms_plugin(batch: int, reps: int) -> float:
    from sglang_depthkv.kernels.kv_splits import layer_kv_splits

    st = S.build_state(batch, PROMPT)
    reqs = S.add_requests(st, batch, PROMPT)
    st.streams.alloc_graph(batch, batch * (PROMPT + 8))
    st.pool.alloc_write_slots(batch)
    splits = torch.empty((S.LAYERS, batch), dtype=torch.int32)
    rpi = torch.tensor([r.req_pool_idx for r in reqs])
    seq = torch.full((batch,), PROMPT + 1, dtype=torch.int64)

    def step():
        out = st.alloc.alloc(batch)
        st.r2t.req_to_token[rpi, seq - 1] = out.to(torch.int32)
        _, _, kept = st.streams.fill_graph(rpi, seq, batch)
        layer_kv_splits(splits, kept, num_head=S.Q_HEADS, num_kv_head=S.KV_HEADS, max_kv_splits=S.MAX_KV_SPLITS,
                        device_core_count=S.CORES)
        st.pool.fill_write_slots(out, batch)
        return lambda: st.alloc.free(out)

    with kernel_bodies_skipped():
        return _median_ms(step, reps)


def host_ms_vanilla(batch: int, reps: int) -> float:
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton
    from sglang.kernels.ops.kvcache.kv_indices import create_flashinfer_kv_indices_triton
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    size = 2 * batch * (PROMPT + 8) + 64
    pool = MHATokenToKVPool(size, 1, S.DTYPE, S.KV_HEADS, S.HEAD_DIM, 1, "cpu", False)  # buffers unused here
    alloc = TokenToKVPoolAllocator(size, S.DTYPE, "cpu", pool, False)
    r2t = ReqToTokenPool(size=batch + 2, max_context_len=PROMPT + 64, device="cpu", enable_memory_saver=False)
    rpi = torch.arange(1, batch + 1)
    seq = torch.full((batch,), PROMPT + 1, dtype=torch.int64)
    kv_indptr = torch.zeros(batch + 1, dtype=torch.int32)
    kv_indices = torch.zeros(batch * (PROMPT + 8), dtype=torch.int64)
    splits = torch.empty(batch, dtype=torch.int32)

    def step():
        out = alloc.alloc(batch)
        r2t.req_to_token[rpi, seq - 1] = out.to(torch.int32)
        kv_indptr[1:] = torch.cumsum(seq, dim=0)
        create_flashinfer_kv_indices_triton[(batch,)](r2t.req_to_token, rpi, seq, kv_indptr, None, kv_indices,
                                                      r2t.req_to_token.stride(0))
        get_num_kv_splits_triton[(1,)](splits, seq, batch, 1, S.Q_HEADS, S.KV_HEADS, S.MAX_KV_SPLITS, S.CORES,
                                       MAX_NUM_SEQ=256)
        return lambda: alloc.free(out)

    with kernel_bodies_skipped():
        return _median_ms(step, reps)


def markdown(records, command: str) -> str:
    lines = ["# Hot-path host syncs (CPU proxy, Llama-3.1-8B attention shapes)", "",
             f"Command: `{command}`", "",
             "Syncs: ops that make the host wait for a CUDA device (`.item()`/`bool()`, `nonzero`, `unique`, "
             "boolean-mask indexing, blocking device-to-host copies, `.tolist()`), counted under a "
             "`TorchDispatchMode` + `TorchFunctionMode` that follows host vs device tensors "
             "(`benchmarks/hot_path/sync_count.py`). Target: 0 on decode and request finish, <= 8 per prefill "
             "batch.", "",
             "| path | layers | batch | syncs | sync kinds | aten ops | host ms | host / vanilla |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in records:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["sync_kinds"].items())) or "-"
        hm = "" if r["host_ms"] is None else f"{r['host_ms']:.3f}"
        ratio = "" if r["host_ratio_vs_vanilla"] is None else f"{r['host_ratio_vs_vanilla']:.2f}x"
        syncs = "" if r["syncs"] is None else r["syncs"]
        ops = "" if r["aten_ops"] is None else r["aten_ops"]
        lines.append(f"| {r['path']} | {r['layers']} | {r['batch']} | {syncs} | {kinds if syncs != '' else ''} | "
                     f"{ops} | {hm} | {ratio} |")
    lines += ["", "Host ms (decode_graph rows): the host work of one CUDA-graph decode step outside the graph, "
              "plugin (`alloc` on every layer's stack, one index-stream launch pair, one split-K launch, the "
              "write-slot gather) vs "
              "vanilla SGLang (`alloc`, `kv_indptr` cumsum, one index launch, one split-K launch), Triton kernel "
              "bodies skipped, median of repeated steps on this CPU. It is not a whole decode step: the graph "
              "replay, sampling and the scheduler are the same on both sides and are not in either number.",
              "", "decode_step_engine: one whole decode step through SGLang's real Engine (scheduler, batch "
              "preparation, allocation, the model's torch ops, attention metadata, the plugin's per-layer work), "
              "tiny 32-layer Llama, batch 64, triton backend, eager decode, Triton kernel bodies skipped during "
              "decode (`benchmarks/hot_path/decode_step.py`): median interval between decode forwards, median of "
              "the Engine runs per side (plugin: snapkv 0.5, window 4; vanilla: the same flags without "
              "`--kv-*`). Target: <= 1.10x vanilla.",
              "", "Not visible to the counter: a CUDA event wait. The allocator waits for its free-count snapshot "
              "only when an `alloc` or the per-layer eviction top-up (`evict`) needs more than the host's lower "
              "bound while a free is in flight: under memory pressure, at most once per call."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/hot_path.json")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--engine-repeats", type=int, default=2,
                    help="Engine runs per side for the whole-step host time (decode_step.py); 0 skips it")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    records = []
    for bs in (int(x) for x in args.batches.split(",")):
        counts = count_paths(bs)
        host = vanilla = None
        if args.reps:
            host, vanilla = host_ms_plugin(bs, args.reps), host_ms_vanilla(bs, args.reps)
        for path, (syncs, kinds, ops) in counts.items():
            rec = {"path": path, "layers": S.LAYERS, "batch": bs, "syncs": syncs, "sync_kinds": kinds,
                   "aten_ops": ops, "host_ms": None, "host_ratio_vs_vanilla": None}
            if path == "decode_graph" and host is not None:
                rec.update(host_ms=host, vanilla_host_ms=vanilla, host_ratio_vs_vanilla=host / vanilla)
            records.append(rec)
            print(json.dumps(rec), flush=True)
    if args.engine_repeats:
        from benchmarks.hot_path.decode_step import engine_record

        rec = engine_record(args.engine_repeats)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    command = "python -m benchmarks.hot_path.run " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command.strip(), "shapes": {"layers": S.LAYERS, "q_heads": S.Q_HEADS,
                                                                     "kv_heads": S.KV_HEADS, "head_dim": S.HEAD_DIM},
                               "targets": TARGETS, "records": records}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(records, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
