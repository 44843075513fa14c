r"""Soak test through SGLang's real HTTP server with the plugin: many concurrent requests with random
prompt lengths and shared prefixes, some aborted mid-stream or while queued, a few over the
per-layer length limit, chunked prefill on, a KV pool under per-layer pressure; then every answer,
the server, SGLang's idle memory check, our per-layer invariants and a full drain of every layer
are checked.

CPU (the committed results, benchmarks/results/soak-cpu.*):

    python benchmarks/soak.py --tiny-model llama --kv-policy depthkv --kv-profile calibrate \
        --kv-budget 0.2 --requests 500 --prompt-len 1 2000 --new-tokens 1 128 \
        --chunked-prefill-size 512 --max-total-tokens 16384 --out benchmarks/results/soak-cpu

GPU (one command after the set-up of ../shared/gpu/README.md; the dummy model has no profile, so a
policy without one; CUDA graphs stay on; no --max-total-tokens: SGLang sizes the pool):

    python3 benchmarks/soak.py --model .gpu/model-llama8b --kv-policy snapkv --kv-budget 0.2 \
        --requests 2000 --prompt-len 1 16000 --new-tokens 1 256 --chunked-prefill-size 4096 \
        --server-args "--load-format dummy --grammar-backend none --mm-feature-transport=cpu" \
        --workdir /tmp/soak --out $OUT/soak-gpu

Prints and writes ``OUT.json`` and ``OUT.md``: requests sent / completed / aborted / refused,
requests/s, output tok/s, peak running requests (SGLang's ``Decode batch, #running-req`` log lines,
one per decode step: ``--decode-log-interval 1``), retractions (SGLang's log), the plugin's per-layer
pressure counters and the invariant verdicts (the per-layer idle check runs on every idle turn:
``SGLANG_DEPTHKV_IDLE_CHECK_S=0``). Exit status 0 only if every check passed. The server
log, the invariant log (``SGLANG_DEPTHKV_INVARIANT_LOG``) and one JSON line per request (ids in and
out) stay in ``--workdir``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from machine import cpu_model_name  # noqa: E402
from server import SGLangServer, _cuda_available, http_json  # noqa: E402
from shown_paths import shown_command  # noqa: E402
from soak_checks import invariant_verdict, kept_fraction_in_tree, parse_server_log  # noqa: E402
from soak_client import send_all  # noqa: E402
from soak_workload import MODES, build_workload, overlong_requests  # noqa: E402

INVARIANT_ENV = "SGLANG_DEPTHKV_INVARIANT_LOG"  # sglang_depthkv.sglang.invariant_log.ENV
IDLE_CHECK_ENV = "SGLANG_DEPTHKV_IDLE_CHECK_S"  # patches/invariant_checker.py: PERIOD_ENV
POLICIES = ("depthkv", "laprox", "kvzip", "snapkv", "pyramid", "streamingllm", "full")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/soak.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="model directory (config.json; weights unless --load-format dummy)")
    m.add_argument("--tiny-model", choices=("llama", "qwen2", "qwen3"), default=None,
                   help="build a tiny random model of this architecture in --workdir (tests/tiny_models.py, "
                        "max_position_embeddings 4096) instead of --model")
    k = p.add_argument_group("plugin")
    k.add_argument("--kv-policy", choices=POLICIES, required=True)
    k.add_argument("--kv-budget", type=float, default=0.2)
    k.add_argument("--kv-profile", default=None,
                   help="DepthKV profile file, or 'calibrate': run `python -m sglang_depthkv calibrate` on the "
                        "model (bytes as token ids) into --workdir")
    k.add_argument("--kv-gates", default=None)
    k.add_argument("--kv-window", type=int, default=None)
    k.add_argument("--kv-sinks", type=int, default=None)
    k.add_argument("--kv-decode-interval", type=int, default=None)
    s = p.add_argument_group("server")
    s.add_argument("--chunked-prefill-size", type=int, required=True,
                   help="prefill chunk in tokens; smaller than --prompt-len's maximum so long prompts are chunked")
    s.add_argument("--max-total-tokens", type=int, default=None,
                   help="logical KV pool size (required on CPU; small enough that the per-layer pools are under "
                        "pressure)")
    s.add_argument("--max-running-requests", type=int, default=None)
    s.add_argument("--server-args", default="", help="further launch_server flags, one shell-quoted string")
    s.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the server (repeatable), e.g. "
                        "SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION=32 to make SGLang admit more eagerly (more retractions)")
    s.add_argument("--start-timeout", type=float, default=900.0)
    w = p.add_argument_group("load")
    w.add_argument("--requests", type=int, default=500)
    w.add_argument("--prompt-len", type=int, nargs=2, default=(1, 2000), metavar=("MIN", "MAX"))
    w.add_argument("--new-tokens", type=int, nargs=2, default=(1, 64), metavar=("MIN", "MAX"),
                   help="max_new_tokens range (ignore_eos); abort requests draw from max(MIN,16)..max(MAX,16)")
    w.add_argument("--prefixes", type=int, default=8, help="number of shared prefixes")
    w.add_argument("--share-frac", type=float, default=0.75, help="fraction of prompts that start with a shared prefix")
    w.add_argument("--stream-frac", type=float, default=0.25, help="fraction of non-abort requests streamed")
    w.add_argument("--abort-frac", type=float, default=0.1, help="fraction of requests aborted (3 ways, see --help)")
    w.add_argument("--overlong", type=int, default=4,
                   help="extra requests with a prompt above the server's per-layer input limit, mixed into the "
                        "load; each must be refused at once with SGLang's input-length error (none when the plugin "
                        "did not lower the limit)")
    w.add_argument("--token-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="input ids drawn from [LO, HI] (default 1 .. vocab_size-1)")
    w.add_argument("--max-concurrency", type=int, default=0, help="0: every request in flight at once")
    w.add_argument("--request-rate", type=float, default=0.0, help="Poisson arrivals per second; 0: all at t=0")
    w.add_argument("--warmup", type=int, default=2,
                   help="short requests sent before the timed load (on a GPU the first requests pay kernel JIT)")
    w.add_argument("--request-timeout", type=float, default=3600.0)
    w.add_argument("--idle-timeout", type=float, default=300.0, help="seconds to wait for the server to go idle")
    w.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="output prefix: writes OUT.json and OUT.md")
    o.add_argument("--workdir", default=None, help="server log, invariant log, per-request results (default: a new temp dir)")
    return p


# --- set-up ---------------------------------------------------------------------------------------------
def prepare_model(args, workdir: Path) -> str:
    if (args.model is None) == (args.tiny_model is None):
        raise ValueError("give exactly one of --model and --tiny-model")
    if args.model is not None:
        if not (Path(args.model) / "config.json").is_file():
            raise ValueError(f"--model {args.model}: no config.json there")
        return str(args.model)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny_model

    return str(save_tiny_model(workdir / f"tiny-{args.tiny_model}", args.tiny_model, seed=args.seed,
                               max_position_embeddings=4096))


def prepare_profile(args, model: str, workdir: Path) -> Optional[str]:
    if args.kv_profile != "calibrate":
        return args.kv_profile
    out = workdir / "profile.json"
    cmd = [sys.executable, "-m", "sglang_depthkv", "calibrate", "--model", model, "--tokenizer", "bytes",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"calibration failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return str(out)


def vocab_size(model: str) -> int:
    cfg = json.loads((Path(model) / "config.json").read_text())
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if not v:
        raise ValueError(f"{model}/config.json has no vocab_size")
    return int(v)


def server_flags(args, profile: Optional[str], on_cpu: bool) -> List[str]:
    flags = ["--kv-policy", args.kv_policy]
    if args.kv_policy != "full":
        flags += ["--kv-budget", str(args.kv_budget)]
    for flag, v in (("--kv-profile", profile), ("--kv-gates", args.kv_gates), ("--kv-window", args.kv_window),
                    ("--kv-sinks", args.kv_sinks), ("--kv-decode-interval", args.kv_decode_interval),
                    ("--max-total-tokens", args.max_total_tokens),
                    ("--max-running-requests", args.max_running_requests)):
        if v is not None:
            flags += [flag, str(v)]
    flags += ["--chunked-prefill-size", str(args.chunked_prefill_size), "--skip-tokenizer-init",
              "--decode-log-interval", "1"]
    extra = shlex.split(args.server_args)
    for f in ("--disable-radix-cache", "--skip-tokenizer-init", "--decode-log-interval", "--chunked-prefill-size"):
        if f in extra:
            raise ValueError(f"--server-args: {f} is set by the soak itself (radix cache on, input ids, per-step "
                             "decode log, chunking from --chunked-prefill-size)")
    if on_cpu and "--attention-backend" not in extra:
        flags += ["--attention-backend", "torch_native"]  # the plugin's backend that runs on CPU
    return flags + extra


def raise_open_files_limit(n_requests: int) -> None:
    """Every request in flight holds a socket here and one in the server (which inherits this limit)."""
    try:
        import resource
    except ImportError:  # not on Linux / macOS
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * n_requests + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def server_env(args) -> dict:
    """The server's extra environment: the per-layer idle check on every idle turn (a production
    server runs it at most every 30 s; a soak checks them all), then the ``--server-env`` items."""
    env = {IDLE_CHECK_ENV: "0"}
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--server-env {item!r}: expected KEY=VALUE")
        if key == INVARIANT_ENV:
            raise ValueError(f"--server-env: {INVARIANT_ENV} is set by the soak itself (in --workdir)")
        env[key] = value
    return env


def device_description(on_cpu: bool) -> str:
    if not on_cpu:
        import torch

        return f"{torch.cuda.get_device_name(0)} (CUDA), {os.cpu_count()} CPU cores"
    model = cpu_model_name() or platform.processor() or "unknown CPU"
    return f"CPU only: {model}, {os.cpu_count()} cores"


def git_state() -> dict:
    def run(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": run("git", "rev-parse", "HEAD"), "dirty_files": len(run("git", "status", "--porcelain").splitlines())}


# --- server-side waits ----------------------------------------------------------------------------------
def wait_idle(srv: SGLangServer, timeout: float) -> float:
    """Wait until the scheduler reports no running and no waiting request; returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        loads = http_json(srv.url + "/get_load", timeout=30)
        if all(int(x.get("num_reqs", 0)) == 0 and int(x.get("num_waiting_reqs", 0)) == 0 for x in loads):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"server not idle after {timeout:.0f} s: {loads}")
        time.sleep(0.5)


