"""SGLang's real Engine with ``attention_backend="triton"`` (Triton interpreted on CPU, subprocess)
over per-layer pruned KV: the same checks as the torch_native ``test_reference_equivalence.py``
(its assertions are called here, not copied), on a smaller set of runs of the tiny Llama:

- SnapKV 0.4 (+ a radix hit on its pruned prompt), LaProx 0.3 with decode-time pruning every 4
  steps, KVzip gates 0.5 (keys + attention inputs) with decode-time pruning every 6 steps: per-layer
  kept-token sets identical to the HF reference path, greedy tokens identical for 32 decode steps,
  chosen-token log-probs within 2e-3, decode-time pruning events equal to the reference's; a batch
  of 4 requests of lengths 40 / 57 / 23 / 9 (9: not pruned);
- ``kv_policy="full"`` on triton gives exactly vanilla SGLang's triton tokens (same batch).

KVzip and ``full`` run with ``graph_buffers/sitecustomize.py`` on ``PYTHONPATH`` (a test-side
start-up patch): their decode batches read through the CUDA-graph buffers (bound per batch size,
refilled in place, writes through the prepared write slots), and KVzip's decode steps
are recorded in the CUDA-graph ring (``decode_ring.DecodeRing``: queries and attention inputs
written at the rows bound before the step) with every pruning event run before the next step
(``backends/graph_decode.py``): the dump says each event came from the ring, and LaProx's (eager
decode) from the Python lists. No graph is captured on CPU. All triton runs use
``triton_attention_num_kv_splits=2`` (interpreter time; the split-K path with empty trailing splits
on pruned layers is still taken)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import test_reference_equivalence as torch_native_eq  # noqa: E402  (helpers and assertions reused)

GRAPH_BUFFERS_ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(HERE / "graph_buffers"),
                                                                 os.environ.get("PYTHONPATH")) if p)}

PROMPTS, HIT_SUFFIX = torch_native_eq.PROMPTS, torch_native_eq.HIT_SUFFIX
STEPS = torch_native_eq.STEPS
TRITON = {"attention_backend": "triton", "triton_attention_num_kv_splits": 2, "log_level": "info"}
# name, arch, policy, budget, extra engine kwargs (same shape as torch_native_eq.RUNS)
RUNS = [
    ("llama-snapkv", "llama", "snapkv", 0.4, {}),
    ("llama-laprox-decode", "llama", "laprox", 0.3, {"kv_decode_interval": 4}),
]
GRAPH_BUFFER_RUNS = [("llama-kvzip-decode", "llama", "kvzip", 0.5, {"kv_decode_interval": 6})]
TRITON_LOG = "sglang-depthkv: attention backend DepthKVTritonAttnBackend"
RING_LOG = "sglang-depthkv: decode-time pruning through the CUDA-graph ring"


def _start(spec, env_extra=None):
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1", TRITON_INTERPRET="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, str(HERE / "e2e_runs.py"), json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _stop(proc):
    if proc.poll() is None:  # its own session: the Engine's scheduler / detokenizer go with it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _collect(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        out, err = proc.communicate()
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert lines, f"no RESULT line (rc {proc.returncode})\n{out[-3000:]}\n{err[-6000:]}"
    res = {r["name"]: r for r in json.loads(lines[-1][len("RESULT "):])}
    for name, r in res.items():
        assert "error" not in r, f"{name}: {r.get('error_type')}: {r.get('error')}\n{r.get('traceback', '')}"
    return res, err


def _batch(name):
    return [{"rid": f"{name}-{k}", "ids": p} for k, p in PROMPTS.items()]


def _pruning_run(name, model, policy, budget, extra, files):
    kw = {"kv_policy": policy, "kv_budget": budget, "kv_sinks": torch_native_eq.SINKS,
          "kv_window": torch_native_eq.WINDOW, **TRITON, **extra}
    if policy == "kvzip":
        kw["kv_gates"] = files["gates"]
    batches = [_batch(name)]
    if name == "llama-snapkv":
        batches.append([{"rid": f"{name}-hit", "ids": PROMPTS["a"] + HIT_SUFFIX}])
    return {"name": name, "model": model, "engine_kwargs": kw, "batches": batches, "max_new_tokens": STEPS}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiny_models import save_tiny_model

    from sglang_depthkv.core.reference import ReferenceModel, load_hf_model

    root = tmp_path_factory.mktemp("triton")
    model = str(save_tiny_model(root / "llama", "llama", seed=0))
    ref = ReferenceModel(load_hf_model(model))
    files = {"profile": torch_native_eq.write_profile(root / "profile.json", ref.identity),
             "gates": torch_native_eq.write_gates(root / "gates.safetensors", ref.identity, seed=7)}
    eager = {"runs": [_pruning_run(*r[:1], model, *r[2:], files) for r in RUNS]}
    graph = {"runs": [_pruning_run(*r[:1], model, *r[2:], files) for r in GRAPH_BUFFER_RUNS] + [
        {"name": "llama-full", "model": model, "engine_kwargs": {"kv_policy": "full", **TRITON},
         "batches": [_batch("llama-full")], "max_new_tokens": STEPS},
        {"name": "llama-vanilla", "model": model, "engine_kwargs": dict(TRITON),
         "batches": [_batch("llama-vanilla")], "max_new_tokens": STEPS},
    ]}
    # two Engine subprocesses side by side (one scheduler core each; the env differs)
    procs = [_start(eager), _start(graph, GRAPH_BUFFERS_ENV)]
    try:
        (res, log), (res_g, log_g) = [_collect(p, 1200) for p in procs]
    finally:
        for p in procs:
            _stop(p)
    res.update(res_g)
    return dict(res=res, refs={"llama": ref}, files={"llama": files}, logs=(log, log_g))


def test_triton_backend_really_ran(setup):
    log, log_g = setup["logs"]
    assert log.count(TRITON_LOG) == len(RUNS)
    assert log_g.count(TRITON_LOG) == len(GRAPH_BUFFER_RUNS) + 1  # + full; vanilla: no plugin
    assert "DepthKVTorchNativeAttnBackend" not in log + log_g
    assert "Failed to apply hooks" not in log + log_g
    assert RING_LOG not in log and log_g.count(RING_LOG) == 1  # kvzip-decode: queries + attention inputs
    assert "queries + attention inputs" in log_g


def test_decode_events_came_from_the_ring(setup):
    """Graph-buffer decode: every decode-time pruning event was rebuilt from the ring; eager: lists."""
    graph = {r[0] for r in GRAPH_BUFFER_RUNS}
    for name, _, _, _, extra in RUNS + GRAPH_BUFFER_RUNS:
        rows = [r for r in setup["res"][name]["keep"] if r.get("event") == "decode"]
        assert bool(rows) == bool(extra.get("kv_decode_interval")), name
        assert {r["source"] for r in rows} <= {"ring" if name in graph else "lists"}, name


@pytest.mark.parametrize("name, arch, policy, budget, extra", RUNS + GRAPH_BUFFER_RUNS,
                         ids=[r[0] for r in RUNS + GRAPH_BUFFER_RUNS])
def test_keep_sets_and_tokens_equal_reference(setup, name, arch, policy, budget, extra):
    torch_native_eq.test_keep_sets_and_tokens_equal_reference(setup, name, arch, policy, budget, extra)


def test_radix_hit_on_pruned_prefix(setup):
    torch_native_eq.test_radix_hit_on_pruned_prefix(setup)


def test_full_equals_vanilla_triton(setup):
    """``kv_policy="full"`` through the per-layer streams (graph buffers) vs SGLang's own triton backend."""
    full, vanilla = setup["res"]["llama-full"]["batches"][0], setup["res"]["llama-vanilla"]["batches"][0]
    for key in PROMPTS:
        a, b = full[f"llama-full-{key}"], vanilla[f"llama-vanilla-{key}"]
        assert len(a["tokens"]) == STEPS and a["tokens"] == b["tokens"], key
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 1e-5, key
    assert setup["res"]["llama-full"]["keep"] == []  # nothing pruned, nothing dumped
