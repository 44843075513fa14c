"""The triton backend's per-layer page tables (``backends/layer_indices.py``) over a real pruned
``DepthKVPool`` / ``DepthKVAllocator`` / SGLang ``ReqToTokenPool``, without an Engine:

- eager streams and the preallocated CUDA-graph buffers (padded rows, refill at another batch size,
  stable addresses) equal a plain-torch gather of each request's held slots (``pool.translate``);
- SGLang's own Triton decode / extend kernels reading through those streams equal a float64
  softmax over the held keys (decode: every held key, split-K with empty trailing splits; extend:
  held cached prefix + the new tokens, causal), i.e. the torch_native backend's read rule."""

import pytest
import torch

from dkv_support import build, write_kv
from sglang_depthkv.sglang.backends.layer_indices import LayerIndexStreams

QH, KVH, D = 4, 2, 16
CAPS = (60, 56, 58)
SCALE = 0.3


@pytest.fixture(scope="module")
def state():
    """Three requests in rows 1..3 (row 0 = SGLang's padding row): 36 tokens, 12 tokens sharing the
    first 6 ids of the first (a radix-shared prefix), 9 tokens; each layer pruned differently,
    never the last 6 positions of a request (they play the new / decoded tokens)."""
    pool, alloc, r2t, _ = build(capacities=CAPS, size=60, heads=KVH, dim=D, tree=False)
    ids1 = alloc.alloc(36)
    ids2 = torch.cat([ids1[:6], alloc.alloc(6)])
    ids3 = alloc.alloc(9)
    rows, seqs = [1, 2, 3], [ids1, ids2, ids3]
    for row, ids in zip(rows, seqs):
        r2t.req_to_token[row, :len(ids)] = ids.to(r2t.req_to_token.dtype)
    write_kv(pool, torch.cat([ids1, ids2[6:], ids3]), seed=3)
    g = torch.Generator().manual_seed(4)
    prunable = torch.cat([ids1[:30], ids3[:3]])  # ids2's first 6 are ids1's
    drops = []
    for l in range(len(CAPS)):
        p = (0.3, 0.6, 0.45)[l]
        drops.append(prunable[torch.rand(prunable.numel(), generator=g) < p].long())
    alloc.prune("all", drops)
    assert all(int((pool.mapping[l, d.long()] == 0).sum()) == d.numel() for l, d in enumerate(drops))
    return dict(pool=pool, r2t=r2t, rows=rows, lens=[len(s) for s in seqs], drops=drops)


def held_slots(pool, r2t, layer, row, n):
    slots = pool.translate(layer, r2t.req_to_token[row, :n])
    return slots[slots > 0]


def plain_streams(pool, r2t, rows, lens):
    """Per layer: (indptr list, concatenated held slots), by plain torch indexing."""
    out = []
    for l in range(pool.layer_num):
        parts = [held_slots(pool, r2t, l, r, n) for r, n in zip(rows, lens)]
        indptr = [0]
        for p in parts:
            indptr.append(indptr[-1] + p.numel())
        out.append((indptr, torch.cat(parts).long()))
    return out


def _streams(state):
    return LayerIndexStreams(state["pool"].mapping, state["r2t"].req_to_token)


@pytest.mark.parametrize("prefix", [False, True], ids=["decode-seq-lens", "extend-prefix-lens"])
def test_eager_streams_equal_plain_gather(state, prefix):
    pool, r2t, rows = state["pool"], state["r2t"], state["rows"]
    lens = [n - 6 if prefix else n for n in state["lens"]]
    s = _streams(state)
    indptr, indices, kept = s.build(torch.tensor(rows), torch.tensor(lens, dtype=torch.int32), sum(lens))
    assert indptr.dtype == torch.int32 and indices.dtype == torch.int64 and indices.shape == (len(CAPS), sum(lens))
    ref = plain_streams(pool, r2t, rows, lens)
    for l, (ref_ptr, ref_idx) in enumerate(ref):
        assert indptr[l].tolist() == ref_ptr
        assert torch.equal(indices[l, :ref_ptr[-1]], ref_idx)
        assert kept[l].tolist() == [b - a for a, b in zip(ref_ptr, ref_ptr[1:])]
    assert len({tuple(r[0]) for r in ref}) == len(CAPS)  # layers really differ


