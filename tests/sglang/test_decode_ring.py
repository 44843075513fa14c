"""``DecodeRing`` (the CUDA-graph record of decode steps for decode-time pruning), no Engine:

- decode steps of several requests written through ``bind`` + ``write`` with batches that change
  composition and order, padded rows, and different fed counts per row (so different ring
  positions, wrapping) read back (``read``) exactly as a plain Python list of the fed queries /
  attention inputs: the last ``w`` queries and the attention inputs of the unsettled tokens;
- padded rows write only the sink (distinct rows past every slot); a capture (no real rows) too;
- ``load`` (a record kept elsewhere) reads back the same; slot hand-out and bad input.
- ``DecodeState`` bookkeeping: a missed step restarts the state; the eager record keeps the last
  ``w`` queries."""

import pytest
import torch

from sglang_depthkv.sglang import decode_pruning as DP
from sglang_depthkv.sglang.decode_ring import DecodeRing

L, QH, D, HID = 3, 4, 8, 12
W, I = 3, 4
SLOTS, MAX_BS, ROWS = 4, 6, 10


def ring(hidden=True, dtype=torch.float32):
    return DecodeRing(num_layers=L, slots=SLOTS, max_bs=MAX_BS, window=W, interval=I, q_heads=QH, head_dim=D,
                      hidden_size=HID if hidden else None, table_rows=ROWS, dtype=dtype, device="cpu")


class Request:
    """The plain-list truth: every fed query / attention input per layer, and P."""

    def __init__(self, rpi, prompt_len):
        self.rpi, self.prompt_len = rpi, prompt_len
        self.q = [[] for _ in range(L)]
        self.h = [[] for _ in range(L)]
        self.settled = 0
        self.slot = None

    @property
    def fed(self):
        return len(self.q[0])


def expected(r):
    qs = [torch.stack(r.q[l][max(r.settled, r.fed - W):r.fed], 1) if r.fed > r.settled else None
          for l in range(L)]
    hs = [torch.stack(r.h[l][r.settled:r.fed], 0) if r.fed > r.settled else None for l in range(L)]
    return qs, hs


def step(rg, batch, bs, g):
    """One decode step of ``batch`` (Requests, in row order) padded to ``bs`` rows."""
    raw = len(batch)
    rpi = torch.tensor([r.rpi for r in batch] + [0] * (bs - raw), dtype=torch.int64)
    seq = torch.tensor([r.prompt_len + r.fed + 1 for r in batch] + [1] * (bs - raw), dtype=torch.int64)
    rg.bind(rpi, seq, raw, bs)
    assert rg.q_index[raw:bs].tolist() == [SLOTS * W + j for j in range(raw, bs)]
    assert rg.h_index[raw:bs].tolist() == [SLOTS * (I + W) + j for j in range(raw, bs)]
    for l in range(L):
        q = torch.randn(bs, QH * D, generator=g)
        h = torch.randn(bs, HID, generator=g)
        rg.write(l, q, h)
        for i, r in enumerate(batch):
            r.q[l].append(q[i].view(QH, D).clone())
            r.h[l].append(h[i].clone())


def check(rg, reqs):
    live = [r for r in reqs if r.fed > r.settled]
    got = rg.read([(r.slot, r.fed, r.settled) for r in live])
    for r, (qs, hs) in zip(live, got):
        eq, eh = expected(r)
        for l in range(L):
            assert torch.equal(qs[l], eq[l]), (r.rpi, l, r.fed, r.settled)
            assert torch.equal(hs[l], eh[l]), (r.rpi, l, r.fed, r.settled)


