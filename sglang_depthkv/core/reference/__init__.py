"""HF reference path: pruned-cache prefill/decode on Llama / Qwen2 / Qwen3 in float32 on CPU."""

from .attention import ATTN_IMPLEMENTATION, AttentionState, register, right_aligned_causal_mask
from .cache import PrunedCache, validate_keep
from .generator import DecodeResult, FullPrefill, ReferenceModel
from .hf_model import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    check_supported,
    load_hf_model,
    load_tokenizer,
    model_identity,
    o_proj_weights,
)

__all__ = [
    "ATTN_IMPLEMENTATION", "AttentionState", "register", "right_aligned_causal_mask",
    "PrunedCache", "validate_keep", "DecodeResult", "FullPrefill", "ReferenceModel",
    "SUPPORTED_ARCHITECTURES", "UnsupportedModelError", "check_supported", "load_hf_model",
    "load_tokenizer", "model_identity", "o_proj_weights",
]
