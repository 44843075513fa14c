"""benchmarks/accuracy/kvzip_oracle: the best-kv-head reduction and the table, against hand values."""

import pytest
import torch

from sglang_depthkv.core.selection import token_scores


def test_head_max_makes_the_token_score_the_best_kv_head():
    from benchmarks.accuracy.kvzip_oracle import head_max

    s = torch.tensor([[0.1, 0.9, 0.3, 0.0], [0.5, 0.2, 0.3, 0.7], [0.4, 0.1, 0.8, 0.6]], dtype=torch.float64)
    out = head_max(s.float())
    assert tuple(out.shape) == (3, 4)
    best = [max(col) for col in zip(*s.tolist())]  # an independent max over heads
    assert token_scores(out).tolist() == pytest.approx(best, abs=1e-7)


def test_exact_scorer_refuses_scores_of_another_shape():
    from benchmarks.accuracy.kvzip_oracle import _scorers
    from sglang_depthkv.core.types import LayerObservation

    _, Exact = _scorers()
    ex = Exact()
    ex.targets = [torch.rand(2, 5)]
    obs = LayerObservation(layer=0, keys=torch.randn(2, 6, 4), values=torch.randn(2, 6, 4),
                           window_queries=torch.randn(4, 2, 4), scaling=0.5)
    with pytest.raises(ValueError, match=r"exact KVzip scores \(2, 5\) for layer 0, expected \(2, 6\)"):
        ex.score(obs)


def test_markdown_means_by_run_budget_and_task():
    from benchmarks.accuracy.kvzip_oracle import markdown

    def runs(full, pairs):
        out = [{"policy": "full", "budget": 1.0, "score": full}]
        return out + [{"policy": r, "budget": b, "score": v} for r, b, v in pairs]

    doc = {"command": "python -m benchmarks.accuracy.kvzip_oracle X", "model": {"name": "M"}, "wall_s": 9.0,
           "config": {"tasks": ["passkey", "vartrack"], "lengths": [2048], "counts": [1], "budgets": [0.1, 0.2]},
           "samples": [
               {"task": "passkey", "runs": runs(1.0, [("snapkv", 0.1, 1.0), ("snapkv", 0.2, 1.0), ("exact", 0.1, 0.0),
                                                     ("exact", 0.2, 1.0)])},
               {"task": "vartrack", "runs": runs(0.5, [("snapkv", 0.1, 0.25), ("snapkv", 0.2, 0.5), ("exact", 0.1, 0.0),
                                                      ("exact", 0.2, 0.0)])}]}
    lines = markdown(doc).splitlines()
    assert "| full cache | 0.750 | 0.750 |" in lines
    assert "| uniform SnapKV | 0.625 | 0.750 |" in lines
    assert "| KVzip exact score, best kv head | 0.000 | 0.500 |" in lines
    assert "| KVzip gates (as served) | – | – |" in lines
    i = lines.index("| run | passkey | vartrack |")
    assert "| uniform SnapKV | 1.000 | 0.250 |" in lines[i:]


def test_oracle_run_on_smollm2_keeps_the_budget_in_every_run(tmp_path):
    """The benchmark as users run it, on one short sample: every run's kept slots equal the budget's
    formula, the uniform runs keep the same count in every layer, the full cache answers."""
    import json
    import math

    from benchmarks.accuracy.kvzip_oracle import RUNS, main

    out = tmp_path / "o.json"
    assert main(["--model", "smollm2", "--gates", "benchmarks/results/smollm2_gates.safetensors", "--tasks", "passkey",
                 "--lengths", "1024", "--counts", "1", "--budgets", "0.2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] and len(doc["samples"]) == 1
    s = doc["samples"][0]
    n, L = s["n_tokens"], 30
    total = min(max(math.floor(0.2 * n * L + 0.5), L * min(n, 36)), L * n)  # docs/core-api.md's total_keep
    runs = {r["policy"]: r for r in s["runs"]}
    assert set(runs) == {"full", "snapkv", *RUNS}
    assert runs["full"]["score"] == 1.0
    for name in ("snapkv", *RUNS):
        assert sum(runs[name]["layer_keep"]) == total, name
    for name in ("gates_uniform", "exact_uniform"):
        assert max(runs[name]["layer_keep"]) - min(runs[name]["layer_keep"]) <= 1, name
    assert (tmp_path / "o.md").read_text().startswith("# KVzip with its exact scores: SmolLM2-135M-Instruct")