def test_write_read_with_padding_reordering_and_wrap():
    g = torch.Generator().manual_seed(0)
    rg = ring()
    a, b, c, d = Request(3, 10), Request(5, 7), Request(1, 20), Request(8, 4)
    # b starts 2 steps behind a, c later, d replaces a: different fed counts per row, every ring position
    schedule = ([([a], 2)] * 2 + [([a, b], 4)] * 3 + [([b, a, c], 3)] * 4 + [([c, b, a], 6)] * 5
                + [([c, d, b], 5)] * 6 + [([d, c], 2)] * 4)
    for batch, bs in schedule:
        if a not in batch and a.slot is not None:
            rg.release(a.slot)
            a.slot = None
        for r in batch:
            if r.slot is None:
                r.slot = rg.acquire(r, r.rpi, r.prompt_len)
        step(rg, batch, bs, g)
        for r in batch:  # an event settles I tokens when G - P reaches I + w (as decode_pruning does)
            if r.fed - r.settled == I + W:
                check(rg, [r])
                r.settled += I
        check(rg, [r for r in (a, b, c, d) if r.slot is not None])
    assert d.slot == 0  # a's slot, handed out again
    assert max(r.fed for r in (b, c, d)) > 2 * (I + W)  # the ring wrapped several times


def test_capture_binding_and_sink_leave_slots_alone():
    g = torch.Generator().manual_seed(1)
    rg = ring()
    a = Request(2, 5)
    a.slot = rg.acquire(a, a.rpi, a.prompt_len)
    step(rg, [a], 1, g)
    before_q, before_h = rg.q[:, :SLOTS * W].clone(), rg.h[:, :SLOTS * (I + W)].clone()
    rg.bind(torch.zeros(MAX_BS, dtype=torch.int64), torch.ones(MAX_BS, dtype=torch.int64), 0, MAX_BS)  # a capture
    for l in range(L):
        rg.write(l, torch.randn(MAX_BS, QH, D, generator=g), torch.randn(MAX_BS, HID, generator=g))
    assert torch.equal(rg.q[:, :SLOTS * W], before_q) and torch.equal(rg.h[:, :SLOTS * (I + W)], before_h)
    assert not torch.equal(rg.q[:, SLOTS * W:], torch.zeros_like(rg.q[:, SLOTS * W:]))  # the sink took them
    check(rg, [a])


def test_load_reads_back():
    g = torch.Generator().manual_seed(2)
    rg = ring()
    for fed, settled in ((2, 0), (I + W - 1, 0), (I + W + 2, I)):
        r = Request(4, 9)
        for l in range(L):
            r.q[l] = [torch.randn(QH, D, generator=g) for _ in range(fed)]
            r.h[l] = [torch.randn(HID, generator=g) for _ in range(fed)]
        r.settled = settled
        r.slot = rg.acquire(r, r.rpi, r.prompt_len)
        qs, hs = expected(r)
        rg.load(r.slot, fed, settled, qs, hs)
        check(rg, [r])
        step(rg, [r], 2, g)  # and the graph path continues the same record
        check(rg, [r])
        rg.release(r.slot)


def test_queries_only_and_bad_input():
    rg = ring(hidden=False)
    assert rg.h is None and rg.nbytes == L * (SLOTS * W + MAX_BS) * QH * D * 4
    slots = [rg.acquire(object(), i, 5) for i in range(SLOTS)]
    assert sorted(slots) == list(range(SLOTS))
    with pytest.raises(RuntimeError, match="all 4 slots are taken"):
        rg.acquire(object(), 0, 5)
    rg.release(slots[0])
    with pytest.raises(RuntimeError, match="not taken"):
        rg.release(slots[0])
    with pytest.raises(ValueError, match="raw_bs 3 <= bs 2"):
        rg.bind(torch.zeros(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64), 3, 2)
    with pytest.raises(ValueError, match="req_pool_idx 10 outside"):
        rg.assign(1, ROWS, 5)
    rg.bind(torch.tensor([1]), torch.tensor([6]), 1, 1)
    with pytest.raises(TypeError, match="query dtype torch.float16"):
        rg.write(0, torch.zeros(1, QH * D, dtype=torch.float16), None)
    with pytest.raises(ValueError, match="interval must be >= 1"):
        DecodeRing(num_layers=L, slots=1, max_bs=1, window=W, interval=0, q_heads=QH, head_dim=D, hidden_size=None,
                   table_rows=ROWS, dtype=torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="attention inputs None"):
        ring().write(0, torch.zeros(1, QH, D), None)


class _Req:
    origin_input_ids = list(range(7))


