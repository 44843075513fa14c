"""benchmarks/serving.py: the numbers it computes, checked against hand-computed values; the
command lines of both presets; run_all.sh's syntax and stage commands; and one tiny end-to-end CPU
run (real SGLang servers, SGLang's own client) whose JSON records must carry every required field."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
LLAMA8B = ROOT / "tests" / "sglang" / "data" / "llama31_8b_config.json"
sys.path.insert(0, str(ROOT))

from benchmarks import serving  # noqa: E402
from benchmarks.throughput import bound, logparse, pins, report, runner  # noqa: E402
from benchmarks.throughput.model_files import TINY_LLAMA, resample_rows  # noqa: E402
from benchmarks.throughput.workloads import ServerConfig, parse_config  # noqa: E402

REQUIRED = ("workload", "policy", "budget", "device", "logical_kv_tokens", "peak_running_requests", "output_tok_s",
            "decode_tok_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "ratio_vs_vanilla", "bound_ratio")


def _dec(r, g, tok=100):
    return (f"[2026-11-30 16:55:03] Decode batch, #running-req: {r}, #token: {tok}, token usage: 0.90, "
            f"cpu graph: False, gen throughput (token/s): {g}, #queue-req: 24")


def _pre(seq, new, cached, r):
    return (f"[2026-11-30 16:55:03] Prefill batch, #new-seq: {seq}, #new-token: {new}, #cached-token: {cached}, "
            f"token usage: 0.27, #running-req: {r}, #queue-req: 18, #pending-token: 9729, cpu graph: False, "
            "input throughput (token/s): 18197.00")


# --- numbers on fixed inputs --------------------------------------------------------------------------

def test_decode_stats_count_only_decode_only_steps():
    log = "\n".join([_dec(3, "100.00"),  # first line: its window began before the run -> not decode-only
                     _dec(3, "150.00"), _dec(3, "100.00"), _pre(2, 512, 0, 3),
                     _dec(4, "50.00"),  # a prefill ran in its window -> excluded
                     _dec(4, "200.00"), "some other log line", _dec(2, "100.00"), _pre(1, 8, 4, 2)])
    st = logparse.decode_stats(log)
    # decode-only steps: (3, 150), (3, 100), (4, 200), (2, 100): 12 tokens in 3/150+3/100+4/200+2/100 = 0.09 s
    assert st.decode_only_running == [3, 3, 4, 2]
    assert st.decode_seconds == pytest.approx(0.09)
    assert st.decode_tok_s == pytest.approx(12 / 0.09)
    assert st.peak_running == 4 and st.mean_running == 3.0
    assert logparse.prefill_tokens(log) == (520, 4)
    assert logparse.decode_stats(_pre(1, 8, 0, 0)).decode_tok_s is None


def test_parameter_counts_and_bytes_by_hand():
    # tiny Llama: per layer 128*(128+2*64) + 128*128 + 3*128*256 + 2*128 = 147712; embed = lm_head = 512*128
    c = bound.llama_param_count(TINY_LLAMA)
    assert c["per_layer"] == 147712 and c["total"] == 2 * 65536 + 4 * 147712 + 128 == 722048
    assert bound.decode_weight_bytes(TINY_LLAMA) == (722048 - 65536) * 4
    assert bound.kv_bytes_per_token(TINY_LLAMA) == 2 * 2 * 32 * 4 * 4 == 2048
    llama = json.loads(LLAMA8B.read_text())
    assert bound.llama_param_count(llama)["total"] == 8_030_261_248  # Llama-3.1-8B's published parameter count
    assert bound.kv_bytes_per_token(llama) == 8 * 128 * 2 * 32 * 2 == pins.kv_cell_bytes(llama) == 131072


def test_bandwidth_bound_by_hand():
    assert bound.kept_tokens("vanilla", 1.0, 512, 64) == 544
    assert bound.kept_tokens("full", 1.0, 512, 64) == 544
    assert bound.kept_tokens("depthkv", 0.3, 512, 64) == pytest.approx(0.3 * 512 + 32)
    # steps of batch 2 and 4, W = 1000 B, 100 B of KV per request: 6 tokens in (1200 + 1400) / BW
    assert bound.bound_tok_s([2, 4], 1000, 100, 1.0) == pytest.approx(6 / 2600)
    assert bound.bound_tok_s([2, 4], 1000, 100, 2e9) == pytest.approx(6 / 2600 * 2e9)
    assert bound.bound_tok_s([], 1000, 100) is None
    assert bound.peak_bw_gbs("NVIDIA H200") == 4800 and bound.peak_bw_gbs("NVIDIA H100 80GB HBM3") == 3350
    assert bound.peak_bw_gbs("NVIDIA H100 PCIe") == 2000 and bound.peak_bw_gbs("CPU") is None


def _rec(workload, config, **kw):
    cfg = parse_config(config)
    r = {"workload": workload, "policy": cfg.policy, "budget": cfg.budget, "config": cfg.label, "device": "X",
         "status": "ok", "error": None, "logical_kv_tokens": 1000, "peak_running_requests": 4, "input_tok_s": 100.0,
         "output_tok_s": 10.0, "decode_tok_s": 20.0, "ttft_ms_p50": 1.0, "ttft_ms_p99": 2.0, "tpot_ms_p50": 0.5,
         "tpot_ms_p99": 0.7, "bound_tok_s_per_byte_s": 1e-6, "cache_hit_rate": 0.25, "notes": []}
    r.update(kw)
    return r


def test_ratios_checks_table_and_json():
    recs = [_rec("long-decode", "vanilla"),
            _rec("long-decode", "depthkv@0.3", decode_tok_s=54.0, peak_running_requests=12, logical_kv_tokens=2760,
                 bound_tok_s_per_byte_s=2.9e-6),
            _rec("long-decode", "depthkv@0.1", status="server failed", error="refused: --attention-backend: no"),
            _rec("prefill", "vanilla", input_tok_s=1000.0), _rec("prefill", "full", input_tok_s=960.0),
            _rec("prefill", "depthkv@0.3", input_tok_s=900.0),
            _rec("short-chat", "vanilla", output_tok_s=100.0), _rec("short-chat", "depthkv@0.3", output_tok_s=98.0)]
    report.add_ratios(recs)
    d3 = recs[1]
    assert d3["ratio_vs_vanilla"] == pytest.approx(2.7) and d3["bound_ratio"] == pytest.approx(2.9)
    assert d3["peak_running_ratio"] == pytest.approx(3.0) and d3["logical_kv_ratio"] == pytest.approx(2.76)
    assert recs[0]["ratio_vs_vanilla"] == 1.0 and recs[2]["ratio_vs_vanilla"] is None
    cs = {c["name"]: c for c in report.checks(recs)}
    assert cs["long-decode: depthkv@0.3 decode tok/s >= 2.6x vanilla"]["result"] == "PASS"
    assert cs["long-decode: depthkv@0.3 peak running requests >= 3x vanilla"]["result"] == "PASS"
    na = cs["long-decode: depthkv@0.1 decode tok/s >= 6x vanilla"]
    assert na["result"] == "N/A" and "refused: --attention-backend" in na["detail"]
    full = cs["prefill: full prefill tok/s (plugin overhead <= 5%) >= 0.95x vanilla"]
    assert full["result"] == "PASS" and full["value"] == pytest.approx(0.96)
    dk = cs["prefill: depthkv@0.3 prefill tok/s (scoring + compaction <= 5%) >= 0.95x full"]
    assert dk["result"] == "FAIL" and dk["value"] == pytest.approx(900 / 960)
    assert cs["short-chat: depthkv@0.3 output tok/s >= 0.97x vanilla"]["result"] == "PASS"
    lines = report.check_lines(list(cs.values()))
    assert lines[0].startswith("PASS  long-decode: depthkv@0.3 decode tok/s >= 2.6x vanilla: 2.70x (54 vs 20; "
                               "bandwidth bound 2.90x)")
    row = [l for l in report.table(recs).splitlines() if l.startswith("| long-decode | depthkv@0.3 ")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["long-decode", "depthkv@0.3", "0.3", "2760", "12", "100.0", "10.0", "54.0", "1.0 / 2.0",
                     "0.50 / 0.70", "2.70x (2.90x)", "25.0%", "ok"]
    meta = {"device": "X", "command": "cmd", "preset": {"name": "p", "description": "d"}, "date": "now",
            "server_common_args": ["--a"], "workloads": [{"key": "long-decode", "title": "t", "describe": "d"}]}
    doc = json.loads(report.to_json(meta, recs, {}, list(cs.values())))
    assert doc["records"][1]["ratio_vs_vanilla"] == pytest.approx(2.7) and len(doc["checks"]) == 6
    md = report.markdown(meta, recs, {}, list(cs.values()))
    assert "| long-decode | depthkv@0.1 | 0.1 |" in md and "server failed: refused: --attention-backend" in md


def test_recorded_bench_serving_output_is_read_field_by_field(tmp_path):
    """A result line recorded from SGLang's client (CPU run, vanilla, 32 x 512 in / 64 out)."""
    res = json.loads((DATA / "bench_serving_random_ids.json").read_text())
    setup = runner.RunSetup(serving.PRESETS["cpu-tiny"], tmp_path, tmp_path, dict(TINY_LLAMA), tmp_path, tmp_path,
                            "CPU", peak_bw_gbs=None)
    w = setup.preset.workload("long-decode")
    log = "\n".join([_dec(8, "1255.97"), _dec(8, "1272.44"), _dec(8, "1180.40")])
    rec = runner.workload_record(setup, ServerConfig("vanilla"), w, res, log, 4096)
    assert rec["status"] == "ok" and rec["completed"] == 32
    assert rec["input_tok_s"] == res["input_throughput"] and rec["output_tok_s"] == res["output_throughput"]
    assert rec["ttft_ms_p50"] == res["median_ttft_ms"] and rec["ttft_ms_p99"] == res["p99_ttft_ms"]
    assert rec["tpot_ms_p50"] == res["median_tpot_ms"] and rec["tpot_ms_p99"] == res["p99_tpot_ms"]
    assert rec["mean_prompt_len"] == 512 and rec["mean_output_len"] == 64
    assert rec["cache_hit_rate"] == pytest.approx(0.0624)
    assert rec["decode_tok_s"] == pytest.approx(16 / (8 / 1272.44 + 8 / 1180.40))
    assert rec["peak_running_requests"] == 8 and rec["logical_kv_tokens"] == 4096
    W, kv = (722048 - 65536) * 4, 2048 * (512 + 32)
    assert rec["bound_tok_s_per_byte_s"] == pytest.approx(16 / (2 * (W + 8 * kv)))
    assert rec["bound_tok_s"] is None  # no peak bandwidth known for this CPU
    partial = runner.workload_record(setup, ServerConfig("vanilla"), w, dict(res, completed=30), log, 4096)
    assert partial["status"] == "partial: 30/32 completed"
    one = runner.workload_record(setup, ServerConfig("vanilla"), w, dict(res, total_output_tokens=32), log, 4096)
    assert one["tpot_ms_p50"] is None and one["tpot_ms_p99"] is None  # 1 token each: no time per output token


