"""``backends/graph_decode.py`` (decode-time pruning under CUDA-graph decode) vs the eager record, no
Engine: the decode-time pruning steps of the two backend mixins over a real ``DepthKVPool`` /
``DepthKVAllocator`` / SGLang ``ReqToTokenPool`` / ``Req`` / ``RadixAttention`` layers and a real
SnapKV policy, fed the same queries and K/V twice:

- *eager* (the path the HF-reference e2e tests check): every step records into Python lists and
  runs its due event at once;
- *graph*: graph steps bound and written through the ``DecodeRing`` (padded rows, the batch's rows
  reordered), events run before the next step; eager steps in between (a batch larger than the
  graph's: the ring records are spilled to the lists); a request leaving unfinished (retracted: its
  slot is taken back for a newcomer, its record spilled) and coming back with a gap (restart); a
  finished request's slot taken back.

Before every step both hold exactly the same positions at every layer for every request, and the
pruning events (fed count, dropped positions per layer) are the same; the graph run's events come
from the ring and from the lists."""

import json
from array import array
from contextlib import contextmanager

import torch

from dkv_support import build
from sglang_depthkv.sglang.backends.graph_decode import GraphDecodePruningMixin
from sglang_depthkv.sglang.backends.scoring import DepthKVScoringMixin
from sglang_depthkv.sglang.decode_ring import DecodeRing
from sglang_depthkv.sglang.pruning import DUMP_ENV

L, KVH, QH, D = 3, 2, 4, 8
W, I, SINKS = 3, 5, 1
BUDGET = 0.6  # segments of 8: keep about 5 = the sink, the 3-token window and one chosen by score
MAX_BS = 3
SCALING = 0.35
PROMPTS = {"a": 7, "b": 9, "c": 5, "d": 6}


class Namespace:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class Host(GraphDecodePruningMixin, DepthKVScoringMixin):
    """The mixins' decode-time pruning state over real pools; the ``ForwardBatch.init_new`` hook's
    handover attribute (``depthkv_pending_decode_reqs``) is set on the host itself."""

    def __init__(self, graph: bool):
        from sglang_depthkv.core.policy import make_policy

        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

        self.token_to_kv_pool, self.allocator, _, _ = build(capacities=(160, 150, 140), size=160, heads=KVH, dim=D,
                                                            tree=False)
        self.req_to_token_pool = ReqToTokenPool(size=6, max_context_len=64, device="cpu", enable_memory_saver=False)
        self.model_runner = self
        self.depthkv_pending_decode_reqs = None
        self.policy = make_policy("snapkv", BUDGET, sinks=SINKS, window=W)
        self.decode_interval = I
        self._needs_hidden, self._hidden, self._hooks = False, {}, []
        self._scoring = self._decode_reqs = None
        g = torch.Generator().manual_seed(5)
        self._o = [torch.randn(QH * D, QH * D, generator=g) for _ in range(L)]
        self.layers = [self._radix_attention(l) for l in range(L)]
        self.reqs = {}
        if graph:
            self._layer_scalings = [None] * L
            self._ring_reqs = [None] * MAX_BS
            self.decode_ring = DecodeRing(num_layers=L, slots=MAX_BS, max_bs=MAX_BS, window=W, interval=I,
                                          q_heads=QH, head_dim=D, hidden_size=None,
                                          table_rows=int(self.req_to_token_pool.req_to_token.shape[0]),
                                          dtype=torch.float32, device="cpu")

    @staticmethod
    def _radix_attention(layer_id):
        from sglang.srt.layers.radix_attention import RadixAttention

        return RadixAttention(QH, D, SCALING, KVH, layer_id)

    def _o_proj_weight(self, layer_id):
        return self._o[layer_id]

    # --- requests and tokens ---------------------------------------------------------------------------
    def admit(self, key):
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        req = Req(key, "", array("q", range(1, PROMPTS[key] + 1)), SamplingParams(max_new_tokens=64))
        self.req_to_token_pool.alloc([req])
        req.seq = 0
        self.reqs[key] = req
        self.append(key, PROMPTS[key])
        return req

    def append(self, key, n):
        """``n`` new tokens of ``key`` at every layer, K/V a function of (request, position) only."""
        req = self.reqs[key]
        ids = self.allocator.alloc(n)
        self.req_to_token_pool.req_to_token[req.req_pool_idx, req.seq:req.seq + n] = ids.to(torch.int32)
        for j, i in enumerate(ids.tolist()):
            g = torch.Generator().manual_seed(ord(key) * 1000 + req.seq + j)
            for l in range(L):
                k, v = torch.randn(1, KVH, D, generator=g), torch.randn(1, KVH, D, generator=g)
                self.token_to_kv_pool.set_kv_buffer(None, torch.tensor([i]), k, v, layer_id_override=l)
        req.seq += n

    def readmit(self, key, n):
        """A retraction and re-prefill: another req row (SGLang frees the row), ``n`` more tokens."""
        req = self.reqs[key]
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx].clone()
        self.req_to_token_pool.free(req)
        self.req_to_token_pool.alloc([req])
        self.req_to_token_pool.req_to_token[req.req_pool_idx] = row
        self.append(key, n)

    def held(self):
        """{request: per layer the held positions}."""
        out = {}
        for key, req in self.reqs.items():
            row = self.req_to_token_pool.req_to_token[req.req_pool_idx, :req.seq].long()
            out[key] = [torch.nonzero(self.token_to_kv_pool.mapping[l, row]).reshape(-1).tolist() for l in range(L)]
        return out


