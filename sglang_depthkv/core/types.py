"""Data the core passes between scorers, allocators and the reference path.

Everything here is engine-agnostic: the HF reference path and the SGLang backends both build a
``LayerObservation`` per (request, layer) from what attention already computed.

Conventions (fixed; the SGLang path must follow the same ones):
- shapes are per request, no batch dimension;
- keys and queries are post-RoPE (and post q/k-norm for Qwen3);
- GQA: query head ``h`` belongs to kv head ``h // (num_q_heads // num_kv_heads)``;
- the observation window is the last ``w = window_queries.shape[1]`` positions of the request; those
  positions are also the always-kept recent window;
- every tensor of an observation is on one device (the keys'); scorers, allocators and the policy
  create their tensors there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LayerObservation:
    """What one attention layer has for one request at the end of its prefill."""

    layer: int
    keys: torch.Tensor  # [kv_heads, n, head_dim]
    values: torch.Tensor  # [kv_heads, n, head_dim]
    window_queries: torch.Tensor  # [q_heads, w, head_dim], queries of positions n-w .. n-1
    scaling: float  # softmax scale (usually head_dim ** -0.5)
    o_proj_weight: Optional[torch.Tensor] = None  # [hidden, q_heads * head_dim] (LaProx)
    hidden_states: Optional[torch.Tensor] = None  # [n, hidden], attention input after the input norm

    @property
    def num_tokens(self) -> int:
        return int(self.keys.shape[1])

    @property
    def num_kv_heads(self) -> int:
        return int(self.keys.shape[0])

    @property
    def num_q_heads(self) -> int:
        return int(self.window_queries.shape[0])

    @property
    def window(self) -> int:
        return int(self.window_queries.shape[1])

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        k, v, q = self.keys, self.values, self.window_queries
        if k.dim() != 3 or v.dim() != 3 or q.dim() != 3:
            raise ValueError(
                f"layer {self.layer}: keys/values/window_queries must be 3-D, got "
                f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(q.shape)}"
            )
        if k.shape[:2] != v.shape[:2]:
            raise ValueError(f"layer {self.layer}: keys {tuple(k.shape)} and values {tuple(v.shape)} disagree")
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"layer {self.layer}: query head_dim {q.shape[2]} != key head_dim {k.shape[2]}")
        if q.shape[0] % k.shape[0] != 0:
            raise ValueError(f"layer {self.layer}: {q.shape[0]} query heads not a multiple of {k.shape[0]} kv heads")
        if q.shape[1] > k.shape[1]:
            raise ValueError(f"layer {self.layer}: window {q.shape[1]} longer than the sequence {k.shape[1]}")
        if self.o_proj_weight is not None and self.o_proj_weight.shape[1] != q.shape[0] * v.shape[2]:
            raise ValueError(
                f"layer {self.layer}: o_proj weight {tuple(self.o_proj_weight.shape)} does not take "
                f"{q.shape[0]} heads x {v.shape[2]} dims"
            )
        if self.hidden_states is not None and self.hidden_states.shape[0] != k.shape[1]:
            raise ValueError(
                f"layer {self.layer}: hidden_states has {self.hidden_states.shape[0]} rows for {k.shape[1]} tokens"
            )
        self._check_devices()

    def _check_devices(self) -> None:
        """Every tensor on the keys' device: scorers create their tensors there and mix all fields."""
        for name in ("values", "window_queries", "o_proj_weight", "hidden_states"):
            t = getattr(self, name)
            if t is not None and t.device != self.keys.device:
                raise ValueError(f"layer {self.layer}: {name} on {t.device}, keys on {self.keys.device}")


@dataclass(frozen=True)
class ModelIdentity:
    """The model facts a profile or gate file is bound to (validated on load)."""

    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    architecture: str = ""
    name: str = ""

    def shape_fields(self) -> dict:
        """The fields that must match for a profile/gate file to be usable (not the name)."""
        return {
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
        }

    @classmethod
    def from_hf_config(cls, config, name: str = "") -> "ModelIdentity":
        """From a transformers config (Llama / Qwen2 / Qwen3 style field names)."""
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        return cls(
            num_layers=int(config.num_hidden_layers),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            hidden_size=int(config.hidden_size),
            architecture=str(archs[0]),
            name=name or str(getattr(config, "_name_or_path", "") or ""),
        )
