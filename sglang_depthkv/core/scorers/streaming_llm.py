"""StreamingLLM (Xiao et al. 2023): keep attention sinks + the most recent tokens.

score[g, t] = t (position index, float32) for every kv head: the most recent tokens score highest;
the sinks ``[0, sinks)`` and the recent window are protected by ``core.selection.protect``, so at a
keep count ``k`` the policy keeps the sinks and the ``k - sinks`` most recent tokens.
"""

from __future__ import annotations

import torch

from ..types import LayerObservation
from .base import Scorer


class StreamingLLMScorer(Scorer):
    name = "streamingllm"
    query_agnostic = True

    def score(self, obs: LayerObservation) -> torch.Tensor:
        obs.check()
        n = obs.num_tokens
        pos = torch.arange(n, dtype=torch.float32, device=obs.keys.device)
        return pos.unsqueeze(0).expand(obs.num_kv_heads, n).contiguous()
