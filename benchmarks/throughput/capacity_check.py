"""KV capacity check at SGLang's own memory sizing (no ``--max-total-tokens``): vanilla vs the plugin
(``--kv-policy depthkv --kv-budget 0.3`` by default) with otherwise identical flags, on dummy weights.
Each server is started only until it logs its pool (``max_total_num_tokens=...``), then stopped; the
two lines are printed with their ratio. ``--vanilla-log`` reuses a log that already has vanilla's line
(e.g. the GPU smoke run's, same flags), saving one start.

    python -m benchmarks.throughput.capacity_check --model .gpu/model-llama8b --out capacity.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.throughput import logparse  # noqa: E402
from benchmarks.throughput.model_files import read_model_config, write_resampled_profile  # noqa: E402

# The GPU smoke command's flags (../shared/gpu/files/smoke.sh), SGLang's default memory sizing.
SMOKE_FLAGS = ["--load-format", "dummy", "--skip-tokenizer-init", "--attention-backend", "triton",
               "--grammar-backend", "none", "--mm-feature-transport=cpu"]
POOL_RE = r"max_total_num_tokens=\d+, chunked_prefill_size="


def plugin_flags(policy: str, budget: float, profile: Optional[str]) -> List[str]:
    a = ["--kv-policy", policy, "--kv-budget", f"{budget:g}"]
    return a + (["--kv-profile", str(profile)] if policy == "depthkv" else [])


def summarize(vanilla_text: str, plugin_text: str, label: str) -> dict:
    """Both pool lines, the plugin's capacity-table total, and the ratio of the logical capacities."""
    v, p = logparse.pool_line(vanilla_text), logparse.pool_line(plugin_text)
    cap = logparse.capacity_table(plugin_text)
    out = {"vanilla_line": v["line"] if v else None, "plugin_line": p["line"] if p else None, "plugin": label,
           "vanilla_tokens": v["max_total_num_tokens"] if v else None,
           "plugin_tokens": p["max_total_num_tokens"] if p else None,
           "plugin_kv_gib": cap["kv_gib"] if cap else None, "plugin_metadata_gib": cap["metadata_gib"] if cap else None}
    out["ratio"] = (out["plugin_tokens"] / out["vanilla_tokens"]) if v and p else None
    if p is None:
        out["plugin_failure"] = logparse.failure_reason(plugin_text)
    return out


def _start_until_pool(model: str, args: List[str], log: Path, timeout: float, on_cpu: bool) -> str:
    from benchmarks.server import ServerError, SGLangServer

    srv = SGLangServer(model, args, log_path=log, on_cpu=on_cpu)
    try:
        srv.start(wait=False)
        srv.wait_for_log(POOL_RE, timeout)
        if "--kv-policy" in args:  # the capacity table is logged with the pool; give it a moment
            try:
                srv.wait_for_log(logparse.CAP_TOTAL_RE.pattern, 30)
            except ServerError:
                pass
    except ServerError:
        pass  # summarize() reports what the log says
    finally:
        srv.stop()
    return log.read_text(errors="replace") if log.exists() else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model dir (config.json; dummy weights)")
    ap.add_argument("--policy", default="depthkv")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--vanilla-log", help="server log that already has vanilla's max_total_num_tokens line")
    ap.add_argument("--work-dir", default="/tmp/depthkv-capacity")
    ap.add_argument("--out", help="write the summary (text) here, and JSON beside it (.json)")
    ap.add_argument("--timeout-s", type=float, default=240.0)
    ap.add_argument("--server-arg", dest="server_args", action="append", default=[], metavar="ARG",
                    help="extra argument for both servers")
    ap.add_argument("--cpu", action="store_true", help="servers on CPU (pass --server-arg=--max-total-tokens ...)")
    a = ap.parse_args(argv)

    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = read_model_config(a.model)
    profile = write_resampled_profile(work / "depthkv-profile.json", cfg) if a.policy == "depthkv" else None
    flags = SMOKE_FLAGS + list(a.server_args)
    label = f"{a.policy}@{a.budget:g}"

    vtext = Path(a.vanilla_log).read_text(errors="replace") if a.vanilla_log and Path(a.vanilla_log).exists() else ""
    if logparse.pool_line(vtext) is None:
        vtext = _start_until_pool(a.model, flags, work / "vanilla.server.log", a.timeout_s, a.cpu)
    ptext = _start_until_pool(a.model, flags + plugin_flags(a.policy, a.budget, profile),
                              work / f"{label.replace('@', '_')}.server.log", a.timeout_s, a.cpu)
    s = summarize(vtext, ptext, label)
    lines = [f"capacity check ({' '.join(flags)}):",
             f"  vanilla:  {s['vanilla_line'] or 'no pool line: ' + logparse.failure_reason(vtext)}",
             f"  {label}: {s['plugin_line'] or 'no pool line: ' + s.get('plugin_failure', '?')}"]
    if s["ratio"] is not None:
        lines.append(f"  logical capacity {s['plugin_tokens']} / {s['vanilla_tokens']} = {s['ratio']:.3f}x vanilla "
                     f"(plugin KV {s['plugin_kv_gib']} GiB + metadata {s['plugin_metadata_gib']} GiB)")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps(dict(s, flags=flags), indent=1))
    return 0 if s["ratio"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
