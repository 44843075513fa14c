"""Full cache: every token scores 0 (the ``full`` policy keeps everything anyway)."""

from __future__ import annotations

import torch

from ..types import LayerObservation
from .base import Scorer


class FullScorer(Scorer):
    name = "full"
    query_agnostic = True

    def score(self, obs: LayerObservation) -> torch.Tensor:
        obs.check()
        return torch.zeros(obs.num_kv_heads, obs.num_tokens, dtype=torch.float32, device=obs.keys.device)
