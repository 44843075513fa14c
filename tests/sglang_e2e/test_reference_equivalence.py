"""SGLang's real Engine (torch_native, CPU, subprocess) with ``kv_policy=P, kv_budget=b`` vs the HF
reference path (``core.reference``) with ``make_policy(P, b)``: per-layer kept-token sets identical
(read back through ``SGLANG_DEPTHKV_DUMP_KEEP``), greedy tokens identical for 32 decode steps, and
the chosen tokens' log-probabilities within 2e-3 — for StreamingLLM, SnapKV, pyramid, LaProx global,
DepthKV (profile written here) and KVzip gates (gate file constructed here), on tiny random Llama
(all six) and Qwen3 (SnapKV, KVzip), batched requests of different lengths (one too short to be
pruned), decode-time pruning (``kv_decode_interval``: every pruning event's dropped positions equal the
reference's ``DecodePruner`` events), and a radix hit on a pruned prefix (the hit request's own suffix is too short to prune:
reference = extension of the pruned cache).

Chunked prefill (``CHUNKED``, chunks of 16 tokens): the earlier chunks enter the radix tree as in
vanilla SGLang, and the final chunk prunes the whole prompt, equal to the reference's unchunked
decision (``sglang/chunk_ownership.py``)."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.engine

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from e2e_runs import run_spec  # noqa: E402

STEPS = 32
SINKS, WINDOW = 2, 8
LOGPROB_TOL = 2e-3
# distinct first tokens: no radix sharing inside a batch; lengths 40 / 57 / 23 prune, 9 does not
PROMPTS = {
    "a": [(7 * i + 3) % 500 + 1 for i in range(40)],
    "b": [(11 * i + 100) % 500 + 2 for i in range(57)],
    "c": [(13 * i + 250) % 500 + 3 for i in range(23)],
    "d": [(5 * i + 400) % 500 + 4 for i in range(9)],
}
HIT_SUFFIX = [17, 33, 61, 5, 9]  # a + suffix: radix hit on a's pruned prompt, own segment 5 <= sinks + window

RUNS = [  # name, arch, policy, budget, extra engine kwargs
    ("llama-streamingllm", "llama", "streamingllm", 0.4, {}),
    ("llama-snapkv", "llama", "snapkv", 0.4, {}),
    ("llama-pyramid", "llama", "pyramid", 0.4, {}),
    ("llama-laprox", "llama", "laprox", 0.3, {}),
    ("llama-depthkv", "llama", "depthkv", 0.4, {}),
    ("llama-kvzip", "llama", "kvzip", 0.4, {}),
    ("qwen3-snapkv", "qwen3", "snapkv", 0.3, {}),
    ("qwen3-kvzip-decode", "qwen3", "kvzip", 0.5, {"kv_decode_interval": 6}),
    ("llama-snapkv-decode", "llama", "snapkv", 0.4, {"kv_decode_interval": 4}),
]
CHUNKED = [("llama-snapkv-chunked", "llama", "snapkv", 0.4, {"chunked_prefill_size": 16}),
           ("llama-kvzip-chunked", "llama", "kvzip", 0.4, {"chunked_prefill_size": 16}),  # stashed attention inputs
           ("qwen3-laprox-chunked", "qwen3", "laprox", 0.3, {"chunked_prefill_size": 16})]


def write_profile(path, identity):
    from sglang_depthkv.core.profile import SensitivityProfile, save_profile

    sens = [[0.2 + 0.7 * ((3 * l) % 4), 0.05 * (l + 1), 0.0] for l in range(identity.num_layers)]
    return str(save_profile(SensitivityProfile(identity, "snapkv", [0.25, 0.5, 1.0], sens), path))


def write_gates(path, identity, seed):
    from sglang_depthkv.core.gates import FeatureSpec, KVzipGates, save_gates

    spec = FeatureSpec(use_key=True, use_hidden=True, head_dim=identity.head_dim, hidden_size=identity.hidden_size)
    g = torch.Generator().manual_seed(seed)
    w = 3.0 * torch.randn(identity.num_layers, identity.num_key_value_heads, spec.dim, generator=g)
    b = 0.1 * torch.randn(identity.num_layers, identity.num_key_value_heads, generator=g)
    return str(save_gates(KVzipGates(identity, spec, w, b, training={"constructed": "test"}), path))


def tiny_models_refs_files(root):
    """The tiny Llama (seed 0) and Qwen3 (seed 1) saved under ``root``, their HF reference models, and
    a profile and gate file for each: ``(models, refs, files)`` keyed by architecture."""
    from tiny_models import save_tiny_model

    from sglang_depthkv.core.reference import ReferenceModel, load_hf_model

    models = {"llama": str(save_tiny_model(root / "llama", "llama", seed=0)),
              "qwen3": str(save_tiny_model(root / "qwen3", "qwen3", seed=1))}
    refs = {a: ReferenceModel(load_hf_model(p)) for a, p in models.items()}
    files = {a: {"profile": write_profile(root / f"{a}-profile.json", ref.identity),
                 "gates": write_gates(root / f"{a}-gates.safetensors", ref.identity, seed=7)}
             for a, ref in refs.items()}
    return models, refs, files


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    models, refs, files = tiny_models_refs_files(tmp_path_factory.mktemp("e2e"))
    spec = {"runs": []}
    for name, arch, policy, budget, extra in RUNS + CHUNKED:
        kw = {"kv_policy": policy, "kv_budget": budget, "kv_sinks": SINKS, "kv_window": WINDOW, **extra}
        if policy == "depthkv":
            kw["kv_profile"] = files[arch]["profile"]
        if policy == "kvzip":
            kw["kv_gates"] = files[arch]["gates"]
        batches = [[{"rid": f"{name}-{k}", "ids": p} for k, p in PROMPTS.items()]]
        if name == "llama-snapkv":
            batches.append([{"rid": f"{name}-hit", "ids": PROMPTS["a"] + HIT_SUFFIX}])
        spec["runs"].append({"name": name, "model": models[arch], "engine_kwargs": kw, "batches": batches,
                             "max_new_tokens": STEPS})
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    res, _ = run_spec(spec, env, timeout=900)
    return dict(res=res, refs=refs, files=files)


def reference_policy(setup, arch, policy, budget):
    from sglang_depthkv.core.gates import load_gates
    from sglang_depthkv.core.policy import make_policy
    from sglang_depthkv.core.profile import load_profile

    ident = setup["refs"][arch].identity
    return make_policy(policy, budget, profile=load_profile(setup["files"][arch]["profile"], ident),
                       gates=load_gates(setup["files"][arch]["gates"], ident), sinks=SINKS, window=WINDOW)


def reference_run(ref, pol, ids, decode_interval=0):
    pre = ref.prefill(torch.tensor(ids), window=WINDOW)
    keep = ref.select(pre, pol)
    out = ref.decode(pre, keep, STEPS, policy=pol if decode_interval else None, decode_interval=decode_interval)
    logprobs = torch.log_softmax(out.logits.double(), dim=-1)
    chosen = [float(logprobs[i, t]) for i, t in enumerate(out.tokens.tolist())]
    return keep, out.tokens.tolist(), chosen, out.events


def kept_by_layer(dump, rid):
    rows = sorted((r for r in dump if r["rid"] == rid), key=lambda r: r["layer"])
    return [r for r in rows if r.get("event") != "decode"]


def decode_events(dump, rid):
    """{fed G: [dropped positions per layer]} from the decode-time pruning dump rows."""
    ev = {}
    for r in dump:
        if r["rid"] == rid and r.get("event") == "decode":
            ev.setdefault(r["fed"], {})[r["layer"]] = r["dropped"]
            assert r["freed"] == len(r["dropped"])
    return {g: [d[l] for l in sorted(d)] for g, d in ev.items()}


@pytest.mark.parametrize("name, arch, policy, budget, extra", RUNS, ids=[r[0] for r in RUNS])
def test_keep_sets_and_tokens_equal_reference(setup, name, arch, policy, budget, extra):
    r = setup["res"][name]
    ref = setup["refs"][arch]
    pol = reference_policy(setup, arch, policy, budget)
    got = r["batches"][0]
    pruned_somewhere = False
    for key, ids in PROMPTS.items():
        rid = f"{name}-{key}"
        interval = extra.get("kv_decode_interval", 0)
        keep, tokens, chosen, events = reference_run(ref, pol, ids, interval)
        rows = kept_by_layer(r["keep"], rid)
        assert [x["layer"] for x in rows] == list(range(ref.num_layers)), f"{rid}: dump rows {len(rows)}"
        for l, row in enumerate(rows):
            assert row["own_lo"] == 0 and row["seq_len"] == len(ids)
            assert row["kept"] == keep[l].tolist(), f"{rid} layer {l}: kept sets differ"
            assert row["freed"] == len(ids) - len(keep[l])
        pruned_somewhere |= any(row["pruned"] for row in rows)
        assert rows[0]["pruned"] == pol.prunes(len(ids)), rid
        if interval:
            ref_events = {g: [d.tolist() for d in dropped] for g, dropped in events}
            assert len(ref_events) >= 3 and any(any(d) for e in ref_events.values() for d in e)
            got_events = decode_events(r["keep"], rid)
            # SGLang's overlap loop launches one more decode step before it sees the request finished
            # (its output is dropped): it may feed token STEPS and prune once more; the reference feeds STEPS-1
            assert set(got_events) - set(ref_events) <= {STEPS}
            got_events.pop(STEPS, None)
            assert got_events == ref_events, f"{rid}: decode-time pruning events differ"
        else:
            assert not decode_events(r["keep"], rid)
        assert got[rid]["tokens"] == tokens, f"{rid}: greedy tokens differ"
        diff = max(abs(a - b) for a, b in zip(got[rid]["logprobs"], chosen))
        assert diff <= LOGPROB_TOL, f"{rid}: chosen-token log-probs differ by {diff}"
    assert pruned_somewhere


@pytest.mark.parametrize("name, arch, policy, budget, extra", CHUNKED, ids=[r[0] for r in CHUNKED])
def test_chunked_prefill_equals_unchunked_reference(setup, name, arch, policy, budget, extra):
    """Chunked prefill (chunk budget 16 tokens per batch, so every prompt but the shortest is split and
    its earlier chunks enter the radix tree before the last one runs): at its final chunk each request
    prunes its whole own prompt (``sglang/chunk_ownership.py``), so the per-layer kept sets, greedy
    tokens and log-probs equal the HF reference's single unchunked prefill of the same prompt."""
    r = setup["res"][name]
    ref = setup["refs"][arch]
    pol = reference_policy(setup, arch, policy, budget)
    got = r["batches"][0]
    split = pruned = 0
    for key, ids in PROMPTS.items():
        rid = f"{name}-{key}"
        keep, tokens, chosen, _ = reference_run(ref, pol, ids)
        rows = kept_by_layer(r["keep"], rid)
        assert [x["layer"] for x in rows] == list(range(ref.num_layers)), f"{rid}: dump rows {len(rows)}"
        for l, row in enumerate(rows):
            assert row["own_lo"] == 0 and row["seq_len"] == len(ids), (rid, row["own_lo"])
            assert row["kept"] == keep[l].tolist(), f"{rid} layer {l}: kept sets differ"
            assert row["freed"] == len(ids) - len(keep[l])
        assert rows[0]["pruned"] == pol.prunes(len(ids)), rid
        pruned += rows[0]["pruned"]
        split += len(ids) > 16
        assert got[rid]["tokens"] == tokens, f"{rid}: greedy tokens differ"
        diff = max(abs(a - b) for a, b in zip(got[rid]["logprobs"], chosen))
        assert diff <= LOGPROB_TOL, f"{rid}: chosen-token log-probs differ by {diff}"
    assert split >= 3 and pruned >= 3