def test_capacity_table_and_pool_line_parse(tmp_path):
    from sglang_depthkv.sglang.capacity import plan_for_tokens

    plan = plan_for_tokens(5000, [0.5, 0.1, 0.3, 0.3], 512, 512)
    text = ("[2026-11-30 17:00:55] \n" + plan.table("depthkv", 0.3) + "\n[2026-11-30 17:00:55] max_total_num_tokens="
            "5000, chunked_prefill_size=512, max_prefill_tokens=16384, max_running_requests=2048, context_len=4096, "
            "available_cpu_mem=15.41 GB\n")
    cap = logparse.capacity_table(text)
    assert cap["capacities"] == list(plan.capacities) == [3012, 1012, 2012, 2012]
    assert cap["fractions"] == [0.5, 0.1, 0.3, 0.3] and cap["headroom"] == 512 and cap["logical_tokens"] == 5000
    assert cap["kv_gib"] == pytest.approx(plan.kv_bytes() / 2**30, abs=1e-4)
    pl = logparse.pool_line(text)
    assert pl["max_total_num_tokens"] == 5000 and pl["chunked_prefill_size"] == 512 and pl["context_len"] == 4096
    assert logparse.capacity_table("no table") is None and logparse.pool_line("nothing") is None
    assert logparse.failure_reason("x\nsglang_depthkv.sglang.config.DepthKVConfigError: --attention-backend: "
                                   "'flashinfer' not supported\n") == "refused: --attention-backend: 'flashinfer' not supported"
    assert logparse.failure_reason("UserWarning: x\nerror: --kv-budget: must be in (0, 1], got 1.5\n") == \
        "refused: --kv-budget: must be in (0, 1], got 1.5"  # launch_server's one-line usage error
    assert logparse.failure_reason("a\nRuntimeError: boom\nb") == "failed: RuntimeError: boom"


