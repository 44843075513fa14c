"""CPU stand-in for ``sgl_kernel`` (SGLang's CUDA/CPU kernel package has no build for this machine).

Only for the CPU test environment built by scripts/setup-cpu.sh. SGLang's CPU engine imports these
names at module import time; the code paths the project uses never call them (they raise if called).
Unknown names raise ImportError as usual, so SGLang's own ``try: from sgl_kernel import ...`` probes
keep falling back to their torch implementations.
"""
import torch


def _missing(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available in the CPU stand-in")

    fn.__name__ = name
    return fn


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, bs=None):
    """Torch version: req_to_token[rpi, start:end] = out_cache_loc (concatenated per request)."""
    pos = 0
    for i in range(len(req_pool_indices)):
        s, e = int(start_offset[i]), int(end_offset[i])
        req_to_token[int(req_pool_indices[i]), s:e] = out_cache_loc[pos : pos + e - s].to(req_to_token.dtype)
        pos += e - s


_NAMES = [
    "copy_all_layer_kv_cache_cpu",
    "rotate_input_ids_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "build_draft_decode_metadata_cpu",
]
for _n in _NAMES:
    globals()[_n] = _missing(_n)
