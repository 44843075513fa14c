"""Start-up calibration through SGLang's model runner (``--kv-policy depthkv``, no profile given or
cached), SGLang's real Engine on CPU in a subprocess (tiny random Llama on torch_native, tiny Qwen3
on the interpreted triton backend):

- the profile the server measures and caches equals the HF reference's (``python -m sglang_depthkv
  calibrate`` with the same text and settings), sensitivities within 1e-4 relative;
- the server then serves with it: each layer keeps what ``core``'s DepthKV allocation of that
  profile gives for the prompt (the dump), and ``/server_info`` names the cached file;
- a second start finds the cached profile and does not calibrate again (file untouched)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from e2e_runs import run_spec  # noqa: E402

ARCHS = {"llama": "torch_native", "qwen3": "triton"}
PROMPT = [(7 * i + 3) % 500 + 1 for i in range(300)]
BUDGET = 0.3


def _run(name, arch, model, cache):
    return {"name": name, "model": str(model), "env": {"SGLANG_DEPTHKV_CACHE": str(cache)},
            "engine_kwargs": {"kv_policy": "depthkv", "kv_budget": BUDGET, "attention_backend": ARCHS[arch],
                              "log_level": "info"},
            "batches": [[{"rid": f"{name}-0", "ids": PROMPT}]], "max_new_tokens": 4}


def _reference_profile(model, out):
    from sglang_depthkv.sglang import runner_calibration as RC

    cmd = [sys.executable, "-m", "sglang_depthkv", "calibrate", "--model", str(model), "--tokenizer", "bytes",
           "--novel", RC.NOVEL, "--keep-fractions", ",".join(str(f) for f in RC.KEEP_FRACTIONS),
           "--context-tokens", str(RC.CONTEXT_TOKENS), "--continuation-tokens", str(RC.CONTINUATION_TOKENS),
           "--samples", str(RC.SAMPLES), "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(out).read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("autocal")
    models = {a: save_tiny_model(root / a, a, seed=0) for a in ARCHS}
    env = dict(os.environ, TRITON_INTERPRET="1")
    spec = {"runs": [_run(f"{a}-first", a, models[a], root / f"cache-{a}") for a in ARCHS]}
    first, log1 = run_spec(spec, env, timeout=1500)
    from sglang_depthkv.core.profile_cache import cached_profile_path

    paths = {a: cached_profile_path(models[a], root=root / f"cache-{a}") for a in ARCHS}
    mtimes = {a: paths[a].stat().st_mtime_ns for a in ARCHS if paths[a].is_file()}
    spec = {"runs": [_run(f"{a}-second", a, models[a], root / f"cache-{a}") for a in ARCHS]}
    second, log2 = run_spec(spec, env, timeout=900)
    return dict(root=root, models=models, paths=paths, mtimes=mtimes, first=first, second=second, log1=log1,
                log2=log2)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_startup_profile_equals_the_reference_calibration(runs, arch):
    path = runs["paths"][arch]
    assert path.is_file(), runs["log1"][-4000:]
    got = json.loads(path.read_text())
    ref = _reference_profile(runs["models"][arch], runs["root"] / f"ref-{arch}.json")
    assert got["keep_fractions"] == ref["keep_fractions"] and got["scorer"] == ref["scorer"] == "snapkv"
    assert got["model"] == ref["model"]
    for k, v in ref["calibration"].items():
        if k not in ("device", "dtype"):
            assert got["calibration"][k] == v, k
    assert got["calibration"]["engine"] == "sglang-model-runner"
    import numpy as np

    a, b = np.array(got["sensitivity"]), np.array(ref["sensitivity"])
    assert a.shape == b.shape == (4, len(ref["keep_fractions"]))
    assert (b > 0).all()  # every layer's pruning changes the continuation: the comparison has content
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_server_prunes_with_the_startup_profile_and_the_next_start_reuses_it(runs, arch):
    import torch

    from sglang_depthkv.core.policy import make_policy
    from sglang_depthkv.core.profile import load_profile

    path = runs["paths"][arch]
    for which in ("first", "second"):
        run = runs[which][f"{arch}-{which}"]
        assert run["server_info"][0]["settings"]["profile"] == str(path)
        assert run["server_info"][0]["settings"]["calibrate_at_start"] is False
        rows = sorted(run["keep"], key=lambda r: r["layer"])
        assert len(rows) == 4 and all(r["pruned"] and r["seq_len"] == len(PROMPT) for r in rows)
        policy = make_policy("depthkv", BUDGET, profile=load_profile(str(path)))
        expect = policy.keep_counts(len(PROMPT), 4, torch.zeros(4, len(PROMPT)))
        assert [len(r["kept"]) for r in rows] == expect, which
    assert len(set(expect)) > 1  # the profile's sensitivities give the layers different budgets
    assert path.stat().st_mtime_ns == runs["mtimes"][arch]  # the second start did not calibrate again
    assert runs["log1"].count("start-up calibration took") == 2
    assert "start-up calibration" not in runs["log2"]


@pytest.mark.gpu
def test_startup_calibration_on_cuda_returns_its_memory(tmp_path):
    """On CUDA (triton backend, float32, the pool sized by SGLang from free memory): the start-up
    profile equals the CPU reference, and the start that calibrated sizes the same pool as the start
    that found the profile cached (the provisional full-cache pool's memory was given back)."""
    from tiny_models import save_tiny_model

    from sglang_depthkv.core.profile_cache import cached_profile_path

    model = save_tiny_model(tmp_path / "llama", "llama", seed=0)
    kw = {"device": "cuda", "attention_backend": "triton", "max_total_tokens": None, "mem_fraction_static": 0.5}
    runs = []
    for which in ("first", "second"):
        run = _run(which, "llama", model, tmp_path / "cache")
        run["engine_kwargs"].update(kw)
        runs.append(run)
    res, log = run_spec({"runs": runs}, dict(os.environ), timeout=900)
    path = cached_profile_path(model, root=tmp_path / "cache")
    assert log.count("start-up calibration took") == 1
    caps = [res[w]["server_info"][0]["logical_capacity"] for w in ("first", "second")]
    assert caps[0] == caps[1], caps
    got = json.loads(path.read_text())
    assert (got["calibration"]["device"].startswith("cuda"), got["calibration"]["dtype"]) == (True, "float32")
    ref = _reference_profile(model, tmp_path / "ref.json")
    import numpy as np

    np.testing.assert_allclose(np.array(got["sensitivity"]), np.array(ref["sensitivity"]), rtol=1e-3, atol=1e-7)