def test_equal_bytes_pins_fit_vanilla_bytes(tmp_path):
    from sglang_depthkv.sglang.capacity import plan_for_tokens
    from sglang_depthkv.sglang.plugin_memory import items_function

    from benchmarks.throughput.model_files import write_resampled_profile

    prof = write_resampled_profile(tmp_path / "p.json", TINY_LLAMA)
    cell = 2048
    for policy, budget in (("depthkv", 0.3), ("depthkv", 0.1), ("laprox", 0.3), ("full", 1.0)):
        plan = pins.equal_bytes_plan(4096, policy, budget, str(prof), TINY_LLAMA, 512, 4096)
        # KV + metadata + the plugin's other buffers inside vanilla's bytes
        assert plan.headroom == 512 and plan.total_bytes() <= 4096 * cell
        assert (plan.plugin_bytes() > 0) == (policy != "full")
        shapes = pins.plugin_shapes(TINY_LLAMA, 4096, 512, None, 0, 0, policy, budget)
        bigger = plan_for_tokens(plan.logical_tokens + 1, plan.fractions, 512, cell // 4, items_function(shapes))
        assert bigger.total_bytes() > 4096 * cell  # and the largest such N
        assert sum(plan.fractions) / 4 == pytest.approx(budget)
    # a profile calibrated with LaProx: DepthKV scores with LaProx and reserves its transients, as the plugin does
    from benchmarks.throughput.model_files import ROOT

    lap = write_resampled_profile(tmp_path / "lap.json", TINY_LLAMA,
                                  source=ROOT / "benchmarks" / "results" / "smollm2_profile_laprox.json")
    snap_plan = pins.equal_bytes_plan(4096, "depthkv", 0.3, str(prof), TINY_LLAMA, 512, 4096)
    lap_plan = pins.equal_bytes_plan(4096, "depthkv", 0.3, str(lap), TINY_LLAMA, 512, 4096)
    assert lap_plan.plugin_bytes() > snap_plan.plugin_bytes()
    assert pins.plugin_shapes(TINY_LLAMA, 4096, 512, None, 0, 0, "depthkv", 0.3, str(lap)).laprox
    assert not pins.plugin_shapes(TINY_LLAMA, 4096, 512, None, 0, 0, "depthkv", 0.3, str(prof)).laprox
    full = pins.equal_bytes_plan(4096, "full", 1.0, None, TINY_LLAMA, 512, 4096)
    assert full.logical_tokens < 4096  # the mapping and free lists cost a little
    # every slot costs cell/4 = 512 B at each of 4 layers; metadata 4*4 + 8 B per logical token + 8 B per slot:
    # 4 * (N + 1) * 512 + 4 * (N + 2) * 4 + 4 * N * 8 + N * 8 <= 4096 * 2048  ->  N = 3985
    assert full.logical_tokens == 3985


def test_profile_is_resampled_over_depth(tmp_path):
    assert resample_rows([[0.0, 1.0], [2.0, 3.0]], 3) == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]
    assert resample_rows([[0.0], [3.0], [6.0]], 2) == [[0.0], [6.0]]
    from sglang_depthkv.core.profile import load_profile
    from sglang_depthkv.core.types import ModelIdentity

    from benchmarks.throughput.model_files import SMOLLM2_PROFILE, hf_config_view, write_resampled_profile

    llama = json.loads(LLAMA8B.read_text())
    p = load_profile(write_resampled_profile(tmp_path / "p.json", llama),
                     ModelIdentity.from_hf_config(hf_config_view(llama)))
    src = load_profile(SMOLLM2_PROFILE)
    assert p.num_layers == 32 and p.sensitivity[0] == src.sensitivity[0] and p.sensitivity[-1] == src.sensitivity[-1]


