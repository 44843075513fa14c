"""Token scores summed over tensor-parallel ranks (``core/rank_sum.py``): two ``torch.distributed``
gloo processes, each holding its rank's heads of the same observations (SGLang's head split: kv
heads in contiguous blocks or replicated, query heads in contiguous blocks, ``o_proj`` input
columns of the rank's query heads, gates cut to the rank's kv heads), select with the policy's
``score_sum`` over the group. Reference: the same policy on one rank with every head. Kept sets
must be identical, and the two ranks' score totals bitwise equal. LaProx over replicated kv heads
(its score mixes a kv head's query heads, which the ranks split) is refused on every rank."""

import os
import pickle
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglang_depthkv.core.gates import FeatureSpec, KVzipGates
from sglang_depthkv.core.policy import make_policy
from sglang_depthkv.core.profile import SensitivityProfile
from sglang_depthkv.core.rank_sum import HeadShard, RankScoreSum
from sglang_depthkv.core.types import LayerObservation, ModelIdentity

L, QH, D, HID, N, W, SINKS = 3, 4, 8, 32, 48, 6, 2
POLICIES = ("snapkv", "pyramid", "depthkv", "laprox", "kvzip", "streamingllm")
TP = 2


def identity(kvh):
    return ModelIdentity(architecture="LlamaForCausalLM", num_layers=L, num_attention_heads=QH,
                         num_key_value_heads=kvh, head_dim=D, hidden_size=HID)


def full_observations(kvh, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for l in range(L):
        out.append(LayerObservation(
            layer=l, keys=torch.randn(kvh, N, D, generator=g), values=torch.randn(kvh, N, D, generator=g),
            window_queries=2 * torch.randn(QH, W, D, generator=g), scaling=D ** -0.5,
            o_proj_weight=torch.randn(HID, QH * D, generator=g), hidden_states=torch.randn(N, HID, generator=g)))
    return out


def rank_observations(obs, shard):
    """The rank's part of each observation, as SGLang's parallel layers split it."""
    heads = list(shard.kv_heads())
    q_lo, q_hi = shard.rank * QH // shard.size, (shard.rank + 1) * QH // shard.size
    return [LayerObservation(layer=o.layer, keys=o.keys[heads], values=o.values[heads],
                             window_queries=o.window_queries[q_lo:q_hi], scaling=o.scaling,
                             o_proj_weight=o.o_proj_weight[:, q_lo * D:q_hi * D], hidden_states=o.hidden_states)
            for o in obs]


def policy(name, kvh, gates=None):
    prof = SensitivityProfile(identity(kvh), "snapkv", [0.25, 0.5, 1.0],
                              [[0.9, 0.2, 0.0], [0.1, 0.02, 0.0], [0.5, 0.1, 0.0]])
    if gates is None:
        g = torch.Generator().manual_seed(3)
        spec = FeatureSpec(use_key=True, use_hidden=True, head_dim=D, hidden_size=HID)
        gates = KVzipGates(identity(kvh), spec, 3 * torch.randn(L, kvh, spec.dim, generator=g),
                           0.1 * torch.randn(L, kvh, generator=g))
    return make_policy(name, 0.35, profile=prof, gates=gates, sinks=SINKS, window=W)


def _worker(rank, kvh, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP)
    try:
        shard = HeadShard(rank, TP, kvh)
        obs = rank_observations(full_observations(kvh), shard)

        def all_gather(x):
            out = torch.empty((TP,) + tuple(x.shape[1:]), dtype=x.dtype)
            dist.all_gather_into_tensor(out, x)
            return out

        res = {}
        for name in POLICIES:
            pol = policy(name, kvh)
            if name == "kvzip":
                pol.scorer.gates = pol.scorer.gates.shard(shard.kv_heads())
            try:
                pol.score_sum = RankScoreSum(shard, pol.scorer, all_gather)
            except ValueError as e:  # a scorer that mixes query heads, over replicated kv heads
                res[name] = {"refused": str(e)}
                continue
            totals = pol.layer_scores(obs)
            keep = pol.select(obs)
            batch = pol.score_sum.sum_many([torch.ones(1, N), torch.ones(2, 3)])  # one collective, two parts
            res[name] = {"keep": [k.tolist() for k in keep], "totals": totals, "batch": batch}
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(res, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 1], ids=["kv-split", "kv-replicated"])
def ranks(request, tmp_path_factory):
    kvh = request.param
    d = tmp_path_factory.mktemp(f"tp-kvh{kvh}")
    mp.start_processes(_worker, args=(kvh, str(d / "init"), str(d)), nprocs=TP, start_method="spawn", join=True)
    out = []
    for r in range(TP):
        with open(d / f"rank{r}.pkl", "rb") as f:
            out.append(pickle.load(f))
    return kvh, out


