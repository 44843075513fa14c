"""The two presets: ``cpu-tiny`` (functional run on this CPU machine) and ``gpu-llama8b`` (the issue's
run on one H100/H200: dummy Llama-3.1-8B weights, triton attention, CUDA graphs on, SGLang's default
chunked prefill). Every field can be overridden from the command line (``benchmarks/serving.py``).

Workloads, in the order a server runs them (the most important first, so a run cut short by its time
budget keeps those):

1. ``long-decode`` - long random prompts, long outputs, more requests than vanilla's KV pool holds.
2. ``prefill`` - the same prompts with 1 output token: prefill throughput, the scoring + compaction
   overhead check.
3. ``short-chat`` - ShareGPT-like lengths (uniform in [1, len], mean len/2), bounded concurrency:
   KV is not the bottleneck.
4. ``shared-prefix`` - SGLang's generated-shared-prefix: long system prompts shared by groups of
   questions; pruned prefixes come back from the radix tree (cache hit rate reported).

Server configurations, in priority order (vanilla first: the ratios need it).

Decode-time pruning (``kv_decode_interval``): the pruning plugin servers (every configuration but
``vanilla`` and ``full``) get ``--kv-decode-interval I``. Without it decoded tokens are never pruned
and hold a slot at *every* layer; DepthKV gives some layers a small share of the pool, those fill
first, and concurrency stays far below the logical-capacity gain (``serving-cpu.md``: depthkv@0.3
has 2.76x vanilla's logical capacity but only 1.62x its peak running requests; gpu-llama8b's
smallest depthkv@0.3 layer holds 17,695 slots vs vanilla's 65,536, so 8k + 1k requests might not
beat vanilla). With it, decoded tokens are pruned in segments of ``I + w`` tokens (``w`` = the
window, ``--kv-window``, 32 by default: these presets keep it) by the same policy and per-layer
budgets as the prompt, so the budget covers all KV; a request holds at most ``I + w - 1`` decoded
tokens unpruned, and each event (one ``policy.select`` over ``I + w`` tokens x every layer, with
host syncs) runs every ``I`` decode steps per request.

- ``gpu-llama8b``: ``I = 128`` (segments of 160): the unpruned tail is at most 159 tokens, 16% of a
  1k output, with an event every 128 steps per request (48 concurrent long-decode requests: about
  0.4 events per decode step). ``I = 256`` would halve the events but leave up to 287 tokens (28%)
  unpruned; ``I = 64`` the reverse. Under CUDA graphs the steps are recorded in the triton
  backend's graph ring (queries of the last ``w`` steps per request: ``L * max_bs * (w + 1) *
  heads * head_dim`` bf16 elements, 2 GiB for Llama-3.1-8B at ``max_bs`` 256, independent of ``I``).
- ``cpu-tiny``: ``I = 16`` (segments of 48): the 64-token outputs still see an event.

Override per run with ``--plugin-arg=--kv-decode-interval --plugin-arg=N`` (0: prune after prefill
only; replaces the preset's value).

Sizing of ``gpu-llama8b`` (to fit the GPU session's ~10-minute command next to the other checks):
the KV pool is pinned to 65,536 vanilla tokens (8 GiB) so that 48 requests of 8k + 1k tokens exceed
vanilla's pool 6.8 times over while a server's four workloads take about a minute. The issue's 16k
prompts: ``--set long-decode.input_len=16384 --set prefill.input_len=16384 --vanilla-kv-tokens 131072``
(about twice the time). Prompts longer than the chunked-prefill size are pruned whole at their final
chunk, but hold a slot at every layer for all their chunks until then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from benchmarks.throughput.workloads import Workload

CONFIG_ORDER = ("vanilla", "depthkv@0.3", "depthkv@0.1", "full", "laprox@0.3", "depthkv@0.5", "depthkv@0.2")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    device: str  # "cpu" | "cuda"
    model: Optional[str]  # model dir with config.json; None: write the tiny Llama config
    dtype: Optional[str]  # --dtype for every server (None: the model's)
    attention_backend: str
    chunked_prefill_size: Optional[int]  # None: SGLang's default
    cuda_graph: bool
    vanilla_kv_tokens: Optional[int]  # vanilla's pool (--max-total-tokens); None: SGLang's own sizing
    configs: Tuple[str, ...]
    workloads: Tuple[Workload, ...]
    time_budget_s: float
    start_timeout_s: float
    extra_server_args: Tuple[str, ...] = ()
    load_format: str = "dummy"
    # seconds to assume for a server start / a workload before one was measured (time budget)
    first_start_estimate_s: float = 60.0
    # --kv-decode-interval of the pruning plugin servers (not vanilla, not full); None: not passed
    kv_decode_interval: Optional[int] = None
    # --cuda-graph-max-bs for every server (with cuda_graph): the plugin's graph buffers are sized by it
    # and counted in the equal-bytes pin, so it is set, not left to SGLang's memory heuristics
    cuda_graph_max_bs: Optional[int] = None

    def workload(self, key: str) -> Workload:
        for w in self.workloads:
            if w.key == key:
                return w
        raise KeyError(f"workload {key!r} not in preset {self.name}; one of {', '.join(w.key for w in self.workloads)}")

    def server_configs(self):
        from benchmarks.throughput.workloads import parse_config

        return [parse_config(c) for c in self.configs]


CPU_TINY = Preset(
    name="cpu-tiny",
    description="CPU functional run: tiny Llama (4 layers, 2 kv heads x 32, vocab 512, float32, dummy weights), "
                "torch_native attention, small sizes; the numbers are not the GPU targets",
    device="cpu", model=None, dtype="float32", attention_backend="torch_native", chunked_prefill_size=512,
    cuda_graph=False, vanilla_kv_tokens=4096, configs=CONFIG_ORDER,
    workloads=(
        Workload("long-decode", "Long context, decode heavy", "random-ids", num_prompts=32, input_len=512,
                 output_len=64, timeout_s=300),
        Workload("prefill", "Prefill only (overhead check)", "random-ids", num_prompts=8, input_len=512, output_len=1,
                 timeout_s=120),
        Workload("short-chat", "Short chat (ShareGPT-like lengths)", "random-ids", num_prompts=32, input_len=128,
                 output_len=64, range_ratio=0.0, max_concurrency=8, timeout_s=180),
        Workload("shared-prefix", "Shared prefixes (generated-shared-prefix)", "generated-shared-prefix",
                 gsp_groups=4, gsp_prompts_per_group=6, gsp_system_len=384, gsp_question_len=32, gsp_output_len=32,
                 timeout_s=180),
    ),
    time_budget_s=1800.0, start_timeout_s=240.0, extra_server_args=("--grammar-backend", "none"),
    first_start_estimate_s=60.0, kv_decode_interval=16,
)

GPU_LLAMA8B = Preset(
    name="gpu-llama8b",
    description="Llama-3.1-8B shapes (bf16, dummy weights), triton attention, CUDA graphs on, SGLang's default "
                "chunked prefill, KV pool pinned to 65,536 vanilla tokens (8 GiB) for every server",
    device="cuda", model=".gpu/model-llama8b", dtype=None, attention_backend="triton", chunked_prefill_size=None,
    cuda_graph=True, vanilla_kv_tokens=65536, configs=CONFIG_ORDER,
    workloads=(
        Workload("long-decode", "Long context, decode heavy", "random-ids", num_prompts=48, input_len=8192,
                 output_len=1024, timeout_s=240),
        Workload("prefill", "Prefill only (overhead check)", "random-ids", num_prompts=16, input_len=8192,
                 output_len=1, timeout_s=90),
        Workload("short-chat", "Short chat (ShareGPT-like lengths)", "random-ids", num_prompts=128, input_len=512,
                 output_len=512, range_ratio=0.0, max_concurrency=32, timeout_s=120),
        Workload("shared-prefix", "Shared prefixes (generated-shared-prefix)", "generated-shared-prefix",
                 gsp_groups=8, gsp_prompts_per_group=8, gsp_system_len=2048, gsp_question_len=128,
                 gsp_output_len=256, timeout_s=90),
    ),
    time_budget_s=330.0, start_timeout_s=300.0,
    extra_server_args=("--grammar-backend", "none", "--mm-feature-transport=cpu"),
    first_start_estimate_s=90.0, kv_decode_interval=128, cuda_graph_max_bs=128,
)

PRESETS: Dict[str, Preset] = {p.name: p for p in (CPU_TINY, GPU_LLAMA8B)}
