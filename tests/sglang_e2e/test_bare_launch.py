"""The command users are told about, with nothing but the policy, run as subprocesses as a user types
them:

- SmolLM2-135M-Instruct (real weights), nothing cached: ``python -m sglang.launch_server --model-path M
  --device cpu ... --kv-policy depthkv`` calibrates at start-up through SGLang's model runner (a
  progress line per layer, the time taken), caches the profile, and serves a chat prompt with the
  default budget (0.3); the second start finds the cached profile and does not calibrate again.
- tiny random Llama (byte tokens): ``calibrate --model M`` once (it caches the profile for that model
  directory), then the same bare launch uses that cached profile, as SGLang's ``/server_info`` reports,
  and a prompt is pruned and answered."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent / "benchmarks"))


def test_bare_depthkv_launch_serves_with_the_cached_profile(tmp_path):
    from server import SGLangServer
    from tiny_models import save_tiny_model

    from sglang_depthkv.core.profile_cache import cached_profile_path

    model = save_tiny_model(tmp_path / "llama", "llama", seed=0)
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession " * 4)
    env = dict(os.environ, SGLANG_DEPTHKV_CACHE=str(tmp_path / "cache"))
    cal = subprocess.run([sys.executable, "-m", "sglang_depthkv", "calibrate", "--model", str(model), "--text",
                          str(text), "--tokenizer", "bytes", "--keep-fractions", "0.3,0.6", "--context-tokens", "96",
                          "--continuation-tokens", "8", "--samples", "1"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert cal.returncode == 0, cal.stderr[-3000:]
    cached = cached_profile_path(model, root=tmp_path / "cache")
    assert cached.is_file() and str(cached) in cal.stdout

    from sglang_depthkv.sglang.pruning import DUMP_ENV

    dump = tmp_path / "keep.jsonl"
    args = ["--kv-policy", "depthkv", "--max-total-tokens", "4096", "--skip-tokenizer-init"]
    with SGLangServer(str(model), args, log_path=tmp_path / "server.log",
                      env={"SGLANG_DEPTHKV_CACHE": str(tmp_path / "cache"), DUMP_ENV: str(dump)}) as srv:
        ids = [(7 * i + 3) % 500 + 1 for i in range(300)]
        out = srv.generate({"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0.0,
                                                                  "ignore_eos": True}})
        info = srv.server_info()
    assert len(out["output_ids"]) == 4
    state = info["internal_states"][0]["depthkv"]
    assert state["settings"]["policy"] == "depthkv" and state["settings"]["budget"] == 0.3
    assert state["settings"]["profile"] == str(cached)
    log = (tmp_path / "server.log").read_text()
    assert f"--kv-profile {cached} (the model's cached profile)" in log
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    # launch_server's own warm-up request (3 input ids under --skip-tokenizer-init, too short to prune) may
    # reach the scheduler before or after ours on a loaded machine
    warmup = [r for r in rows if r["seq_len"] != len(ids)]
    assert all(r["seq_len"] == 3 and not r["pruned"] for r in warmup) and len(warmup) in (0, 4)
    rows = [r for r in rows if r["seq_len"] == len(ids)]
    assert len(rows) == 4 and all(r["pruned"] for r in rows)
    kept = sum(len(r["kept"]) for r in rows)
    assert abs(kept - 0.3 * len(ids) * 4) <= 4, kept  # the default budget over the four layers


def test_bare_depthkv_launch_of_smollm2_calibrates_at_start_up_once(tmp_path):
    from server import SGLangServer

    from sglang_depthkv.core.profile_cache import cached_profile_path
    from sglang_depthkv.core.smollm2 import chat_prompt, export_hf_dir, load_smollm2
    from sglang_depthkv.sglang.runner_calibration import SAMPLES

    model = export_hf_dir()
    cached = cached_profile_path(model, root=tmp_path / "cache")
    env = {"SGLANG_DEPTHKV_CACHE": str(tmp_path / "cache")}
    _, tok = load_smollm2()
    prompt = chat_prompt(tok, "What is the capital of France? Answer in one word.")
    answers, infos = [], []
    for start in ("first", "second"):
        # the first start calibrates SmolLM2's 30 layers on this CPU before it serves: 5 to 11 minutes
        # measured, depending on how busy the machine's cores are
        with SGLangServer(str(model), ["--kv-policy", "depthkv", "--max-total-tokens", "8192"],
                          log_path=tmp_path / f"{start}.log", env=env,
                          start_timeout=1800 if start == "first" else 600) as srv:
            out = srv.generate({"text": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0.0}})
            answers.append(out["text"])
            infos.append(srv.server_info()["internal_states"][0]["depthkv"])
        if start == "first":
            mtime = cached.stat().st_mtime_ns
    first, second = ((tmp_path / f"{s}.log").read_text() for s in ("first", "second"))
    for layer in range(1, 31):  # a progress line per layer and sample, with an ETA
        assert f"calibrating sample {SAMPLES}/{SAMPLES} layer {layer}/30 (4 keep fractions)" in first, layer
    assert "start-up calibration took" in first and f"profile {cached} (cached" in first
    assert "start-up calibration" not in second and f"--kv-profile {cached} (the model's cached profile)" in second
    assert cached.stat().st_mtime_ns == mtime
    for info in infos:
        assert (info["settings"]["profile"], info["settings"]["budget"]) == (str(cached), 0.3)
    assert all("Paris" in a for a in answers), answers
