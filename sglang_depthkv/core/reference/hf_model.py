"""Load a Llama / Qwen2 / Qwen3 HF causal LM in float32 on CPU and read the facts the core needs.

Other architectures are refused with :class:`UnsupportedModelError` (a ``ValueError``): the
reference attention function relies on the Llama-family attention layout (``self_attn`` with
``q_proj/k_proj/v_proj/o_proj``, RoPE applied before the attention interface, one
``input_layernorm`` per decoder layer, no sliding window).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from ..types import ModelIdentity

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    """The model is not one of the supported architectures, or is configured in a way we cannot handle."""


def check_supported(model, float32_only: bool = True) -> None:
    """Raise UnsupportedModelError unless ``model`` is a supported HF causal LM in float32 (or, with
    ``float32_only=False``, all in one of float32 / bfloat16 / float16)."""
    cls = type(model).__name__
    cfg = getattr(model, "config", None)
    if cls not in SUPPORTED_ARCHITECTURES or cfg is None:
        raise UnsupportedModelError(
            f"model class {cls} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"model_type {getattr(cfg, 'model_type', None)!r} is not supported")
    if getattr(cfg, "use_sliding_window", False):
        raise UnsupportedModelError("sliding-window attention is enabled in the config; not supported")
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(f"only full-attention layers are supported, config has {sorted(set(layer_types))}")
    dtypes = {p.dtype for p in model.parameters()}
    allowed = {torch.float32} if float32_only else {torch.float32, torch.bfloat16, torch.float16}
    if len(dtypes) != 1 or not dtypes <= allowed:
        runs_in = "float32" if float32_only else "one of float32 / bfloat16 / float16"
        raise UnsupportedModelError(f"the reference path runs in {runs_in}, model parameters are "
                                    f"{sorted(map(str, dtypes))}")


def decoder_layers(model):
    """The list of decoder layers of a supported model."""
    return list(model.model.layers)


def o_proj_weights(model) -> list[torch.Tensor]:
    """Per layer, the o_proj weight ``[hidden, q_heads * head_dim]`` (detached, float32)."""
    return [layer.self_attn.o_proj.weight.detach() for layer in decoder_layers(model)]


def model_identity(model, name: str = "", float32_only: bool = True) -> ModelIdentity:
    check_supported(model, float32_only)
    return ModelIdentity.from_hf_config(model.config, name=name)


def load_hf_model(path, gguf_file: Optional[str] = None, device="cpu", dtype: torch.dtype = torch.float32):
    """Load a supported causal LM from an HF directory (optionally from a GGUF file inside it), in
    eval mode, as ``dtype`` on ``device`` (float32 on the CPU by default: the reference path's
    exactness tests use that). Raises ValueError for a missing dir/file or another architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"--model {p}: not a directory")
    kwargs = {}
    if gguf_file is not None:
        if not (p / gguf_file).is_file():
            raise ValueError(f"--gguf-file {gguf_file}: no such file in {p}")
        kwargs["gguf_file"] = gguf_file
    elif not (p / "config.json").is_file():
        raise ValueError(f"--model {p}: no config.json (pass --gguf-file for a GGUF model)")
    config = AutoConfig.from_pretrained(p, **kwargs)
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model at {p} has model_type {getattr(config, 'model_type', None)!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, **kwargs)
    model = model.to(device=device, dtype=dtype).eval()
    check_supported(model, float32_only=dtype == torch.float32)
    return model


def load_tokenizer(path, gguf_file: Optional[str] = None):
    """The model's tokenizer; ValueError naming the directory if it has none."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        return AutoTokenizer.from_pretrained(Path(path), **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"no usable tokenizer in {path} ({type(exc).__name__}: {exc}); "
            "use --tokenizer bytes for tokenizer-less models"
        ) from exc


@contextlib.contextmanager
def attention_implementation(model, impl: str):
    """Run ``model`` with the registered attention implementation ``impl`` (every sub-config's
    ``_attn_implementation``), restoring the previous ones afterwards."""
    cfgs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    saved = {k: c._attn_implementation for k, c in cfgs.items()}
    try:
        for c in cfgs.values():
            c._attn_implementation = impl
        yield
    finally:
        for k, c in cfgs.items():
            c._attn_implementation = saved[k]