# --- command lines ---------------------------------------------------------------------------------------

def _setup(tmp_path, argv, device):
    a = serving.parse_args(argv)
    pr = serving.build_preset(a)
    return runner.prepare(pr, tmp_path / "work", device, None, plugin_args=tuple(a.plugin_args))


def test_gpu_preset_commands(tmp_path):
    model = tmp_path / "llama8b"
    model.mkdir()
    (model / "config.json").write_text(LLAMA8B.read_text())
    s = _setup(tmp_path, ["--preset", "gpu-llama8b", "--model", str(model), "--set", "long-decode.input_len=16384",
                          "--set", "short-chat.max_concurrency=none"], "NVIDIA H200")
    van = runner.server_args(s, ServerConfig("vanilla"), 65536)
    dk = runner.server_args(s, ServerConfig("depthkv", 0.3), 190000)
    common = runner.common_server_args(s)
    assert van == common + ["--max-total-tokens", "65536"]
    assert dk == common + ["--max-total-tokens", "190000", "--kv-policy", "depthkv", "--kv-budget", "0.3",
                           "--kv-profile", str(s.profile), "--kv-decode-interval", "128"]
    assert runner.server_args(s, ServerConfig("laprox", 0.3), 9)[-4:] == ["--kv-budget", "0.3",
                                                                         "--kv-decode-interval", "128"]
    assert runner.server_args(s, ServerConfig("full"), 60000)[-2:] == ["--kv-policy", "full"]  # nothing to prune
    assert ["--attention-backend", "triton"] == common[common.index("--attention-backend"):][:2]
    assert ["--load-format", "dummy"] == common[common.index("--load-format"):][:2]
    for flag in ("--disable-cuda-graph", "--chunked-prefill-size", "--dtype", "--max-total-tokens"):
        assert flag not in common  # CUDA graphs on, SGLang's default chunked prefill, the model's dtype
    assert s.preset.workload("long-decode").input_len == 16384
    assert s.preset.workload("short-chat").max_concurrency is None
    tok = json.loads((s.tokenizer_dir / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == 128256  # the model's vocabulary: every output id decodes to text
    cmd = runner.client_command(s, s.preset.workload("long-decode"), "http://h:1", tmp_path / "o.jsonl")
    assert cmd[1].endswith("benchmarks/throughput/client.py")
    joined = " ".join(cmd)
    for part in ("--backend sglang --base-url http://h:1", "--dataset-name random-ids", "--tokenize-prompt",
                 "--random-input-len 16384 --random-output-len 1024", "--num-prompts 48", "--warmup-requests 1",
                 "--flush-cache", "--cache-report", f"--tokenizer {s.tokenizer_dir}"):
        assert part in joined
    gsp = " ".join(runner.client_command(s, s.preset.workload("shared-prefix"), "http://h:1", tmp_path / "o.jsonl"))
    assert "--dataset-name generated-shared-prefix" in gsp and "--gsp-num-groups 8 --gsp-prompts-per-group 8" in gsp
    assert "--tokenize-prompt" not in gsp  # SGLang's gsp dataset sends text


def test_cpu_preset_commands_and_plugin_args(tmp_path):
    s = _setup(tmp_path, ["--preset", "cpu-tiny", "--plugin-arg=--kv-decode-interval", "--plugin-arg=24",
                          "--configs", "vanilla,depthkv@0.2"], "CPU")
    assert json.loads((s.model_dir / "config.json").read_text())["num_hidden_layers"] == 4
    common = runner.common_server_args(s)
    for part in (["--attention-backend", "torch_native"], ["--chunked-prefill-size", "512"], ["--dtype", "float32"]):
        assert part == common[common.index(part[0]):][:2]
    assert "--disable-cuda-graph" in common
    assert runner.server_args(s, ServerConfig("vanilla"), 4096)[-2:] == ["--max-total-tokens", "4096"]
    dk = runner.server_args(s, ServerConfig("depthkv", 0.2), 9)
    assert dk[-2:] == ["--kv-decode-interval", "24"] and dk.count("--kv-decode-interval") == 1  # replaces the preset's
    assert [c.label for c in s.preset.server_configs()] == ["vanilla", "depthkv@0.2"]
    s = _setup(tmp_path, ["--preset", "cpu-tiny", "--plugin-arg=--kv-decode-interval=0"], "CPU")
    assert runner.server_args(s, ServerConfig("snapkv", 0.3), 9)[-1] == "--kv-decode-interval=0"
    assert runner.server_args(s, ServerConfig("snapkv", 0.3), 9).count("--kv-decode-interval") == 0
    s = _setup(tmp_path, ["--preset", "cpu-tiny"], "CPU")
    assert runner.server_args(s, ServerConfig("snapkv", 0.3), 9)[-2:] == ["--kv-decode-interval", "16"]
    assert "--kv-decode-interval" not in runner.server_args(s, ServerConfig("vanilla"), 9)
    assert "--kv-decode-interval" not in runner.server_args(s, ServerConfig("full"), 9)


@pytest.mark.parametrize("argv, message", [
    (["--configs", "depthkv@0.3,vanilla"], "must start with vanilla"),
    (["--configs", "vanilla,depthkv@1.5"], "not in (0, 1]"),
    (["--configs", "vanilla,kvzip@0.3"], "kvzip needs trained gates"),
    (["--configs", "vanilla,magic@0.3"], "unknown policy 'magic'"),
    (["--workloads", "long-decode,nope"], "--workloads: unknown ['nope']"),
    (["--set", "long-decode.bogus=1"], "unknown field"),
    (["--set", "nope.input_len=1"], "unknown workload 'nope'"),
    (["--set", "long-decode.input_len=abc"], "not a valid int"),
    (["--set", "long-decode.input_len=0"], "input_len must be >= 1"),
    (["--vanilla-kv-tokens", "0"], "free RAM"),
    (["--cuda-graph"], "no CUDA graphs"),
])
def test_bad_arguments_are_named(argv, message):
    a = serving.parse_args(["--preset", "cpu-tiny"] + argv)
    with pytest.raises(ValueError) as e:
        serving.build_preset(a)
    assert message in str(e.value)


def test_cli_help_and_gpu_dry_run(tmp_path):
    env = dict(os.environ)
    h = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=env)
    assert h.returncode == 0 and "--preset {cpu-tiny,gpu-llama8b}" in h.stdout
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(LLAMA8B.read_text())
    d = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--preset", "gpu-llama8b", "--model", str(model),
                        "--device-name", "NVIDIA H200", "--work-dir", str(tmp_path / "w"), "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
    assert d.returncode == 0, d.stderr[-2000:]
    servers = [l for l in d.stdout.splitlines() if l.startswith("[server ")]
    assert [l.split("]")[0][8:] for l in servers] == ["vanilla", "depthkv@0.3", "depthkv@0.1", "full", "laprox@0.3",
                                                      "depthkv@0.5", "depthkv@0.2"]
    assert "--max-total-tokens 65536" in servers[0] and "--kv-policy" not in servers[0]
    assert all("--kv-decode-interval 128" in l for i, l in enumerate(servers) if i not in (0, 3))
    assert "--kv-decode-interval" not in servers[0] + servers[3]  # vanilla, full
    assert "device: NVIDIA H200; time budget 330 s" in d.stdout
    assert len([l for l in d.stdout.splitlines() if l.startswith("[client ")]) == 4


def test_run_all_sh_syntax_and_stages(tmp_path):
    sh = ROOT / "benchmarks" / "gpu" / "run_all.sh"
    assert subprocess.run(["bash", "-n", str(sh)], capture_output=True).returncode == 0
    r = subprocess.run(["bash", str(sh)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "w"),
                                SERVING_ARGS="--configs vanilla,depthkv@0.3"))
    assert r.returncode == 0, r.stderr
    cmds = [l[len("DRY_RUN: "):] for l in r.stdout.splitlines() if l.startswith("DRY_RUN: ")]
    assert len(cmds) == 5
    assert cmds[0].endswith("bash .gpu/smoke.sh") and f"LOG={tmp_path}/w/smoke.server.log" in cmds[0]
    assert "benchmarks.throughput.capacity_check --model .gpu/model-llama8b --vanilla-log" in cmds[1]
    assert "benchmarks/kernels.py" in cmds[2] and "pytest" in cmds[3] and "-m gpu" in cmds[3]
    assert re.search(r"^timeout \d+ python3 -m benchmarks\.serving --preset gpu-llama8b --time-budget-s 5[23]\d ", cmds[4])
    assert cmds[4].endswith("--configs vanilla,depthkv@0.3")


