"""Stateful property tests of ``DepthKVAllocator`` over ``DepthKVPool`` against a plain-Python oracle.

The oracle is a dict ``logical id -> set of layers that still hold a slot for it`` (plus the ids freed
inside an open free group, and the K/V rows written at allocation). It is changed only by the
operations issued to the allocator (alloc, free, free groups, prune, clear), never read back from
it; the oracle's free count of layer ``l`` is ``C_l - #ids held at l``, its logical free count
``size - #allocated ids``. After every step the allocator's observable state must equal it:
``available_size``, ``layer_available_size(s)``, ``held_counts``, ``translate``, which logical ids
hold a slot at each layer (``pool.mapping``), held slots distinct and inside ``[1, C_l]`` (slot 0,
the dummy write target, never handed out), and the K/V bytes of every held (layer, id) still those
written at its allocation. ``alloc`` must return ``None`` exactly when the oracle says the logical
space or some layer is short; a refused prune must raise ``ValueError`` and change nothing (the
refusals that read device values, of ids already pruned, free, duplicated or out of range, are made
with content checks on: ``sglang/checks.py``, which ``tests/conftest.py`` turns on).

- ``TestDepthKVAllocatorStateful``: the allocator alone, capacities drawn per run (1-4 layers,
  logical size 1-12, each ``C_l`` in ``[1, size]``).
- ``TestDepthKVRadixStateful``: requests over SGLang's real radix cache (our ``DepthKVRadixCache``)
  and the allocator: match / lock / insert / evict / ``evict_for_layers`` / retract. The frees the
  tree issues are taken from its calls to the allocator's ``free`` (what it asked for, not what the
  allocator did), and must never touch an id a running request or a lock holds.
"""

import sys
from array import array
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

sys.path.insert(0, str(Path(__file__).parent))
from dkv_support import build, write_kv  # noqa: E402

CONTENT_REFUSALS = ("pruned", "free", "duplicate", "id_range")  # refused only with content checks on


def content_checks_on() -> bool:
    try:
        from sglang_depthkv.sglang import checks
    except ImportError:  # an allocator that always checks
        return True
    return checks.enabled()


def ids_tensor(ids):
    return torch.tensor(list(ids), dtype=torch.int64)


@st.composite
def shapes(draw, min_size=1, max_size=12, max_layers=4, min_cap=1):
    size = draw(st.integers(min_size, max_size))
    layers = draw(st.integers(1, max_layers))
    caps = draw(st.lists(st.integers(min_cap, size), min_size=layers, max_size=layers))
    return size, tuple(caps)


