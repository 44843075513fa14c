"""The run loop: one SGLang server per configuration (vanilla first), each driven through the preset's
workloads by SGLang's own client, under one wall-clock budget.

- Every server gets the same flags except the ``--kv-*`` ones and ``--max-total-tokens`` (the
  equal-bytes pin of ``pins.py`` when vanilla's pool is pinned).
- A server that does not come up is recorded with the reason from its log (the plugin's
  ``DepthKVConfigError`` names the refused flag); then the remaining plugin configurations, which
  share every non-``--kv-*`` flag, are skipped with that reason (``keep_going`` tries them anyway).
  Nothing falls back to other flags.
- Time budget: a configuration starts only if the time left covers the longest start seen so far
  plus its first workload as measured on vanilla; a workload starts only if the time left covers its
  vanilla time; every client run has a timeout that ends the run inside the budget. What is not run
  is recorded as skipped, with the reason.
- The server log is cut per workload at the moment the client prints that its warm-up is done, so
  the decode statistics (``logparse``) cover the measured requests only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from benchmarks.shown_paths import shown_command
from benchmarks.throughput import bound, logparse, pins
from benchmarks.throughput.model_files import (read_model_config, write_resampled_profile, write_tiny_model_config,
                                               write_wordlevel_tokenizer)
from benchmarks.throughput.presets import Preset
from benchmarks.throughput.workloads import ServerConfig, Workload

ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).resolve().with_name("client.py")
MAIN_RUN_MARKER = "Starting main benchmark run"
STOP_MARGIN_S = 15.0


@dataclass
class RunSetup:
    preset: Preset
    work_dir: Path
    model_dir: Path
    model_cfg: dict
    tokenizer_dir: Path
    profile: Path
    device_name: str
    peak_bw_gbs: Optional[float] = None
    python: str = sys.executable
    keep_going: bool = False
    extra_server_args: tuple = ()  # every server
    plugin_args: tuple = ()  # plugin servers only (e.g. --kv-decode-interval 64)


def prepare(preset: Preset, work_dir: Path, device_name: str, peak_bw_gbs: Optional[float] = None,
            keep_going: bool = False, extra_server_args: tuple = (), plugin_args: tuple = ()) -> RunSetup:
    """Write what the servers need into ``work_dir``: the model config (CPU preset), a tokenizer with
    the model's vocabulary, and a DepthKV profile for the model's identity."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if preset.model is None:
        model_dir = write_tiny_model_config(work_dir / "model")
    else:
        model_dir = Path(preset.model)
        if not model_dir.is_absolute():
            model_dir = (Path.cwd() / model_dir).resolve()
    cfg = read_model_config(model_dir)
    tok = write_wordlevel_tokenizer(work_dir / "tokenizer", int(cfg["vocab_size"]))
    prof = write_resampled_profile(work_dir / "depthkv-profile.json", cfg)
    return RunSetup(preset, work_dir, model_dir, cfg, tok, prof, device_name, peak_bw_gbs, keep_going=keep_going,
                    extra_server_args=tuple(extra_server_args), plugin_args=tuple(plugin_args))


def common_server_args(s: RunSetup) -> List[str]:
    """The flags every server of the run gets (vanilla and plugin alike)."""
    p = s.preset
    a = ["--tokenizer-path", str(s.tokenizer_dir), "--load-format", p.load_format,
         "--attention-backend", p.attention_backend, "--decode-log-interval", "1"]
    if p.dtype:
        a += ["--dtype", p.dtype]
    if p.chunked_prefill_size:
        a += ["--chunked-prefill-size", str(p.chunked_prefill_size)]
    if not p.cuda_graph:
        a.append("--disable-cuda-graph")
    elif p.cuda_graph_max_bs:
        a += ["--cuda-graph-max-bs", str(int(p.cuda_graph_max_bs))]
    return a + list(p.extra_server_args) + list(s.extra_server_args)


def server_args(s: RunSetup, cfg: ServerConfig, max_total_tokens: Optional[int]) -> List[str]:
    a = common_server_args(s)
    if max_total_tokens is not None:
        a += ["--max-total-tokens", str(int(max_total_tokens))]
    a += cfg.kv_args(str(s.profile)) + decode_interval_args(s, cfg)
    return a + (list(s.plugin_args) if cfg.is_plugin else [])


def decode_interval(s: RunSetup, cfg: ServerConfig) -> int:
    """The ``--kv-decode-interval`` a server of the run gets (0: none)."""
    a = decode_interval_args(s, cfg) or [x for x in s.plugin_args if x.startswith("--kv-decode-interval")]
    if not a:
        return 0
    if a[0].startswith("--kv-decode-interval="):
        return int(a[0].split("=", 1)[1])
    rest = list(s.plugin_args) if not decode_interval_args(s, cfg) else a
    return int(rest[rest.index("--kv-decode-interval") + 1])