def test_capacity_check_summary():
    from benchmarks.throughput import capacity_check as cc

    van = "x\n[t] max_total_num_tokens=417701, chunked_prefill_size=8192, max_prefill_tokens=16384, context_len=131072\n"
    plug = ("sglang-depthkv capacity: policy=depthkv budget=0.3 headroom=8192 tokens/layer\n"
            "layer  fraction     capacity       GiB\n    0    0.3000       400000    1.5259\n"
            "total KV 1.5259 GiB + metadata 0.0100 GiB = 1.5359 GiB; logical capacity max_total_num_tokens=1302000\n"
            "[t] max_total_num_tokens=1302000, chunked_prefill_size=8192, context_len=131072\n")
    s = cc.summarize(van, plug, "depthkv@0.3")
    assert s["vanilla_tokens"] == 417701 and s["plugin_tokens"] == 1302000
    assert s["ratio"] == pytest.approx(1302000 / 417701) and s["plugin_kv_gib"] == 1.5259
    failed = cc.summarize(van, "DepthKVConfigError: --cuda-graph: no\n", "depthkv@0.3")
    assert failed["ratio"] is None and failed["plugin_failure"] == "refused: --cuda-graph: no"
    assert cc.plugin_flags("depthkv", 0.3, "p.json") == ["--kv-policy", "depthkv", "--kv-budget", "0.3",
                                                         "--kv-profile", "p.json"]


