"""The peers script's shared prefill gives every kvpress press the tokens of kvpress's own pipeline.

``benchmarks.accuracy.kvpress_peers`` prefills a sample once and calls each press's hook on copies
of the full cache (``shared_press_runs``); ``press_greedy`` is kvpress's pipeline as its docs use it,
one prefill inside ``with press(model)``. kvpress 0.5.5 needs transformers < 5.3, so both run in the
peers' venv (``benchmarks/accuracy/kvpress_env.sh``, which the test command builds) through
``kvpress_shared_prefill_run.py``: on a tiny seeded Llama, every press at two budgets must give the
same tokens and cache size both ways, and some press must change the answer, so the check can fail.
"""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PEERS_PYTHON = ROOT / ".venv-kvpress" / "bin" / "python"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from sglang_depthkv.core.smollm2 import SMOLLM2

    if not PEERS_PYTHON.is_file():
        pytest.skip(f"{PEERS_PYTHON} missing: build it with `bash benchmarks/accuracy/kvpress_env.sh`")
    tok_dir = SMOLLM2.export_hf_dir()
    work = tmp_path_factory.mktemp("tiny-llama")
    proc = subprocess.run([str(PEERS_PYTHON), str(Path(__file__).with_name("kvpress_shared_prefill_run.py")),
                           str(tok_dir), str(work)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_shared_prefill_gives_kvpress_pipeline_tokens(result):
    runs = [tuple(r) for r in result["runs"]]
    shared = {r: (tuple(tokens), kept) for r, (tokens, kept) in zip(runs, result["shared"])}
    per_press = {r: (tuple(tokens), kept) for r, (tokens, kept) in zip(runs, result["per_press"])}
    assert len(runs) == 13
    for r in runs:
        assert shared[r] == per_press[r], f"{r}: shared prefill {shared[r]} vs kvpress pipeline {per_press[r]}"
    full_tokens = per_press[("full", 1.0)][0]
    assert any(per_press[r][0] != full_tokens for r in runs[1:]), "no press changed the answer: the check cannot fail"


def test_cache_sizes_and_masks(result):
    kept = {tuple(r): s[1] for r, s in zip(result["runs"], result["per_press"])}
    full = kept[("full", 1.0)]
    assert kept[("snapkv", 0.2)] < kept[("snapkv", 0.5)] < full  # removing presses shrink the cache
    assert kept[("adakv_snapkv", 0.2)] == kept[("kvzip", 0.2)] == full  # masking presses keep every token
    assert not any(result["masks_left_after_shared"]), "the shared prefill left head masks on the modules"
