"""Stateful property test: random sequences of alloc, prune, insert, match, lock/unlock, evict, free
and retract against SGLang's real radix cache (our ``DepthKVRadixCache`` subclass, unmodified tree
logic) and our allocator. After every step: no slot is both free and mapped, no slot leaks, per-layer
use <= capacity, the per-layer and logical accounting closes, and the K/V bytes of every surviving
(layer, token) equal what was written (a brute-force dict of every write)."""

import sys
from array import array
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

sys.path.insert(0, str(Path(__file__).parent))
from dkv_support import build, write_kv  # noqa: E402

from sglang_depthkv.sglang.invariants import check  # noqa: E402

CAPS = (20, 9, 13)
SIZE = 20


def key(tokens):
    from sglang.srt.mem_cache.radix_cache import RadixKey

    return RadixKey(array("l", tokens))


class Machine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool, self.alloc, _, self.tree = build(CAPS, SIZE, heads=1, dim=2)
        self.ref = {}  # (layer, logical id) -> (k, v) written
        self.reqs = []  # live requests: dict(tokens, prefix_ids, own_ids, node, lock)
        self.locks = []  # extra locks taken on matched nodes
        self.seed = 0

    # --- requests ------------------------------------------------------------------------------
    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=8))
    def start_request(self, tokens):
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

        m = self.tree.match_prefix(MatchPrefixParams(key=key(tokens)))
        prefix = m.device_indices.long()
        node = m.last_device_node
        self.tree.inc_lock_ref(node)
        need = len(tokens) - len(prefix)
        self.tree.evict_for_layers(need)
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        if self.alloc.available_size() < need:
            self.tree.evict(EvictParams(num_tokens=need - self.alloc.available_size()))
        self._forget_unmapped()
        ids = self.alloc.alloc(need)
        if ids is None:
            # refused only when a resource is really short
            assert self.alloc.available_size() < need or self.alloc.min_layer_available_size() < need
            self.tree.dec_lock_ref(node)
            return
        self.seed += 1
        self.ref.update(write_kv(self.pool, ids, self.seed))
        self.reqs.append(dict(tokens=tokens, prefix=prefix, own=ids, node=node))

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def prune(self, data):
        r = data.draw(st.sampled_from(self.reqs))
        if len(r["own"]) == 0:
            return
        layer = data.draw(st.integers(0, len(CAPS) - 1))
        held = [i for i in r["own"].tolist() if int(self.pool.mapping[layer, i]) > 0]
        if not held:
            # the rule: a pruned token cannot be pruned again
            try:
                self.alloc.prune([layer], [r["own"][:1]])
            except ValueError:
                return
            raise AssertionError("double prune was accepted")
        pick = data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=len(held), unique=True))
        before = self.alloc.layer_available_size(layer)
        self.alloc.prune([layer], [torch.tensor(pick)])
        assert self.alloc.layer_available_size(layer) == before + len(pick)
        for i in pick:
            del self.ref[(layer, i)]

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def finish_and_insert(self, data):
        from sglang.srt.mem_cache.base_prefix_cache import InsertParams

        r = self.reqs.pop(data.draw(st.integers(0, len(self.reqs) - 1)))
        value = torch.cat([r["prefix"], r["own"]])
        res = self.tree.insert(InsertParams(key=key(r["tokens"]), value=value))
        dup = value[len(r["prefix"]): res.prefix_len]  # our ids already present in the tree: caller frees
        self._free(dup)
        self.tree.dec_lock_ref(r["node"])

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def retract_or_abort(self, data):
        r = self.reqs.pop(data.draw(st.integers(0, len(self.reqs) - 1)))
        self._free(r["own"])
        self.tree.dec_lock_ref(r["node"])

    def _free(self, ids):
        for i in ids.tolist():
            for l in range(len(CAPS)):
                self.ref.pop((l, i), None)
        self.alloc.free(ids)

    # --- tree ------------------------------------------------------------------------------------
    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=8), lock=st.booleans())
    def match(self, tokens, lock):
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

        m = self.tree.match_prefix(MatchPrefixParams(key=key(tokens)))
        ids = m.device_indices.long()
        # a matched prefix: every id is allocated; its per-layer view is what its writer left
        for i in ids.tolist():
            for l in range(len(CAPS)):
                s = int(self.pool.mapping[l, i])
                assert (s > 0) == ((l, i) in self.ref)
        if lock and len(ids):
            self.tree.inc_lock_ref(m.last_device_node)
            self.locks.append(m.last_device_node)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data):
        node = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.tree.dec_lock_ref(node)

    @rule(n=st.integers(1, 12))
    def evict(self, n):
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        protected_before = self.tree.protected_size()
        self.tree.evict(EvictParams(num_tokens=n))
        assert self.tree.protected_size() == protected_before  # locks hold
        self._forget_unmapped()

    @rule(n=st.integers(1, 12))
    def evict_for_layers(self, n):
        self.tree.evict_for_layers(n)
        self._forget_unmapped()
        if self.tree.evictable_size() > 0:
            assert self.alloc.min_layer_available_size() >= n

    def _forget_unmapped(self):
        for (l, i) in list(self.ref):
            if int(self.pool.mapping[l, i]) == 0:
                del self.ref[(l, i)]

    # --- invariants --------------------------------------------------------------------------------
    @invariant()
    def per_layer_invariants(self):
        held = [0] * len(CAPS)
        n_own = 0
        for r in self.reqs:
            n_own += len(r["own"])
            for l, c in enumerate(self.alloc.held_counts(r["own"])):
                held[l] += c
        assert check(self.alloc, self.tree, held) == []
        for l, cap in enumerate(CAPS):
            assert cap - self.alloc.layer_available_size(l) <= cap
        # SGLang's logical invariant: available + evictable + protected + request-owned == total
        assert self.alloc.available_size() + self.tree.evictable_size() + self.tree.protected_size() + n_own == SIZE

    @invariant()
    def bytes_unchanged(self):
        mapped = {(l, i) for l in range(len(CAPS)) for i in torch.nonzero(self.pool.mapping[l]).flatten().tolist()}
        assert mapped == set(self.ref)
        for (l, i), (k, v) in self.ref.items():
            s = int(self.pool.mapping[l, i])
            assert torch.equal(self.pool.k_buffer[l][s], k) and torch.equal(self.pool.v_buffer[l][s], v)

    def teardown(self):
        for r in self.reqs:
            self.alloc.free(r["own"])
            self.tree.dec_lock_ref(r["node"])
        for node in self.locks:
            self.tree.dec_lock_ref(node)
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        self.tree.evict(EvictParams(num_tokens=SIZE))
        # everything back: no leak anywhere
        assert self.alloc.available_size() == SIZE
        assert self.alloc.layer_available_sizes() == list(CAPS)
        assert int(self.pool.mapping.abs().sum()) == 0


Machine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
TestDepthKVStateful = Machine.TestCase
