"""The benchmark's table/JSON formatting with made-up timings (the GPU part cannot run on CPU)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("depthkv_bench_kernels", ROOT / "benchmarks" / "kernels.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look the module up by name
_spec.loader.exec_module(bench)


def test_table_and_json_from_made_up_timings():
    rows = [
        bench.make_row("index_streams (device lens)", 65536, 0.5, 2400.0, "GB/s", 0.8, "copy bandwidth"),
        bench.make_row("index_streams (host lens)", 4096, 0.01, 100.0, "GB/s", 0.03, "copy bandwidth"),
        bench.make_row("snapkv_scores (1 layer)", 131072, 1.0, 50.0, "TFLOP/s", 0.07, "prefill attention time"),
    ]
    assert [r.meets_goal for r in rows] == [True, None, False]
    table = bench.format_table(rows, "Fake GPU", 3000.0, {"layers": 32})
    lines = table.splitlines()
    assert lines[0] == "# Kernel benchmark on Fake GPU"
    assert "3000.0 GB/s" in table
    body = [l for l in lines if l.startswith("| ") and not l.startswith("| kernel")]
    assert len(body) == 3
    cells = [c.strip() for c in body[0].strip("|").split("|")]
    assert cells == ["index_streams (device lens)", "65536", "0.5000", "2400.0 GB/s", "0.800", "copy bandwidth",
                     ">= 0.80", "yes"]
    assert body[1].endswith("| - |") and body[2].endswith("| NO |")
    data = json.loads(bench.to_json(rows, "Fake GPU", 3000.0, {"layers": 32}))
    assert data["device"] == "Fake GPU" and len(data["rows"]) == 3 and data["rows"][2]["meets_goal"] is False


def test_help_runs_on_cpu():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--sizes" in res.stdout
