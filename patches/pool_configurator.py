"""Hook: ``create_memory_pool_configurator`` returns ``DepthKVPoolConfigurator`` under --kv-policy."""

from sglang_depthkv.sglang.config import settings_of


def create_memory_pool_configurator_around(orig, kvc):
    settings = settings_of(kvc.server_args)
    if settings is None:
        return orig(kvc)
    from sglang_depthkv.patches.registry import verify_applied
    from sglang_depthkv.sglang.configurator import DepthKVPoolConfigurator

    verify_applied()
    return DepthKVPoolConfigurator(kvc, settings)
