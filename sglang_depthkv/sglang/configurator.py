"""``DepthKVPoolConfigurator``: SGLang's pool-size configurator for the per-layer pool.

Same entry points as SGLang's ``DefaultPoolConfigurator`` (bytes -> tokens, and capped tokens ->
sizes), with the per-layer model of ``capacity.py``. A slot's price is SGLang's own cell size
(``DefaultPoolConfigurator._cell_size``) divided by the number of layers.
"""

from __future__ import annotations

import logging

from sglang.srt.model_executor.pool_configurator import (
    DefaultPoolConfigurator,
    MemoryPoolConfig,
    MemoryPoolConfigurator,
)

from sglang_depthkv.sglang import plugin_memory
from sglang_depthkv.sglang.config import scores_with_laprox
from sglang_depthkv.sglang.capacity import (
    CapacityPlan,
    default_headroom,
    plan_for_bytes,
    plan_for_tokens,
    policy_layer_fractions,
)

logger = logging.getLogger(__name__)


class DepthKVPoolConfigurator(MemoryPoolConfigurator):
    def __init__(self, kvc, settings):
        if kvc.is_hybrid_swa or kvc.use_mla_backend:
            raise ValueError("--model-path: hybrid / MLA models are not supported with --kv-policy")
        self.settings = settings
        self.num_layers = int(kvc.layer_info.num_effective_layers)
        cell = DefaultPoolConfigurator(kvc)._cell_size
        if cell % self.num_layers:
            raise ValueError(f"cell size {cell} is not a multiple of {self.num_layers} layers")
        self.bytes_per_slot = cell // self.num_layers
        self.vanilla_cell_size = cell
        self.fractions = policy_layer_fractions(settings, self.num_layers, kvc.model_config.hf_config)
        sa = kvc.server_args
        self.headroom = default_headroom(
            getattr(sa, "chunked_prefill_size", None), int(kvc.model_config.context_len), settings.window, settings.sinks
        )
        self.shapes = plugin_memory.shapes_of(kvc, settings, gate_hidden=_gates_read_hidden(settings, kvc),
                                              laprox=scores_with_laprox(settings, kvc.model_config.hf_config))
        self.plugin = plugin_memory.items_function(self.shapes)

    def plan_for_tokens(self, n: int) -> CapacityPlan:
        return plan_for_tokens(n, self.fractions, self.headroom, self.bytes_per_slot, self.plugin)

    def _config(self, plan: CapacityPlan) -> MemoryPoolConfig:
        config = MemoryPoolConfig(max_total_num_tokens=plan.logical_tokens)
        config.depthkv_plan = plan  # plain dataclass: extra attribute is fine
        return config

    def calculate_pool_sizes(self, available_bytes: int, page_size: int) -> MemoryPoolConfig:
        if page_size != 1:
            raise ValueError(f"--page-size: {page_size} not supported with --kv-policy")
        return self._config(plan_for_bytes(available_bytes, self.fractions, self.headroom, self.bytes_per_slot,
                                           plugin=self.plugin))

    def calculate_pool_sizes_from_max_tokens(self, max_total_num_tokens: int, page_size: int) -> MemoryPoolConfig:
        if page_size != 1:
            raise ValueError(f"--page-size: {page_size} not supported with --kv-policy")
        return self._config(self.plan_for_tokens(max_total_num_tokens))


def _gates_read_hidden(settings, kvc) -> bool:
    """Whether the KVzip gate file reads hidden states (they are then stashed across chunks)."""
    if settings.gates is None:
        return False
    from sglang_depthkv.core.gates import load_gates
    from sglang_depthkv.core.types import ModelIdentity

    return bool(load_gates(settings.gates, ModelIdentity.from_hf_config(kvc.model_config.hf_config)).spec.use_hidden)
