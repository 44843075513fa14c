"""The plugin under SGLang's tensor parallelism (``--tp-size N``).

Each rank's attention layers hold ``kv_heads / N`` heads (SGLang's ``QKVParallelLinear``), its pool
those heads' K/V, and its ``o_proj`` the matching input columns (row-parallel), so a rank scores its
own heads: SnapKV / LaProx from its query heads and its ``o_proj`` slice, KVzip from its slice of the
gates (``KVzipGates.shard``). The partial token scores are summed over the attention
tensor-parallel group (``core.rank_sum.RankScoreSum``, through SGLang's own ``GroupCoordinator``:
NCCL on CUDA, gloo on CPU) before any selection, once per prefill batch and once per decode-time
pruning event, so every rank keeps the same tokens and its pool, allocator and radix tree take the
same decisions as the others.
"""

from __future__ import annotations

from typing import Optional

from sglang_depthkv.core.rank_sum import HeadShard, RankScoreSum


def head_shard(model_runner) -> Optional[HeadShard]:
    """This rank's kv heads (None on a single attention rank)."""
    ps = model_runner.ps
    if ps.attn_tp_size == 1:
        return None
    return HeadShard(rank=int(ps.attn_tp_rank), size=int(ps.attn_tp_size),
                     total_kv_heads=int(model_runner.model_config.get_total_num_kv_heads()))


def rank_score_sum(shard: HeadShard, scorer) -> RankScoreSum:
    """The score sum over SGLang's attention tensor-parallel group."""
    from sglang.srt.runtime_context import get_parallel

    group = get_parallel().attn_tp_group
    if group.world_size != shard.size:
        raise RuntimeError(f"attention tensor-parallel group of {group.world_size} ranks, expected {shard.size}")
    return RankScoreSum(shard, scorer, lambda x: group.all_gather(x, dim=0))


def rank_label(ps) -> str:
    """``" tp=R/N dp=D"`` for the capacity table of a server with several ranks (SGLang's
    ``ParallelState``), ``""`` on a single rank."""
    parts = []
    if ps.attn_tp_size > 1:
        parts.append(f"tp={ps.attn_tp_rank}/{ps.attn_tp_size}")
    if ps.dp_size > 1 and ps.dp_rank is not None:
        parts.append(f"dp={ps.dp_rank}/{ps.dp_size}")
    return (" " + " ".join(parts)) if parts else ""
