"""SGLang's real Engine on CPU with several ranks under ``--kv-policy`` (subprocess, torch_native,
gloo): the checks of ``test_reference_equivalence.py`` (its assertions are called here, not copied),
per rank.

- ``tp_size=2`` on the tiny Llama / Qwen3 (4 query heads, 2 kv heads: one kv head and two query heads
  per rank): each rank scores only its heads (LaProx with its ``o_proj`` slice, KVzip with its slice
  of the gates) and the scores are summed over the ranks before selection. Each rank's per-layer
  kept sets equal the single-rank HF reference over every head, the two ranks' dumps are identical,
  and greedy tokens / log-probs / decode-time pruning events equal the reference's.
- ``dp_size=2``: two independent schedulers, each with its own pool and radix tree; the batch's
  requests are answered by both ranks, each request's kept sets equal the reference's.

Every rank prints its own capacity table (``tp=R/2`` / ``dp=D/2`` in its heading) and runs the
per-layer idle invariant checks (``SGLANG_DEPTHKV_INVARIANT_LOG``: every line ok, one writer per
scheduler process); SGLang's ``/server_info`` reports the plugin's state for each DP rank. SGLang's CPU engine needs ``SGLANG_CPU_OMP_THREADS_BIND`` (one core per TP rank)
when ``tp_size`` exceeds the NUMA nodes; the TP runs set it."""

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import test_reference_equivalence as torch_native_eq  # noqa: E402  (helpers and assertions reused)
from e2e_runs import run_spec  # noqa: E402

TP_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}
TP_RUNS = [  # name, arch, policy, budget, extra engine kwargs
    ("tp2-llama-laprox", "llama", "laprox", 0.3, {"tp_size": 2}),
    ("tp2-llama-kvzip-decode", "llama", "kvzip", 0.5, {"tp_size": 2, "kv_decode_interval": 6}),
    ("tp2-qwen3-depthkv", "qwen3", "depthkv", 0.4, {"tp_size": 2}),
]
DP_RUNS = [("dp2-llama-snapkv", "llama", "snapkv", 0.4, {"dp_size": 2})]


def _run(name, arch, policy, budget, extra, models, files, env):
    kw = {"kv_policy": policy, "kv_budget": budget, "kv_sinks": torch_native_eq.SINKS,
          "kv_window": torch_native_eq.WINDOW, "log_level": "info", **extra}
    if policy == "depthkv":
        kw["kv_profile"] = files[arch]["profile"]
    if policy == "kvzip":
        kw["kv_gates"] = files[arch]["gates"]
    return {"name": name, "model": models[arch], "engine_kwargs": kw, "env": env,
            "batches": [[{"rid": f"{name}-{k}", "ids": p} for k, p in torch_native_eq.PROMPTS.items()]],
            "max_new_tokens": torch_native_eq.STEPS}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    models, refs, files = torch_native_eq.tiny_models_refs_files(root)
    spec = {"runs": [_run(*r, models, files, TP_ENV) for r in TP_RUNS] +
                    [_run(*r, models, files, {}) for r in DP_RUNS]}
    inv_log = root / "invariants.jsonl"
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1", SGLANG_DEPTHKV_INVARIANT_LOG=str(inv_log))
    res, log = run_spec(spec, env, timeout=1200)
    invariants = [json.loads(l) for l in inv_log.read_text().splitlines()] if inv_log.exists() else []
    return dict(res=res, refs=refs, files=files, log=log, invariants=invariants)


def rank_view(setup, name, key, rank):
    """``setup`` with run ``name``'s dump cut to the rows of one rank (``key``: tp_rank / dp_rank)."""
    r = setup["res"][name]
    return {**setup, "res": {name: {**r, "keep": [row for row in r["keep"] if row[key] == rank]}}}


@pytest.mark.parametrize("name, arch, policy, budget, extra", TP_RUNS, ids=[r[0] for r in TP_RUNS])
def test_tensor_parallel_ranks_keep_what_one_rank_keeps(setup, name, arch, policy, budget, extra):
    keep = setup["res"][name]["keep"]
    assert {row["tp_rank"] for row in keep} == {0, 1}
    by_rank = [[{k: v for k, v in row.items() if k != "tp_rank"} for row in keep if row["tp_rank"] == r]
               for r in (0, 1)]
    key = lambda row: (row["rid"], row.get("event", ""), row.get("fed", 0), row["layer"])  # noqa: E731
    assert sorted(by_rank[0], key=key) == sorted(by_rank[1], key=key), "the ranks kept different tokens"
    torch_native_eq.test_keep_sets_and_tokens_equal_reference(rank_view(setup, name, "tp_rank", 0), name, arch,
                                                              policy, budget, extra)


@pytest.mark.parametrize("name, arch, policy, budget, extra", DP_RUNS, ids=[r[0] for r in DP_RUNS])
def test_data_parallel_ranks_each_keep_what_the_reference_keeps(setup, name, arch, policy, budget, extra):
    keep = setup["res"][name]["keep"]
    served = {}
    for row in keep:
        served.setdefault(row["rid"], set()).add(row["dp_rank"])
    assert all(len(ranks) == 1 for ranks in served.values()), served  # one rank per request
    assert set().union(*served.values()) == {0, 1}, "both data-parallel ranks answered requests"
    torch_native_eq.test_keep_sets_and_tokens_equal_reference(setup, name, arch, policy, budget, extra)


def test_every_rank_prints_its_capacity_table(setup):
    log = setup["log"]
    for label, runs in (("tp=0/2", TP_RUNS), ("tp=1/2", TP_RUNS), ("dp=0/2", DP_RUNS), ("dp=1/2", DP_RUNS)):
        assert log.count(f"tokens/layer {label}\n") == len(runs), label


def test_every_rank_ran_the_idle_invariant_checks(setup):
    idle = [r for r in setup["invariants"] if r["kind"] == "idle"]
    assert idle and all(r["ok"] for r in setup["invariants"]), [r["violations"] for r in setup["invariants"]]
    assert len({r["pid"] for r in idle}) >= 2 * (len(TP_RUNS) + len(DP_RUNS))  # one scheduler process per rank


def test_server_info_reports_each_data_parallel_rank(setup):
    """SGLang's ``/server_info`` (``Engine.get_server_info``): one internal state per DP rank, each with
    the plugin's settings, per-layer capacities, logical capacity and request-length cap."""
    for name, _, policy, budget, extra in TP_RUNS + DP_RUNS:
        states = setup["res"][name]["server_info"]
        dp = extra.get("dp_size", 1)
        assert len(states) == dp and all(s is not None for s in states), name
        assert sorted(s["dp_rank"] or 0 for s in states) == list(range(dp)), name
        for s in states:
            assert s["settings"]["policy"] == policy and s["settings"]["budget"] == budget
            assert s["tp_size"] == extra.get("tp_size", 1) and s["dp_size"] == dp
            caps = s["layer_capacities"]
            assert len(caps) == len(s["layer_fractions"]) == 4 and max(caps) <= s["logical_capacity"]
            assert s["max_req_len"] == min(min(caps) - 1, s["context_len"] - 1, s["logical_capacity"] - 1)
