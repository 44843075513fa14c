"""RULER-style task generators (sglang_depthkv/core/tasks.py) with SmolLM2's real tokenizer."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sglang_depthkv.core.tasks import TASKS, TaskSample, make_sample, make_samples, score  # noqa: E402
from sglang_depthkv.core.haystack import haystack_text  # noqa: E402
from sglang_depthkv.core.smollm2 import chat_prompt, gguf_path  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    p = gguf_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="module")
def hay():
    return haystack_text()


def _make(tok, hay, task, n, i=0, seed=0):
    return make_sample(task, n, i, tokenizer=tok, haystack=hay, chat=lambda u: chat_prompt(tok, u), seed=seed)


def _ntok(tok, text):
    return len(tok(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("n", [600, 2048])
def test_length_needles_and_template(tok, hay, task, n):
    s = _make(tok, hay, task, n)
    assert abs(_ntok(tok, s.prompt) - n) <= 64
    assert s.prompt.startswith("<|im_start|>system")
    assert "<|im_start|>user\n" in s.prompt and "<|im_start|>assistant\n" in s.prompt
    user = s.prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
    # every answer appears in the user turn (as a needle), as a whole number / name
    for a in s.answers:
        assert re.search(rf"(?<![\dA-Z]){a}(?![\dA-Z])", user) is not None
    assert user.endswith(s.question)
    assert s.depths == sorted(s.depths) and all(0.0 < d < 1.0 for d in s.depths)


def test_needle_texts(tok, hay):
    s = _make(tok, hay, "passkey", 1024)
    key = s.answers[0]
    assert re.fullmatch(r"\d{5}", key)
    assert f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n" in s.prompt
    assert s.prompt.endswith("<|im_start|>assistant\nThe pass key is ")

    mk = _make(tok, hay, "multikey", 1024)
    assert mk.prompt.count("One of the special magic numbers for ") == 4
    asked = re.search(r"What is the special magic number for (\w+)\?", mk.prompt).group(1)
    assert f"One of the special magic numbers for {asked} is: {mk.answers[0]}." in mk.prompt

    mv = _make(tok, hay, "multivalue", 1024)
    word = re.search(r"What are all the special magic numbers for (\w+)\?", mv.prompt).group(1)
    assert len(mv.answers) == 4 and len(set(mv.answers)) == 4
    for v in mv.answers:
        assert f"One of the special magic numbers for {word} is: {v}." in mv.prompt

    vt = _make(tok, hay, "vartrack", 1024)
    value = re.search(r"assigned the value (\d{5})\.", vt.prompt).group(1)
    # follow the chain independently, from the prompt text
    holders = {re.search(rf"VAR ([A-Z]{{5}}) = {value}\.", vt.prompt).group(1)}
    for new, old in re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", vt.prompt):
        assert old in holders  # chain order: each assignment refers to an earlier variable
        holders.add(new)
    assert holders == set(vt.answers) and len(holders) == 5


def test_deterministic_and_seed_dependent(tok, hay):
    a = _make(tok, hay, "multikey", 800, i=1, seed=7)
    b = _make(tok, hay, "multikey", 800, i=1, seed=7)
    c = _make(tok, hay, "multikey", 800, i=1, seed=8)
    d = _make(tok, hay, "multikey", 800, i=2, seed=7)
    assert a.prompt == b.prompt and a.answers == b.answers
    assert c.prompt != a.prompt and d.prompt != a.prompt


def test_make_samples_order_and_counts(tok, hay):
    out = make_samples(["passkey", "vartrack"], {1024: 2, 512: 1}, tokenizer=tok, haystack=hay,
                       chat=lambda u: chat_prompt(tok, u))
    assert [(s.target_tokens, s.task, s.index) for s in out] == [
        (512, "passkey", 0), (512, "vartrack", 0),
        (1024, "passkey", 0), (1024, "passkey", 1), (1024, "vartrack", 0), (1024, "vartrack", 1)]


def test_score_exact_and_fractional():
    s = TaskSample("passkey", 1024, 0, 0, "", ["12345"], "q")
    assert score(s, "12345.") == 1.0
    assert score(s, "The key is 12345 indeed") == 1.0
    assert score(s, "123456") == 0.0  # not a whole-number match
    assert score(s, "1234") == 0.0
    mv = TaskSample("multivalue", 1024, 0, 0, "", ["11111", "22222", "33333", "44444"], "q")
    assert score(mv, "11111, 33333 and 99999") == 0.5
    vt = TaskSample("vartrack", 1024, 0, 0, "", ["ABCDE", "FGHIJ"], "q")
    assert score(vt, "ABCDEF, FGHIJ") == 0.5
    with pytest.raises(ValueError, match="no answers"):
        score(TaskSample("passkey", 1024, 0, 0, "", [], "q"), "x")


def test_bad_input(tok, hay):
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        _make(tok, hay, "qa", 1024)
    with pytest.raises(ValueError, match="target_tokens"):
        _make(tok, hay, "passkey", 100)
    with pytest.raises(ValueError, match="too short"):
        make_sample("passkey", 4096, 0, tokenizer=tok, haystack=hay[:1000], chat=lambda u: chat_prompt(tok, u))


# ----------------------------------------------------------------------------- report formatter
def _doc():
    def run(p, b, score, kept):
        return {"policy": p, "budget": b, "output": "x", "score": score, "kept": kept}

    s1 = {"task": "passkey", "target_tokens": 2048, "index": 0, "n_tokens": 10, "runs": [
        run("full", 1.0, 1.0, [10, 10]), run("snapkv", 0.1, 0.0, [1, 1]), run("snapkv", 0.3, 1.0, [3, 3]),
        run("depthkv", 0.1, 1.0, [0, 2]), run("depthkv", 0.3, 1.0, [2, 4])]}
    s2 = {"task": "multivalue", "target_tokens": 4096, "index": 0, "n_tokens": 20, "runs": [
        run("full", 1.0, 0.5, [20, 20]), run("snapkv", 0.1, 0.25, [2, 2]), run("snapkv", 0.3, 0.75, [6, 6]),
        run("depthkv", 0.1, 0.0, [2, 2]), run("depthkv", 0.3, 0.5, [4, 8])]}
    return {"format": "sglang-depthkv-accuracy", "version": 1, "command": "python -m benchmarks.accuracy.sweep X",
            "config": {"tasks": ["passkey", "multivalue"], "lengths": [2048, 4096], "counts": [1, 1], "seed": 0,
                       "sinks": 4, "window": 32, "haystack": ["emma"]},
            "samples": [s1, s2], "wall_s": 90.0, "complete": True}


def test_report_aggregate_and_markdown(tmp_path):
    from benchmarks.accuracy import report

    doc = _doc()
    overall = report.aggregate(doc)[None]
    assert overall[("full", 1.0)] == (0.75, 2)
    assert overall[("snapkv", 0.1)] == (0.125, 2)
    assert overall[("depthkv", 0.3)] == (0.75, 2)
    by_len = report.aggregate(doc, "length")
    assert by_len[4096][("depthkv", 0.1)] == (0.0, 1)
    assert report.aggregate(doc, "task")["passkey"][("snapkv", 0.3)] == (1.0, 1)
    with pytest.raises(ValueError, match="by must be"):
        report.aggregate(doc, "policy")
    assert report.budgets_of(doc) == [0.1, 0.3]
    table = report.markdown_table(overall, [0.1, 0.3])
    lines = table.splitlines()
    assert lines[0] == "| policy | 10% | 30% |"
    assert lines[2] == "| full cache | 0.750 | 0.750 |"
    assert lines[3] == "| uniform SnapKV | 0.125 | 0.875 |"
    assert lines[4] == "| DepthKV + SnapKV | 0.500 | 0.750 |"
    assert report.depthkv_vs_uniform(overall, [0.1, 0.3]) == [
        "budget 10%: DepthKV 0.500 beats uniform SnapKV 0.125",
        "budget 30%: DepthKV 0.750 loses to uniform SnapKV 0.875"]
    fr = report.layer_fractions(doc, 0.3)
    assert fr["depthkv"] == pytest.approx([(0.2 + 0.2) / 2, (0.4 + 0.4) / 2])
    assert fr["snapkv"] == pytest.approx([0.3, 0.3])
    md = report.write_markdown(doc, tmp_path / "a.md")
    assert "Command: `python -m benchmarks.accuracy.sweep X`" in md and "Wall time: 90 s" in md
    assert "## By target length: 4096 (1 samples)" in md
    report.plot_accuracy(doc, tmp_path / "a.png")
    report.plot_layer_budgets(doc, tmp_path / "l.png", 0.3)
    for f in ("a.png", "l.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no runs at budget"):
        report.plot_layer_budgets(doc, tmp_path / "m.png", 0.5)


def test_report_load_rejects_bad_files(tmp_path):
    import json

    from benchmarks.accuracy import report

    with pytest.raises(ValueError, match="does not exist"):
        report.load(tmp_path / "none.json")
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an accuracy sweep result"):
        report.load(p)
    p.write_text(json.dumps({"format": "sglang-depthkv-accuracy", "samples": []}))
    with pytest.raises(ValueError, match="no samples"):
        report.load(p)


def test_sweep_arguments_are_checked(tmp_path):
    from benchmarks.accuracy.sweep import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--tasks", "qa"])
    with pytest.raises(SystemExit):
        parse_args(["--lengths", "2048,4096", "--counts", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--lengths", "9000", "--counts", "1", "--policies", "snapkv"])
    with pytest.raises(SystemExit):
        parse_args(["--policies", "depthkv", "--profile", str(tmp_path / "none.json")])
    with pytest.raises(SystemExit):
        parse_args(["--policies", "snapkv", "--budgets", "0,0.5"])
    a = parse_args(["--policies", "snapkv,streamingllm", "--budgets", "0.1,0.5", "--lengths", "512", "--counts", "2"])
    assert a.policies == ["snapkv", "streamingllm"] and a.budgets == [0.1, 0.5] and a.counts == [2]
    assert a.model == "smollm2"
    with pytest.raises(SystemExit):
        parse_args(["--model", "qwen", "--policies", "snapkv"])
    with pytest.raises(SystemExit):  # DepthKV + LaProx needs a LaProx-calibrated profile
        parse_args(["--policies", "depthkv_laprox"])
    a = parse_args(["--model", "qwen2.5-coder-0.5b", "--policies", "snapkv"])
    assert a.model == "qwen2.5-coder-0.5b"


def test_report_names_outputs_after_the_result_and_titles_the_model(tmp_path):
    from benchmarks.accuracy import report

    assert report.output_paths(Path("r/accuracy.json"), tmp_path) == (
        tmp_path / "accuracy.md", tmp_path / "accuracy.png", tmp_path / "layer_budgets.png")
    assert report.output_paths(Path("accuracy-qwen2.5-0.5b.json"), tmp_path) == (
        tmp_path / "accuracy-qwen2.5-0.5b.md", tmp_path / "accuracy-qwen2.5-0.5b.png",
        tmp_path / "layer_budgets-qwen2.5-0.5b.png")
    doc = _doc() | {"model": {"name": "Qwen2.5-Coder-0.5B-Instruct"}}
    assert report.write_markdown(doc, tmp_path / "q.md").startswith(
        "# Accuracy sweep: Qwen2.5-Coder-0.5B-Instruct (real weights")


def _ours_and_peers(peer_samples, **extra):
    """Our sweep document with answers set, and a kvpress peers document of ``peer_samples``:
    ``(task, length, answers, [(policy, budget, score)], extra fields)``."""
    ours = _doc()
    for s, ans in zip(ours["samples"], (["60574"], ["1", "2"])):
        s["answers"] = ans
    samples = [dict({"task": t, "target_tokens": n, "index": 0, "answers": a,
                     "runs": [{"policy": p, "budget": b, "output": "x", "score": sc} for p, b, sc in runs]}, **more)
               for t, n, a, runs, more in peer_samples]
    peers = dict({"format": "sglang-depthkv-accuracy", "version": 1, "command": "python -m benchmarks.accuracy.kvpress_peers Y",
                  "peers": {"kvpress": "0.5.5", "transformers": "5.2.0", "labels": {"snapkv": "kvpress SnapKVPress"}},
                  "samples": samples}, **extra)
    return ours, peers


def test_peers_report_tables_the_common_samples(tmp_path):
    from benchmarks.accuracy import peers_report

    ours, peers = _ours_and_peers([
        ("passkey", 2048, ["60574"], [("full", 1.0, 1.0), ("kvpress:snapkv", 0.1, 0.5), ("kvpress:snapkv", 0.2, 1.0)], {}),
        ("vartrack", 2048, ["A"], [("full", 1.0, 0.0), ("kvpress:snapkv", 0.1, 0.0)], {})])  # not in ours: left out
    md = peers_report.write(ours, peers, tmp_path / "p.md")
    lines = md.splitlines()
    i = lines.index("| policy | 10% |")  # budgets in both runs: 0.1 only; the vartrack sample is only theirs
    assert lines[i + 2:i + 7] == ["| full cache | 1.000 |", "| uniform SnapKV | 0.000 |", "| DepthKV + SnapKV | 1.000 |",
                                  "| full cache (kvpress venv) | 1.000 |", "| kvpress SnapKVPress | 0.500 |"]
    assert "1 common samples" in md
    assert "Full cache: ours 1.000, the kvpress venv's 1.000." in md
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    peers["samples"][0]["answers"] = ["11111"]
    with pytest.raises(ValueError, match="expected answers differ"):
        peers_report.write(ours, peers, tmp_path / "q.md")


def test_peers_report_tables_by_length_and_names_reused_runs(tmp_path):
    from benchmarks.accuracy import peers_report

    shared = {"made_by": {"kvpress": "0.5.5", "transformers": "5.2.0", "prefill": "shared"}}
    ours, peers = _ours_and_peers([
        ("passkey", 2048, ["60574"], [("full", 1.0, 1.0), ("kvpress:snapkv", 0.1, 0.5)], {}),
        ("multivalue", 4096, ["1", "2"], [("full", 1.0, 0.5), ("kvpress:snapkv", 0.1, 0.25)], shared)],
        reused={"old.json": 1})
    lines = peers_report.write(ours, peers, tmp_path / "p.md").splitlines()
    assert "kvpress, samples' runs copied from earlier runs (`--reuse`): 1 from `old.json`  " in lines
    assert ("kvpress prefill: 1 samples one prefill under each press (kvpress's pipeline), "
            "1 samples one prefill shared by every press (same tokens)  ") in lines
    assert "2 common samples; budget = fraction of the KV kept (kvpress `compression_ratio = 1 - budget`). Mean score:" in lines
    short, long_ = lines.index("### 2048 tokens (1 samples)"), lines.index("### 4096 tokens (1 samples)")
    assert "| kvpress SnapKVPress | 0.500 |" in lines[short:long_]
    assert "| kvpress SnapKVPress | 0.250 |" in lines[long_:]
    assert "| kvpress SnapKVPress | 0.375 |" in lines[:short]  # both lengths together
    mv, pk = lines.index("### Task multivalue (1 samples)"), lines.index("### Task passkey (1 samples)")
    assert long_ < mv < pk
    assert "| kvpress SnapKVPress | 0.250 |" in lines[mv:pk] and "| kvpress SnapKVPress | 0.500 |" in lines[pk:]


def test_kvpress_peers_reuse_checks_model_versions_and_coverage():
    from benchmarks.accuracy.kvpress_peers import reusable

    versions = {"kvpress": "0.5.5", "transformers": "5.2.0"}

    def sample(index, runs, **extra):
        return dict({"task": "passkey", "target_tokens": 2048, "index": index, "answers": ["1"], "n_tokens": 9,
                     "runs": [{"policy": p, "budget": b} for p, b in runs]}, **extra)

    full, snap1, snap2 = ("full", 1.0), ("kvpress:snapkv", 0.1), ("kvpress:snapkv", 0.2)
    doc = {"format": "sglang-depthkv-accuracy", "model": {"name": "M"}, "peers": dict(versions), "config": {},
           "samples": [sample(0, [full, snap1, snap2]), sample(1, [full, snap1]),
                       sample(2, [full, snap1, snap2], made_by={"prefill": "shared"})]}
    got = reusable(doc, "M", versions, ["snapkv"], [0.1, 0.2])
    assert sorted(got) == [("passkey", 2048, 0), ("passkey", 2048, 2)]  # index 1 lacks the 20% run
    assert got[("passkey", 2048, 0)]["made_by"] == dict(versions, prefill="per-press")  # no prefill recorded
    assert got[("passkey", 2048, 2)]["made_by"] == {"prefill": "shared"}
    assert sorted(reusable(doc, "M", versions, ["snapkv"], [0.1])) == [("passkey", 2048, i) for i in range(3)]
    with pytest.raises(ValueError, match="its model is M"):
        reusable(doc, "N", versions, ["snapkv"], [0.1])
    with pytest.raises(ValueError, match="made with"):
        reusable(doc, "M", dict(versions, transformers="5.3.0"), ["snapkv"], [0.1])
    with pytest.raises(ValueError, match="not a document"):
        reusable({"format": "sglang-depthkv-accuracy", "samples": []}, "M", versions, ["snapkv"], [0.1])
