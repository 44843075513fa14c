"""Byte budget -> per-layer slot capacities, and the start-up capacity table.

Model (page_size 1). N is the logical capacity (SGLang's ``max_total_num_tokens``: how many logical
tokens ``req_to_token`` / the radix tree may hold). Layer l has its own slot space of capacity

    C_l(N) = min(N, ceil(f_l * N) + H)

where f_l is the layer's keep fraction (from the policy's layer-budget allocator; mean = budget) and
H is the per-layer headroom for tokens not yet pruned (every new token holds a slot at every layer
until its request's scores are known; see ``default_headroom``). The bytes charged are

    KV:        sum_l (C_l + 1) * cell_l           (+1: slot 0 is the dummy write target)
    metadata:  mapping int32 [L, N + 2]           (logical -> layer slot, 0 = not held)
               per-layer free lists int64 C_l     (the layer allocators)
               logical free list int64 N          (SGLang's logical allocator)

plus the plugin's other device buffers (``plugin_memory``: CUDA-graph page tables, decode ring,
end-of-prefill scoring transients), and N is the largest value whose total fits the byte budget
SGLang computed for its KV pool
(``mem_fraction_static`` logic unchanged). ``cell_l`` is SGLang's own per-token cell size divided by
the number of layers (``DefaultPoolConfigurator``), so vanilla and ours price a slot the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

MAPPING_BYTES = 4  # int32 per (layer, logical id)
FREE_LIST_BYTES = 8  # int64 per slot in a free list

GIB = 1 << 30


@dataclass(frozen=True)
class CapacityPlan:
    logical_tokens: int  # N (max_total_num_tokens)
    fractions: tuple  # f_l
    capacities: tuple  # C_l
    headroom: int  # H
    bytes_per_slot: int  # cell_l (K+V bytes of one token at one layer)
    plugin: Tuple[Tuple[str, int], ...] = ()  # other plugin buffers (name, bytes): plugin_memory

    @property
    def num_layers(self) -> int:
        return len(self.capacities)

    def kv_bytes(self) -> int:
        return sum((c + 1) * self.bytes_per_slot for c in self.capacities)

    def metadata_bytes(self) -> int:
        return metadata_bytes(self.logical_tokens, self.capacities)

    def plugin_bytes(self) -> int:
        return sum(b for _, b in self.plugin)

    def total_bytes(self) -> int:
        return self.kv_bytes() + self.metadata_bytes() + self.plugin_bytes()

    def table(self, policy: str, budget: float, ranks: str = "") -> str:
        """One table: layer, keep fraction, capacity tokens, GiB, then the logical capacity.
        ``ranks``: which tensor- / data-parallel rank's table it is (``tensor_parallel.rank_label``)."""
        lines = [
            f"sglang-depthkv capacity: policy={policy} budget={budget:g} headroom={self.headroom} tokens/layer{ranks}",
            f"{'layer':>5} {'fraction':>9} {'capacity':>12} {'GiB':>9}",
        ]
        for l, (f, c) in enumerate(zip(self.fractions, self.capacities)):
            lines.append(f"{l:>5} {f:>9.4f} {c:>12d} {(c + 1) * self.bytes_per_slot / GIB:>9.4f}")
        for name, b in self.plugin:
            lines.append(f"plugin buffer: {name} {b / GIB:.4f} GiB")
        extra = f" + plugin buffers {self.plugin_bytes() / GIB:.4f} GiB" if self.plugin else ""
        lines.append(
            f"total KV {self.kv_bytes() / GIB:.4f} GiB + metadata {self.metadata_bytes() / GIB:.4f} GiB{extra} = "
            f"{self.total_bytes() / GIB:.4f} GiB; logical capacity max_total_num_tokens={self.logical_tokens}"
        )
        return "\n".join(lines)


def layer_capacities(n: int, fractions: Sequence[float], headroom: int) -> List[int]:
    return [min(n, int(math.ceil(f * n)) + headroom) for f in fractions]


def metadata_bytes(n: int, capacities: Sequence[int]) -> int:
    L = len(capacities)
    return L * (n + 2) * MAPPING_BYTES + sum(capacities) * FREE_LIST_BYTES + n * FREE_LIST_BYTES


def check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) == 0:
        raise ValueError("layer fractions: empty")
    for l, f in enumerate(fractions):
        if not (isinstance(f, (int, float)) and math.isfinite(f) and 0.0 < f <= 1.0):
            raise ValueError(f"layer fractions: layer {l} has {f!r}, not in (0, 1]")