class OracleMachine(RuleBasedStateMachine):
    """The oracle, the checked allocation, and the invariants; subclasses add the rules."""

    def start(self, shape, tree):
        self.size, self.caps = shape
        self.L = len(self.caps)
        self.pool, self.alloc, self.r2t, self.tree = build(self.caps, self.size, heads=1, dim=2, tree=tree)
        self.held = {}  # oracle: allocated logical id -> set of layers holding a slot for it
        self.pending = set()  # ids freed inside the open free group (still allocated until it ends)
        self.in_group = False
        self.kv = {}  # (layer, id) -> (k, v) written at allocation
        self.seed = 0

    # --- oracle ----------------------------------------------------------------------------------
    def o_layer_free(self, l):
        return self.caps[l] - sum(1 for ls in self.held.values() if l in ls)

    def o_logical_free(self):
        return self.size - len(self.held)

    def o_room(self):
        return min([self.o_logical_free()] + [self.o_layer_free(l) for l in range(self.L)])

    def o_holders(self, l):
        return {i for i, ls in self.held.items() if l in ls}

    def o_release(self, ids):
        for i in ids:
            assert i in self.held, f"logical id {i} freed while not allocated"
            for l in self.held.pop(i):
                del self.kv[(l, i)]

    def o_prune(self, layers, picks):
        for l, pick in zip(layers, picks):
            for i in pick:
                self.held[i].discard(l)
                del self.kv[(l, i)]

    # --- checked operations ---------------------------------------------------------------------
    def checked_alloc(self, n):
        """``alloc(n)`` against the oracle; the new ids (None when refused)."""
        short = n > self.o_room()
        ids = self.alloc.alloc(n)
        if short:
            assert ids is None, f"alloc({n}) succeeded although the oracle says a resource is short"
            return None
        assert ids is not None, f"alloc({n}) refused although every layer and the logical space have room"
        got = [int(i) for i in ids.tolist()]
        assert len(got) == n and len(set(got)) == n
        assert all(1 <= i <= self.size for i in got)
        assert not set(got) & set(self.held), "alloc handed out an id that is still allocated"
        for l in range(self.L):
            assert bool((self.alloc.translate(l, ids) > 0).all()), f"layer {l}: a new id got slot 0 (or none)"
        for i in got:
            self.held[i] = set(range(self.L))
        if n:
            self.seed += 1
            self.kv.update(write_kv(self.pool, ids, self.seed))
        return ids

    def checked_prune(self, layers, picks, as_all=False):
        freed = self.alloc.prune("all" if as_all else list(layers), [ids_tensor(p) for p in picks])
        assert list(freed) == [len(p) for p in picks]
        self.o_prune(layers, picks)

    # --- invariants ---------------------------------------------------------------------------------------
    @invariant()
    def counts_match_the_oracle(self):
        assert self.alloc.available_size() == self.o_logical_free()
        want = [self.o_layer_free(l) for l in range(self.L)]
        assert [self.alloc.layer_available_size(l) for l in range(self.L)] == want
        assert list(self.alloc.layer_available_sizes()) == want
        assert list(self.alloc.held_counts(ids_tensor(sorted(self.held)))) == [c - w for c, w in zip(self.caps, want)]
        assert list(self.alloc.held_counts(ids_tensor([]))) == [0] * self.L

    @invariant()
    def mapping_matches_the_oracle(self):
        mapping = self.pool.mapping.cpu()
        every = torch.arange(1, self.size + 1)
        for l in range(self.L):
            row = mapping[l]
            # exactly the oracle's holders (so column 0 and the last, -1, column stay 0)
            assert set(torch.nonzero(row).flatten().tolist()) == self.o_holders(l)
            slots = row[row != 0].tolist()
            assert len(set(slots)) == len(slots), f"layer {l}: two logical ids share a slot"
            assert all(1 <= s <= self.caps[l] for s in slots), f"layer {l}: slot outside [1, {self.caps[l]}]"
            assert torch.equal(self.alloc.translate(l, every).cpu(), row[every].long())
            assert torch.equal(self.pool.translate(l, every).cpu(), row[every].long())

    @invariant()
    def held_bytes_unchanged(self):
        for (l, i), (k, v) in self.kv.items():
            s = int(self.pool.mapping[l, i])
            assert torch.equal(self.pool.k_buffer[l][s].cpu(), k) and torch.equal(self.pool.v_buffer[l][s].cpu(), v)

    def check_drained(self):
        assert not self.held
        assert self.alloc.available_size() == self.size
        assert list(self.alloc.layer_available_sizes()) == list(self.caps)
        assert int(self.pool.mapping.abs().sum()) == 0


