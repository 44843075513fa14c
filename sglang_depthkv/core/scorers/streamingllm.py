"""Alias module: ``core/calibrate.py`` imports ``sglang_depthkv.core.scorers.streamingllm``; the
scorer lives in ``streaming_llm.py``."""

from .streaming_llm import StreamingLLMScorer

__all__ = ["StreamingLLMScorer"]
