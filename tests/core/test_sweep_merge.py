"""``benchmarks.accuracy.merge``: re-run policies replace the base's, everything else stays, and a
mismatched update is refused before anything is written."""

import json

import pytest

from benchmarks.accuracy.merge import main, merge


def run(policy, budget, score, tokens=(1, 2)):
    return {"policy": policy, "budget": budget, "output": f"{policy}-{score}", "score": score, "tokens": list(tokens),
            "kept": [1], "select_s": 0.0}


def doc(policies, runs_of_sample, command="python -m benchmarks.accuracy.sweep x"):
    samples = [{"task": "passkey", "target_tokens": 2048, "index": i, "seed": 0, "answers": ["1"], "n_tokens": 2050 + i,
                "runs": runs} for i, runs in enumerate(runs_of_sample)]
    return {"format": "sglang-depthkv-accuracy", "version": 1, "command": command,
            "model": {"name": "m", "sha256": "s"}, "complete": True, "wall_s": 5.0,
            "config": {"tasks": ["passkey"], "lengths": [2048], "counts": [2], "seed": 0, "sinks": 4, "window": 32,
                       "budgets": [0.1], "policies": policies, "profile": "p.json", "laprox_profile": "old.json",
                       "gates": "g.safetensors"},
            "samples": samples}


BASE = doc(["snapkv", "laprox", "depthkv_laprox"],
           [[run("full", 1.0, 1.0), run("snapkv", 0.1, 1.0), run("laprox", 0.1, 0.0), run("depthkv_laprox", 0.1, 0.0)],
            [run("full", 1.0, 0.0), run("snapkv", 0.1, 0.0), run("laprox", 0.1, 0.0), run("depthkv_laprox", 0.1, 1.0)]])


def update(**config):
    u = doc(["laprox", "kvzip"], [[run("full", 1.0, 1.0), run("laprox", 0.1, 1.0), run("kvzip", 0.1, 0.5)],
                                  [run("full", 1.0, 0.0), run("laprox", 0.1, 1.0), run("kvzip", 0.1, 0.0)]],
            command="python -m benchmarks.accuracy.sweep --policies laprox,kvzip")
    u["config"].update(config)
    return u


def test_merge_replaces_the_rerun_policies_and_keeps_the_rest():
    base_before = json.dumps(BASE)
    out = merge(BASE, update(gates="new.safetensors"))
    assert json.dumps(BASE) == base_before  # inputs untouched
    assert out["config"]["policies"] == ["snapkv", "depthkv_laprox", "laprox", "kvzip"]
    assert out["config"]["gates"] == "new.safetensors" and out["config"]["laprox_profile"] == "old.json"
    first = {r["policy"]: r["score"] for r in out["samples"][0]["runs"]}
    assert first == {"full": 1.0, "snapkv": 1.0, "depthkv_laprox": 0.0, "laprox": 1.0, "kvzip": 0.5}
    assert [r["policy"] for r in out["samples"][1]["runs"]] == ["full", "snapkv", "depthkv_laprox", "laprox", "kvzip"]
    assert out["merged"] == [{"command": "python -m benchmarks.accuracy.sweep --policies laprox,kvzip",
                              "policies": ["laprox", "kvzip"], "wall_s": 5.0}]


@pytest.mark.parametrize("change, match", [
    (lambda u: u["config"].update(budgets=[0.2]), "config 'budgets' differs"),
    (lambda u: u["model"].update(sha256="x"), "models differ"),
    (lambda u: u["samples"][1].update(n_tokens=9), "sample 1: n_tokens differs"),
    (lambda u: u["samples"][0]["runs"][0].update(tokens=[7]), "sample 0: the full-cache answers differ"),
    (lambda u: u.update(complete=False), "update: the sweep did not complete"),
    (lambda u: u["samples"].pop(), "base has 2 samples, update 1"),
])
def test_merge_refuses_a_mismatched_update(change, match):
    u = update()
    change(u)
    with pytest.raises(ValueError, match=match):
        merge(BASE, u)


def test_command_line_writes_the_merge_and_refuses_without_writing(tmp_path):
    b, u = tmp_path / "base.json", tmp_path / "update.json"
    b.write_text(json.dumps(BASE))
    bad = update(seed=1)
    u.write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="merge: config 'seed' differs"):
        main([str(b), str(u)])
    assert json.loads(b.read_text()) == BASE
    u.write_text(json.dumps(update()))
    assert main([str(b), str(u)]) == 0
    assert json.loads(b.read_text())["merged"][0]["policies"] == ["laprox", "kvzip"]


def test_report_names_the_rerun_and_scores_it(tmp_path):
    from benchmarks.accuracy import report

    d = merge(BASE, update())
    d["config"]["haystack"] = ["emma"]
    md = report.write_markdown(d, tmp_path / "merged.md")
    assert ("Re-run of laprox, kvzip: `python -m benchmarks.accuracy.sweep --policies laprox,kvzip` (0.1 min), "
            "merged in by `python -m benchmarks.accuracy.merge`.") in md
    assert report.aggregate(d)[None][("laprox", 0.1)] == (1.0, 2)  # the update's runs, both samples
