"""Our SnapKV / StreamingLLM scores vs kvpress 0.5.5 (``SnapKVPress`` / ``StreamingLLMPress``) on the
same keys and queries of a tiny seeded HF Llama attention module (GQA, 2 query heads per kv head).

Where the definitions differ (all documented in ``core/scorers/snapkv.py``):
- GQA: kvpress averages the per-query-head scores over the group, we sum (factor q_heads/kv_heads);
- kvpress scores only the first ``n - w`` tokens (the window's own tokens get ``max + 1``) and pools
  them with ``avg_pool1d(..., count_include_pad=True)``; we pool over all ``n`` tokens with
  ``count_include_pad=False``. So: interior positions agree exactly after the group normalisation,
  and our unpooled scores (``pool_kernel=1``) pooled kvpress's way agree everywhere on ``[0, n-w)``;
- kvpress's queries are rebuilt from the hidden states (q_proj + its own RoPE), ours are the
  post-RoPE queries taken from HF's ``apply_rotary_pos_emb``: an independent path to the same numbers.
- StreamingLLM: kvpress scores are 0/1 (sinks and the most recent tokens 1); ours are positions,
  so we compare the kept sets at the same keep count.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.accuracy.kvpress_peers import import_kvpress  # noqa: E402  (the one kvpress import shim)
from sglang_depthkv.core.policy import make_policy  # noqa: E402
from sglang_depthkv.core.scorers.snapkv import SnapKVScorer  # noqa: E402
from sglang_depthkv.core.selection import protect, select_top, token_scores  # noqa: E402
from sglang_depthkv.core.types import LayerObservation  # noqa: E402

N, W, KERNEL = 40, 8, 5


@pytest.fixture(scope="module")
def setup():
    import_kvpress()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, apply_rotary_pos_emb

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=64, num_hidden_layers=1, vocab_size=100)
    attn = LlamaAttention(cfg, layer_idx=0).eval()
    rope = LlamaRotaryEmbedding(cfg)
    hidden = torch.randn(1, N, 32)
    pos = torch.arange(N).unsqueeze(0)
    cos, sin = rope(hidden, pos)
    with torch.no_grad():
        q = attn.q_proj(hidden).view(1, N, 4, 8).transpose(1, 2)
        k = attn.k_proj(hidden).view(1, N, 2, 8).transpose(1, 2)
        v = attn.v_proj(hidden).view(1, N, 2, 8).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    obs = LayerObservation(0, k[0].clone(), v[0].clone(), q[0, :, N - W:].clone(), 8 ** -0.5,
                           attn.o_proj.weight.detach().clone(), hidden[0].clone())
    return dict(attn=attn, hidden=hidden, keys=k, values=v, cos_sin=(cos, sin), obs=obs)


def kvpress_snapkv(setup):
    from kvpress import SnapKVPress

    press = SnapKVPress(compression_ratio=0.5, window_size=W, kernel_size=KERNEL)
    with torch.no_grad():
        return press.score(setup["attn"], setup["hidden"], setup["keys"], setup["values"], None,
                           {"position_embeddings": setup["cos_sin"]})[0]  # [kvh, n]


def test_snapkv_interior_equal_after_group_normalisation(setup):
    theirs = kvpress_snapkv(setup)
    ours = SnapKVScorer(KERNEL).score(setup["obs"]) / 2  # sum over 2 query heads -> mean
    half = KERNEL // 2
    inner = slice(half, N - W - half)
    torch.testing.assert_close(ours[:, inner], theirs[:, inner], rtol=1e-5, atol=1e-7)
    # the window's own tokens: kvpress pads with max + 1 (we protect them in selection instead)
    assert torch.all(theirs[:, N - W:] == theirs[:, : N - W].max() + 1)
    # and the boundaries genuinely differ (count_include_pad, window truncation), as documented
    assert not torch.allclose(ours[:, :half], theirs[:, :half])


def test_snapkv_unpooled_pooled_kvpress_way_equal_everywhere(setup):
    theirs = kvpress_snapkv(setup)
    raw = SnapKVScorer(pool_kernel=1).score(setup["obs"]) / 2  # [kvh, n]
    pooled = F.avg_pool1d(raw[:, : N - W].unsqueeze(1), KERNEL, stride=1, padding=KERNEL // 2).squeeze(1)
    torch.testing.assert_close(pooled, theirs[:, : N - W], rtol=1e-5, atol=1e-7)


def test_snapkv_selection_equal_on_interior_ranking(setup):
    """Top tokens among interior positions are the same set under both definitions."""
    theirs = kvpress_snapkv(setup)
    ours = SnapKVScorer(KERNEL).score(setup["obs"])
    inner = torch.arange(KERNEL // 2, N - W - KERNEL // 2)
    a = select_top(token_scores(ours)[inner], 10)
    b = select_top(theirs.sum(0)[inner], 10)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("sinks, ratio", [(4, 0.5), (2, 0.25), (0, 0.75)])
def test_streamingllm_same_kept_set(setup, sinks, ratio):
    from kvpress import StreamingLLMPress

    press = StreamingLLMPress(compression_ratio=ratio, n_sink=sinks)
    with torch.no_grad():
        theirs = press.score(setup["attn"], setup["hidden"], setup["keys"], setup["values"], None, {})[0]
    n_kept = int(N * (1 - ratio))
    kv_keep = [sorted(theirs[g].topk(n_kept).indices.tolist()) for g in range(theirs.shape[0])]
    assert kv_keep[0] == kv_keep[1] == list(range(sinks)) + list(range(N - (n_kept - sinks), N))
    ours = make_policy("streamingllm", 0.5, sinks=sinks, window=1).scorer.score(setup["obs"])
    keep = select_top(protect(token_scores(ours), sinks, 1), n_kept)
    assert keep.tolist() == kv_keep[0]


def test_reference_path_runs_under_kvpress_attention_patch(tmp_path):
    """Importing kvpress wraps every attention function registered in transformers at that moment
    (``attention_patch``) and the wrapper calls ``func(module, q, k, v, mask, dropout, **kwargs)``,
    dropout positional. CI once failed because our reference attention took ``scaling`` in that
    position: with the wrapper applied to it, the reference path must give the unwrapped logits."""
    kvpress = import_kvpress()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from tiny_models import save_tiny_model

    from sglang_depthkv.core.reference import ATTN_IMPLEMENTATION, ReferenceModel, load_hf_model

    ref = ReferenceModel(load_hf_model(save_tiny_model(tmp_path / "m", "llama", seed=3)))
    ids = torch.arange(1, 30)
    plain = ref.prefill(ids, window=4)
    plain_dec = ref.decode(plain, [torch.arange(29)] * ref.num_layers, steps=3)
    original = ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION]
    ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] = kvpress.attention_patch.attention_patch(original)
    try:
        wrapped = ref.prefill(ids, window=4)
        wrapped_dec = ref.decode(wrapped, [torch.arange(29)] * ref.num_layers, steps=3)
    finally:
        ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] = original
    assert torch.equal(plain.logits, wrapped.logits)
    assert torch.equal(plain_dec.tokens, wrapped_dec.tokens)
    assert torch.equal(plain_dec.logits, wrapped_dec.logits)