@pytest.mark.parametrize("name", POLICIES)
def test_rank_sum_keeps_what_one_rank_with_every_head_keeps(ranks, name):
    kvh, res = ranks
    if name == "laprox" and kvh == 1:
        # LaProx mixes the query heads of a kv head; replicated, each rank holds half of them
        for r in range(TP):
            assert res[r][name] == {"refused": "LaProxScorer mixes the query heads of a kv head, and 2 "
                                    "tensor-parallel ranks over 1 kv heads split each kv head's query heads over "
                                    "2 ranks; use a tensor-parallel size of at most 1 with this scorer"}
        return
    ref_pol = policy(name, kvh)
    full = full_observations(kvh)
    ref_keep = [k.tolist() for k in ref_pol.select(full)]
    for r in range(TP):
        assert res[r][name]["keep"] == ref_keep, f"rank {r}: kept sets differ from the single-rank selection"
    assert torch.equal(res[0][name]["totals"], res[1][name]["totals"]), "score totals differ between ranks"
    ref_totals = ref_pol.layer_scores(full)
    torch.testing.assert_close(res[0][name]["totals"], ref_totals, rtol=1e-5, atol=1e-6)
    assert sum(len(k) for k in ref_keep) < L * N  # something was pruned


def test_sum_many_is_one_collective_with_every_part(ranks):
    _, res = ranks
    for r in range(TP):
        ones, twos = res[r]["snapkv"]["batch"]
        assert ones.shape == (1, N) and twos.shape == (2, 3)
        assert torch.equal(ones, torch.full((1, N), 2.0)) and torch.equal(twos, torch.full((2, 3), 2.0))
    kvz = res[0]["kvzip"]["batch"]  # kvzip over replicated kv heads: only the first rank of a replica group counts
    assert torch.equal(kvz[1], torch.full((2, 3), 2.0 if ranks[0] == 2 else 1.0))


def test_head_shard_follows_sglang_split():
    """SGLang's ``QKVParallelLinear``: contiguous kv-head blocks, or kv head ``rank // (tp / kvh)``."""
    assert [list(HeadShard(r, 2, 8).kv_heads()) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [list(HeadShard(r, 4, 2).kv_heads()) for r in range(4)] == [[0], [0], [1], [1]]
    kvzip, snapkv = policy("kvzip", 2).scorer, policy("snapkv", 2).scorer
    assert [HeadShard(r, 4, 2).counts(kvzip) for r in range(4)] == [True, False, True, False]
    assert [HeadShard(r, 4, 2).counts(snapkv) for r in range(4)] == [True] * 4  # distinct query heads
    assert all(HeadShard(r, 2, 2).counts(kvzip) for r in range(2))
    with pytest.raises(ValueError, match="3 kv heads cannot be split over 2"):
        HeadShard(0, 2, 3)
    with pytest.raises(ValueError, match="rank 2 of size 2"):
        HeadShard(2, 2, 2)


def test_rank_score_sum_refuses_mismatched_gather():
    shard = HeadShard(0, 2, 2)
    s = RankScoreSum(shard, make_policy("snapkv", 0.5).scorer, lambda x: torch.cat([x, x[:, :-1]], 1))
    with pytest.raises(RuntimeError, match="different score shapes"):
        s(torch.ones(4))


def test_sharded_gates_score_their_heads():
    kvh = 2
    pol = policy("kvzip", kvh)
    obs = full_observations(kvh)[1]
    full = pol.scorer.gates.scores(obs)
    part = pol.scorer.gates.shard([1])
    one = LayerObservation(layer=1, keys=obs.keys[1:], values=obs.values[1:], window_queries=obs.window_queries,
                           scaling=obs.scaling, hidden_states=obs.hidden_states)
    assert part.num_kv_heads == 1
    torch.testing.assert_close(part.scores(one), full[1:])
    with pytest.raises(ValueError, match="observation has 2 kv heads, gates 1"):
        part.scores(obs)
    with pytest.raises(ValueError, match="outside the gates' 2 kv heads"):
        pol.scorer.gates.shard([2])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