def decode_interval_args(s: RunSetup, cfg: ServerConfig) -> List[str]:
    """The preset's ``--kv-decode-interval`` for a pruning plugin server (not vanilla / ``full``), unless
    the plugin arguments of the run set it."""
    interval = s.preset.kv_decode_interval
    if not interval or not cfg.is_plugin or cfg.policy == "full" or any(
            a == "--kv-decode-interval" or a.startswith("--kv-decode-interval=") for a in s.plugin_args):
        return []
    return ["--kv-decode-interval", str(int(interval))]


def client_command(s: RunSetup, w: Workload, base_url: str, out_file: Path) -> List[str]:
    return [s.python, str(CLIENT), "--backend", "sglang", "--base-url", base_url, "--model", str(s.model_dir),
            "--tokenizer", str(s.tokenizer_dir), "--output-file", str(out_file), "--warmup-requests", "1",
            "--flush-cache", "--disable-tqdm", "--cache-report", "--ready-check-timeout-sec", "30"] + w.client_args()


def client_env(s: RunSetup) -> Dict[str, str]:
    env = dict(os.environ)
    home = s.work_dir / "client-home"  # the generated-shared-prefix cache lives under ~/.cache
    home.mkdir(parents=True, exist_ok=True)
    env.update({"HOME": str(home), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


def base_record(s: RunSetup, cfg: ServerConfig, w: Workload, status: str, error: Optional[str] = None) -> dict:
    return {"workload": w.key, "policy": cfg.policy, "budget": cfg.budget, "config": cfg.label,
            "device": s.device_name, "status": status, "error": error, "requests": w.requests,
            "logical_kv_tokens": None, "peak_running_requests": None, "input_tok_s": None, "output_tok_s": None,
            "decode_tok_s": None, "ttft_ms_p50": None, "ttft_ms_p99": None, "tpot_ms_p50": None, "tpot_ms_p99": None,
            "ratio_vs_vanilla": None, "bound_ratio": None, "bound_tok_s": None, "notes": []}


def workload_record(s: RunSetup, cfg: ServerConfig, w: Workload, result: dict, log_text: str,
                    logical_tokens: Optional[int]) -> dict:
    """A record from the client's JSON result and the server-log slice of the measured requests."""
    st = logparse.decode_stats(log_text)
    completed = int(result.get("completed") or 0)
    rec = base_record(s, cfg, w, "ok" if completed == w.requests else f"partial: {completed}/{w.requests} completed")
    mean_p = result["total_input_tokens"] / completed if completed else None
    mean_o = result["total_output_tokens"] / completed if completed else None
    cache = result.get("cache_report") or {}
    new, cached = logparse.prefill_tokens(log_text)
    rec.update({
        "logical_kv_tokens": logical_tokens,
        "peak_running_requests": st.peak_running,
        "mean_decode_batch": st.mean_running,
        "decode_steps": st.decode_steps,
        "decode_seconds": st.decode_seconds,
        "input_tok_s": result.get("input_throughput"),
        "output_tok_s": result.get("output_throughput"),
        "decode_tok_s": st.decode_tok_s,
        "ttft_ms_p50": result.get("median_ttft_ms"),
        "ttft_ms_p99": result.get("p99_ttft_ms"),
        # SGLang's client reports TPOT 0 when no request produced 2 tokens
        "tpot_ms_p50": result.get("median_tpot_ms") if (mean_o or 0) > 1 else None,
        "tpot_ms_p99": result.get("p99_tpot_ms") if (mean_o or 0) > 1 else None,
        "completed": completed,
        "duration_s": result.get("duration"),
        "total_input_tokens": result.get("total_input_tokens"),
        "total_output_tokens": result.get("total_output_tokens"),
        "mean_prompt_len": mean_p,
        "mean_output_len": mean_o,
        "cache_hit_rate": (cache["cache_hit_rate_pct"] / 100.0) if cache.get("cache_hit_rate_pct") is not None else None,
        "server_prefill_new_tokens": new,
        "server_prefill_cached_tokens": cached,
    })
    if st.decode_steps and mean_p is not None:
        W = bound.decode_weight_bytes(s.model_cfg, s.preset.dtype)
        kv_req = bound.kv_bytes_per_token(s.model_cfg, s.preset.dtype) * bound.kept_tokens(
            cfg.policy, cfg.budget, mean_p, mean_o)
        rec["bound_tok_s_per_byte_s"] = bound.bound_tok_s(st.decode_only_running, W, kv_req, 1.0)
        if s.peak_bw_gbs:
            rec["bound_tok_s"] = bound.bound_tok_s(st.decode_only_running, W, kv_req, s.peak_bw_gbs * 1e9)
    return rec


def _read_slice(path: Path, start: int, end: int) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(max(0, end - start)).decode(errors="replace")


def run_client(cmd: List[str], env: Dict[str, str], log_path: Path, client_log: Path, timeout_s: float) -> dict:
    """Run the client; returns {"rc", "timed_out", "start_offset", "end_offset", "seconds"}."""
    mark = {"offset": None}
    t0 = time.monotonic()
    with open(client_log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

        def pump():
            for line in proc.stdout:
                if mark["offset"] is None and MAIN_RUN_MARKER in line:
                    mark["offset"] = log_path.stat().st_size
                out.write(line)
                out.flush()

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        th.join(timeout=10)
    return {"rc": proc.returncode, "timed_out": timed_out, "start_offset": mark["offset"],
            "end_offset": log_path.stat().st_size, "seconds": time.monotonic() - t0}


def last_json_line(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    return json.loads(lines[-1]) if lines else None


@dataclass
class ServerInfo:
    label: str
    status: str  # "ok" | "failed" | "skipped"
    reason: Optional[str] = None
    args: List[str] = field(default_factory=list)
    logical_kv_tokens: Optional[int] = None
    pinned_tokens: Optional[int] = None
    pool_line: Optional[dict] = None
    capacity: Optional[dict] = None
    start_s: Optional[float] = None
    log: Optional[str] = None


class Runner:
    def __init__(self, setup: RunSetup, on_progress: Callable[[List[dict], Dict[str, ServerInfo]], None] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.s = setup
        self.on_progress = on_progress or (lambda records, servers: None)
        self.clock = clock
        self.records: List[dict] = []
        self.servers: Dict[str, ServerInfo] = {}
        self.start_times: List[float] = []
        self.workload_times: Dict[str, float] = {}

    # --- budget -----------------------------------------------------------------------------------
    def left(self) -> float:
        return self.s.preset.time_budget_s - (self.clock() - self.t0)

    def start_estimate(self) -> float:
        return max(self.start_times) if self.start_times else self.s.preset.first_start_estimate_s

    # --- helpers ----------------------------------------------------------------------------------
    def _skip(self, cfg: ServerConfig, reason: str, workloads=None) -> None:
        self.servers.setdefault(cfg.label, ServerInfo(cfg.label, "skipped", reason))
        for w in workloads or self.s.preset.workloads:
            self.records.append(base_record(self.s, cfg, w, "skipped", reason))

    def _pin(self, cfg: ServerConfig) -> Optional[int]:
        """--max-total-tokens for this server, or None (SGLang sizes the pool from its byte budget)."""
        T = self.s.preset.vanilla_kv_tokens
        if T is None:
            return None
        if not cfg.is_plugin:
            return T
        van = self.servers.get("vanilla")
        chunk = self.s.preset.chunked_prefill_size
        if chunk is None:
            if van is None or van.pool_line is None or "chunked_prefill_size" not in van.pool_line:
                raise RuntimeError("the equal-bytes pin needs SGLang's chunked_prefill_size, read from the vanilla "
                                   "server's start-up line; vanilla did not come up")
            chunk = van.pool_line["chunked_prefill_size"]
        ctx = (van.pool_line or {}).get("context_len") if van else None
        ctx = ctx or int(self.s.model_cfg.get("max_position_embeddings") or 0)
        p = self.s.preset
        plan = pins.equal_bytes_plan(T, cfg.policy, cfg.budget, str(self.s.profile), self.s.model_cfg, chunk, ctx,
                                     p.dtype, graph_max_bs=(p.cuda_graph_max_bs or 0) if p.cuda_graph else 0,
                                     decode_interval=decode_interval(self.s, cfg))
        return plan.logical_tokens

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> List[dict]:
        from benchmarks.server import ServerError, SGLangServer

        self.t0 = self.clock()
        p = self.s.preset
        blocked: Optional[str] = None  # a plugin server failed: the others share its flags
        for cfg in p.server_configs():
            if blocked and cfg.is_plugin and not self.s.keep_going:
                self._skip(cfg, f"skipped: {blocked}")
                self.on_progress(self.records, self.servers)
                continue
            first = p.workloads[0].key
            need = self.start_estimate() + self.workload_times.get(first, 0.0)
            if cfg.is_plugin and self.left() < need + STOP_MARGIN_S:
                self._skip(cfg, f"skipped: time budget ({self.left():.0f} s left, a server needs ~{need:.0f} s)")
                self.on_progress(self.records, self.servers)
                continue
            try:
                pin = self._pin(cfg)
            except (RuntimeError, ValueError) as e:
                self._skip(cfg, f"skipped: {e}")
                self.on_progress(self.records, self.servers)
                continue
            args = server_args(self.s, cfg, pin)
            log = self.s.work_dir / "logs" / f"{cfg.label.replace('@', '_')}.server.log"
            info = ServerInfo(cfg.label, "ok", args=args, pinned_tokens=pin, log=str(log))
            self.servers[cfg.label] = info
            t_start = self.clock()
            srv = SGLangServer(str(self.s.model_dir), args, log_path=log, on_cpu=(p.device == "cpu"),
                               start_timeout=max(30.0, min(p.start_timeout_s, self.left() - STOP_MARGIN_S)),
                               python=self.s.python)
            try:
                srv.start()
            except ServerError as e:
                text = log.read_text(errors="replace") if log.exists() else str(e)
                info.status, info.reason = "failed", logparse.failure_reason(text)
                if "not ready after" in str(e):
                    info.reason = f"failed: not ready after {srv.start_timeout:.0f} s"
                for w in p.workloads:
                    self.records.append(base_record(self.s, cfg, w, "server failed", info.reason))
                if cfg.is_plugin:
                    blocked = f"{cfg.label} {info.reason}"
                self.on_progress(self.records, self.servers)
                continue
            try:
                info.start_s = self.clock() - t_start
                self.start_times.append(info.start_s)
                text = log.read_text(errors="replace")
                info.pool_line = logparse.pool_line(text)
                info.capacity = logparse.capacity_table(text)
                try:
                    info.logical_kv_tokens = srv.max_total_num_tokens()
                except OSError:  # /get_server_info did not answer: SGLang's start-up line has the same number
                    info.logical_kv_tokens = (info.pool_line or {}).get("max_total_num_tokens")
                self._run_workloads(srv, cfg, info, log)
            finally:
                srv.stop()
            self.on_progress(self.records, self.servers)
        return self.records

    def _run_workloads(self, srv, cfg: ServerConfig, info: ServerInfo, log: Path) -> None:
        p = self.s.preset
        notes = []
        if info.pinned_tokens is not None and info.logical_kv_tokens != info.pinned_tokens:
            notes.append(f"server reports max_total_num_tokens={info.logical_kv_tokens}, pinned {info.pinned_tokens}")
        for i, w in enumerate(p.workloads):
            if not srv.alive():
                for rest in p.workloads[i:]:
                    self.records.append(base_record(self.s, cfg, rest, "server died", logparse.failure_reason(
                        log.read_text(errors="replace"))))
                return
            need = self.workload_times.get(w.key, 0.0)
            if self.left() < need + STOP_MARGIN_S or self.left() < 2 * STOP_MARGIN_S:
                self._skip(cfg, f"skipped: time budget ({self.left():.0f} s left, {w.key} took {need:.0f} s on vanilla)",
                           [w])
                continue
            out_file = self.s.work_dir / "bench" / f"{cfg.label.replace('@', '_')}__{w.key}.jsonl"
            out_file.parent.mkdir(parents=True, exist_ok=True)
            if out_file.exists():
                out_file.unlink()
            cmd = client_command(self.s, w, srv.url, out_file)
            timeout = min(w.timeout_s, self.left() - STOP_MARGIN_S)
            try:
                rec = self._one_workload(cfg, w, info, log, out_file, cmd, timeout)
            except Exception:  # noqa: BLE001 - recorded with its traceback; the other runs still report
                rec = base_record(self.s, cfg, w, "error", traceback.format_exc()[-1500:])
            rec["notes"] = list(notes)
            rec["server_args"] = info.args
            rec["client_command"] = shown_command(cmd)
            self.records.append(rec)
            self.on_progress(self.records, self.servers)

    def _one_workload(self, cfg, w, info, log, out_file, cmd, timeout) -> dict:
        r = run_client(cmd, client_env(self.s), log, out_file.with_suffix(".client.log"), timeout)
        self.workload_times[w.key] = max(self.workload_times.get(w.key, 0.0), r["seconds"])
        result = last_json_line(out_file)
        if r["timed_out"] or result is None or r["start_offset"] is None:
            tail = out_file.with_suffix(".client.log").read_text(errors="replace")[-1500:]
            status = "timeout" if r["timed_out"] else "client failed"
            why = (f"client killed after {timeout:.0f} s" if r["timed_out"] else f"client exit code {r['rc']}")
            return base_record(self.s, cfg, w, status, f"{why}; client output tail:\n{tail}")
        text = _read_slice(log, r["start_offset"], r["end_offset"])
        return workload_record(self.s, cfg, w, result, text, info.logical_kv_tokens)
