"""Hook: ``ModelRunner.alloc_memory_pool`` (AROUND). ``--kv-policy depthkv`` with no profile given or
cached (``DepthKVSettings.calibrate_at_start``) calibrates at start-up, through SGLang's own model
runner on the serving device, before the real KV pool is sized (the pool's per-layer capacities
come from the profile):

1. the runner allocates a provisional full-cache pool (the ``--kv-policy full`` sizes) and its
   attention backend (the one the server will use);
2. ``runner_calibration.calibrate_with_runner`` measures the profile on it;
3. the provisional pool and backend are dropped (device memory returned), the profile is written to
   the model's entry in the profile cache (the next start reuses it) and set in the settings;
4. the runner allocates the real pool, sized from the profile, as without calibration.

SGLang then builds the attention backends and captures CUDA graphs over the real pool, as always.
The time taken is logged."""

import gc
import logging
import time
from dataclasses import replace
from pathlib import Path

from sglang_depthkv.sglang.config import settings_of

logger = logging.getLogger("sglang_depthkv")


def _set_settings(server_args, settings) -> None:
    object.__setattr__(server_args, "_depthkv_settings", settings)


def _drop_provisional(runner) -> None:
    for name in ("attn_backend", "decode_attn_backend", "decode_attn_backend_group", "req_to_token_pool",
                 "token_to_kv_pool", "token_to_kv_pool_allocator", "kv_cache_configurator", "_unified_memory_pool",
                 "depthkv_pending_entries"):
        if hasattr(runner, name):
            setattr(runner, name, None)
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def alloc_memory_pool_around(orig, self, *args, **kwargs):
    settings = settings_of(self.server_args)
    if settings is None or not settings.calibrate_at_start or getattr(self, "is_draft_worker", False):
        return orig(self, *args, **kwargs)
    from sglang_depthkv.core.calibrate import write_profile
    from sglang_depthkv.core.profile_cache import DEFAULT_SCORER, cached_profile_path
    from sglang_depthkv.core.types import ModelIdentity
    from sglang_depthkv.patches.registry import verify_applied
    from sglang_depthkv.sglang import runner_calibration as RC

    verify_applied()
    t0 = time.monotonic()
    logger.info("sglang-depthkv: start-up calibration: a provisional full-cache pool first")
    _set_settings(self.server_args, replace(settings, policy="full", budget=1.0, calibrate_at_start=False))
    try:
        orig(self, *args, **kwargs)
        self.init_attention_backends()
        ctx = int(self.model_config.context_len)
        plan = RC.plan_for(settings, int(self.max_total_num_tokens), ctx, DEFAULT_SCORER)
        tokens, tokenizer = RC.calibration_tokens(self, int(self.model_config.vocab_size), plan)
        logger.info("sglang-depthkv: start-up calibration on %s: %d samples x (%d + %d) tokens, keep fractions %s, "
                    "scorer %s", self.device, plan.samples, plan.context_tokens, plan.continuation_tokens,
                    ",".join(f"{f:g}" for f in plan.keep_fractions), plan.scorer)
        result, spent = RC.calibrate_with_runner(self, plan, tokens)
    finally:
        _drop_provisional(self)
        _set_settings(self.server_args, settings)
    result.settings.update(text=f"novel:{RC.NOVEL}", tokenizer=tokenizer, device=str(self.device),
                           dtype=str(self.dtype).replace("torch.", ""), engine="sglang-model-runner")
    identity = ModelIdentity.from_hf_config(self.model_config.hf_config, name=Path(self.server_args.model_path).name)
    path = write_profile(result, identity, plan.scorer, cached_profile_path(self.server_args.model_path, plan.scorer))
    _set_settings(self.server_args, replace(settings, profile=str(path), calibrate_at_start=False))
    logger.info("sglang-depthkv: start-up calibration took %.1f s (%.1f s of forwards); profile %s (cached: the "
                "next start reuses it)", time.monotonic() - t0, spent, path)
    from sglang_depthkv.patches.server_args import log_profile_hull

    log_profile_hull(path)
    return orig(self, *args, **kwargs)
