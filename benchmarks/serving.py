"""Serving throughput of vanilla SGLang vs the sglang-depthkv plugin, measured with SGLang's
own benchmark client against real SGLang servers, all with the same flags except the ``--kv-*`` ones.

    python -m benchmarks.serving --preset cpu-tiny        # functional run on this CPU machine
    python -m benchmarks.serving --preset gpu-llama8b     # the GPU run (benchmarks/gpu/run_all.sh)

Per preset: one server per configuration (vanilla, DepthKV at each budget, LaProx global, the
plugin with ``--kv-policy full``), each driven through the workloads of
``benchmarks/throughput/presets.py``; prints one table (policy, budget, logical KV capacity, peak
running requests, input / output / decode-phase tok/s, TTFT and TPOT p50 / p99, decode tok/s vs
vanilla beside its memory-bandwidth bound) and PASS/FAIL lines for the issue's targets, and writes
``serving-<device>.json`` / ``.md`` and two PNGs into ``--out-dir``. Every size is overridable
(``--set long-decode.input_len=16384``). Weights are dummy (``--load-format dummy``): capacity and
speed are measured, quality is not (``benchmarks/throughput/model_files.py`` says which DepthKV
profile is used). Definitions: ``benchmarks/throughput/report.py`` (DEFINITIONS).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model_name  # noqa: E402
from benchmarks.shown_paths import shown_command  # noqa: E402
from benchmarks.throughput import bound, report  # noqa: E402
from benchmarks.throughput.presets import PRESETS, Preset  # noqa: E402
from benchmarks.throughput.workloads import override_workload, parse_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU_BANNER = ("CPU functional run (tiny model, dummy weights, small sizes, 2 shared cores): it shows that the "
              "benchmark runs end to end; its numbers are not the GPU targets.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Workloads: " + ", ".join(w.key for w in PRESETS["cpu-tiny"].workloads)
                                + ". Configurations: vanilla, full, POLICY@BUDGET (e.g. depthkv@0.3, laprox@0.3).")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="cpu-tiny or gpu-llama8b")
    p.add_argument("--model", help="model dir with config.json (dummy weights); cpu-tiny writes a tiny Llama config")
    p.add_argument("--attention-backend", help="for every server (gpu-llama8b: triton, cpu-tiny: torch_native)")
    p.add_argument("--dtype", help="--dtype for every server (default: the model's; cpu-tiny: float32)")
    p.add_argument("--chunked-prefill-size", type=int, help="for every server; 0 = SGLang's default")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cuda-graph", dest="cuda_graph", action="store_true", default=None, help="CUDA graphs on")
    g.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", help="--disable-cuda-graph everywhere")
    p.add_argument("--vanilla-kv-tokens", type=int,
                   help="vanilla's KV pool in tokens (--max-total-tokens); plugin servers get the same bytes. "
                        "0 = every server sizes its pool from SGLang's own byte budget")
    p.add_argument("--configs", help="comma-separated, run in this order, vanilla first "
                                     "(default: vanilla,depthkv@0.3,depthkv@0.1,full,laprox@0.3,depthkv@0.5,depthkv@0.2)")
    p.add_argument("--workloads", help="comma-separated workload keys, run in this order on every server")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="WORKLOAD.FIELD=VALUE",
                   help="override a workload field, e.g. long-decode.input_len=16384 (repeatable)")
    p.add_argument("--server-arg", dest="server_args", action="append", default=[], metavar="ARG",
                   help="extra argument for every server, e.g. --server-arg=--cuda-graph-max-bs --server-arg=64")
    p.add_argument("--plugin-arg", dest="plugin_args", action="append", default=[], metavar="ARG",
                   help="extra argument for the plugin servers only, e.g. --plugin-arg=--kv-decode-interval "
                        "--plugin-arg=64")
    p.add_argument("--time-budget-s", type=float, help="wall-clock budget of the whole run")
    p.add_argument("--start-timeout-s", type=float, help="per server start-up")
    p.add_argument("--peak-bw-gbs", type=float, help="peak memory bandwidth for the absolute decode bound "
                                                     "(default from the device name: H100 3350, H200 4800)")
    p.add_argument("--device-name", help="override the detected device name")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--work-dir", help="tokenizer, profile, server logs, client outputs (default /tmp/...)")
    p.add_argument("--keep-going", action="store_true",
                   help="after a plugin server fails to start, still try the other plugin configurations")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; start nothing")
    return p.parse_args(argv)


def build_preset(a: argparse.Namespace) -> Preset:
    pr = PRESETS[a.preset]
    kw = {}
    if a.model:
        kw["model"] = a.model
    for name in ("attention_backend", "dtype", "time_budget_s", "start_timeout_s"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    if a.chunked_prefill_size is not None:
        if a.chunked_prefill_size < 0:
            raise ValueError(f"--chunked-prefill-size must be >= 0, got {a.chunked_prefill_size}")
        kw["chunked_prefill_size"] = a.chunked_prefill_size or None
    if a.cuda_graph is not None:
        if a.cuda_graph and pr.device == "cpu":
            raise ValueError("--cuda-graph: the cpu-tiny preset runs on CPU (no CUDA graphs)")
        kw["cuda_graph"] = a.cuda_graph
    if a.vanilla_kv_tokens is not None:
        if a.vanilla_kv_tokens < 0:
            raise ValueError(f"--vanilla-kv-tokens must be >= 0, got {a.vanilla_kv_tokens}")
        if a.vanilla_kv_tokens == 0 and pr.device == "cpu":
            raise ValueError("--vanilla-kv-tokens 0: on CPU SGLang would size the pool from free RAM; give a size")
        kw["vanilla_kv_tokens"] = a.vanilla_kv_tokens or None
    if a.configs:
        cfgs = [c.strip() for c in a.configs.split(",") if c.strip()]
        labels = [parse_config(c).label for c in cfgs]
        if not labels or labels[0] != "vanilla":
            raise ValueError("--configs must start with vanilla (every ratio is against it)")
        if len(set(labels)) != len(labels):
            raise ValueError(f"--configs: repeated configuration in {a.configs!r}")
        kw["configs"] = tuple(labels)
    wls = {w.key: w for w in pr.workloads}
    order = list(wls)
    if a.workloads:
        order = [k.strip() for k in a.workloads.split(",") if k.strip()]
        unknown = [k for k in order if k not in wls]
        if unknown or not order:
            raise ValueError(f"--workloads: unknown {unknown or order}; one of {', '.join(wls)}")
    for s in a.sets:
        m = re.fullmatch(r"([\w-]+)\.(\w+)=(.*)", s)
        if not m:
            raise ValueError(f"--set {s!r}: expected WORKLOAD.FIELD=VALUE")
        if m[1] not in wls:
            raise ValueError(f"--set {s!r}: unknown workload {m[1]!r}; one of {', '.join(wls)}")
        wls[m[1]] = override_workload(wls[m[1]], m[2], m[3])
    kw["workloads"] = tuple(wls[k] for k in order)
    return replace(pr, **kw)


def detect_device(preset: Preset, override: str = None) -> tuple:
    """(device name, file slug)."""
    if override:
        name = override
    elif preset.device == "cpu":
        model = cpu_model_name()
        name = f"CPU ({model}, {os.cpu_count()} cores)" if model else "CPU"
    else:
        try:
            name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            raise RuntimeError("gpu preset: nvidia-smi found no GPU (use --device-name to override)") from None
    if preset.device == "cpu" and not override:
        return name, "cpu"
    m = re.search(r"(H200|H100|H20|A100|B200|L40S|L40|A10G|L4)", name, re.I)
    slug = m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return name, slug


def git_commit() -> str:
    """HEAD's short hash, with ``+dirty`` when tracked files differ from it (None outside a git checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, timeout=30).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def command_line() -> str:
    """The command that ran this script, as ``shown_command`` records it (no checkout path)."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv
    return " ".join(shlex.quote(x) for x in shown_command(argv))


def make_meta(setup, slug: str, command: str) -> dict:
    pr = setup.preset
    from benchmarks.throughput.runner import common_server_args

    return {
        "device": setup.device_name, "device_slug": slug, "banner": CPU_BANNER if pr.device == "cpu" else None,
        "command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
        "preset": asdict(pr), "server_common_args": common_server_args(setup), "plugin_args": list(setup.plugin_args),
        "workloads": [{"key": w.key, "title": w.title, "describe": w.describe()} for w in pr.workloads],
        "peak_bw_gbs": setup.peak_bw_gbs,
        "weight_bytes_per_decode_step": bound.decode_weight_bytes(setup.model_cfg, pr.dtype),
        "kv_bytes_per_token": bound.kv_bytes_per_token(setup.model_cfg, pr.dtype),
        "profile": str(setup.profile),
    }


def write_results(out_dir: Path, slug: str, meta: dict, records, servers, final: bool) -> dict:
    from benchmarks.throughput import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    report.add_ratios(records)
    cs = report.checks(records)
    files = {"json": str(out_dir / f"serving-{slug}.json"), "md": str(out_dir / f"serving-{slug}.md"), "png": []}
    if final:
        wl = [w["key"] for w in meta["workloads"]]
        files["png"] = [
            str(plots.throughput_png(out_dir / f"serving-{slug}-throughput.png", records, wl, meta["device"],
                                     meta["command"])),
            str(plots.capacity_png(out_dir / f"serving-{slug}-capacity.png", servers, meta["device"], meta["command"])),
        ]
    meta = dict(meta, files={k: ([Path(x).name for x in v] if isinstance(v, list) else Path(v).name)
                            for k, v in files.items()}, complete=final)
    Path(files["md"]).write_text(report.markdown(meta, records, servers, cs))
    Path(files["json"]).write_text(report.to_json(meta, records, servers, cs))
    return {"checks": cs, "files": files}


def print_plan(setup, runner_mod) -> None:
    pr = setup.preset
    print(f"preset {pr.name}: {pr.description}")
    print(f"device: {setup.device_name}; time budget {pr.time_budget_s:.0f} s; work dir {setup.work_dir}")
    print("common server args: " + " ".join(runner_mod.common_server_args(setup)))
    for cfg in pr.server_configs():
        pin = pr.vanilla_kv_tokens if not cfg.is_plugin else None
        if cfg.is_plugin and pr.vanilla_kv_tokens:
            if pr.chunked_prefill_size:
                from benchmarks.throughput.pins import equal_bytes_plan

                pin = equal_bytes_plan(pr.vanilla_kv_tokens, cfg.policy, cfg.budget, str(setup.profile),
                                       setup.model_cfg, pr.chunked_prefill_size,
                                       int(setup.model_cfg.get("max_position_embeddings") or 0), pr.dtype,
                                       graph_max_bs=(pr.cuda_graph_max_bs or 0) if pr.cuda_graph else 0,
                                       decode_interval=runner_mod.decode_interval(setup, cfg)).logical_tokens
            else:
                pin = "<equal-bytes N, computed once vanilla reports chunked_prefill_size>"
        args = runner_mod.server_args(setup, cfg, None) + (["--max-total-tokens", str(pin)] if pin else [])
        print(f"[server {cfg.label}] python -m sglang.launch_server --model-path {setup.model_dir} " + " ".join(args))
    for w in pr.workloads:
        cmd = runner_mod.client_command(setup, w, "http://127.0.0.1:PORT", setup.work_dir / "bench" / f"X__{w.key}.jsonl")
        print(f"[client {w.key}] {w.describe()}\n    " + " ".join(shlex.quote(c) for c in cmd))


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        preset = build_preset(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name, slug = detect_device(preset, a.device_name)
    bw = a.peak_bw_gbs if a.peak_bw_gbs is not None else bound.peak_bw_gbs(name)
    from benchmarks.throughput import runner as runner_mod

    work = Path(a.work_dir) if a.work_dir else Path(f"/tmp/depthkv-serving-{slug}")
    setup = runner_mod.prepare(preset, work, name, bw, keep_going=a.keep_going, extra_server_args=tuple(a.server_args),
                               plugin_args=tuple(a.plugin_args))
    if a.dry_run:
        print_plan(setup, runner_mod)
        return 0
    command = command_line()
    meta = make_meta(setup, slug, command)
    out_dir = Path(a.out_dir)
    print(f"serving benchmark: preset {preset.name} on {name}; results -> {out_dir}/serving-{slug}.*", flush=True)
    runner = runner_mod.Runner(setup, on_progress=lambda recs, srvs: write_results(out_dir, slug, meta, recs, srvs,
                                                                                  final=False))
    records = runner.run()
    res = write_results(out_dir, slug, meta, records, runner.servers, final=True)
    print()
    print(report.table(records))
    print()
    print(report.capacity_table(runner.servers))
    print()
    print("\n".join(report.check_lines(res["checks"])))
    print("\nwrote " + ", ".join([res["files"]["json"], res["files"]["md"]] + res["files"]["png"]))
    return 0 if any(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
