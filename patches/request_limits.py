"""Hook: ``TpModelWorker.get_worker_info`` caps SGLang's request-length limits at the smallest layer.

Vanilla SGLang bounds a request by its logical pool (``max_req_len = min(context_len, N) - 1``,
``max_req_input_len = max_req_len - 5``, and ``max_new_tokens`` is clipped so input + output fits), so
that "a request can [not] be accepted into the waiting queue but never be scheduled, blocking the
queue" (scheduler.py). Under ``--kv-policy`` a request holds one slot per token at *every* layer
until it is pruned (a prompt is pruned only after its last chunk; decode tokens only with
``--kv-decode-interval``), and per-layer admission (``patches/admission.py``) admits it only if it
fits at every layer. So the bound is the smallest layer capacity ``min_l C_l``, not ``N``: without
this cap, a prompt longer than ``min_l C_l`` waited in the queue forever (found by the soak,
``benchmarks/soak.py``). With it, SGLang's own checks refuse such a prompt with its usual error
(``Input length (...) exceeds the maximum allowed length (...)``) and clip ``max_new_tokens`` as it
does at the context length.
"""

import logging

logger = logging.getLogger("sglang_depthkv")

# positions in the tuple TpModelWorker.get_worker_info returns (sglang 0.5.17)
MAX_REQ_LEN, MAX_REQ_INPUT_LEN = 4, 5


def per_layer_request_limits(max_req_len: int, layer_capacities) -> tuple:
    """(max_req_len, max_req_input_len) with the smallest layer as a further pool bound; the
    ``- 1`` / ``- 5`` margins are vanilla's."""
    caps = [int(c) for c in layer_capacities]
    if not caps or min(caps) < 2:
        raise ValueError(f"per-layer capacities {caps} leave no room for a request")
    length = min(int(max_req_len), min(caps) - 1)
    return length, length - 5


REQUEST_CAP_WARNING = ("sglang-depthkv: requests are limited to {cap} tokens (the smallest layer's capacity) below "
                       "the model's context of {ctx}; raise --kv-budget or --mem-fraction-static, or use a policy "
                       "with a larger smallest layer")


def get_worker_info_around(orig, self, *args, **kwargs):
    info = orig(self, *args, **kwargs)
    alloc = getattr(self.model_runner, "token_to_kv_pool_allocator", None)
    if type(alloc).__name__ != "DepthKVAllocator":  # no import of our pool code in vanilla runs
        return info
    length, input_len = per_layer_request_limits(info[MAX_REQ_LEN], alloc.layer_capacities)
    if length < info[MAX_REQ_LEN]:  # the smallest layer binds, not the context or the logical pool
        caps = list(alloc.layer_capacities)
        logger.warning(REQUEST_CAP_WARNING.format(cap=length, ctx=self.model_config.context_len))
        # the details, in the form the soak's log parser reads (benchmarks/soak_checks.py)
        logger.info("sglang-depthkv: request length capped at %d tokens (input %d) by the smallest layer "
                    "capacity %d (layer %d); the logical pool alone allowed %d", length, input_len, min(caps),
                    caps.index(min(caps)), info[MAX_REQ_LEN])
    info = list(info)
    info[MAX_REQ_LEN], info[MAX_REQ_INPUT_LEN] = length, input_len
    return tuple(info)