def queries(keys, reqs, bs, step):
    """[bs, QH * D]: a request's query is a function of (request, fed count, layer) only; padded rows
    are noise."""
    out = []
    for l in range(L):
        rows = []
        for key in keys:
            g = torch.Generator().manual_seed(ord(key) * 100000 + reqs[key].seq * 10 + l)
            rows.append(torch.randn(QH * D, generator=g))
        g = torch.Generator().manual_seed(step * 100 + l)
        rows += [torch.randn(QH * D, generator=g) for _ in range(bs - len(keys))]
        out.append(torch.stack(rows))
    return out


@contextmanager
def dump_to(monkeypatch, path):
    with monkeypatch.context() as m:
        m.setenv(DUMP_ENV, str(path))
        yield


def eager_step(host, keys):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    for k in keys:
        host.append(k, 1)
    reqs = [host.reqs[k] for k in keys]
    seqs = torch.tensor([r.seq for r in reqs])
    fb = Namespace(forward_mode=ForwardMode.DECODE, batch_size=len(reqs), seq_lens_cpu=seqs, seq_lens=seqs,
                   req_pool_indices=torch.tensor([r.req_pool_idx for r in reqs]))
    host.depthkv_pending_decode_reqs = reqs
    host._ring_live = False
    host._begin_forward(fb)
    return fb, lambda qs: [(host._feed_decode(layer, q.view(-1, QH, D)), host._end_decode_layer(layer, fb))
                           for layer, q in zip(host.layers, qs)]


def graph_step(host, keys, bs):
    """SGLang's replay view of a padded batch (a ``SimpleNamespace`` in ``build_replay_fb_view``)."""
    for k in keys:
        host.append(k, 1)
    reqs = [host.reqs[k] for k in keys]
    pad = bs - len(reqs)
    seqs = torch.tensor([r.seq for r in reqs] + [1] * pad)
    fb = Namespace(batch_size=bs, num_padding=pad, seq_lens_cpu=seqs, seq_lens=seqs,
                   req_pool_indices=torch.tensor([r.req_pool_idx for r in reqs] + [0] * pad))
    host.depthkv_pending_decode_reqs = reqs
    host._prepare_graph_decode(fb, bs, in_capture=False)

    def run(qs):
        for layer, q in zip(host.layers, qs):
            host._record_layer_scaling(layer)
            host._graph_decode_write(layer, q)
    return fb, run


# (kind, batch in row order, graph batch size). Events at G = 8 + 5k (by hand below). Eager phases end
# 1-2 steps before an event, so the window read right after a switch back to graph steps holds queries
# recorded eagerly and loaded into the ring; a pauses (absent, unfinished) while d takes its slot (its
# record is spilled) and comes back without a gap (loaded again, read by its event at 18); d finishes
# (slot taken back, nothing spilled); a is retracted (new req row while holding a slot, 2 tokens
# re-prefilled: a gap, so it restarts at G = 22; its event at 29 reads what it wrote into the ring from
# its new row).
SCHEDULE = ([("graph", "ab", 3)] * 5 + [("eager", "bac", 3)] * 7 + [("graph", "abc", 3)] * 4
            + [("graph", "cdb", 3)] * 3 + [("finish", "d", 0)] + [("graph", "bac", 3)] * 3
            + [("readmit", "a", 2)] + [("graph", "bac", 3)] * 9 + [("eager", "abc", 3)] * 3)


def test_graph_ring_path_equals_eager_lists(tmp_path, monkeypatch):
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH

    eager, graph = Host(graph=False), Host(graph=True)
    for h in (eager, graph):
        for k in "abcd":
            h.admit(k)
    compared = 0
    for step, (kind, keys, bs) in enumerate(SCHEDULE):
        if kind == "readmit":
            for h in (eager, graph):
                h.readmit(keys, bs)
            continue
        if kind == "finish":
            for h in (eager, graph):
                h.reqs[keys].finished_reason = FINISH_LENGTH(length=0)
            continue
        with dump_to(monkeypatch, tmp_path / "eager.jsonl"):
            _, run_e = eager_step(eager, keys)
        with dump_to(monkeypatch, tmp_path / "graph.jsonl"):
            if kind == "graph":
                _, run_g = graph_step(graph, keys, bs)
            else:
                _, run_g = eager_step(graph, keys)
        # both are about to read: the graph path ran the events due after the previous step first
        assert graph.held() == eager.held(), step
        qs = queries(keys, eager.reqs, bs if kind == "graph" else len(keys), step)
        with dump_to(monkeypatch, tmp_path / "eager.jsonl"):
            run_e([q[:len(keys)] for q in qs])
        with dump_to(monkeypatch, tmp_path / "graph.jsonl"):
            run_g(qs)
        compared += 1
    assert compared == len(SCHEDULE) - 2
    assert graph.reqs["a"].req_pool_idx == 5  # readmitted into another req row (a..d had rows 1..4)
    ev, source = {}, {}
    for name in ("eager", "graph"):
        rows = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        ev[name] = sorted((r["rid"], r["fed"], r["layer"], tuple(r["dropped"])) for r in rows)
        source[name] = {(r["rid"], r["fed"]): r["source"] for r in rows}
    assert ev["eager"] == ev["graph"]
    # an event due after a graph step runs before the request's next step: from the ring if that is a
    # graph step, from the spilled lists if it is an eager one; events of eager steps run at once
    assert source["graph"] == {("a", 8): "lists", ("a", 13): "ring", ("a", 18): "ring", ("a", 29): "ring",
                               ("b", 8): "lists", ("b", 13): "ring", ("b", 18): "ring", ("b", 23): "ring",
                               ("b", 28): "ring", ("b", 33): "lists",
                               ("c", 8): "ring", ("c", 13): "ring", ("c", 18): "ring", ("c", 23): "ring",
                               ("c", 28): "lists"}
    assert set(source["eager"].values()) == {"lists"}
    assert all(2 <= len(d) <= 4 for *_, d in ev["eager"])  # 8-token segments keep about 5