# --- one tiny end-to-end CPU run ------------------------------------------------------------------------

@pytest.mark.engine
def test_tiny_cpu_run_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # snapkv@0.005 keeps 20 of 4096 tokens, less than sinks + window: the plugin refuses it at start-up
    cmd = [sys.executable, "-m", "benchmarks.serving", "--preset", "cpu-tiny", "--configs",
           "vanilla,depthkv@0.3,snapkv@0.005",
           "--workloads", "long-decode", "--set", "long-decode.num_prompts=12", "--set", "long-decode.output_len=16",
           "--out-dir", str(out), "--work-dir", str(work), "--time-budget-s", "400"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    doc = json.loads((out / "serving-cpu.json").read_text())
    assert doc["complete"] and doc["device_slug"] == "cpu" and "--preset cpu-tiny" in doc["command"]
    recs = {x["config"]: x for x in doc["records"]}
    assert set(recs) == {"vanilla", "depthkv@0.3", "snapkv@0.005"}
    refused = recs.pop("snapkv@0.005")
    assert refused["status"] == "server failed" and refused["error"].startswith("refused: --kv-budget: 0.005 keeps")
    assert doc["servers"]["snapkv@0.005"]["status"] == "failed"
    for x in recs.values():
        assert x["status"] == "ok", x
        for k in REQUIRED:
            assert x[k] is not None, (x["config"], k)
        assert x["completed"] == 12 and x["total_output_tokens"] == 12 * 16
        assert x["output_tok_s"] > 0 and x["decode_tok_s"] > 0 and x["input_tok_s"] > 0
        assert 0 < x["ttft_ms_p50"] <= x["ttft_ms_p99"] and 0 < x["tpot_ms_p50"]
        assert x["decode_steps"] >= 1 and math.isfinite(x["bound_ratio"])
        # the record names the client as it would be run from the repository, not where this checkout lies
        assert x["client_command"][:2] == ["python", "benchmarks/throughput/client.py"], x["client_command"][:2]
    van, dk = recs["vanilla"], recs["depthkv@0.3"]
    assert van["logical_kv_tokens"] == 4096 and van["ratio_vs_vanilla"] == 1.0 and van["bound_ratio"] == 1.0
    # vanilla's pool holds at most 4096 // 512 distinct prompts at once; 2 of the 12 seed-1 prompts repeat another
    # one (random-ids wraps the 512-token vocabulary) and share its KV through the radix tree
    assert 1 <= van["peak_running_requests"] <= 4096 // 512 + 2
    assert 1 <= dk["peak_running_requests"] <= 12
    srv = doc["servers"]["depthkv@0.3"]
    cap = srv["capacity"]
    # more logical tokens than vanilla in the same bytes (the tiny pool also pays the scoring reserve and
    # one prefill chunk of headroom per layer, so the gain depends on how the profile spreads the budget:
    # 1.29x with the committed SmolLM2 profile resampled to these 4 layers)
    assert cap["logical_tokens"] == dk["logical_kv_tokens"] == srv["pinned_tokens"] > 1.25 * 4096
    # the same bytes as vanilla's pool, the plugin's other buffers included
    assert (cap["kv_gib"] + cap["metadata_gib"] + cap["plugin_gib"]) * 2**30 <= 4096 * 2048 * 1.0001
    assert cap["plugin_gib"] > 0
    assert cap["policy"] == "depthkv" and len(cap["capacities"]) == 4
    md = (out / "serving-cpu.md").read_text()
    assert "CPU functional run" in md and "| long-decode | depthkv@0.3 | 0.3 |" in md
    for png in ("serving-cpu-throughput.png", "serving-cpu-capacity.png"):
        assert (out / png).stat().st_size > 10_000