def test_decode_state_restart_and_last_window():
    st = DP.state_of(_Req(), L)
    assert not DP.begin_step(st, 8)  # first decode step: G = 1
    for g in range(1, 6):
        if g > 1:
            assert not DP.begin_step(st, 7 + g)
        for l in range(L):
            DP.record_feed(st, l, torch.full((QH, 1, D), float(g)), torch.full((1, HID), float(g)), 0.5, W)
        DP.end_step(st, 7 + g)
    assert st.fed == 5 and [int(x) for x in st.queries[0][0, :, 0]] == [3, 4, 5] and st.hidden[0].shape[0] == 5
    with pytest.raises(RuntimeError, match="recorded G=5, but this step feeds G=7"):
        DP.end_step(st, 14)
    assert DP.begin_step(st, 7 + 9)  # steps 6..8 were never recorded (retraction / mixed batch): restart
    assert (st.fed, st.settled) == (8, 8) and st.queries[0] is None and st.hidden[0] is None
    with pytest.raises(RuntimeError, match="decode step at sequence length 7"):
        DP.begin_step(st, 7)


def _graph_harness(device, capture):
    """Writes of every layer for a fixed 4-row batch as one callable (a captured CUDA graph when
    ``capture``; on CPU the same calls run directly), fed through static input buffers: each step
    copies the queries in, binds the rows (outside the graph) and replays."""
    dtype = torch.bfloat16
    rg = DecodeRing(num_layers=L, slots=SLOTS, max_bs=MAX_BS, window=W, interval=I, q_heads=QH, head_dim=D,
                    hidden_size=HID, table_rows=ROWS, dtype=dtype, device=device)
    bs = 4
    q_in = torch.zeros(L, bs, QH * D, dtype=dtype, device=device)
    h_in = torch.zeros(L, bs, HID, dtype=dtype, device=device)
    zeros = torch.zeros(bs, dtype=torch.int64, device=device)
    rg.bind(zeros, zeros + 1, 0, bs)  # the capture binds every row to the sink

    def body():
        for l in range(L):
            rg.write(l, q_in[l], h_in[l])

    run = body
    if capture:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            body()  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        run = graph.replay
    return rg, q_in, h_in, bs, run


def _replayed_steps(device, capture):
    g = torch.Generator().manual_seed(3)
    rg, q_in, h_in, bs, run = _graph_harness(device, capture)
    a, b, c = Request(2, 6), Request(7, 11), Request(4, 3)
    for r in (a, b, c):
        r.slot = rg.acquire(r, r.rpi, r.prompt_len)
    for step, batch in enumerate([[a]] * 2 + [[a, b]] * 4 + [[c, a, b]] * 9 + [[b, c]] * 3):
        raw = len(batch)
        rpi = torch.tensor([r.rpi for r in batch] + [0] * (bs - raw), dtype=torch.int64)
        seq = torch.tensor([r.prompt_len + r.fed + 1 for r in batch] + [1] * (bs - raw), dtype=torch.int64)
        q = torch.randn(L, bs, QH * D, generator=g).to(torch.bfloat16)
        h = torch.randn(L, bs, HID, generator=g).to(torch.bfloat16)
        q_in.copy_(q)
        h_in.copy_(h)
        rg.bind(rpi.to(device), seq.to(device), raw, bs)
        run()
        for l in range(L):
            for i, r in enumerate(batch):
                r.q[l].append(q[l, i].view(QH, D))
                r.h[l].append(h[l, i])
        for r in batch:
            if r.fed - r.settled == I + W:
                r.settled += I
        live = [r for r in (a, b, c) if r.fed > r.settled]
        for r, (qs, hs) in zip(live, rg.read([(r.slot, r.fed, r.settled) for r in live])):
            eq, eh = expected(r)
            for l in range(L):
                assert torch.equal(qs[l].cpu(), eq[l]) and torch.equal(hs[l].cpu(), eh[l]), (step, r.rpi, l)
    return max(r.fed for r in (a, b, c))


def test_graph_harness_on_cpu():
    assert _replayed_steps("cpu", capture=False) > 2 * (I + W)


@pytest.mark.gpu
def test_ring_write_captured_in_a_cuda_graph():
    """The per-layer writes captured once in a CUDA graph (capture fails on any host sync), then
    replayed for batches of 1-3 real rows + padding with rows rebound before each replay."""
    assert _replayed_steps("cuda", capture=True) > 2 * (I + W)
