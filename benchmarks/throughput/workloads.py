"""Workloads, server configurations and the command lines of SGLang's own benchmark client.

A workload is one run of ``python -m sglang.benchmark.serving`` (through ``client.py``) against a
running server: ``random-ids`` prompts sent as token ids (``--tokenize-prompt``: exact lengths), or
``generated-shared-prefix`` prompts (sent as text: long system prompts shared by groups of questions).
Every run uses one warm-up request, flushes the radix cache after it, streams, ignores EOS and
reports the cache hit rate (``--cache-report``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import List, Optional

DATASETS = ("random-ids", "generated-shared-prefix")


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    dataset: str
    num_prompts: int = 0  # random-ids; generated-shared-prefix: groups x prompts_per_group
    input_len: int = 0
    output_len: int = 0
    range_ratio: float = 1.0  # random-ids: lengths uniform in [ratio * len, len] (1.0: exact)
    max_concurrency: Optional[int] = None
    gsp_groups: int = 0
    gsp_prompts_per_group: int = 0
    gsp_system_len: int = 0
    gsp_question_len: int = 0
    gsp_output_len: int = 0
    timeout_s: float = 600.0
    seed: int = 1

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"workload {self.key}: dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset == "random-ids":
            for k in ("num_prompts", "input_len", "output_len"):
                if getattr(self, k) < 1:
                    raise ValueError(f"workload {self.key}: {k} must be >= 1, got {getattr(self, k)}")
            if not 0.0 <= self.range_ratio <= 1.0:
                raise ValueError(f"workload {self.key}: range_ratio must be in [0, 1], got {self.range_ratio}")
        else:
            for k in ("gsp_groups", "gsp_prompts_per_group", "gsp_system_len", "gsp_question_len", "gsp_output_len"):
                if getattr(self, k) < 1:
                    raise ValueError(f"workload {self.key}: {k} must be >= 1, got {getattr(self, k)}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"workload {self.key}: max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.timeout_s <= 0:
            raise ValueError(f"workload {self.key}: timeout_s must be > 0, got {self.timeout_s}")

    @property
    def requests(self) -> int:
        return self.num_prompts if self.dataset == "random-ids" else self.gsp_groups * self.gsp_prompts_per_group

    @property
    def max_prompt_len(self) -> int:
        return self.input_len if self.dataset == "random-ids" else self.gsp_system_len + self.gsp_question_len

    def describe(self) -> str:
        if self.dataset == "random-ids":
            lens = (f"{self.input_len} in / {self.output_len} out" if self.range_ratio == 1.0 else
                    f"in U[{max(1, int(self.input_len * self.range_ratio))}, {self.input_len}] / "
                    f"out U[{max(1, int(self.output_len * self.range_ratio))}, {self.output_len}]")
            s = f"{self.num_prompts} requests, {lens} tokens"
        else:
            s = (f"{self.gsp_groups} groups x {self.gsp_prompts_per_group} questions, system prompt "
                 f"{self.gsp_system_len} + question {self.gsp_question_len} in / {self.gsp_output_len} out tokens")
        if self.max_concurrency:
            s += f", at most {self.max_concurrency} in flight"
        return s

    def client_args(self) -> List[str]:
        a = ["--dataset-name", self.dataset, "--seed", str(self.seed)]
        if self.dataset == "random-ids":
            a += ["--tokenize-prompt", "--num-prompts", str(self.num_prompts), "--random-input-len", str(self.input_len),
                  "--random-output-len", str(self.output_len), "--random-range-ratio", repr(float(self.range_ratio))]
        else:
            a += ["--num-prompts", str(self.requests), "--gsp-num-groups", str(self.gsp_groups),
                  "--gsp-prompts-per-group", str(self.gsp_prompts_per_group),
                  "--gsp-system-prompt-len", str(self.gsp_system_len), "--gsp-question-len", str(self.gsp_question_len),
                  "--gsp-output-len", str(self.gsp_output_len), "--gsp-range-ratio", "1.0"]
        if self.max_concurrency:
            a += ["--max-concurrency", str(self.max_concurrency)]
        return a


def override_workload(w: Workload, field_name: str, value: str) -> Workload:
    """``--set KEY.FIELD=VALUE`` for one workload field (typed like the field)."""
    types = {f.name: f.type for f in fields(Workload)}
    if field_name not in types or field_name in ("key", "dataset"):
        settable = ", ".join(n for n in types if n not in ("key", "dataset"))
        raise ValueError(f"--set {w.key}.{field_name}: unknown field; settable: {settable}")
    t = str(types[field_name])
    try:
        if field_name == "max_concurrency":
            v = None if value.lower() in ("none", "0", "") else int(value)
        elif "float" in t:
            v = float(value)
        elif "int" in t:
            v = int(value)
        else:
            v = value
    except ValueError:
        raise ValueError(f"--set {w.key}.{field_name}={value}: not a valid {t}") from None
    return replace(w, **{field_name: v})


@dataclass(frozen=True)
class ServerConfig:
    policy: str  # "vanilla" or a --kv-policy
    budget: float = 1.0

    @property
    def label(self) -> str:
        return self.policy if self.policy in ("vanilla", "full") else f"{self.policy}@{self.budget:g}"

    @property
    def is_plugin(self) -> bool:
        return self.policy != "vanilla"

    def kv_args(self, profile: Optional[str]) -> List[str]:
        if not self.is_plugin:
            return []
        a = ["--kv-policy", self.policy]
        if self.policy != "full":
            a += ["--kv-budget", f"{self.budget:g}"]
        if self.policy == "depthkv":
            if not profile:
                raise ValueError("depthkv needs a profile (--kv-profile)")
            a += ["--kv-profile", str(profile)]
        return a


def parse_config(text: str) -> ServerConfig:
    """``vanilla``, ``full`` or ``POLICY@BUDGET`` (e.g. ``depthkv@0.3``)."""
    from sglang_depthkv.sglang.config import POLICY_CHOICES

    t = text.strip()
    if t in ("vanilla", "full"):
        return ServerConfig(t, 1.0)
    if "@" not in t:
        raise ValueError(f"--configs: {text!r} is not vanilla, full or POLICY@BUDGET")
    policy, b = t.split("@", 1)
    if policy not in POLICY_CHOICES or policy == "full":
        raise ValueError(f"--configs: unknown policy {policy!r} in {text!r}; one of {', '.join(POLICY_CHOICES)}")
    if policy == "kvzip":
        raise ValueError("--configs: kvzip needs trained gates for the model; not available for dummy weights")
    try:
        budget = float(b)
    except ValueError:
        raise ValueError(f"--configs: budget {b!r} in {text!r} is not a number") from None
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"--configs: budget {budget} in {text!r} is not in (0, 1]")
    return ServerConfig(policy, budget)
