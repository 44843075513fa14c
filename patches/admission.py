"""Hooks: admission control per layer.

- ``PrefillAdder.__init__`` (AFTER): SGLang's prefill budget ``rem_total_tokens`` is logical
  (``available + evictable``); a layer that holds fewer slots than that lowers the budget by the
  deficit (``radix_cache.layer_deficit``), so a request is admitted only if it fits at every layer
  (a new token costs one slot at every layer until pruned). Requests added later in the same round
  charge every layer alike, and locking a matched prefix takes at most as much from a layer as from
  the logical space, so the start-of-round deficit is conservative.
- ``ScheduleBatch.check_decode_mem`` (AFTER): the next decode step must fit at every layer too;
  otherwise SGLang retracts, as it does when the logical space is short.
"""



def _ours(alloc) -> bool:
    return type(alloc).__name__ == "DepthKVAllocator"  # no import of our pool code in vanilla runs


def prefill_adder_init_after(result, self, *args, **kwargs):
    alloc = getattr(self, "token_to_kv_pool_allocator", None)
    if _ours(alloc):
        from sglang_depthkv.sglang.pressure import COUNTERS
        from sglang_depthkv.sglang.radix_cache import layer_deficit

        deficit = layer_deficit(alloc, self.tree_cache)
        self.rem_total_token_offset += deficit
        COUNTERS.note_admission(deficit)
    return result


def check_decode_mem_after(result, self, selected_indices=None):
    alloc = self.token_to_kv_pool_allocator
    if not result or not _ours(alloc):
        return result
    need = self.new_tokens_required_next_decode(selected_indices)
    if alloc.min_layer_available_size() >= need:
        return True
    from sglang_depthkv.sglang.pressure import COUNTERS

    COUNTERS.note_decode_refusal()
    return False