def test_graph_buffers_padded_rows_and_refill(state):
    pool, r2t, rows, lens = state["pool"], state["r2t"], state["rows"], state["lens"]
    s = _streams(state)
    s.alloc_graph(max_bs=6, capacity=6 * 64)
    ptrs = (s.graph_indptr.data_ptr(), s.graph_indices.data_ptr(), s.graph_kept.data_ptr())
    # a padded graph batch: 3 real rows + 2 padding rows (row 0, seq_len fill value 1)
    rpi = torch.tensor(rows + [0, 0, 0])
    seq = torch.tensor(lens + [1, 1, 1])
    indptr, indices, kept = s.fill_graph(rpi, seq, 5)
    ref = plain_streams(pool, r2t, rows, lens)
    for l, (ref_ptr, ref_idx) in enumerate(ref):
        assert indptr[l].tolist() == ref_ptr + [ref_ptr[-1] + 1, ref_ptr[-1] + 2]  # padded rows: length 1
        assert torch.equal(indices[l, :ref_ptr[-1]], ref_idx)
        pad = indices[l, ref_ptr[-1]:ref_ptr[-1] + 2]
        assert bool(((pad >= 0) & (pad <= CAPS[l])).all())  # in-bounds slot of this layer's buffer
        assert kept[l].tolist() == [b - a for a, b in zip(ref_ptr, ref_ptr[1:])] + [1, 1]
    # replay at another batch size: same buffers, refilled in place
    indptr2, indices2, _ = s.fill_graph(torch.tensor([rows[2], rows[0]]), torch.tensor([lens[2], lens[0]]), 2)
    assert (s.graph_indptr.data_ptr(), s.graph_indices.data_ptr(), s.graph_kept.data_ptr()) == ptrs
    assert indptr2.data_ptr() == ptrs[0] and indices2 is s.graph_indices
    ref2 = plain_streams(pool, r2t, [rows[2], rows[0]], [lens[2], lens[0]])
    for l, (ref_ptr, ref_idx) in enumerate(ref2):
        assert indptr2[l].tolist() == ref_ptr
        assert torch.equal(indices2[l, :ref_ptr[-1]], ref_idx)
    with pytest.raises(ValueError, match="graph max batch"):
        s.fill_graph(torch.zeros(7, dtype=torch.int64), torch.ones(7, dtype=torch.int64), 7)


def test_check_held_names_the_layer(state):
    s = _streams(state)
    s.check_held(state["r2t"].req_to_token[1, 30:36])  # never pruned
    d0, d1 = state["drops"][0].tolist(), state["drops"][1].tolist()
    dropped = torch.tensor([next(i for i in d1 if i not in d0)])  # held at layer 0, pruned at layer 1
    with pytest.raises(RuntimeError, match=f"layer 1: a new token of the batch \\(logical id {int(dropped)}\\)"):
        s.check_held(dropped)


def _float64_attention(q, keys, values):
    """q [QH, D]; keys / values [n, KVH, D] -> [QH, D]."""
    out = []
    for h in range(QH):
        kv = h // (QH // KVH)
        p = torch.softmax(keys[:, kv].double() @ q[h].double() * SCALE, dim=0)
        out.append(p @ values[:, kv].double())
    return torch.stack(out)


def test_sglang_decode_kernel_over_layer_streams(state):
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    pool, r2t, rows, lens = state["pool"], state["r2t"], state["rows"], state["lens"]
    s = _streams(state)
    indptr, indices, _ = s.build(torch.tensor(rows), torch.tensor(lens), sum(lens))
    g = torch.Generator().manual_seed(9)
    q = torch.randn(len(rows), QH, D, generator=g)
    splits = 4  # a 36-token row held at ~25 slots spans 1 of 4 splits of 32: empty trailing splits
    for l in range(pool.layer_num):
        k_buf, v_buf = pool.get_kv_buffer(l)
        o = torch.empty_like(q)
        logits = torch.empty(len(rows), QH, splits, D)
        lse = torch.empty(len(rows), QH, splits)
        decode_attention_fwd(q, k_buf, v_buf, o, indptr[l], indices[l], logits, lse,
                             torch.full((len(rows),), splits, dtype=torch.int32), splits, SCALE, 1.0, 1.0)
        for b, (row, n) in enumerate(zip(rows, lens)):
            slots = held_slots(pool, r2t, l, row, n)
            ref = _float64_attention(q[b], k_buf[slots], v_buf[slots])
            torch.testing.assert_close(o[b].double(), ref, atol=2e-5, rtol=2e-5)


def test_sglang_extend_kernel_over_prefix_streams(state):
    """Prefix = all but the last 6 positions (pruned per layer), new = the last 6 (held everywhere,
    passed as k/v): query at position p sees held prefix keys and new keys at positions <= p."""
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    pool, r2t, rows, lens = state["pool"], state["r2t"], state["rows"], state["lens"]
    new = 6
    pre = [n - new for n in lens]
    s = _streams(state)
    indptr, indices, _ = s.build(torch.tensor(rows), torch.tensor(pre, dtype=torch.int32), sum(pre))
    g = torch.Generator().manual_seed(10)
    q = torch.randn(len(rows) * new, QH, D, generator=g)
    qo_indptr = torch.arange(0, (len(rows) + 1) * new, new)
    for l in range(pool.layer_num):
        k_buf, v_buf = pool.get_kv_buffer(l)
        new_slots = torch.cat([pool.translate(l, r2t.req_to_token[r, p:p + new]) for r, p in zip(rows, pre)])
        o = torch.empty_like(q)
        extend_attention_fwd(q, k_buf[new_slots].contiguous(), v_buf[new_slots].contiguous(), o, k_buf, v_buf,
                             qo_indptr, indptr[l], indices[l], None, True, None, new, 1.0, 1.0, sm_scale=SCALE)
        for b, (row, p) in enumerate(zip(rows, pre)):
            prefix = held_slots(pool, r2t, l, row, p)
            for i in range(new):
                slots = torch.cat([prefix, new_slots[b * new:b * new + i + 1]])
                ref = _float64_attention(q[b * new + i], k_buf[slots], v_buf[slots])
                torch.testing.assert_close(o[b * new + i].double(), ref, atol=2e-5, rtol=2e-5)
