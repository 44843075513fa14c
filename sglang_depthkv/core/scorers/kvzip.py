"""KVzip gate scorer: query-agnostic keep scores from trained per-(layer, kv head) gates.

score[g, t] = sigmoid(w[l, g] · [r/||r||, h/||h||] + b[l, g]) in [0, 1], ``r`` the key's norm in
each RoPE plane (see ``core/gates.py`` for the features, the reconstruction target and the file
format). Independent of the window queries and of the position, so the scores of a reused prefix
never change.
"""

from __future__ import annotations

import torch

from ..gates import KVzipGates
from ..types import LayerObservation
from .base import Scorer


class KVzipGateScorer(Scorer):
    name = "kvzip"
    query_agnostic = True

    def __init__(self, gates: KVzipGates):
        if not isinstance(gates, KVzipGates):
            raise ValueError(f"KVzipGateScorer needs KVzipGates (core.gates.load_gates), got {type(gates).__name__}")
        self.gates = gates

    def score(self, obs: LayerObservation) -> torch.Tensor:
        obs.check()
        return self.gates.scores(obs)
