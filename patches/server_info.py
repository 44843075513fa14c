"""Hook: ``Scheduler.get_internal_state`` (AFTER) adds the plugin's state under ``"depthkv"``, so
SGLang's ``/server_info`` (and ``/get_server_info``, ``Engine.get_server_info()``) shows, per
data-parallel rank: the ``--kv-*`` settings, the per-layer keep fractions and slot capacities, the
logical capacity, the request-length cap and the rank."""

from sglang_depthkv.sglang.config import settings_of


def get_internal_state_after(result, self, *args, **kwargs):
    settings = settings_of(self.server_args)
    alloc = self.token_to_kv_pool_allocator
    if settings is None or type(alloc).__name__ != "DepthKVAllocator":
        return result
    state = getattr(result, "internal_state", None)  # GetInternalStateReqOutput (sglang 0.5.17)
    if not isinstance(state, dict):
        raise RuntimeError(f"sglang-depthkv: Scheduler.get_internal_state returned {type(result).__name__} "
                           "without an internal_state dict; cannot add the plugin's state")
    from sglang_depthkv.sglang.server_state import plugin_state

    state["depthkv"] = plugin_state(settings, alloc, self.max_req_len, self.max_req_input_len,
                                    self.tp_worker.model_runner)
    return result