PluginItems = Optional[Callable[[Sequence[int]], Tuple[Tuple[str, int], ...]]]


def plan_for_tokens(n: int, fractions: Sequence[float], headroom: int, bytes_per_slot: int,
                    plugin: PluginItems = None) -> CapacityPlan:
    check_fractions(fractions)
    if n < 1:
        raise ValueError(f"logical capacity must be >= 1, got {n}")
    if headroom < 0:
        raise ValueError(f"headroom must be >= 0, got {headroom}")
    caps = tuple(layer_capacities(n, fractions, headroom))
    return CapacityPlan(
        logical_tokens=int(n),
        fractions=tuple(float(f) for f in fractions),
        capacities=caps,
        headroom=int(headroom),
        bytes_per_slot=int(bytes_per_slot),
        plugin=tuple(plugin(caps)) if plugin is not None else (),
    )


def plan_for_bytes(
    available_bytes: int, fractions: Sequence[float], headroom: int, bytes_per_slot: int,
    max_tokens: Optional[int] = None, plugin: PluginItems = None,
) -> CapacityPlan:
    """Largest N whose KV + metadata + plugin buffers fit ``available_bytes`` (binary search: bytes
    grow with N)."""
    check_fractions(fractions)
    if bytes_per_slot <= 0:
        raise ValueError(f"bytes_per_slot must be > 0, got {bytes_per_slot}")

    def cost(n: int) -> int:
        caps = layer_capacities(n, fractions, headroom)
        extra = sum(b for _, b in plugin(caps)) if plugin is not None else 0
        return sum((c + 1) * bytes_per_slot for c in caps) + metadata_bytes(n, caps) + extra

    lo, hi = 0, 1
    while cost(hi) <= available_bytes:  # make sure hi is infeasible
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) <= available_bytes:
            lo = mid
        else:
            hi = mid
    if max_tokens is not None:
        lo = min(lo, int(max_tokens))
    if lo < 1:
        raise ValueError(
            f"KV budget of {available_bytes} bytes holds no token at {bytes_per_slot} bytes per layer slot "
            f"with {headroom} tokens of headroom per layer and the plugin's buffers; raise --mem-fraction-static"
        )
    return plan_for_tokens(lo, fractions, headroom, bytes_per_slot, plugin)


def policy_layer_fractions(settings, num_layers: int, hf_config=None) -> List[float]:
    """Per-layer keep fractions that size the pool, from the policy's layer-budget allocator.

    - ``full``: 1.0 everywhere.
    - ``snapkv`` / ``streamingllm``: uniform ``budget`` (``core.budgets.UniformAllocator``).
    - ``pyramid``: ``core.budgets.PyramidAllocator``; ``depthkv``: ``core.budgets.DepthKVAllocator``
      on the loaded profile.
    - ``laprox`` / ``kvzip`` (one global top-k over (layer, token) pairs): the split per layer is
      score dependent, so the pool is sized at the mean, uniform ``budget``; a layer whose share of a
      request exceeds it is served by per-layer admission (the scheduler evicts, waits or retracts),
      never by an out-of-bounds write.
    """
    b = float(settings.budget)
    if settings.policy == "full":
        return [1.0] * num_layers
    if settings.policy in ("laprox", "kvzip", "snapkv", "streamingllm"):
        return [b] * num_layers
    from sglang_depthkv.core import budgets  # the core's allocators

    if settings.policy == "pyramid":
        alloc = budgets.PyramidAllocator()
    elif settings.policy == "depthkv":
        from sglang_depthkv.core.profile import load_profile
        from sglang_depthkv.core.types import ModelIdentity

        profile = load_profile(settings.profile, ModelIdentity.from_hf_config(hf_config))
        alloc = budgets.DepthKVAllocator(profile)
    else:
        raise ValueError(f"--kv-policy: no layer fractions for {settings.policy!r}")
    return [float(f) for f in alloc.layer_fractions(num_layers, b)]


def default_headroom(chunked_prefill_size: Optional[int], context_len: int, window: int, sinks: int) -> int:
    """Per-layer headroom for tokens not yet pruned: one prefill chunk (the whole context when chunked
    prefill is off), at least sinks + window. A sizing choice, not a bound: a chunked prompt holds a
    slot at every layer for each of its chunks until its final chunk prunes it (``chunk_ownership``);
    when a layer is short, per-layer admission makes the scheduler evict, wait or retract."""
    chunk = chunked_prefill_size if chunked_prefill_size and chunked_prefill_size > 0 else context_len
    return int(max(chunk, sinks + window))
