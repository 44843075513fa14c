"""Tiny random HF causal LMs (Llama / Qwen2 / Qwen3) built from a seed and saved as a loadable dir.

Each saved dir holds ``config.json`` + ``model.safetensors`` (float32, no tokenizer). Shapes are
small but realistic: GQA (4 query heads, 2 kv heads), head_dim 32, hidden 128, 4 layers,
vocab 512. Weights are drawn with a larger std than HF's default init so that attention is not
uniform (otherwise pruning tests would see no effect); the same seed always gives the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen2", "qwen3")

TINY_SHAPE = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def tiny_config(arch: str, **overrides):
    """The transformers config of a tiny model of architecture ``arch`` (llama / qwen2 / qwen3)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    fields = dict(TINY_SHAPE)
    fields.update(overrides)
    if arch == "llama":
        cfg = LlamaConfig(**fields)
        cfg.architectures = ["LlamaForCausalLM"]
    elif arch == "qwen2":
        cfg = Qwen2Config(use_sliding_window=False, **fields)
        cfg.architectures = ["Qwen2ForCausalLM"]
    elif arch == "qwen3":
        cfg = Qwen3Config(use_sliding_window=False, **fields)
        cfg.architectures = ["Qwen3ForCausalLM"]
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")
    return cfg


def make_tiny_model(arch: str = "llama", seed: int = 0, init_std: float = 0.08, **overrides):
    """A tiny random float32 causal LM in eval mode, deterministic in ``seed``."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(init_std * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_tiny_model(out_dir, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Build a tiny model and save it (config.json + model.safetensors) to ``out_dir``; returns the dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(arch, seed, **overrides)
    model.save_pretrained(out, safe_serialization=True)
    if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        raise RuntimeError(f"save_pretrained did not write config.json + model.safetensors into {out}")
    return out