class AllocatorMachine(OracleMachine):
    @initialize(shape=shapes())
    def setup(self, shape):
        self.start(shape, tree=False)

    def freeable(self):
        return sorted(set(self.held) - self.pending)

    # --- allocation -----------------------------------------------------------------------------
    @rule(n=st.integers(0, 13))
    def alloc_n(self, n):
        self.checked_alloc(n)

    @rule(over=st.booleans())
    def alloc_at_the_limit(self, over):
        self.checked_alloc(self.o_room() + 1 if over else self.o_room())

    # --- free ----------------------------------------------------------------------------------------
    @rule(data=st.data())
    def free(self, data):
        cand = self.freeable()
        ids = data.draw(st.lists(st.sampled_from(cand), unique=True, max_size=len(cand)) if cand else st.just([]))
        self.alloc.free(ids_tensor(ids))
        if self.in_group:
            self.pending.update(ids)
        else:
            self.o_release(ids)

    @precondition(lambda self: not self.in_group)
    @rule()
    def free_group_begin(self):
        self.alloc.free_group_begin()
        self.in_group = True

    @precondition(lambda self: self.in_group)
    @rule()
    def free_group_end(self):
        self.alloc.free_group_end()
        self.in_group = False
        self.o_release(sorted(self.pending))
        self.pending = set()

    @rule()
    def clear(self):
        self.alloc.clear()
        self.held, self.kv, self.pending, self.in_group = {}, {}, set(), False

    # --- prune -----------------------------------------------------------------------------------------
    @rule(data=st.data(), as_all=st.booleans())
    def prune(self, data, as_all):
        """A valid prune: distinct layers, at each a subset of the ids it holds."""
        if as_all:
            layers = list(range(self.L))
        else:
            layers = data.draw(st.permutations(range(self.L)))
            layers = layers[:data.draw(st.integers(1, self.L))]
        picks = []
        for l in layers:
            holders = sorted(self.o_holders(l))
            lo = 0 if as_all or not holders else 1  # "all" names every layer, some with nothing to prune
            picks.append(data.draw(st.lists(st.sampled_from(holders), unique=True, min_size=lo, max_size=len(holders))
                                   if holders else st.just([])))
        self.checked_prune(layers, picks, as_all=as_all)

    @rule(data=st.data(), kind=st.sampled_from(CONTENT_REFUSALS + ("layer_range", "layer_twice", "count_mismatch")))
    def refused_prune(self, data, kind):
        """A prune the allocator must refuse, possibly next to a valid entry at another layer: it
        raises ValueError and frees nothing (not even the valid entry)."""
        if kind in CONTENT_REFUSALS and not content_checks_on():
            return
        l = data.draw(st.integers(0, self.L - 1))
        holders = sorted(self.o_holders(l))
        ok = data.draw(st.lists(st.sampled_from(holders), unique=True, max_size=len(holders)) if holders
                       else st.just([]))
        if kind == "pruned":  # allocated, but layer l no longer holds it
            cand = sorted(i for i, ls in self.held.items() if l not in ls)
            if not cand:
                return
            bad = ok + [data.draw(st.sampled_from(cand))]
        elif kind == "free":  # not allocated at all
            cand = sorted(set(range(1, self.size + 1)) - set(self.held))
            if not cand:
                return
            bad = ok + [data.draw(st.sampled_from(cand))]
        elif kind == "duplicate":
            if not holders:
                return
            bad = ok + [data.draw(st.sampled_from(holders))] * 2
        elif kind == "id_range":
            bad = ok + [data.draw(st.sampled_from([0, -1, self.size + 1, self.size + 7]))]
        else:
            bad = ok
        layers, lists = [l], [bad]
        if kind == "layer_range":
            layers = [data.draw(st.sampled_from([-1, self.L, self.L + 3]))]
        elif kind == "layer_twice":
            layers, lists = [l, l], [ok, []]
        elif kind == "count_mismatch":
            lists = [ok, []]
        others = [m for m in range(self.L) if m != l]
        if others and kind not in ("layer_twice", "count_mismatch") and data.draw(st.booleans()):
            m = data.draw(st.sampled_from(others))  # a valid entry next to the bad one
            hm = sorted(self.o_holders(m))
            if hm:
                first = data.draw(st.booleans())
                entry = [data.draw(st.sampled_from(hm))]
                layers = [m] + layers if first else layers + [m]
                lists = [entry] + lists if first else lists + [entry]
        with pytest.raises(ValueError):
            self.alloc.prune(layers, [ids_tensor(x) for x in lists])
        # the oracle is unchanged; the invariants check that the allocator is too

    # --- reads ------------------------------------------------------------------------------------------
    @rule(data=st.data())
    def held_counts_of_any_ids(self, data):
        ids = data.draw(st.lists(st.integers(1, self.size), unique=True, max_size=self.size))
        want = [sum(1 for i in ids if i in self.held and l in self.held[i]) for l in range(self.L)]
        assert list(self.alloc.held_counts(ids_tensor(ids))) == want

    def teardown(self):
        if not hasattr(self, "alloc"):
            return
        if self.in_group:
            self.free_group_end()
        self.alloc.free(ids_tensor(sorted(self.held)))
        self.o_release(sorted(self.held))
        self.check_drained()


