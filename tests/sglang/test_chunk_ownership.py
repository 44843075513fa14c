"""Which positions a chunked request may prune at its final chunk (``sglang/chunk_ownership.py``),
through SGLang's real ``Req``, ``ReqToTokenPool`` and radix-cache paths (``cache_unfinished_req``
between chunks, ``match_prefix`` + ``inc_lock_ref`` of another request, ``cache_finished_req`` of a
request that inserts the same tokens first). Expected values are worked out by hand from the
scenario, not read back from the code."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dkv_support import build  # noqa: E402
from test_radix_reuse import make_req  # noqa: E402

from sglang_depthkv.sglang import chunk_ownership as C  # noqa: E402
from sglang_depthkv.sglang.pruning import PruneRecord, apply_prune  # noqa: E402

TOKENS = [30 + i for i in range(12)]
EMPTY = torch.zeros(0, dtype=torch.int64)  # a keep set that keeps nothing


def run_chunk(req, r2t, alloc, tree, lo, hi):
    """Prefill positions [lo, hi) of ``req`` with fresh logical ids, then SGLang's between-chunk insert."""
    ids = alloc.alloc(hi - lo)
    r2t.write((req.req_pool_idx, slice(lo, hi)), ids.to(torch.int32))
    req.set_extend_range(lo, hi)
    req.kv_committed_len = hi
    tree.cache_unfinished_req(req, chunked=True)
    return ids


def test_own_chunks_are_the_requests_until_another_request_locks_them():
    pool, alloc, r2t, tree = build(capacities=(40, 20, 30), size=40, heads=2, dim=4)
    a = make_req("A", TOKENS, r2t, tree)
    a.init_next_round_input(tree)  # SGLang's own prefix match (empty) and fill ids
    assert C.chunk_own_lo(a) == 0  # first chunk: nothing matched
    run_chunk(a, r2t, alloc, tree, 0, 6)
    assert a.cache_protected_len == 6  # SGLang moved the protected bound past the inserted chunk
    assert C.chunk_own_lo(a) == 0  # ... but the chunk is still A's own
    assert C.unshared_start(a, 0) == 0  # only A holds it
    # B matches the first 4 tokens and is admitted (holds a lock on them): they are no longer A's to prune
    b = make_req("B", TOKENS[:4] + [99, 98], r2t, tree)
    b.init_next_round_input(tree)
    assert b.cache_protected_len == 4
    tree.inc_lock_ref(b.last_node)
    assert C.unshared_start(a, 0) == 4
    # and B, which did not insert them, never prunes them: its own segment starts after its match
    b_ids = alloc.alloc(2)
    r2t.write((b.req_pool_idx, slice(4, 6)), b_ids.to(torch.int32))
    assert C.chunk_own_lo(b) == 4
    rec = PruneRecord("B", own_lo=C.chunk_own_lo(b), seq_len=6, keep=[torch.arange(4, 6), EMPTY, EMPTY])
    apply_prune(alloc, r2t.req_to_token, b.req_pool_idx, rec)
    assert rec.freed == [0, 2, 2]  # B's two own tokens only
    assert alloc.held_counts(r2t.req_to_token[a.req_pool_idx][:6].long()) == [6, 6, 6]  # A's chunk untouched
    alloc.free(b_ids)
    C.forget(b)
    tree.dec_lock_ref(b.last_node)
    assert C.unshared_start(a, 0) == 0
    # A itself may prune its own tree-resident chunk while its chunked prefill runs
    assert alloc.layer_available_sizes() == [34, 14, 24]
    rec = PruneRecord("A", own_lo=C.chunk_own_lo(a), seq_len=6,
                      keep=[torch.arange(0, 6), torch.tensor([1, 3, 4, 5]), torch.arange(0, 6)])
    apply_prune(alloc, r2t.req_to_token, a.req_pool_idx, rec)
    assert rec.freed == [0, 2, 0]
    assert alloc.layer_available_sizes() == [34, 16, 24]
    assert tree.layer_tree_sizes() == ([0, 0, 0], [6, 4, 6])  # A's lock protects the chunk; 2 pruned at layer 1


def test_tokens_another_request_inserted_first_are_not_the_requests():
    pool, alloc, r2t, tree = build(capacities=(40, 20, 30), size=40, heads=2, dim=4)
    a = make_req("A", TOKENS, r2t, tree)
    a.init_next_round_input(tree)
    C.chunk_own_lo(a)
    run_chunk(a, r2t, alloc, tree, 0, 6)
    # D (same first 9 tokens) is prefilled in A's next batch and finishes first: it matched A's chunk
    # [0, 6) and inserts its own ids for [6, 9)
    d = make_req("D", TOKENS[:9], r2t, tree)
    row_d = r2t.req_to_token[d.req_pool_idx]
    row_d[:6] = r2t.req_to_token[a.req_pool_idx][:6]
    d_ids = alloc.alloc(3)
    row_d[6:9] = d_ids.to(torch.int32)
    d.cache_protected_len = 6
    tree.cache_finished_req(d, kv_len_to_handle=9)
    r2t.free(d)
    # A's chunk [6, 12): SGLang frees A's duplicates of [6, 9) and points A's row at D's ids
    run_chunk(a, r2t, alloc, tree, 6, 12)
    row_a = r2t.req_to_token[a.req_pool_idx]
    assert row_a[6:9].tolist() == d_ids.tolist()
    assert a.cache_protected_len == 12
    assert C.chunk_own_lo(a) == 9  # [6, 9) is D's; A owns [0, 6) and [9, 12) -> the contiguous suffix
    assert C.unshared_start(a, 9) == 9
    C.forget(a)
    assert not hasattr(a, C.OWN_LO_ATTR)
