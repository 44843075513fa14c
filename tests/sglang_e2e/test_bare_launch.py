"""The command users are told about, with nothing but the policy: ``calibrate --model M`` once (it caches
the profile for that model directory), then ``python -m sglang.launch_server --model-path M ...
--kv-policy depthkv`` without ``--kv-budget`` or ``--kv-profile`` serves: the default budget (0.3) and
the cached profile, as SGLang's ``/server_info`` reports, and a prompt is pruned and answered. Both
commands run as subprocesses, as a user types them (tiny random Llama, byte tokens, CPU)."""

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
    assert len(rows) == 4 and all(r["pruned"] and r["seq_len"] == len(ids) for r in rows)
    kept = sum(len(r["kept"]) for r in rows)
    assert abs(kept - 0.3 * len(ids) * 4) <= 4, kept  # the default budget over the four layers
