"""The real models this project runs offline, by short name (benchmarks pick one with ``--model``)."""

from __future__ import annotations

from .gguf_model import GGUFPackageModel
from .qwen25_coder import QWEN25_CODER_05B
from .smollm2 import SMOLLM2

OFFLINE_MODELS: dict[str, GGUFPackageModel] = {"smollm2": SMOLLM2, "qwen2.5-coder-0.5b": QWEN25_CODER_05B}


def offline_model(name: str) -> GGUFPackageModel:
    """The model called ``name``; ValueError naming the choices otherwise."""
    try:
        return OFFLINE_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(OFFLINE_MODELS)}") from None
