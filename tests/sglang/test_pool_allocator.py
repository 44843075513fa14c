"""DepthKVPool + DepthKVAllocator on CPU against a brute-force reference of who holds what."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dkv_support import build, write_kv  # noqa: E402

from sglang_depthkv.sglang.invariants import check  # noqa: E402


def test_alloc_gives_a_slot_at_every_layer_and_writes_go_through_the_mapping():
    pool, alloc, _, _ = build(tree=False)
    torch.manual_seed(0)
    pool.k_buffer[0].fill_(float("nan"))  # poison: a read of an unwritten slot shows
    ids = alloc.alloc(10)
    assert ids.tolist() == list(range(1, 11))
    for l in range(3):
        slots = pool.translate(l, ids)
        assert bool((slots > 0).all()) and torch.unique(slots).numel() == 10
        assert int(slots.max()) <= pool.layer_capacities[l]
    ref = write_kv(pool, ids, seed=1)
    for (l, i), (k, v) in ref.items():
        s = int(pool.mapping[l, i])
        assert torch.equal(pool.k_buffer[l][s], k) and torch.equal(pool.v_buffer[l][s], v)
    assert alloc.available_size() == 14
    assert alloc.layer_available_sizes() == [14, 2, 6]
    assert check(alloc, request_held=[10, 10, 10]) == []


def test_alloc_is_all_or_nothing_when_one_layer_is_short():
    pool, alloc, _, _ = build(tree=False)
    alloc.alloc(10)
    before = (alloc.available_size(), alloc.layer_available_sizes(), pool.mapping.clone())
    assert alloc.alloc(3) is None  # layer 1 has 2 free slots
    assert (alloc.available_size(), alloc.layer_available_sizes()) == before[:2]
    assert torch.equal(pool.mapping, before[2])


def test_prune_frees_exactly_those_slots_and_free_frees_what_is_still_held():
    pool, alloc, _, _ = build(tree=False)
    ids = alloc.alloc(10)
    ref = write_kv(pool, ids, seed=2)
    pruned1 = ids[[0, 3, 4]]
    freed = alloc.prune([1, 2], [pruned1, ids[[9]]])
    assert freed == [3, 1]
    assert alloc.layer_available_sizes() == [14, 5, 7]
    assert pool.translate(1, pruned1).tolist() == [0, 0, 0]
    assert check(alloc, request_held=[10, 7, 9]) == []
    # survivors' bytes unchanged
    for (l, i), (k, _) in ref.items():
        s = int(pool.mapping[l, i])
        if s:
            assert torch.equal(pool.k_buffer[l][s], k)
    # pruning again is refused (a segment is pruned once), nothing changes
    with pytest.raises(ValueError, match="does not hold"):
        alloc.prune([1], [ids[[0, 1]]])
    assert alloc.layer_available_sizes() == [14, 5, 7]
    with pytest.raises(ValueError, match="outside"):
        alloc.prune([7], [ids[[1]]])
    with pytest.raises(ValueError, match="duplicate"):
        alloc.prune([0], [ids[[1, 1]]])
    alloc.free(ids)
    assert alloc.available_size() == 24 and alloc.layer_available_sizes() == [24, 12, 16]
    assert int(pool.mapping.abs().sum()) == 0
    assert check(alloc) == []


def test_free_group_and_clear():
    pool, alloc, _, _ = build(tree=False)
    ids = alloc.alloc(6)
    alloc.free_group_begin()
    alloc.free(ids[:3])
    alloc.free(ids[3:])
    assert alloc.layer_available_sizes() == [18, 6, 10]  # deferred
    alloc.free_group_end()
    assert alloc.layer_available_sizes() == [24, 12, 16]
    alloc.alloc(5)
    alloc.clear()
    assert alloc.layer_available_sizes() == [24, 12, 16] and int(pool.mapping.abs().sum()) == 0


def test_pool_refuses_bad_capacities():
    from sglang_depthkv.sglang.pool import DepthKVPool

    with pytest.raises(ValueError, match="capacity"):
        DepthKVPool(8, [8, 9], torch.float32, 1, 2, 2, "cpu")
    with pytest.raises(ValueError, match="capacities"):
        DepthKVPool(8, [8], torch.float32, 1, 2, 2, "cpu")


def test_cpu_copy_round_trip_keeps_pruned_state():
    pool, alloc, _, _ = build(tree=False)
    ids = alloc.alloc(5)
    ref = write_kv(pool, ids, seed=3)
    alloc.prune([2], [ids[[1]]])
    copy = pool.get_cpu_copy(ids)
    for l in range(3):
        pool.k_buffer[l].zero_()
    pool.load_cpu_copy(copy, ids)
    for (l, i), (k, _) in ref.items():
        s = int(pool.mapping[l, i])
        if s:
            assert torch.equal(pool.k_buffer[l][s], k)
