"""Hook: ``KVCacheConfigurator._build_token_to_kv_pool`` builds a ``DepthKVPool`` under --kv-policy,
and logs the capacity table."""

import logging

from sglang_depthkv.sglang.config import settings_of

logger = logging.getLogger("sglang_depthkv")


def build_token_to_kv_pool_around(orig, self, *args, **kwargs):
    settings = settings_of(self.server_args)
    if settings is None:
        return orig(self, *args, **kwargs)
    from sglang_depthkv.patches.registry import verify_applied
    from sglang_depthkv.sglang.configurator import DepthKVPoolConfigurator
    from sglang_depthkv.sglang.pool import DepthKVPool

    verify_applied()
    if kwargs.get("is_dsa_model") or kwargs.get("is_dsv4_model"):
        raise ValueError("--model-path: DSA / DeepSeek-V4 models are not supported with --kv-policy")
    if self.is_draft_worker:
        raise ValueError("--speculative-algorithm: draft workers are not supported with --kv-policy")
    if self.post_capture_kv_active:
        raise ValueError("post-capture KV resize (SGLANG post-capture KV env) is not supported with --kv-policy: "
                         "the per-layer pool is sized once at start-up")
    sizes = kwargs["sizes"]
    conf = DepthKVPoolConfigurator(self, settings)
    plan = conf.plan_for_tokens(sizes.max_total_num_tokens)
    from sglang_depthkv.sglang.tensor_parallel import rank_label

    table = plan.table(settings.policy, settings.budget, rank_label(self.ps))
    logger.info("\n%s", table)
    mc = self.model_config
    from sglang.srt.runtime_context import get_parallel

    pool = DepthKVPool(
        sizes.max_total_num_tokens,
        plan.capacities,
        dtype=self.kv_cache_dtype,
        head_num=mc.get_num_kv_heads(get_parallel().attn_tp_size),
        head_dim=mc.head_dim,
        v_head_dim=mc.v_head_dim,
        layer_num=self.layer_info.num_effective_layers,
        device=self.device,
        start_layer=self.layer_info.start_layer,
        end_layer=self.layer_info.end_layer,
    )
    pool.depthkv_plan = plan
    pool.depthkv_capacity_table = table
    return pool
