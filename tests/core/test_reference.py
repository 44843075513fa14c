"""HF reference path: full-cache equivalence with HF's own decode, pruned caches against an
independent float64 masked forward, original positions, observation capture, input validation."""
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models  # noqa: E402

from sglang_depthkv.core.reference import (  # noqa: E402
    PrunedCache,
    ReferenceModel,
    UnsupportedModelError,
    load_hf_model,
    right_aligned_causal_mask,
)

N = 48
STEPS = 16


def _ids(n, seed=0):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=tiny_models.ARCHITECTURES)
def tiny(request):
    return tiny_models.make_tiny_model(request.param, seed=3)


def hf_greedy_logits(model, ids, tokens):
    """HF's own full-cache decode (DynamicCache, eager attention), teacher-forced on ``tokens``."""
    m = copy.deepcopy(model)
    m.config._attn_implementation = "eager"
    with torch.no_grad():
        out = m(input_ids=ids[None], use_cache=True)
        pkv, logits = out.past_key_values, [out.logits[0, -1]]
        for t in tokens[:-1]:
            out = m(input_ids=t.view(1, 1), past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
            logits.append(out.logits[0, -1])
    return torch.stack(logits)


def masked_forward64(model, full_ids, n, keep, position_shift=0):
    """Independent reference: one float64 eager forward over the whole sequence, with a per-layer
    4-D mask (installed by a pre-hook on each layer's attention) that hides, from every query at
    position >= n, the prompt keys that layer ``l`` pruned. Returns logits [T, vocab] (float64)."""
    m = copy.deepcopy(model).double()
    m.config._attn_implementation = "eager"
    T = full_ids.shape[0]
    hooks = []
    for l, layer in enumerate(m.model.layers):
        allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
        pruned = torch.ones(n, dtype=torch.bool)
        pruned[keep[l]] = False
        allowed[n:, :n] &= ~pruned[None, :]
        mask = torch.zeros(T, T, dtype=torch.float64).masked_fill(~allowed, float("-inf"))[None, None]

        def pre(_mod, args, kwargs, mask=mask):
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = mask
            return args, kwargs

        hooks.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
    pos = (torch.arange(T) + position_shift * (torch.arange(T) >= n))[None]
    try:
        with torch.no_grad():
            out = m(input_ids=full_ids[None], position_ids=pos, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return out.logits[0]


def test_right_aligned_mask():
    m = right_aligned_causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    with pytest.raises(ValueError):
        right_aligned_causal_mask(3, 2)


def test_full_budget_matches_hf_decode(tiny):
    rm = ReferenceModel(tiny)
    ids = _ids(N)
    pf = rm.prefill(ids, window=8)
    res = rm.decode(pf, None, STEPS)
    assert res.tokens.shape == (STEPS,) and res.logits.shape == (STEPS, 512)
    ref = hf_greedy_logits(tiny, ids, res.tokens)
    assert (ref - res.logits).abs().max().item() <= 1e-5
    assert torch.equal(res.tokens, ref.argmax(-1))
    # keep-everything given explicitly is the same as keep=None
    res2 = rm.decode(pf, [torch.arange(N) for _ in range(rm.num_layers)], STEPS)
    assert torch.equal(res2.logits, res.logits)
    # the model's own attention implementation is restored
    assert tiny.config._attn_implementation != "depthkv_reference"


def _hand_keep(num_layers, n):
    g = torch.Generator().manual_seed(11)
    keep = []
    for l in range(num_layers):
        k = [4, 30, 12, 40][l % 4]  # layer 0 pruned hard: wrong positions would show
        idx = torch.randperm(n, generator=g)[:k].sort().values
        keep.append(idx)
    return keep


def test_pruned_decode_matches_masked_float64_forward(tiny):
    rm = ReferenceModel(tiny)
    ids = _ids(N, seed=1)
    pf = rm.prefill(ids, window=8)
    keep = _hand_keep(rm.num_layers, N)
    res = rm.decode(pf, keep, STEPS)
    assert res.cache_lengths == [int(k.numel()) + STEPS - 1 for k in keep]
    full = torch.cat([ids, res.tokens[:-1]])
    ref = masked_forward64(tiny, full, N, keep)[N - 1 :]
    assert (ref - res.logits.double()).abs().max().item() <= 1e-4
    full_res = rm.decode(pf, None, STEPS)
    assert (full_res.logits - res.logits).abs().max().item() > 1e-3  # pruning had an effect


def test_positions_continue_at_original_length(tiny):
    """If decode restarted positions at the pruned length, the masked reference at the true
    positions would disagree; check the reference is sensitive to that shift."""
    rm = ReferenceModel(tiny)
    ids = _ids(N, seed=2)
    pf = rm.prefill(ids, window=8)
    keep = _hand_keep(rm.num_layers, N)
    res = rm.decode(pf, keep, 6)
    full = torch.cat([ids, res.tokens[:-1]])
    right = masked_forward64(tiny, full, N, keep)[N:]
    shift = int(keep[0].numel()) - N  # positions as HF would infer from the pruned layer-0 length
    wrong = masked_forward64(tiny, full, N, keep, position_shift=shift)[N:]
    ours = res.logits[1:].double()
    assert (ours - right).abs().max().item() <= 1e-4
    assert (ours - wrong).abs().max().item() > 1e-2


def test_extension_over_pruned_cache(tiny):
    rm = ReferenceModel(tiny)
    ids = _ids(N, seed=4)
    ext = _ids(5, seed=5)
    pf = rm.prefill(ids, window=8)
    keep = _hand_keep(rm.num_layers, N)
    res = rm.decode(pf, keep, 4, extend_ids=ext)
    full = torch.cat([ids, ext, res.tokens[:-1]])
    ref = masked_forward64(tiny, full, N, keep)[N + ext.numel() - 1 :]
    assert (ref - res.logits.double()).abs().max().item() <= 1e-4
    cache = PrunedCache.from_prefill(pf, keep)
    all_logits = rm.extend(cache, ext)
    ref_ext = masked_forward64(tiny, torch.cat([ids, ext]), N, keep)[N:]
    assert (ref_ext - all_logits.double()).abs().max().item() <= 1e-4
    assert cache.next_position == N + ext.numel()
    assert torch.equal(cache.positions[0][-ext.numel():], torch.arange(N, N + ext.numel()))


def test_observations_match_hf_cache(tiny):
    rm = ReferenceModel(tiny)
    ids = _ids(N, seed=6)
    pf = rm.prefill(ids, window=8)
    m = copy.deepcopy(tiny)
    with torch.no_grad():
        out = m(input_ids=ids[None], use_cache=True, output_hidden_states=True)
    pkv = out.past_key_values
    cfg = tiny.config
    for l, obs in enumerate(pf.observations):
        assert obs.layer == l
        assert torch.allclose(obs.keys, pkv.layers[l].keys[0], atol=1e-5)
        assert torch.allclose(obs.values, pkv.layers[l].values[0], atol=1e-5)
        assert obs.window_queries.shape == (cfg.num_attention_heads, 8, cfg.head_dim)
        assert obs.scaling == pytest.approx(cfg.head_dim ** -0.5)
        assert obs.o_proj_weight is tiny.model.layers[l].self_attn.o_proj.weight or torch.equal(
            obs.o_proj_weight, tiny.model.layers[l].self_attn.o_proj.weight)
        # hidden states = input_layernorm(residual stream entering layer l)
        h = tiny.model.layers[l].input_layernorm(out.hidden_states[l][0])
        assert torch.allclose(obs.hidden_states, h, atol=1e-5)
    # window queries: recompute the last query of layer 0 by hand (Llama-family q path + RoPE)
    layer0 = tiny.model.layers[0].self_attn
    h0 = pf.observations[0].hidden_states[-1:]
    q = layer0.q_proj(h0).view(1, cfg.num_attention_heads, cfg.head_dim)
    if hasattr(layer0, "q_norm"):
        q = layer0.q_norm(q)
    cos, sin = tiny.model.rotary_emb(h0[None], torch.tensor([[N - 1]]))
    from transformers.models.llama.modeling_llama import rotate_half

    q = q.transpose(0, 1) * cos[0] + rotate_half(q.transpose(0, 1)) * sin[0]
    assert torch.allclose(pf.observations[0].window_queries[:, -1, :], q[:, 0, :], atol=1e-5)


def test_window_clipped_to_sequence(tiny):
    rm = ReferenceModel(tiny)
    pf = rm.prefill(_ids(5), window=32)
    assert pf.observations[0].window == 5


@pytest.mark.parametrize(
    "bad, msg",
    [
        (lambda L, n: [torch.arange(n)] * (L - 1), "layers"),
        (lambda L, n: [torch.arange(n)] * (L - 1) + [torch.tensor([0, n])], "outside"),
        (lambda L, n: [torch.arange(n)] * (L - 1) + [torch.tensor([-1, 2])], "outside"),
        (lambda L, n: [torch.arange(n)] * (L - 1) + [torch.tensor([3, 1])], "ascending"),
        (lambda L, n: [torch.arange(n)] * (L - 1) + [torch.tensor([1, 1])], "ascending"),
        (lambda L, n: [torch.arange(n)] * (L - 1) + [torch.arange(n).float()], "integer"),
        (lambda L, n: torch.arange(n), "list"),
    ],
)
def test_bad_keep_raises(bad, msg):
    model = tiny_models.make_tiny_model("llama", seed=0)
    rm = ReferenceModel(model)
    pf = rm.prefill(_ids(20), window=4)
    with pytest.raises(ValueError, match=msg):
        rm.decode(pf, bad(rm.num_layers, 20), 2)


def test_bad_inputs_raise():
    model = tiny_models.make_tiny_model("llama", seed=0)
    rm = ReferenceModel(model)
    with pytest.raises(ValueError, match="token ids"):
        rm.prefill(torch.tensor([1, 2, 9999]))
    with pytest.raises(ValueError, match="1-D"):
        rm.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="window"):
        rm.prefill(_ids(10), window=0)
    pf = rm.prefill(_ids(10), window=4)
    with pytest.raises(ValueError, match="steps"):
        rm.decode(pf, None, 0)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ReferenceModel(gpt2)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_hf_model(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="not a directory"):
        load_hf_model(tmp_path / "missing")
    half = tiny_models.make_tiny_model("llama", seed=0).to(torch.bfloat16)
    with pytest.raises(UnsupportedModelError, match="float32"):
        ReferenceModel(half)


def test_load_saved_tiny_model(tmp_path):
    for arch in tiny_models.ARCHITECTURES:
        d = tiny_models.save_tiny_model(tmp_path / arch, arch, seed=5)
        loaded = load_hf_model(d)
        orig = tiny_models.make_tiny_model(arch, seed=5)
        ids = _ids(12)
        with torch.no_grad():
            assert torch.equal(loaded(ids[None]).logits, orig(ids[None]).logits)


class FixedDropPolicy:
    """A deterministic test policy: drops segment tokens 1 + (layer % 2) and 3 of every segment
    (never the last `window`), and checks the observations it is given."""

    def __init__(self, window, interval):
        self.window, self.interval, self.seen = window, interval, []

    def select(self, observations):
        out = []
        for o in observations:
            assert o.num_tokens == self.interval + self.window and o.window == self.window
            assert o.hidden_states.shape[0] == o.num_tokens and o.o_proj_weight is not None
            drop = {1 + (o.layer % 2), 3}
            out.append(torch.tensor([i for i in range(o.num_tokens) if i not in drop]))
        self.seen.append(observations)
        return out


def masked_forward64_events(model, full_ids, n, keep, events):
    """Like masked_forward64, plus decode-time drops: a token dropped at event G_e is hidden from
    queries at positions >= n + G_e."""
    m = copy.deepcopy(model).double()
    m.config._attn_implementation = "eager"
    T = full_ids.shape[0]
    hooks = []
    for l, layer in enumerate(m.model.layers):
        allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
        pruned = torch.ones(n, dtype=torch.bool)
        pruned[keep[l]] = False
        allowed[n:, :n] &= ~pruned[None, :]
        for g_e, dropped in events:
            for j in dropped[l].tolist():
                allowed[n + g_e :, j] = False
        mask = torch.zeros(T, T, dtype=torch.float64).masked_fill(~allowed, float("-inf"))[None, None]

        def pre(_mod, args, kwargs, mask=mask):
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = mask
            return args, kwargs

        hooks.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            out = m(input_ids=full_ids[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return out.logits[0]


@pytest.mark.parametrize("with_extension", [False, True])
def test_decode_time_pruning_matches_masked_forward(with_extension):
    model = tiny_models.make_tiny_model("qwen2", seed=4)
    rm = ReferenceModel(model)
    ids = _ids(N, seed=8)
    ext = _ids(5, seed=9) if with_extension else None
    pf = rm.prefill(ids, window=8)
    keep = _hand_keep(rm.num_layers, N)
    policy = FixedDropPolicy(window=3, interval=4)
    res = rm.decode(pf, keep, 20, extend_ids=ext, policy=policy, decode_interval=4)
    fed = (5 if with_extension else 0) + 19
    # events whenever fed - settled >= 7, settled += 4
    expected_events = []
    g, p = 0, 0
    steps_fed = ([5] if with_extension else []) + [1] * 19
    for s in steps_fed:
        g += s
        while g - p >= 7:
            expected_events.append(g)
            p += 4
    assert [e[0] for e in res.events] == expected_events and len(expected_events) >= 4
    for e_idx, (_, dropped) in enumerate(res.events):
        for l in range(rm.num_layers):
            seg0 = N + 4 * e_idx
            assert dropped[l].tolist() == sorted({seg0 + 1 + (l % 2), seg0 + 3})
    for l in range(rm.num_layers):
        assert res.cache_lengths[l] == keep[l].numel() + fed - 2 * len(res.events)
    parts = [ids] + ([ext] if with_extension else []) + [res.tokens[:-1]]
    full = torch.cat(parts)
    first = N + (5 if with_extension else 0) - 1
    ref = masked_forward64_events(model, full, N, keep, res.events)[first:]
    assert (ref - res.logits.double()).abs().max().item() <= 1e-4
    plain = rm.decode(pf, keep, 20, extend_ids=ext)
    assert (plain.logits - res.logits).abs().max().item() > 1e-4  # the drops had an effect


def test_decode_pruning_bad_arguments():
    model = tiny_models.make_tiny_model("llama", seed=0)
    rm = ReferenceModel(model)
    pf = rm.prefill(_ids(20), window=4)
    with pytest.raises(ValueError, match="policy"):
        rm.decode(pf, None, 3, decode_interval=4)
    with pytest.raises(ValueError, match="decode_interval"):
        rm.decode(pf, None, 3, policy=FixedDropPolicy(3, 4), decode_interval=0)


def test_run_policy_with_named_policies():
    from sglang_depthkv.core.policy import make_policy

    model = tiny_models.make_tiny_model("llama", seed=6)
    rm = ReferenceModel(model)
    ids = _ids(64, seed=10)
    pf = rm.prefill(ids, window=8)
    full = rm.run_policy(pf, make_policy("full", 1.0, sinks=2, window=8), 8)
    ref = hf_greedy_logits(model, ids, full.tokens)
    assert (ref - full.logits).abs().max().item() <= 1e-5
    snap = make_policy("snapkv", 0.4, sinks=2, window=8)
    res = rm.run_policy(pf, snap, 8)
    counts = snap.keep_counts(64, rm.num_layers)
    assert res.cache_lengths == [c + 7 for c in counts]
    keep = rm.select(pf, snap)
    ref = masked_forward64(model, torch.cat([ids, res.tokens[:-1]]), 64, keep)[63:]
    assert (ref - res.logits.double()).abs().max().item() <= 1e-4
    # the same policy also prunes decoded tokens: segments of 6 + 8 tokens
    res_d = rm.run_policy(pf, snap, 30, decode_interval=6)
    assert len(res_d.events) >= 2
    full_ids = torch.cat([ids, res_d.tokens[:-1]])
    ref = masked_forward64_events(model, full_ids, 64, keep, res_d.events)[63:]
    assert (ref - res_d.logits.double()).abs().max().item() <= 1e-4
    for _, dropped in res_d.events:
        assert sum(d.numel() for d in dropped) > 0
