"""A serving-path state at Llama-3.1-8B attention shapes (32 layers, 32 query / 8 kv heads x 128),
small token counts, built from the real classes: SGLang's ``ReqToTokenPool``, ``Req`` and
``MHATokenToKVPool`` (vanilla), the plugin's ``DepthKVPool`` / ``DepthKVAllocator`` /
``DepthKVRadixCache`` / ``LayerIndexStreams``."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import List

import torch

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 128
CORES = 132  # H200 SMs: the split-K rule's device_core_count
MAX_KV_SPLITS = 8
DTYPE = torch.bfloat16


@dataclass
class ServingState:
    pool: object
    alloc: object
    r2t: object
    tree: object
    streams: object
    reqs: List[object] = field(default_factory=list)
    seq_lens: List[int] = field(default_factory=list)


def layer_capacities(size: int) -> List[int]:
    """A DepthKV-like spread: the first layer keeps everything, the last one 40%."""
    return [max(1, int(size * (1.0 - 0.6 * l / (LAYERS - 1)))) for l in range(LAYERS)]


def build_state(batch: int, prompt: int, device: str = "cpu") -> ServingState:
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from sglang_depthkv.sglang.allocator import DepthKVAllocator
    from sglang_depthkv.sglang.backends.layer_indices import LayerIndexStreams
    from sglang_depthkv.sglang.pool import DepthKVPool
    from sglang_depthkv.sglang.radix_cache import DepthKVRadixCache

    size = 4 * batch * (prompt + 8) + 128
    pool = DepthKVPool(size, layer_capacities(size), DTYPE, KV_HEADS, HEAD_DIM, LAYERS, device)
    alloc = DepthKVAllocator(size, DTYPE, device, pool)
    r2t = ReqToTokenPool(size=3 * batch + 2, max_context_len=prompt + 64, device=device, enable_memory_saver=False)
    tree = DepthKVRadixCache(CacheInitParams(disable=False, req_to_token_pool=r2t, token_to_kv_pool_allocator=alloc,
                                             page_size=1))
    streams = LayerIndexStreams(pool.mapping, r2t.req_to_token, torch.int32)
    return ServingState(pool, alloc, r2t, tree, streams)


def add_requests(st: ServingState, batch: int, prompt: int, first_token: int = 1000) -> List[object]:
    """``batch`` running requests of ``prompt`` tokens each (distinct tokens: no radix sharing)."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    reqs = []
    for b in range(batch):
        tokens = list(range(first_token + b * (prompt + 64), first_token + b * (prompt + 64) + prompt))
        req = Req(f"r{first_token}-{b}", "", array("q", tokens), SamplingParams(max_new_tokens=8))
        st.r2t.alloc([req])
        req.last_node = st.tree.root_node
        ids = st.alloc.alloc(prompt)
        if ids is None:
            raise RuntimeError("hot-path state: pool too small")
        st.r2t.write((req.req_pool_idx, slice(0, prompt)), ids.to(torch.int32))
        req.kv_committed_len = prompt
        req.fill_ids = tokens
        reqs.append(req)
    st.reqs.extend(reqs)
    st.seq_lens.extend([prompt] * batch)
    return reqs
