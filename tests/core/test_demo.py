"""Smoke test of the CPU demo (``python -m sglang_depthkv demo``) in a small configuration:
the sweep's 1024-token passkey sample 0 at budget 0.3, quick calibration into a fresh cache
directory."""
import io
import math

import pytest

from sglang_depthkv.demo import build_parser, main, run


def _total_keep(n, L, b, sinks=4, window=32):
    # docs/core-api.md: clip(floor(b*n*L + 0.5), L*min_keep, L*n), min_keep = min(n, sinks+window)
    return min(max(math.floor(b * n * L + 0.5), L * min(n, sinks + window)), L * n)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = io.StringIO()
    args = build_parser().parse_args(["--task", "passkey", "--context-tokens", "1024", "--index", "0", "--budget", "0.3", "--quick",
                                      "--cache-dir",
                                      str(tmp_path_factory.mktemp("demo-cache"))])
    res = run(args, out=out)
    return res, out.getvalue()


def test_demo_output_structure(demo):
    res, text = demo
    L, n = res["num_layers"], res["n_tokens"]
    assert L == 30 and abs(n - 1024) <= 48
    assert "== model: SmolLM2-135M-Instruct" in text
    assert "calibrated in" in text  # fresh cache dir: the profile was calibrated by this run
    assert "== per-layer keep fraction at budget 0.30" in text
    assert f"== passkey sample 0 (seed 0): {n} tokens, answer {res['sample']['answers'][0]}" in text
    assert "== KV tokens kept per layer" in text
    rows = [ln for ln in text.splitlines() if ln[:5].strip().isdigit() and len(ln.split()) == 4]
    assert len(rows) == 2 * L  # fraction table + kept table
    for name in ("full", "depthkv", "snapkv"):
        assert any(ln.startswith(name) for ln in text.splitlines())


def test_demo_numbers(demo):
    res, _ = demo
    L, n = res["num_layers"], res["n_tokens"]
    r = res["results"]
    assert r["full"]["kept"] == [n] * L
    for name in ("depthkv", "snapkv"):
        assert sum(r[name]["kept"]) == _total_keep(n, L, 0.3)
        assert all(min(n, 36) <= k <= n for k in r[name]["kept"])
    # uniform: every layer within one token of b*n (largest remainder makes the total exact)
    assert max(r["snapkv"]["kept"]) - min(r["snapkv"]["kept"]) <= 1
    assert abs(r["snapkv"]["kept"][0] - 0.3 * n) <= 1
    assert sum(res["fractions"]["depthkv"]) / L == pytest.approx(0.3, abs=1e-6)
    assert sum(res["fractions"]["pyramid"]) / L == pytest.approx(0.3, abs=1e-6)
    # SmolLM2 reliably finds a passkey at 1k tokens with the full cache
    key = res["sample"]["answers"][0]
    assert r["full"]["score"] == 1.0 and key in r["full"]["answer"]
    for name in r:
        assert r[name]["score"] == float(key in r[name]["answer"])
        # K and V of SmolLM2's 3 kv heads x 64 dims, float32, per kept (layer, token) slot
        assert r[name]["kv_mib"] == pytest.approx(sum(r[name]["kept"]) * 2 * 3 * 64 * 4 / 2 ** 20)


def test_demo_bad_flags(capsys):
    assert main(["--context-tokens", "100"]) == 2
    assert "--context-tokens must lie in [256, 8000]" in capsys.readouterr().err
    assert main(["--budget", "1.5"]) == 2
    assert "--budget must lie in (0, 1]" in capsys.readouterr().err
    assert main(["--profile", "/nonexistent/profile.json"]) == 2
    assert "--profile /nonexistent/profile.json: no such file" in capsys.readouterr().err
