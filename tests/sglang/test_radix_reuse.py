"""Radix reuse of a pruned prefix through SGLang's real ``Req`` / ``ReqToTokenPool`` / radix-cache
code paths (``cache_finished_req``, ``match_prefix``, ``cache_unfinished_req``, ``evict``)."""

import sys
from array import array
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dkv_support import build, write_kv  # noqa: E402

from sglang_depthkv.sglang import chunk_ownership as C  # noqa: E402
from sglang_depthkv.sglang.invariants import check  # noqa: E402
from sglang_depthkv.sglang.pruning import PruneRecord, apply_prune  # noqa: E402


def keep_all_but(lo, hi, dropped):
    """A keep set of positions ``[lo, hi)`` without ``dropped``."""
    return torch.tensor([p for p in range(lo, hi) if p not in set(dropped)], dtype=torch.int64)


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
    # A prunes its own tokens (different ones per layer; the end-of-prefill path), then finishes
    rec = PruneRecord("A", own_lo=C.chunk_own_lo(a), seq_len=10,
                      keep=[keep_all_but(0, 10, []), keep_all_but(0, 10, [1, 2, 3, 5, 6]), keep_all_but(0, 10, [4, 8])])
    apply_prune(alloc, r2t.req_to_token, a.req_pool_idx, rec)
    assert rec.freed == [0, 5, 2]
    C.forget(a)
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

    # B never re-prunes the tree-owned prefix it holds: its own segment starts after it
    b = make_req("B", tokens_b, r2t, tree)
    tree.inc_lock_ref(m.last_device_node)
    b.last_node = m.last_device_node
    b.prefix_indices = got
    b.cache_protected_len = len(got)
    r2t.write((b.req_pool_idx, slice(0, 8)), got.to(torch.int32))
    b_ids = alloc.alloc(2)
    r2t.write((b.req_pool_idx, slice(8, 10)), b_ids.to(torch.int32))
    own_lo = C.unshared_start(b, C.chunk_own_lo(b))  # as the end-of-prefill entry computes it
    assert own_lo == 8
    rec = PruneRecord("B", own_lo=own_lo, seq_len=10, keep=[keep_all_but(8, 10, [8, 9])] * 3)  # keeps nothing
    apply_prune(alloc, r2t.req_to_token, b.req_pool_idx, rec)
    assert rec.freed == [2, 2, 2]  # B's own two tokens, at every layer
    C.forget(b)
    for l, (held, k, v) in enumerate(snapshot(pool, got)):  # the prefix is still what A left
        assert torch.equal(held, b_state[l][0]) and torch.equal(k, b_state[l][1]) and torch.equal(v, b_state[l][2])
    alloc.free(b_ids)
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
    ``chunk_ownership``; tested in test_chunk_ownership.py), its own segment starts after them: the
    final prune leaves the tree-resident chunk alone."""
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
    assert alloc.layer_available_sizes() == [12, 4, 4]
    more = alloc.alloc(4)  # second (final) chunk: positions [4, 8)
    r2t.write((req.req_pool_idx, slice(4, 8)), more.to(torch.int32))
    own_lo = C.chunk_own_lo(req)  # recorded only now: the first chunk is already the tree's
    assert own_lo == 4
    rec = PruneRecord("C", own_lo=own_lo, seq_len=8,
                      keep=[keep_all_but(4, 8, []), keep_all_but(4, 8, [4, 5, 6, 7]), keep_all_but(4, 8, [7])])
    apply_prune(alloc, r2t.req_to_token, req.req_pool_idx, rec)
    assert rec.freed == [0, 4, 1]
    assert alloc.held_counts(ids) == [4, 4, 4]  # the tree-resident chunk is held at every layer
    assert alloc.layer_available_sizes() == [8, 4, 1]
    C.forget(req)
    alloc.free(more)
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


def test_incremental_layer_evictable_counts_follow_split_lock_prune_and_evict():
    """``layer_evictable()`` (kept incrementally) through a split by a match, a lock, a prune of the
    locked tokens by their holder, the unlock (recount) and eviction, against the tree walk."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    pool, alloc, r2t, tree = build(capacities=(24, 12, 16), size=24)
    ids = alloc.alloc(6)
    tree.insert(InsertParams(key=RadixKey(array("l", range(10, 16))), value=ids))
    assert tree.layer_evictable() == [6, 6, 6] == tree.layer_tree_sizes()[0]
    node = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("l", range(10, 14))))).last_device_node  # splits
    tree.inc_lock_ref(node)
    assert tree.layer_evictable() == [2, 2, 2] == tree.layer_tree_sizes()[0]
    alloc.prune([1], [ids[[0, 2]]])  # the lock holder prunes two of its locked tokens at layer 1
    tree.dec_lock_ref(node)
    assert tree.layer_evictable() == [6, 4, 6] == tree.layer_tree_sizes()[0]
    assert check(alloc, tree) == []
    tree.evict(EvictParams(num_tokens=6))
    assert tree.layer_evictable() == [0, 0, 0] and alloc.layer_available_sizes() == [24, 12, 16]
