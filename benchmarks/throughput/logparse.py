"""What the SGLang server log says about a run (launched with ``--decode-log-interval 1``).

Decode-phase throughput (the definition used everywhere in this benchmark): SGLang logs one
``Decode batch, #running-req: r, ... gen throughput (token/s): g`` line per decode step, where g is
the tokens generated since the previous decode line (r with interval 1) divided by the wall time
since it. A step is *decode-only* when the line before it (among Prefill / Decode lines of the same
run) is a Decode line: no prefill batch ran in its window. Then its window lasted r / g seconds, and

    decode_tok_s = sum(r_i) / sum(r_i / g_i)     over decode-only steps i

i.e. output tokens per second of wall time while no prefill runs. The first line of a run is never
decode-only (its window started before the run). ``peak_running`` is the largest r of any Decode line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

DECODE_RE = re.compile(
    r"Decode batch(?: \[\d+\])?, #running-req: (?P<r>\d+), #token: (?P<tok>\d+),.*?"
    r"gen throughput \(token/s\): (?P<g>[0-9.]+)")
PREFILL_RE = re.compile(
    r"Prefill batch(?: \[\d+\])?, #new-seq: (?P<seq>\d+), #new-token: (?P<new>\d+), #cached-token: (?P<cached>\d+),"
    r".*?#running-req: (?P<r>\d+)")
TOTAL_TOKENS_RE = re.compile(r"max_total_num_tokens=(?P<n>\d+)(?P<rest>[^\n]*)")
CAP_HEADER_RE = re.compile(
    r"sglang-depthkv capacity: policy=(?P<policy>\S+) budget=(?P<budget>\S+) headroom=(?P<headroom>\d+) tokens/layer")
CAP_ROW_RE = re.compile(r"^\s*(?P<l>\d+)\s+(?P<f>[0-9.]+)\s+(?P<c>\d+)\s+(?P<gib>[0-9.]+)\s*$")
CAP_TOTAL_RE = re.compile(
    r"total KV (?P<kv>[0-9.]+) GiB \+ metadata (?P<meta>[0-9.]+) GiB(?: \+ plugin buffers (?P<plugin>[0-9.]+) GiB)? "
    r"= (?P<tot>[0-9.]+) GiB; "
    r"logical capacity max_total_num_tokens=(?P<n>\d+)")
# a refusal: the Python API's exception, or launch_server's one-line usage error (exit status 2)
REFUSAL_RE = re.compile(r"DepthKVConfigError: (?P<msg>[^\n]+)|^error: (?P<cli>--[\w-]+: [^\n]+)", re.M)
ERROR_LINE_RE = re.compile(r"^[^\n]*(?:Error|Exception)[^\n]*$", re.M)


@dataclass
class DecodeStats:
    decode_only_running: List[int] = field(default_factory=list)  # r of each decode-only step
    decode_seconds: float = 0.0
    decode_lines: int = 0
    peak_running: Optional[int] = None

    @property
    def decode_steps(self) -> int:
        return len(self.decode_only_running)

    @property
    def decode_tokens(self) -> int:
        return sum(self.decode_only_running)

    @property
    def decode_tok_s(self) -> Optional[float]:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else None

    @property
    def mean_running(self) -> Optional[float]:
        return self.decode_tokens / self.decode_steps if self.decode_steps else None


def batch_lines(text: str) -> list:
    """[("prefill"|"decode", match)] in log order."""
    out = []
    for line in text.splitlines():
        m = DECODE_RE.search(line)
        if m:
            out.append(("decode", m))
            continue
        m = PREFILL_RE.search(line)
        if m:
            out.append(("prefill", m))
    return out


def decode_stats(text: str) -> DecodeStats:
    st = DecodeStats()
    prev = None
    for kind, m in batch_lines(text):
        if kind == "decode":
            r, g = int(m["r"]), float(m["g"])
            st.decode_lines += 1
            st.peak_running = r if st.peak_running is None else max(st.peak_running, r)
            if prev == "decode" and r > 0 and g > 0:
                st.decode_only_running.append(r)
                st.decode_seconds += r / g
        prev = kind
    return st


def prefill_tokens(text: str) -> tuple:
    """(new tokens, cached tokens) summed over the Prefill lines."""
    new = cached = 0
    for kind, m in batch_lines(text):
        if kind == "prefill":
            new += int(m["new"])
            cached += int(m["cached"])
    return new, cached


def pool_line(text: str) -> Optional[dict]:
    """SGLang's start-up line ``max_total_num_tokens=N, chunked_prefill_size=C, ..., context_len=X``
    (the first one; the plugin's capacity table also ends in ``max_total_num_tokens=``)."""
    for m in TOTAL_TOKENS_RE.finditer(text):
        rest = m["rest"]
        if "chunked_prefill_size=" not in rest:
            continue
        fields = dict(re.findall(r"(\w+)=([-\w.]+)", rest))
        out = {"line": m.group(0).strip(), "max_total_num_tokens": int(m["n"])}
        for k in ("chunked_prefill_size", "max_prefill_tokens", "max_running_requests", "context_len"):
            if k in fields:
                try:
                    out[k] = int(fields[k])
                except ValueError:
                    pass
        return out
    return None


def capacity_table(text: str) -> Optional[dict]:
    """The plugin's start-up capacity table (``CapacityPlan.table``), or None if not in the log."""
    m = CAP_HEADER_RE.search(text)
    if not m:
        return None
    fractions, capacities, gib = [], [], []
    total = None
    for line in text[m.end():].splitlines()[1:]:
        row = CAP_ROW_RE.match(line)
        if row and int(row["l"]) == len(capacities):
            fractions.append(float(row["f"]))
            capacities.append(int(row["c"]))
            gib.append(float(row["gib"]))
            continue
        if line.strip().startswith(("layer", "plugin buffer:")):
            continue
        total = CAP_TOTAL_RE.search(line)
        break
    if not capacities or total is None:
        return None
    return {"policy": m["policy"], "budget": float(m["budget"]), "headroom": int(m["headroom"]),
            "fractions": fractions, "capacities": capacities, "layer_gib": gib,
            "kv_gib": float(total["kv"]), "metadata_gib": float(total["meta"]),
            "plugin_gib": float(total["plugin"] or 0.0), "total_gib": float(total["tot"]),
            "logical_tokens": int(total["n"])}


def failure_reason(text: str) -> str:
    """Why a server did not come up: the plugin's refusal (``DepthKVConfigError: --flag: ...``) if any,
    else the last error line of the log."""
    m = REFUSAL_RE.search(text)
    if m:
        return "refused: " + (m["msg"] or m["cli"]).strip()
    lines = ERROR_LINE_RE.findall(text)
    return ("failed: " + lines[-1].strip()) if lines else "failed: no error line in the server log"
