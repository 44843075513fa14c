"""``examples/long_document_forks.py`` (an unchanged SGLang frontend program: ``sgl.function``,
``fork``, ``gen``) against a real ``sglang.launch_server`` with SmolLM2-135M-Instruct (real weights,
CPU) and ``--kv-policy depthkv --kv-budget 0.3``.

Checks: every fork answered; every fork's request found the document prefix in the radix tree
(``meta_info.cached_tokens`` >= the document prefill's length minus a few tokens of tokenization
boundary); and that prefix is the pruned one, pruned exactly once: the kept-set dump
(``SGLANG_DEPTHKV_DUMP_KEEP``) holds one end-of-prefill decision over positions ``[0, D)`` (the
frontend's prefix commit, D = its length), which keeps about budget x D tokens per layer on average
(DepthKV's water-filling on the profile, recomputed here by the core allocator), and every fork's
decision starts at ``own_lo`` = its cached length (>= D - margin): no position of the prefix is
ever pruned again. The server chunks the prefix (``--chunked-prefill-size 1024``): its earlier chunks
enter the radix tree before the last one runs, and the one decision still covers ``[0, D)``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "benchmarks" / "results" / "smollm2_profile.json"
BUDGET, SINKS, WINDOW = 0.3, 4, 32
CHUNK = 1024  # splits the ~2.2k-token shared prefix into 3 chunks: pruned whole at its final chunk (chunk_ownership)
MARGIN = 4  # tokens at the document / question boundary that may tokenize differently
WARMUP_TOKENS = 64  # the server's own warm-up request at start-up is a few tokens long


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from benchmarks.server import SGLangServer

    from sglang_depthkv.core.smollm2 import export_hf_dir
    from sglang_depthkv.sglang.pruning import DUMP_ENV

    tmp = tmp_path_factory.mktemp("frontend")
    dump, out = tmp / "keep.jsonl", tmp / "answers.json"
    model = export_hf_dir()
    # 32768 logical tokens: the smallest DepthKV layer (fraction ~0.05) plus one chunk of headroom holds the
    # whole ~2.2k-token prompt before it is pruned (patches/request_limits.py refuses longer prompts)
    flags = ["--dtype", "float32", "--attention-backend", "torch_native", "--max-total-tokens", "32768",
             "--chunked-prefill-size", str(CHUNK), "--log-level", "warning",
             "--kv-policy", "depthkv", "--kv-budget", str(BUDGET), "--kv-profile", str(PROFILE),
             "--kv-sinks", str(SINKS), "--kv-window", str(WINDOW)]
    with SGLangServer(model, flags, log_path=tmp / "server.log", env={DUMP_ENV: str(dump)},
                      start_timeout=240) as srv:
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "long_document_forks.py"), "--url", srv.url,
                               "--json", str(out)], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 0, f"example failed (rc {proc.returncode})\n{proc.stdout}\n{proc.stderr[-4000:]}" \
                                     f"\n{srv.log_tail()}"
    rows = [json.loads(l) for l in dump.read_text().splitlines() if l.strip()]
    return {"stdout": proc.stdout, "answers": json.loads(out.read_text()), "dump": rows}


def decisions(rows):
    """{rid: (own_lo, seq_len, [kept per layer], [freed per layer])} of the end-of-prefill rows."""
    out = {}
    for r in rows:
        if r.get("event") == "decode":
            continue
        lo, n, kept, freed = out.setdefault(r["rid"], (r["own_lo"], r["seq_len"], {}, {}))
        assert (lo, n) == (r["own_lo"], r["seq_len"])
        kept[r["layer"]], freed[r["layer"]] = r["kept"], r["freed"]
    return {rid: (lo, n, [k[l] for l in sorted(k)], [f[l] for l in sorted(f)]) for rid, (lo, n, k, f) in out.items()}


def test_every_fork_answered(run):
    forks = run["answers"]["forks"]
    assert len(forks) == 3
    for f in forks:
        assert f["completion_tokens"] and f["completion_tokens"] >= 1, f
        assert len(f["answer"]) > len("The pass key is "), f
    assert run["stdout"].count("cached_tokens=") == 3, run["stdout"]


def test_forks_reuse_the_pruned_prefix_pruned_once(run):
    from sglang_depthkv.core.profile import load_profile
    from sglang_depthkv.core.policy import make_policy
    from sglang_depthkv.core.smollm2 import EXPECTED_IDENTITY

    dec = decisions(run["dump"])
    dec = {rid: d for rid, d in dec.items() if d[1] > WARMUP_TOKENS}  # SGLang's start-up warm-up request
    prefix = [(rid, d) for rid, d in dec.items() if d[0] == 0]
    assert len(prefix) == 1, f"expected exactly one decision over the document from position 0, got {len(prefix)}"
    _, (_, D, kept, freed) = prefix[0]
    assert D > 1000  # the document (~2.1k tokens) plus the system turn
    L = EXPECTED_IDENTITY.num_layers
    assert len(kept) == L
    # the prefix was really pruned, with DepthKV's per-layer budgets at 0.3 of the prefix
    pol = make_policy("depthkv", BUDGET, profile=load_profile(PROFILE, EXPECTED_IDENTITY), sinks=SINKS, window=WINDOW)
    counts = pol.allocator.allocate(D, L, BUDGET, SINKS, WINDOW)
    assert [len(k) for k in kept] == [int(c) for c in counts]
    assert freed == [D - len(k) for k in kept]
    assert abs(sum(len(k) for k in kept) / (L * D) - BUDGET) < 0.02
    assert len({len(k) for k in kept}) > 1  # DepthKV: the layers keep different amounts
    # every fork reused that prefix from the radix tree and never re-pruned it
    forks = run["answers"]["forks"]
    for f in forks:
        assert f["cached_tokens"] >= D - MARGIN, (f, D)
        assert f["prompt_tokens"] > D
    others = [d for rid, d in dec.items() if d[0] != 0]
    assert len(others) == len(forks), f"{len(others)} fork decisions for {len(forks)} forks"
    for lo, n, k, _ in others:
        assert D - MARGIN <= lo <= D and n > lo
        assert all(min(kk, default=lo) >= lo for kk in k)  # a fork only ever decides on its own positions
    assert sorted(lo for lo, *_ in others) == sorted(f["cached_tokens"] for f in forks)
