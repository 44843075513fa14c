"""``benchmarks/shown_paths.py``: results name the repository's files relative to its root and an
interpreter as ``python``, so no committed result records where the checkout lies."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.shown_paths import ROOT as SHOWN_ROOT, shown, shown_command  # noqa: E402

ABSOLUTE_INTERPRETER = re.compile(r"(?<![\w.])/[^\s\"'`]*/bin/python")


def test_paths_inside_the_repository_are_shown_relative_to_it(tmp_path):
    assert SHOWN_ROOT == ROOT
    assert shown(ROOT / "benchmarks" / "results" / "smollm2_gates.safetensors") == \
        "benchmarks/results/smollm2_gates.safetensors"
    assert shown(tmp_path / "p.json") == str((tmp_path / "p.json").resolve())


def test_a_command_is_recorded_without_the_interpreter_or_checkout_path(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput" / "client.py"), "--model", str(tmp_path / "m"),
           "--request-rate", "2", "--flush-cache"]
    assert shown_command(cmd) == ["python", "benchmarks/throughput/client.py", "--model",
                                  str((tmp_path / "m").resolve()), "--request-rate", "2", "--flush-cache"]
    assert shown_command([".venv/bin/python3.11", "-m", "benchmarks.serving"]) == ["python", "-m", "benchmarks.serving"]
    # a command that does not start with an interpreter keeps its first word
    assert shown_command(["sglang", "serve", "--port", "1"]) == ["sglang", "serve", "--port", "1"]
    assert shown_command([]) == []


def test_committed_results_name_no_interpreter_or_checkout_path():
    offenders = []
    for f in sorted((ROOT / "benchmarks" / "results").iterdir()):
        if f.suffix not in (".json", ".md", ".log"):
            continue
        text = f.read_text(errors="replace")
        hits = ABSOLUTE_INTERPRETER.findall(text) + ([str(ROOT)] if str(ROOT) + "/" in text else [])
        if hits:
            offenders.append(f"{f.name}: {sorted(set(hits))[:3]}")
    assert not offenders, "results that record an absolute interpreter or checkout path:\n" + "\n".join(offenders)
