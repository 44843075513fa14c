"""Radix reuse of a pruned prefix through SGLang's real ``Req`` / ``ReqToTokenPool`` / radix-cache
code paths (``cache_finished_req``, ``match_prefix``, ``cache_unfinished_req``, ``evict``)."""

import sys
from array import array
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dkv_support import build, write_kv  # noqa: E402

from sglang_depthkv.sglang.invariants import check  # noqa: E402


def make_req(rid, tokens, r2t, tree):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req(rid, "", array("q", tokens), SamplingParams(max_new_tokens=1))
    r2t.alloc([req])
    req.last_node = tree.root_node
    return req


def snapshot(pool, ids):
    out = []
    for l in range(pool.layer_num):
        s = pool.translate(l, ids)
        out.append(((s > 0).clone(), pool.k_buffer[l][s[s > 0]].clone(), pool.v_buffer[l][s[s > 0]].clone()))
    return out


def test_pruned_prefix_is_reused_bit_for_bit():
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    pool, alloc, r2t, tree = build(capacities=(40, 20, 30), size=40, heads=2, dim=4)
    tokens_a = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    a = make_req("A", tokens_a, r2t, tree)
    ids = alloc.alloc(len(tokens_a))
    r2t.write((a.req_pool_idx, slice(0, len(ids))), ids.to(torch.int32))
    write_kv(pool, ids, seed=7)
    a.kv_committed_len = len(ids)  # as ScheduleBatch.prepare_for_extend sets it
    # A prunes its own tokens (different ones per layer), then finishes
    freed = tree.prune_owned(a, [1, 2], [torch.tensor([1, 2, 3, 5, 6]), torch.tensor([4, 8])])
    assert freed == [5, 2]
    a_state = snapshot(pool, ids)
    tree.cache_finished_req(a, kv_len_to_handle=len(tokens_a))
    r2t.free(a)
    assert tree.evictable_size() == len(tokens_a)
    assert tree.layer_tree_sizes() == ([10, 5, 8], [0, 0, 0])
    assert check(alloc, tree) == []

    # B shares the first 8 tokens
    tokens_b = tokens_a[:8] + [99, 98]
    m = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("l", tokens_b))))
    got = m.device_indices.long()
    assert got.tolist() == ids[:8].tolist()
    b_state = snapshot(pool, got)
    for l in range(3):
        held_a, ka, va = a_state[l]
        held_b, kb, vb = b_state[l]
        assert torch.equal(held_b, held_a[:8])
        n = int(held_b.sum())
        assert torch.equal(kb, ka[:n]) and torch.equal(vb, va[:n])  # bit for bit

    # B may not re-prune the tree-owned prefix while holding it
    b = make_req("B", tokens_b, r2t, tree)
    tree.inc_lock_ref(m.last_device_node)
    b.last_node = m.last_device_node
    b.prefix_indices = got
    b.cache_protected_len = len(got)
    r2t.write((b.req_pool_idx, slice(0, 8)), got.to(torch.int32))
    with pytest.raises(ValueError, match="tree-owned"):
        tree.prune_owned(b, [0], [torch.tensor([0])])
    # lock protection: eviction cannot take the locked prefix
    tree.evict(EvictParams(num_tokens=100))
    assert tree.protected_size() == 8
    assert tree.layer_tree_sizes()[1] == [8, int(a_state[1][0][:8].sum()), int(a_state[2][0][:8].sum())]
    tree.dec_lock_ref(b.last_node)
    r2t.free(b)
    # eviction frees exactly the per-layer slots still held
    tree.evict(EvictParams(num_tokens=100))
    assert alloc.available_size() == 40 and alloc.layer_available_sizes() == [40, 20, 30]
    assert check(alloc, tree) == []


def test_chunked_prefill_chunks_enter_the_tree_as_in_vanilla():
    """Intermediate chunks are inserted (vanilla SGLang) and ``cache_protected_len`` moves past them.
    Unless the request's chunk ownership was recorded at its first chunk (the ForwardBatch hook does,
    ``chunk_ownership``; tested in test_chunk_ownership.py), tree-resident positions are refused."""
    pool, alloc, r2t, tree = build(capacities=(16, 8, 8), size=16)
    tokens = list(range(1, 9))
    req = make_req("C", tokens, r2t, tree)
    req.init_next_round_input(tree)  # SGLang's own prefix match (empty) and fill ids
    ids = alloc.alloc(4)
    r2t.write((req.req_pool_idx, slice(0, 4)), ids.to(torch.int32))
    req.set_extend_range(0, 4)  # first chunk: 4 of 8 tokens
    req.kv_committed_len = 4
    tree.cache_unfinished_req(req, chunked=True)
    assert tree.total_size() == 4  # the chunk is in the tree
    assert req.cache_protected_len == 4
    assert req.prefix_indices.tolist() == ids.tolist()
    with pytest.raises(ValueError, match="tree-owned"):
        tree.prune_owned(req, [1], [torch.tensor([0, 1])])
    assert alloc.layer_available_sizes() == [12, 4, 4]  # nothing was pruned
    tree.dec_lock_ref(req.last_node)
    r2t.free(req)



def test_layer_deficit_matches_brute_force():
    """The prefill budget correction: logical room minus the worst layer's room (free + evictable)."""
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from sglang_depthkv.sglang.radix_cache import layer_deficit

    pool, alloc, r2t, tree = build(capacities=(30, 14, 20), size=30)
    assert layer_deficit(alloc, tree) == 30 - 14  # empty: layer 1 is 16 slots short of the logical space
    ids = alloc.alloc(10)
    alloc.prune([0, 2], [ids[:6], ids[2:5]])
    tree.insert(InsertParams(key=RadixKey(array("q", list(range(10)))), value=ids))
    # brute force: logical room = 20 free + 10 evictable; per layer free + held-in-tree
    rooms = []
    for l, cap in enumerate((30, 14, 20)):
        held = int((pool.mapping[l, ids] > 0).sum())
        rooms.append(alloc.layer_available_size(l) + held)
    assert rooms == [30, 14, 20]
    assert layer_deficit(alloc, tree) == 30 - min(rooms)
    more = alloc.alloc(4)  # request-owned, not evictable
    assert layer_deficit(alloc, tree) == (26) - min(r - 4 for r in rooms)
    alloc.free(more)