def test_pruning_changes_the_answer(setup):
    """The comparison has teeth: at these budgets pruning changes some greedy tokens vs full attention."""
    ref = setup["refs"]["llama"]
    changed = 0
    for name in ("llama-snapkv", "llama-laprox", "llama-streamingllm"):
        got = setup["res"][name]["batches"][0]
        for key, ids in PROMPTS.items():
            _, full_tokens, _, _ = reference_run(ref, reference_policy(setup, "llama", "full", 1.0), ids)
            changed += got[f"{name}-{key}"]["tokens"] != full_tokens
    assert changed >= 1


def test_radix_hit_on_pruned_prefix(setup):
    """``a + suffix`` after ``a`` finished: SGLang reuses ``a``'s pruned prompt (cached_tokens == len(a));
    the suffix is prefilled over the per-layer pruned prefix, exactly the reference's extension of
    ``a``'s pruned cache; the own segment (5 tokens) is not pruned."""
    name = "llama-snapkv"
    r = setup["res"][name]
    hit = r["batches"][1][f"{name}-hit"]
    assert hit["cached_tokens"] == len(PROMPTS["a"])
    rows = kept_by_layer(r["keep"], f"{name}-hit")
    assert len(rows) == 4 and all(row["own_lo"] == len(PROMPTS["a"]) and not row["pruned"] for row in rows)
    ref = setup["refs"]["llama"]
    pol = reference_policy(setup, "llama", "snapkv", 0.4)
    pre = ref.prefill(torch.tensor(PROMPTS["a"]), window=WINDOW)
    keep = ref.select(pre, pol)
    out = ref.decode(pre, keep, STEPS, extend_ids=torch.tensor(HIT_SUFFIX))
    assert hit["tokens"] == out.tokens.tolist()
    logprobs = torch.log_softmax(out.logits.double(), dim=-1)
    chosen = [float(logprobs[i, t]) for i, t in enumerate(out.tokens.tolist())]
    assert max(abs(a - b) for a, b in zip(hit["logprobs"], chosen)) <= LOGPROB_TOL