def flush(srv: SGLangServer, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while True:
        try:
            req = urllib.request.Request(srv.url + "/flush_cache", data=b"", method="POST")
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
            return
        except urllib.error.HTTPError as exc:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"/flush_cache refused for {timeout:.0f} s: {exc}") from exc
            time.sleep(1.0)


def read_invariants(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def wait_for_record(path: Path, kind: str, since: float, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any(r["kind"] == kind and r["t"] >= since for r in read_invariants(path)):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no '{kind}' record in {path} after {timeout:.0f} s (is the plugin's invariant hook active?)")


# --- the soak --------------------------------------------------------------------------------------------
def run_soak(args, command: str) -> dict:
    """Run the whole soak; returns the result dict written as OUT.json."""
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    inv_path = workdir / "invariants.jsonl"
    for stale in (inv_path, workdir / "requests.jsonl"):
        if stale.exists():
            stale.unlink()
    if args.kv_policy == "depthkv" and args.kv_profile is None:
        raise ValueError("--kv-policy depthkv needs --kv-profile (a file, or 'calibrate')")
    model = prepare_model(args, workdir)
    profile = prepare_profile(args, model, workdir)
    vocab = vocab_size(model)
    reqs = build_workload(args.requests, tuple(args.prompt_len), tuple(args.new_tokens), vocab, seed=args.seed,
                          n_prefixes=args.prefixes, share_frac=args.share_frac, stream_frac=args.stream_frac,
                          abort_frac=args.abort_frac,
                          token_range=tuple(args.token_range) if args.token_range else None)
    raise_open_files_limit(len(reqs) + args.overlong)
    on_cpu = not _cuda_available()
    flags = server_flags(args, profile, on_cpu)
    srv = SGLangServer(model, flags, log_path=workdir / "server.log", env={**server_env(args), INVARIANT_ENV: str(inv_path)},
                       on_cpu=on_cpu, start_timeout=args.start_timeout)
    result = {"command": command, "device": device_description(srv.on_cpu), "git": git_state(),
              "workdir": str(workdir), "server_command": " ".join(shown_command(srv.command())), "config": {}, "load": {},
              "server_log": {}, "invariants": {}, "checks": {}, "failure": None}
    result["config"] = {
        "model": model if args.model else f"tiny random {args.tiny_model} (tests/tiny_models.py, seed {args.seed})",
        "kv_policy": args.kv_policy, "kv_budget": args.kv_budget, "kv_profile": profile,
        "chunked_prefill_size": args.chunked_prefill_size, "max_total_tokens": args.max_total_tokens,
        "requests": args.requests, "prompt_len": list(args.prompt_len), "new_tokens": list(args.new_tokens),
        "prefixes": args.prefixes, "share_frac": args.share_frac, "stream_frac": args.stream_frac,
        "abort_frac": args.abort_frac, "max_concurrency": args.max_concurrency, "request_rate": args.request_rate,
        "server_args": args.server_args, "server_env": server_env(args),
        "warmup_requests": args.warmup, "seed": args.seed, "modes": {m: sum(r.mode == m for r in reqs) for m in MODES},
        "prompt_tokens_sent": sum(len(r.input_ids) for r in reqs),
    }
    alive_at_end = probe_ok = False
    results: List[dict] = []
    t_start = time.time()
    load_end = t_probe = idle_wait = None
    try:
        with srv:
            startup = parse_server_log(srv.log_path.read_text(errors="replace"))
            cap = startup["request_len_cap"]
            longest = max(len(r.input_ids) + r.max_new_tokens for r in reqs)
            if cap is not None and (longest > cap - 1 or max(len(r.input_ids) for r in reqs) > cap - 6):
                raise ValueError(f"the workload's longest request ({longest} tokens with its output) exceeds the "
                                 f"server's per-layer request limit {cap} (smallest layer capacity - 1): raise "
                                 "--max-total-tokens or lower --prompt-len / --new-tokens")
            if cap is not None and args.overlong > 0:
                extra = overlong_requests(args.overlong, cap - 5, cap + 45, vocab, seed=args.seed)
                rng = random.Random(args.seed + 3)
                for x in extra:
                    reqs.insert(rng.randint(0, len(reqs)), x)
            result["config"]["modes"] = {m: sum(r.mode == m for r in reqs) for m in MODES}
            for i in range(args.warmup):
                srv.generate({"input_ids": [1 + (13 * i + 5 * j) % (vocab - 1) for j in range(16)],
                              "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}, timeout=900)
            results = asyncio.run(send_all(srv.url, reqs, max_concurrency=args.max_concurrency,
                                           request_rate=args.request_rate, timeout_s=args.request_timeout,
                                           seed=args.seed))
            load_end = max(r["t_done"] for r in results)
            idle_wait = wait_idle(srv, args.idle_timeout)
            time.sleep(3.0)  # SGLang aborts a disconnected stream 2 s after the disconnect
            wait_idle(srv, args.idle_timeout)
            # a fresh request after the load: the server still answers, and the state it leaves
            # is checked by the next idle check (written to the invariant log after t_probe)
            t_probe = time.time()
            probe = srv.generate({"input_ids": [1 + (7 * i) % (vocab - 1) for i in range(8)],
                                  "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}, timeout=120)
            probe_ok = len(probe.get("output_ids", [])) == 4
            wait_idle(srv, args.idle_timeout)
            wait_for_record(inv_path, "idle", t_probe)
            t_flush = time.time()
            flush(srv)
            wait_for_record(inv_path, "flush", t_flush)
            alive_at_end = srv.alive()
    except Exception as exc:  # noqa: BLE001 - a failed soak still writes its report
        if isinstance(exc, ValueError) and not results:
            raise  # a configuration error, before any load
        result["failure"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
    log_text = srv.log_path.read_text(errors="replace") if srv.log_path.exists() else ""
    with open(workdir / "requests.jsonl", "w") as f:
        for spec, r in zip(reqs, results):
            f.write(json.dumps({**spec.summary(), **r, "input_ids": list(spec.input_ids)}) + "\n")
    if result["failure"]:
        result["failure"] += "\n--- server log tail ---\n" + log_text[-4000:]
    result["server_log"] = parse_server_log(log_text)
    records = read_invariants(inv_path)
    result["invariants"] = invariant_verdict(records, t_probe if t_probe is not None else float("inf"))
    state = result["invariants"]["idle_state_after_load"]
    if state:
        result["invariants"]["kept_fraction_in_tree"] = kept_fraction_in_tree(state)
    result["load"] = load_summary(reqs, results, load_end, idle_wait, time.time() - t_start)
    result["checks"] = checks(result, alive_at_end, probe_ok)
    if result["failure"]:
        result["checks"]["soak_ran_to_the_end"] = False
        result["checks"]["passed"] = False
    return result


def load_summary(reqs, results, load_end, idle_wait, total_s: float) -> dict:
    sent = [r["t_sent"] for r in results if r["t_sent"] is not None]
    if load_end is None:
        load_end = max((r["t_done"] for r in results if r["t_done"] is not None), default=time.time())
    wall = max(1e-9, load_end - min(sent)) if sent else float("nan")
    by = lambda s: [r for r in results if r["status"] == s]  # noqa: E731
    answered = by("ok") + by("finished_first")
    spec = {r.rid: r for r in reqs}
    out_tokens = sum(r["n_out"] for r in answered)
    prompt_answered = sum(len(spec[r["rid"]].input_ids) for r in answered)
    return {
        "sent": len(results), "completed": len(answered), "completed_non_abort": len(by("ok")),
        "aborted": len(by("aborted")), "abort_requests_finished_first": len(by("finished_first")),
        "rejected": len(by("rejected")), "wrong": len(by("wrong")), "errors": len(by("error")),
        "wall_s": round(wall, 2), "requests_per_s": round(len(answered) / wall, 3),
        "output_tokens": out_tokens, "output_tok_per_s": round(out_tokens / wall, 1),
        "prompt_tokens_completed": prompt_answered,
        "cached_prompt_tokens_completed": sum(r["cached_tokens"] for r in answered),
        "requests_retracted_client_view": sum(1 for r in results if r["num_retractions"] > 0),
        "retractions_client_view": sum(r["num_retractions"] for r in results),
        "idle_wait_s": None if idle_wait is None else round(idle_wait, 2), "soak_total_s": round(total_s, 1),
        "failures": [{**spec[r["rid"]].summary(), "status": r["status"], "error": r["error"]}
                     for r in results if r["status"] in ("wrong", "error")][:20],
    }


def checks(result: dict, alive_at_end: bool, probe_ok: bool) -> dict:
    load, log, inv = result["load"], result["server_log"], result["invariants"]
    modes = result["config"]["modes"]
    c = {
        "every_non_aborted_request_answered_in_full": load["completed_non_abort"] == modes["plain"] + modes["stream"],
        "overlong_prompts_refused_with_sglang_error": load["rejected"] == modes["overlong"],
        "no_wrong_or_failed_request": load["wrong"] == 0 and load["errors"] == 0,
        "server_alive_at_end": alive_at_end,
        "probe_request_after_load_answered": probe_ok,
        "no_leak_report_or_traceback_in_server_log": not log["leak_or_traceback_lines"],
        "sglang_idle_memory_check_passed": inv["sglang_idle_check_passed"],
        "per_layer_idle_invariants_passed": inv["per_layer_idle_check_passed"],
        "no_invariant_violation_recorded": inv["records_with_violation"] == 0,
        "flush_drain_every_layer_fully_free": inv["flush_drain_passed"],
    }
    c["passed"] = all(c.values())
    c["pressure_retractions"] = log["retraction_events"]
    return c


# --- report ----------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    cfg, load, log, inv, chk = (result[k] for k in ("config", "load", "server_log", "invariants", "checks"))
    pr = inv.get("pressure") or {}
    lines = [
        f"# Soak: {cfg['requests']} requests through SGLang's HTTP server ({cfg['kv_policy']}, budget {cfg['kv_budget']})",
        "",
        f"- command: `{result['command']}`",
        f"- device: {result['device']}",
        f"- git: {result['git']['commit'][:12]} ({result['git']['dirty_files']} uncommitted files in the checkout)",
        f"- model: {cfg['model']}; prompts {cfg['prompt_len'][0]}-{cfg['prompt_len'][1]} tokens, "
        f"{cfg['prefixes']} shared prefixes ({cfg['share_frac']:.0%} of prompts), max_new_tokens "
        f"{cfg['new_tokens'][0]}-{cfg['new_tokens'][1]}, chunked prefill {cfg['chunked_prefill_size']}, "
        f"--max-total-tokens {cfg['max_total_tokens']}",
        f"- extra server flags: `{cfg['server_args'] or '(none)'}`; server environment: {cfg['server_env'] or '(none)'}",
        f"- modes: {', '.join(f'{m} {n}' for m, n in cfg['modes'].items())}",
        f"- per-layer capacities: {log['layer_capacities']} (fractions {log['layer_fractions']}); "
        f"request limit {log['request_len_cap']} tokens",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests sent | {load['sent']} |",
        f"| completed (answered in full) | {load['completed']} (non-abort {load['completed_non_abort']}, "
        f"abort requests that finished first {load['abort_requests_finished_first']}) |",
        f"| aborted | {load['aborted']} |",
        f"| overlong prompts refused (SGLang input-length error) | {load['rejected']} |",
        f"| wrong / errors | {load['wrong']} / {load['errors']} |",
        f"| wall time of the load | {load['wall_s']} s |",
        f"| requests/s | {load['requests_per_s']} |",
        f"| output tok/s | {load['output_tok_per_s']} |",
        f"| prompt tokens (completed) / of which radix-cached | {load['prompt_tokens_completed']} / "
        f"{load['cached_prompt_tokens_completed']} |",
        f"| peak running requests (decode batch) | {log['peak_running_decode']} |",
        f"| peak queued requests | {log['peak_queue']} |",
        f"| retraction events / requests retracted (server log) | {log['retraction_events']} / "
        f"{log['retracted_requests']} |",
        f"| max logical token usage | {log['max_logical_token_usage']} |",
        f"| prefill rounds whose budget a layer lowered / largest deficit (tokens) | "
        f"{pr.get('admission_rounds_lowered')} / {pr.get('max_admission_deficit')} |",
        f"| tree evictions / logical tokens evicted / slots freed per layer | {pr.get('evictions')} / "
        f"{pr.get('evicted_tokens')} / {pr.get('evicted_slots')} |",
        f"| decode steps refused by a layer (-> retraction) | {pr.get('decode_refusals')} |",
        f"| invariant-log records / idle checks run | {inv['records']} / {inv['idle_checks']} |",
        f"| kept fraction per layer in the tree after the load | {inv.get('kept_fraction_in_tree')} |",
        "",
        "| check | result |",
        "|---|---|",
    ]
    lines += [f"| {k.replace('_', ' ')} | {'PASS' if v else 'FAIL'} |" for k, v in chk.items()
              if isinstance(v, bool)]
    lines += [
        "",
        "Sources: requests/s and output tok/s count the requests answered in full over the load's wall time "
        "(first request sent to last answer). Peak running requests: SGLang's `Decode batch, #running-req` "
        "scheduler log lines, one per decode step (`--decode-log-interval 1`). Retractions: SGLang's `KV cache "
        "pool is full. Retract requests` log lines. Per-layer counters and checks: the plugin's invariant log "
        "(`SGLANG_DEPTHKV_INVARIANT_LOG`): SGLang's idle `_check_all_pools` + the per-layer invariants after the "
        "load and a probe request, then the whole tree evicted through the allocator before `/flush_cache` "
        "(every layer must be fully free).",
    ]
    if load["failures"]:
        lines += ["", "First failures:", ""] + [f"- `{json.dumps(f)}`" for f in load["failures"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = "python benchmarks/soak.py " + " ".join(shlex.quote(a) for a in argv)
    result = run_soak(args, command)
    json_path, md_path = Path(args.out + ".json"), Path(args.out + ".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    md_path.write_text(md)
    print(md)
    print(f"wrote {json_path} and {md_path}; server log, invariant log and per-request results in {result['workdir']}")
    return 0 if result["checks"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
