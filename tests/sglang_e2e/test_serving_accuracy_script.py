"""``benchmarks/serving_accuracy.py``: argument validation (clear errors naming the flag, before any
work), the server flags that make the server the reference's algorithm, the report's aggregation
against hand-computed values, and one tiny end-to-end run (SmolLM2 real weights, one 256-token
passkey sample, one SnapKV server at budget 0.3) whose answer tokens and per-layer kept sets are
compared with the HF reference path's (the accuracy sweep, run by the script)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import serving_accuracy as SA  # noqa: E402
from benchmarks.serving_accuracy_report import records  # noqa: E402


@pytest.mark.parametrize("argv, flag", [
    (["--tasks", "passkey,nope"], "--tasks"),
    (["--lengths", "2048,4096", "--counts", "1"], "--lengths"),
    (["--lengths", "100", "--counts", "1"], "--lengths"),
    (["--lengths", "9000", "--counts", "1"], "--lengths"),
    (["--lengths", "2k", "--counts", "1"], "--lengths"),
    (["--counts", "0,1"], "--counts"),
    (["--policies", "snapkv,h2o"], "--policies"),
    (["--budgets", "0.3,1.0"], "--budgets"),
    (["--budgets", "0"], "--budgets"),
    (["--budgets", "a"], "--budgets"),
    (["--policies", "depthkv", "--profile", "/nonexistent/profile.json"], "--profile"),
    (["--policies", "kvzip", "--gates", "/nonexistent/gates.safetensors"], "--gates"),
    (["--policies", "", "--no-vanilla"], "nothing to serve"),
    (["--sinks", "-1"], "--sinks"),
])
def test_bad_arguments_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        SA.parse_args(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_defaults_cover_every_policy_and_budget_and_vanilla():
    a = SA.parse_args([])
    assert a.policies == list(SA.POLICIES) and a.budgets == [0.5, 0.3, 0.1]
    confs = SA.configurations(a)
    assert confs[0] == ("vanilla", 1.0) and len(confs) == 1 + 6 * 3


def test_server_flags_make_the_server_the_reference_algorithm():
    a = SA.parse_args(["--policies", "depthkv,kvzip", "--budgets", "0.3"])
    f = SA.server_flags("depthkv", 0.3, a, max_prompt=4099, max_new=30)
    val = lambda name: f[f.index(name) + 1]  # noqa: E731
    assert int(val("--chunked-prefill-size")) >= 4099  # no chunking: the whole prompt pruned at once
    assert int(val("--max-total-tokens")) >= 4099 + 30
    assert "--disable-radix-cache" in f and val("--dtype") == "float32"
    assert (val("--kv-policy"), val("--kv-budget"), val("--kv-sinks"), val("--kv-window")) == ("depthkv", "0.3", "4", "32")
    # the repository's profile, named relative to the root the servers run from (no checkout path)
    assert not Path(val("--kv-profile")).is_absolute() and (SA.ROOT / val("--kv-profile")).is_file()
    assert "--kv-gates" not in f
    assert "--kv-gates" in SA.server_flags("kvzip", 0.3, a, 4099, 30)
    v = SA.server_flags("vanilla", 1.0, a, 4099, 30)
    assert not any(x.startswith("--kv-") for x in v)
    radix = SA.parse_args(["--radix-cache"])
    assert "--disable-radix-cache" not in SA.server_flags("snapkv", 0.3, radix, 4099, 30)


def test_cut_and_token_agreement():
    done = lambda t: t[-1] == 0 or t[-2:] == [5, 5]  # noqa: E731
    assert SA.cut([1, 2, 0, 7], done) == [1, 2, 0]
    assert SA.cut([1, 5, 5, 9], lambda t: len(t) > 1 and done(t)) == [1, 5, 5]
    assert SA.cut([1, 2], done) == [1, 2]
    assert SA.token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert SA.token_agreement([1, 2, 3, 4], [1, 2, 9]) == 0.5
    assert SA.keep_agreement([[0, 1, 2], [0, 3]], [[0, 1, 2], [0, 4]]) == \
        {"layers_equal": 0.5, "jaccard": (1.0 + 1 / 3) / 2, "sym_diff": 2}


def test_records_aggregate_by_task_policy_budget():
    def req(task, policy, budget, s, r, toks, rtoks, keep=None):
        return {"task": task, "policy": policy, "budget": budget, "score": s, "reference_score": r,
                "tokens": toks, "reference_tokens": rtoks, "token_agreement": SA.token_agreement(toks, rtoks),
                "keep": keep}
    reqs = [req("passkey", "snapkv", 0.3, 1.0, 1.0, [1, 2], [1, 2], {"layers_equal": 1.0, "jaccard": 1.0}),
            req("vartrack", "snapkv", 0.3, 0.4, 0.6, [3, 4], [3, 5], {"layers_equal": 0.5, "jaccard": 0.9}),
            req("passkey", "vanilla", 1.0, 1.0, 1.0, [1], [1])]
    rec = {(r["task"], r["policy"], r["budget"]): r for r in records(reqs)}
    all_s = rec[("all", "snapkv", 0.3)]
    assert all_s["n"] == 2
    assert all_s["accuracy_server"] == pytest.approx(0.7) and all_s["accuracy_reference"] == pytest.approx(0.8)
    assert all_s["diff_points"] == pytest.approx(-10.0)
    assert all_s["identical_answers"] == 0.5 and all_s["token_agreement"] == pytest.approx(0.75)
    assert all_s["keep_layers_equal"] == 0.75 and all_s["keep_jaccard"] == pytest.approx(0.95)
    assert rec[("vartrack", "snapkv", 0.3)]["diff_points"] == pytest.approx(-20.0)
    assert rec[("all", "vanilla", 1.0)]["keep_layers_equal"] is None


@pytest.mark.engine
def test_tiny_end_to_end_run_matches_the_reference(tmp_path):
    out = tmp_path / "sa.json"
    assert SA.main(["--tasks", "passkey", "--lengths", "256", "--counts", "1", "--policies", "snapkv",
                    "--budgets", "0.3", "--no-vanilla", "--out", str(out), "--start-timeout", "300"]) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] and out.with_suffix(".md").is_file() and out.with_suffix(".png").stat().st_size > 1000
    (req,) = doc["requests"]
    assert req["policy"] == "snapkv" and req["n_tokens"] == req["prompt_tokens"] == doc["samples"][0]["n_tokens"]
    assert req["cached_tokens"] == 0  # --disable-radix-cache: nothing served from a tree
    # the same algorithm as the HF reference path: same kept set at every layer, same greedy answer
    assert req["kept_server"] and len(req["kept_server"]) == 30
    assert req["keep"]["layers_equal"] == 1.0, req["keep"]
    assert req["tokens"] == req["reference_tokens"] and req["score"] == req["reference_score"]
    rec = {(r["task"], r["policy"], r["budget"]): r for r in doc["records"]}
    for task in ("all", "passkey"):
        r = rec[(task, "snapkv", 0.3)]
        assert set(r) >= {"task", "policy", "budget", "accuracy_server", "accuracy_reference"}
        assert r["accuracy_server"] == r["accuracy_reference"]
    assert doc["checks"]["all_within"]
