"""KVzip gates: targets against a float64 brute force over HF eager attentions, fitting recovers a
planted gate, held-out correlation on a tiny model, file round trip and errors."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models  # noqa: E402

from sglang_depthkv.core import gates as G  # noqa: E402
from sglang_depthkv.core.reference import ReferenceModel  # noqa: E402
from sglang_depthkv.core.types import LayerObservation, ModelIdentity  # noqa: E402

REPEAT = torch.tensor(list(G.DEFAULT_REPEAT_PROMPT.encode()))


def _text_bytes():
    from sglang_depthkv.core.haystack import paragraphs

    return " ".join(paragraphs("pride")[:120]).encode()


@pytest.fixture(scope="module")
def llama():
    return tiny_models.make_tiny_model("llama", seed=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_targets_match_float64_brute_force(arch):
    model = tiny_models.make_tiny_model(arch, seed=2)
    rm = ReferenceModel(model)
    ctx = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(0))
    rep = torch.tensor([7, 8, 9])
    targets, keys, hidden = G.reconstruction_targets(rm, ctx, rep)

    m64 = copy.deepcopy(model).double()
    m64.config._attn_implementation = "eager"
    ids = torch.cat([ctx, rep, ctx])
    with torch.no_grad():
        out = m64(input_ids=ids[None], output_attentions=True, use_cache=True)
    n, p = 24, 3
    qh, kvh = model.config.num_attention_heads, model.config.num_key_value_heads
    for l, att in enumerate(out.attentions):
        a = att[0]  # [qh, T, T]
        brute = torch.empty(kvh, n, dtype=torch.float64)
        for g in range(kvh):
            for t in range(n):
                best = 0.0
                for h in range(qh):
                    if h // (qh // kvh) != g:
                        continue
                    for q in range(n + p, 2 * n + p):
                        best = max(best, float(a[h, q, t]))
                brute[g, t] = best
        assert torch.allclose(targets[l].double(), brute, atol=1e-6, rtol=1e-4), l
        assert torch.allclose(keys[l].double(), out.past_key_values.layers[l].keys[0, :, :n], atol=1e-5)


def test_fit_recovers_planted_gate():
    ident = ModelIdentity(num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=16)
    spec = G.FeatureSpec(use_key=True, use_hidden=True, head_dim=8, hidden_size=16)
    gen = torch.Generator().manual_seed(0)
    w_true = torch.randn(2, 2, spec.dim, generator=gen) * 1.5  # logits stay inside the target clamp
    b_true = torch.randn(2, 2, generator=gen)
    feats, targs = [], []
    for l in range(2):
        keys = torch.randn(2, 400, 8, generator=gen)
        hid = torch.randn(400, 16, generator=gen)
        x = G.gate_features(spec, keys, hid)
        feats.append(x)
        targs.append(torch.sigmoid(torch.einsum("gnf,gf->gn", x.double(), w_true[l].double()) + b_true[l, :, None].double()))
    gates = G.fit_gates(ident, spec, feats, targs, ridge=1e-9)
    assert torch.allclose(gates.weight, w_true, atol=1e-3)
    assert torch.allclose(gates.bias, b_true, atol=1e-3)


def _obs(layer, keys, hidden):
    kvh, n, d = keys.shape
    return LayerObservation(layer, keys, keys, torch.zeros(2 * kvh, 1, d), d ** -0.5, None, hidden)


def test_trained_gate_correlates_on_held_out_text(llama):
    rm = ReferenceModel(llama)
    text = _text_bytes()
    ctxs = [torch.tensor(list(text[i * 128 : (i + 1) * 128])) for i in range(6)]
    gates = G.train_gates(rm, ctxs, REPEAT)
    held = torch.tensor(list(text[6000:6128]))
    targets, keys, hidden = G.reconstruction_targets(rm, held, REPEAT)
    for l in range(rm.num_layers):
        s = gates.scores(_obs(l, keys[l], hidden[l]))
        assert s.shape == targets[l].shape and s.dtype == torch.float32
        assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0
        rho = spearmanr(s.flatten().numpy(), targets[l].flatten().numpy()).statistic
        recency = spearmanr(torch.arange(128).repeat(2).numpy(), targets[l].flatten().numpy()).statistic
        assert rho > 0.3 and rho > abs(recency) + 0.1, (l, rho, recency)


def test_gate_file_round_trip_and_errors(tmp_path, llama):
    rm = ReferenceModel(llama)
    ctx = torch.tensor(list(_text_bytes()[:96]))
    gates = G.train_gates(rm, [ctx], REPEAT, use_hidden=False)
    path = G.save_gates(gates, tmp_path / "g.safetensors")
    back = G.load_gates(path, rm.identity)
    assert torch.equal(back.weight, gates.weight) and torch.equal(back.bias, gates.bias)
    assert back.spec == gates.spec and back.identity == gates.identity

    with pytest.raises(G.GateFileError, match="does not exist"):
        G.load_gates(tmp_path / "missing.safetensors", rm.identity)
    (tmp_path / "junk").write_bytes(b"not a safetensors file at all")
    with pytest.raises(G.GateFileError, match="safetensors"):
        G.load_gates(tmp_path / "junk", rm.identity)
    other = ModelIdentity(num_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=576)
    with pytest.raises(G.GateFileError, match="trained for"):
        G.load_gates(path, other)

    from safetensors.torch import save_file

    def write(header, name):
        p = tmp_path / name
        save_file({"weight": gates.weight, "bias": gates.bias}, str(p), metadata={G.META_KEY: json.dumps(header)})
        return p

    h = gates.header()
    with pytest.raises(G.GateFileError, match="format"):
        G.load_gates(write({**h, "format": "something-else"}, "f.safetensors"))
    with pytest.raises(G.GateFileError, match="version"):
        G.load_gates(write({**h, "version": 99}, "v.safetensors"))
    with pytest.raises(G.GateFileError, match="version 1 gates read the post-RoPE key direction; retrain"):
        G.load_gates(write({**h, "version": 1}, "v1.safetensors"))
    save_file({"weight": gates.weight}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(G.GateFileError, match="header"):
        G.load_gates(tmp_path / "nometa.safetensors")
    bad_feats = {**h, "features": {**h["features"], "use_hidden": True}}
    with pytest.raises(G.GateFileError, match="weight"):
        G.load_gates(write(bad_feats, "shape.safetensors"))


def test_hidden_gate_needs_hidden_states(llama):
    rm = ReferenceModel(llama)
    gates = G.train_gates(rm, [torch.tensor(list(_text_bytes()[:64]))], REPEAT)
    pf = rm.prefill(torch.arange(40), window=4, capture_hidden=False)
    with pytest.raises(ValueError, match="hidden"):
        gates.scores(pf.observations[0])


def test_bad_training_inputs():
    ident = ModelIdentity(num_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4, hidden_size=8)
    spec = G.FeatureSpec(True, False, 4, 8)
    x = torch.randn(1, 10, spec.dim)
    with pytest.raises(ValueError, match="ridge"):
        G.fit_gates(ident, spec, [x], [torch.rand(1, 10)], ridge=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        G.fit_gates(ident, spec, [x], [torch.rand(1, 10) + 1.5])
    with pytest.raises(ValueError, match="layers"):
        G.fit_gates(ident, spec, [x, x], [torch.rand(1, 10)] * 2)
    with pytest.raises(ValueError, match="at least one feature"):
        G.FeatureSpec(False, False, 4, 8).check()


def test_kvzip_scorer(llama):
    from sglang_depthkv.core.scorers.base import Scorer
    from sglang_depthkv.core.scorers.kvzip import KVzipGateScorer

    rm = ReferenceModel(llama)
    gates = G.train_gates(rm, [torch.tensor(list(_text_bytes()[:96]))], REPEAT)
    scorer = KVzipGateScorer(gates)
    assert isinstance(scorer, Scorer) and scorer.name == "kvzip" and scorer.query_agnostic is True
    pf = rm.prefill(torch.tensor(list(_text_bytes()[200:260])), window=8)
    for obs in pf.observations:
        s = scorer.score(obs)
        assert s.shape == (2, 60) and s.dtype == torch.float32
        assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0
        # independent: sigmoid of the linear gate on [r/|r|, h/|h|], r the key's RoPE-plane norms
        half = obs.keys.shape[-1] // 2
        r = (obs.keys[..., :half] ** 2 + obs.keys[..., half:] ** 2).sqrt()
        k = r / r.norm(dim=-1, keepdim=True)
        h = obs.hidden_states / obs.hidden_states.norm(dim=-1, keepdim=True)
        for g in range(2):
            x = torch.cat([k[g], h], dim=-1).double()
            ref = torch.sigmoid(x @ gates.weight[obs.layer, g].double() + gates.bias[obs.layer, g].double())
            assert torch.allclose(s[g].double(), ref, atol=1e-6)
        other = LayerObservation(obs.layer, obs.keys, obs.values, torch.randn_like(obs.window_queries),
                                 obs.scaling, obs.o_proj_weight, obs.hidden_states)
        assert torch.equal(scorer.score(other), s)  # query-agnostic
    with pytest.raises(ValueError, match="KVzipGates"):
        KVzipGateScorer("gates.safetensors")


def test_kvzip_policy_runs_on_reference_path(llama):
    from sglang_depthkv.core.policy import make_policy

    rm = ReferenceModel(llama)
    text = _text_bytes()
    gates = G.train_gates(rm, [torch.tensor(list(text[:96]))], REPEAT)
    policy = make_policy("kvzip", 0.5, gates=gates, sinks=2, window=8)
    pf = rm.prefill(torch.tensor(list(text[300:380])), window=8)
    keep = rm.select(pf, policy)
    assert sum(k.numel() for k in keep) == sum(policy.keep_counts(80, rm.num_layers, policy.layer_scores(pf.observations)))
    res = rm.run_policy(pf, policy, 4)
    assert res.tokens.shape == (4,) and torch.isfinite(res.logits).all()


@pytest.mark.parametrize("use_key,use_hidden", [(True, True), (True, False), (False, True)])
def test_gate_scores_over_chunks_equal_the_float64_feature_formula(monkeypatch, use_key, use_hidden):
    """``KVzipGates.scores`` applies the key and hidden parts chunk by chunk (no [kvh, n, F] features):
    equal to sigmoid(w · [r/|r|, h/|h|] + b) in float64 (r the key's RoPE-plane norms), with chunks
    of 7 tokens over 30."""
    import sglang_depthkv.core.scorers.window_attention as WA

    monkeypatch.setattr(WA, "CHUNK", 7)
    ident = ModelIdentity(num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=16)
    spec = G.FeatureSpec(use_key=use_key, use_hidden=use_hidden, head_dim=8, hidden_size=16)
    gen = torch.Generator().manual_seed(3)
    gates = G.KVzipGates(ident, spec, torch.randn(2, 2, spec.dim, generator=gen), torch.randn(2, 2, generator=gen))
    keys = torch.randn(2, 30, 8, generator=gen).to(torch.bfloat16)
    hid = torch.randn(30, 16, generator=gen).to(torch.bfloat16)
    parts = []
    if use_key:
        k = keys.double()
        r = (k[..., :4] ** 2 + k[..., 4:] ** 2).sqrt()
        parts.append(r / r.norm(dim=-1, keepdim=True))
    if use_hidden:
        h = hid.double()
        parts.append((h / h.norm(dim=-1, keepdim=True))[None].expand(2, 30, 16))
    x = torch.cat(parts, dim=-1)
    want = torch.sigmoid(torch.einsum("gnf,gf->gn", x, gates.weight[1].double()) + gates.bias[1, :, None].double())
    got = gates.scores(_obs(1, keys, hid if use_hidden else None))
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_gate_scores_do_not_depend_on_the_rope_position():
    """The same pre-RoPE key, rotated by transformers' own RoPE at positions 0..29 or 8000..8029,
    gets the same gate score (the key part reads each RoPE plane's norm); the key direction the
    version-1 gates read does change with the position."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ident = ModelIdentity(num_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=16)
    spec = G.FeatureSpec(use_key=True, use_hidden=False, head_dim=8, hidden_size=16)
    gen = torch.Generator().manual_seed(5)
    gates = G.KVzipGates(ident, spec, torch.randn(1, 2, spec.dim, generator=gen), torch.randn(1, 2, generator=gen))
    raw = torch.randn(1, 2, 30, 8, generator=gen, dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))

    def rotated(start):
        ang = torch.arange(start, start + 30, dtype=torch.float64)[:, None] * inv[None]
        emb = torch.cat([ang, ang], dim=-1)[None]
        _, k = apply_rotary_pos_emb(raw, raw, emb.cos(), emb.sin())
        return k[0]

    near, far = rotated(0), rotated(8000)
    assert not torch.allclose(near / near.norm(dim=-1, keepdim=True), far / far.norm(dim=-1, keepdim=True), atol=1e-2)
    s_near = gates.scores(_obs(0, near.float(), None))
    s_far = gates.scores(_obs(0, far.float(), None))
    torch.testing.assert_close(s_far, s_near, rtol=1e-5, atol=1e-6)


def test_key_features_need_an_even_head_dim():
    with pytest.raises(ValueError, match="even head_dim"):
        G.FeatureSpec(True, False, 7, 8).check()
    G.FeatureSpec(False, True, 7, 8).check()  # no key part: any head_dim
