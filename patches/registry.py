"""The plugin's hooks, by SGLang target name, and the start-up self-check.

SGLang's plugin loader and ``HookRegistry.apply_hooks`` only *log* a hook that failed to apply, so
``verify_applied()`` (called by the hooks themselves whenever ``--kv-policy`` is set, in the launcher
and in every scheduler process) turns a missing hook into a hard error naming it.
"""

from __future__ import annotations

import importlib

# (SGLang target, hook type, "module:function" in sglang_depthkv.patches)
HOOKS = (
    ("sglang.srt.server_args.ServerArgs.add_cli_args", "AFTER", "server_args:add_cli_args_after"),
    ("sglang.srt.server_args.ServerArgs.from_cli_args", "AROUND", "server_args:from_cli_args_around"),
    ("sglang.srt.server_args.ServerArgs.__init__", "AROUND", "server_args:init_around"),
    ("sglang.srt.model_executor.pool_configurator.create_memory_pool_configurator", "AROUND",
     "pool_configurator:create_memory_pool_configurator_around"),
    ("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool", "AROUND",
     "kv_pool:build_token_to_kv_pool_around"),
    ("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool_allocator", "AROUND",
     "allocator:build_allocator_around"),
    ("sglang.srt.mem_cache.registry.create_tree_cache", "AROUND", "tree_cache:create_tree_cache_around"),
    ("sglang.srt.model_executor.model_runner_components.attention_backend_setup._build_full_attention_backend_from_str",
     "AROUND", "attention_backend:build_backend_around"),
    ("sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker._check_all_pools",
     "AFTER", "invariant_checker:check_all_pools_after"),
    ("sglang.srt.mem_cache.common.evict_from_tree_cache", "AROUND", "evict:evict_from_tree_cache_around"),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.__init__", "AFTER", "admission:prefill_adder_init_after"),
    ("sglang.srt.managers.schedule_batch.ScheduleBatch.check_decode_mem", "AFTER",
     "admission:check_decode_mem_after"),
    ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", "AFTER",
     "pruning:forward_batch_init_new_after"),
    ("sglang.srt.managers.tp_worker.TpModelWorker.get_worker_info", "AROUND", "request_limits:get_worker_info_around"),
    ("sglang.srt.managers.scheduler.Scheduler.flush_cache", "AROUND", "flush_check:flush_cache_around"),
    ("sglang.srt.managers.scheduler.Scheduler.get_internal_state", "AFTER", "server_info:get_internal_state_after"),
    ("sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool", "AROUND",
     "auto_calibration:alloc_memory_pool_around"),
)

HOOK_TARGETS = tuple(t for t, _, _ in HOOKS)


class HookNotAppliedError(RuntimeError):
    pass


def _resolve(spec: str):
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(f"sglang_depthkv.patches.{mod}"), fn)


def register_all() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, kind, spec in HOOKS:
        HookRegistry.register(target, _resolve(spec), getattr(HookType, kind))


def missing_hooks() -> list:
    from sglang.srt.plugins.hook_registry import HookRegistry

    return [t for t in HOOK_TARGETS if t not in HookRegistry._patched]


def verify_applied() -> None:
    missing = missing_hooks()
    if missing:
        raise HookNotAppliedError(
            "sglang-depthkv: SGLang did not apply these plugin hooks (see the 'Failed to apply hooks' log "
            f"lines): {', '.join(missing)}; refusing to run --kv-policy half-patched"
        )