# ------------------------------------------------------------------------------------------ radix cache
def key(tokens):
    from sglang.srt.mem_cache.radix_cache import RadixKey

    return RadixKey(array("l", tokens))


TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=7)  # a small alphabet: prompts share prefixes


class RadixMachine(OracleMachine):
    @initialize(shape=shapes(min_size=8, max_size=20, max_layers=3, min_cap=7))
    def setup(self, shape):
        self.start(shape, tree=True)
        self.reqs = []  # running requests: dict(tokens, prefix ids, own ids, node)
        self.locks = []  # extra locks on matched nodes: (node, ids)
        self.starting = []  # the matched prefix of the request being admitted (locked)
        self.inserted = []  # prompts inserted so far (later prompts share prefixes with them)
        self.freed_count = 0
        self._spy_frees()

    def _spy_frees(self):
        """Every free the tree (or this test) issues goes through the oracle first; nested calls
        (``free_segment`` -> ``free``) count once, and a free inside an allocator free group counts
        when the group ends (``free_group_end`` frees the group's ids in one call)."""
        depth = [0]

        def wrap(name, ids_of):
            real = getattr(self.alloc, name)

            def spy(*args, **kwargs):
                if depth[0] == 0 and self.alloc.is_not_in_free_group:
                    self.on_free(ids_of(*args, **kwargs))
                depth[0] += 1
                try:
                    return real(*args, **kwargs)
                finally:
                    depth[0] -= 1

            setattr(self.alloc, name, spy)

        wrap("free", lambda ids: ids)
        wrap("free_segment", lambda ids, **_: ids)
        wrap("free_segments", lambda segs: torch.cat([s for s, _ in segs]) if segs else ids_tensor([]))

    def on_free(self, ids):
        ids = [int(i) for i in ids.reshape(-1).tolist()]
        assert len(set(ids)) == len(ids), "one free names an id twice"
        held = self.in_use()
        assert not set(ids) & held, f"freed ids {sorted(set(ids) & held)} that a request or a lock holds"
        self.o_release(ids)
        self.freed_count += len(ids)

    def in_use(self):
        """Ids a running request or a lock holds (its matched prefix and its own tokens)."""
        out = set(self.starting)
        for r in self.reqs:
            out.update(r["prefix"] + r["own"])
        for _, ids in self.locks:
            out.update(ids)
        return out

    def match(self, tokens):
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

        m = self.tree.match_prefix(MatchPrefixParams(key=key(tokens)))
        ids = [int(i) for i in m.device_indices.tolist()]
        assert all(i in self.held for i in ids), "a matched prefix names ids that are not allocated"
        return ids, m.last_device_node

    # --- requests ------------------------------------------------------------------------------
    @rule(tokens=TOKENS, data=st.data())
    def start_request(self, tokens, data):
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        if self.inserted and data.draw(st.booleans()):  # often: share a prefix with an inserted prompt
            base = data.draw(st.sampled_from(self.inserted))
            tokens = base[:data.draw(st.integers(1, len(base)))] + tokens[:data.draw(st.integers(0, 3))]
        prefix, node = self.match(tokens)
        self.tree.inc_lock_ref(node)
        self.starting = prefix
        need = len(tokens) - len(prefix)
        self.tree.evict_for_layers(need)
        assert min(self.o_layer_free(l) for l in range(self.L)) >= need or self.tree.evictable_size() == 0
        if self.o_logical_free() < need:
            self.tree.evict(EvictParams(num_tokens=need - self.o_logical_free()))
        self.starting = []
        ids = self.checked_alloc(need)
        if ids is None:
            self.tree.dec_lock_ref(node)
            return
        self.reqs.append(dict(tokens=tokens, prefix=prefix, own=[int(i) for i in ids.tolist()], node=node))

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def prune_own(self, data):
        """A request prunes some of its own tokens at some layers (never its matched prefix)."""
        r = data.draw(st.sampled_from(self.reqs))
        layers = data.draw(st.permutations(range(self.L)))[:data.draw(st.integers(1, self.L))]
        picks = []
        for l in layers:
            own = [i for i in r["own"] if l in self.held[i]]
            picks.append(data.draw(st.lists(st.sampled_from(own), unique=True, max_size=len(own)) if own
                                   else st.just([])))
        self.checked_prune(layers, picks)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def finish_and_insert(self, data):
        from sglang.srt.mem_cache.base_prefix_cache import InsertParams

        r = self.reqs.pop(data.draw(st.integers(0, len(self.reqs) - 1)))
        value = ids_tensor(r["prefix"] + r["own"])
        res = self.tree.insert(InsertParams(key=key(r["tokens"]), value=value))
        self.inserted.append(r["tokens"])
        self.alloc.free(value[len(r["prefix"]): res.prefix_len])  # our ids the tree already had: the caller frees
        self.tree.dec_lock_ref(r["node"])

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def retract_or_abort(self, data):
        r = self.reqs.pop(data.draw(st.integers(0, len(self.reqs) - 1)))
        self.alloc.free(ids_tensor(r["own"]))
        self.tree.dec_lock_ref(r["node"])

    # --- tree ------------------------------------------------------------------------------------
    @rule(tokens=TOKENS, lock=st.booleans())
    def match_and_lock(self, tokens, lock):
        ids, node = self.match(tokens)
        if lock and ids:
            self.tree.inc_lock_ref(node)
            self.locks.append((node, ids))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data):
        node, _ = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.tree.dec_lock_ref(node)

    @rule(n=st.integers(1, 12))
    def evict(self, n):
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        evictable, protected = self.tree.evictable_size(), self.tree.protected_size()
        before = self.freed_count
        self.tree.evict(EvictParams(num_tokens=n))
        assert self.freed_count - before >= min(n, evictable)  # what was asked for, while there was any
        assert self.tree.protected_size() == protected  # locks hold

    @rule(n=st.integers(1, 12))
    def evict_for_layers(self, n):
        self.tree.evict_for_layers(n)
        assert min(self.o_layer_free(l) for l in range(self.L)) >= n or self.tree.evictable_size() == 0

    # --- invariants --------------------------------------------------------------------------------
    def tree_nodes(self):
        """Every node of the tree but the root."""
        stack = list(self.tree.root_node.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    @invariant()
    def tree_and_requests_account_for_every_allocated_id(self):
        if not hasattr(self, "tree"):
            return
        in_tree = [int(i) for node in self.tree_nodes() if node.value is not None for i in node.value.tolist()]
        own = [i for r in self.reqs for i in r["own"]]
        assert len(set(in_tree + own)) == len(in_tree) + len(own)  # no id both in the tree and request-owned
        assert set(in_tree + own) == set(self.held)
        # SGLang's logical invariant: available + evictable + protected + request-owned == total
        assert self.o_logical_free() + self.tree.evictable_size() + self.tree.protected_size() + len(own) == self.size

    @invariant()
    def incremental_layer_evictable_counts_equal_the_oracle(self):
        """Per layer, the oracle's held ids inside unlocked tree nodes == ``layer_evictable()``
        (kept incrementally by the tree, never walked)."""
        if not hasattr(self, "tree"):
            return
        unlocked = [int(i) for node in self.tree_nodes() if node.lock_ref == 0 for i in node.value.tolist()]
        want = [sum(1 for i in unlocked if l in self.held[i]) for l in range(self.L)]
        assert self.tree.layer_evictable() == want

    def teardown(self):
        if not hasattr(self, "tree"):
            return
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        for r in self.reqs:
            self.tree.dec_lock_ref(r["node"])
        own = [i for r in self.reqs for i in r["own"]]
        self.reqs = []
        self.alloc.free(ids_tensor(own))
        for node, _ in self.locks:
            self.tree.dec_lock_ref(node)
        self.locks = []
        self.tree.evict(EvictParams(num_tokens=self.size))
        self.check_drained()  # everything back, at every layer


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
AllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, **_SETTINGS)
RadixMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, **_SETTINGS)
TestDepthKVAllocatorStateful = AllocatorMachine.TestCase
TestDepthKVRadixStateful = RadixMachine.TestCase
