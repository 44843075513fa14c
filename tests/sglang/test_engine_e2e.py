"""SGLang's real Engine on CPU (torch_native attention), in a subprocess: with the plugin at
``kv_policy="full"`` and at budget 1.0 of a pruning policy, greedy tokens equal vanilla SGLang's and
transformers' on a tiny random Llama and Qwen3, single, batched and on a radix hit; without
``kv_policy`` the plugin changes nothing (same tokens, same max_total_num_tokens, no depthkv log)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.engine

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

PROMPTS = [
    [1, 5, 17, 42, 99, 7],
    [3, 4, 5],
    [(7 * i + 3) % 500 + 1 for i in range(41)],
]
NEW = 12
PRESSURE = [[(11 * i + 5 * j) % 500 + 1 for i in range(60)] for j in range(8)]
PRESSURE_NEW = 40


def hf_tokens(model_dir, prompts=PROMPTS, new=NEW):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():  # plain greedy argmax (generate(min_new_tokens=...) would mask EOS; SGLang ignores it)
        for p in prompts:
            ids = list(p)
            for _ in range(new):
                logits = m(torch.tensor([ids])).logits[0, -1]
                ids.append(int(torch.argmax(logits)))
            out.append(ids[len(p):])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("engine")
    llama = str(save_tiny_model(root / "llama", "llama", seed=0))
    qwen3 = str(save_tiny_model(root / "qwen3", "qwen3", seed=1))
    info = {"log_level": "info"}
    spec = {"runs": [
        {"name": "llama-vanilla", "model": llama, "engine_kwargs": info},
        {"name": "llama-full", "model": llama, "engine_kwargs": {"kv_policy": "full", **info}},
        {"name": "llama-full-noradix", "model": llama,
         "engine_kwargs": {"kv_policy": "full", "disable_radix_cache": True, **info}},
        {"name": "qwen3-vanilla", "model": qwen3, "engine_kwargs": info},
        {"name": "qwen3-snapkv-1.0", "model": qwen3,
         "engine_kwargs": {"kv_policy": "snapkv", "kv_budget": 1.0, **info}},
    ]}
    for r in spec["runs"]:
        r.update(prompts=PROMPTS, max_new_tokens=NEW)
    # per-layer pressure: depthkv at budget 0.4 with a profile sizes layer l at ceil(f_l*512) + 68 slots
    # (< 512 logical tokens; headroom = sinks 4 + window 64). The 60-token prompts are within
    # sinks + window, so no policy prunes them (and --kv-decode-interval 0: no decode pruning): the
    # tokens must equal transformers', while 8 x (60 + 40) tokens are admitted layer by layer
    sys.path.insert(0, str(HERE))
    from dkv_support import make_profile

    profile = str(make_profile(root / "profile.json"))
    spec["runs"].append({"name": "llama-depthkv-0.4-pressure", "model": llama, "prompts": PRESSURE,
                         "max_new_tokens": PRESSURE_NEW,
                         "engine_kwargs": {"kv_policy": "depthkv", "kv_budget": 0.4, "kv_profile": profile,
                                           "kv_window": 64, "max_total_tokens": 512, "chunked_prefill_size": 64, **info}})
    spec["runs"].append(dict(spec["runs"][-1], name="llama-depthkv-0.4-pressure-noradix",
                             engine_kwargs=dict(spec["runs"][-1]["engine_kwargs"], disable_radix_cache=True)))
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(HERE / "engine_runs.py"), json.dumps(spec)], capture_output=True,
                          text=True, timeout=900, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"no RESULT line (rc {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = {r["name"]: r for r in json.loads(lines[-1][len("RESULT "):])}
    for name, r in res.items():
        assert "error" not in r, f"{name}: {r.get('error_type')}: {r.get('error')}\n{r.get('traceback', '')}"
    return dict(res=res, log=proc.stderr, llama=llama, profile=profile, hf={"llama": hf_tokens(llama), "qwen3": hf_tokens(qwen3),
                                              "pressure": hf_tokens(llama, PRESSURE, PRESSURE_NEW)})


@pytest.mark.parametrize("name, model", [
    ("llama-vanilla", "llama"), ("llama-full", "llama"), ("llama-full-noradix", "llama"),
    ("qwen3-vanilla", "qwen3"), ("qwen3-snapkv-1.0", "qwen3"),
])
def test_tokens_equal_transformers(runs, name, model):
    r, hf = runs["res"][name], runs["hf"][model]
    assert r["single"] == hf
    assert r["batch"] == hf
    assert r["radix_hit"] == hf[-1]


def test_radix_hit_really_hits(runs):
    res = runs["res"]
    for name in ("llama-vanilla", "llama-full", "qwen3-snapkv-1.0"):
        assert res[name]["cached_tokens"] >= len(PROMPTS[-1]) - 1, name
    assert res["llama-full-noradix"]["cached_tokens"] == 0


def test_plugin_equals_vanilla_sglang(runs):
    res = runs["res"]
    for a, b in (("llama-vanilla", "llama-full"), ("qwen3-vanilla", "qwen3-snapkv-1.0")):
        assert res[a]["single"] == res[b]["single"] and res[a]["batch"] == res[b]["batch"]
        assert res[a]["max_total_num_tokens"] == res[b]["max_total_num_tokens"] == 2048


def test_plugin_really_ran_and_vanilla_untouched(runs):
    log = runs["log"]
    # per run in order: the plugin runs log the capacity table and their classes, vanilla runs nothing
    assert log.count("sglang-depthkv capacity: policy=full budget=1") == 2
    assert log.count("sglang-depthkv capacity: policy=snapkv budget=1") == 1
    assert log.count("sglang-depthkv capacity: policy=depthkv budget=0.4") == 2
    assert log.count("sglang-depthkv: tree cache DepthKVRadixCache") == 3  # not with --disable-radix-cache
    assert log.count("sglang-depthkv: attention backend DepthKVTorchNativeAttnBackend") == 5
    assert log.count("sglang-depthkv: allocator DepthKVAllocator") == 5
    assert "Failed to apply hooks" not in log
    # SGLang's idle check ran our per-layer invariants (its leak report would have stopped the run)
    assert log.count("sglang-depthkv: per-layer idle invariants checked: ok") >= 3


def test_per_layer_admission_under_pressure(runs):
    """Layers hold fewer slots than the 512 logical tokens: SGLang's logical admission alone would
    overrun a layer (alloc fails -> 'out of memory'); with per-layer admission every request completes
    with exactly the transformers tokens (nothing is pruned, so attention sees every token)."""
    import math
    import re

    from transformers import AutoConfig

    from sglang_depthkv.sglang.capacity import policy_layer_fractions
    from sglang_depthkv.sglang.config import parse_settings

    hf = runs["hf"]["pressure"]
    s = parse_settings({"kv_policy": "depthkv", "kv_budget": 0.4, "kv_profile": runs["profile"]})
    fr = policy_layer_fractions(s, 4, AutoConfig.from_pretrained(runs["llama"]))
    caps = [min(512, math.ceil(f * 512) + 68) for f in fr]
    assert max(caps) < 512 and len(set(caps)) > 1
    for l, c in enumerate(caps):  # the scheduler's start-up table has the same per-layer capacities
        assert re.search(rf"^\s+{l}\s+{fr[l]:.4f}\s+{c}\s", runs["log"], re.M), (l, c)
    for name in ("llama-depthkv-0.4-pressure", "llama-depthkv-0.4-pressure-noradix"):  # radix tree / ChunkCache
        r = runs["res"][name]
        assert r["single"] == hf, name
        assert r["batch"] == hf, name
        assert r["max_total_num_tokens"] == 512
