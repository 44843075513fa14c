"""The scorer interface (kvpress-style: one class, one ``score`` method).

A scorer turns one layer's ``LayerObservation`` into per-kv-head keep scores ``[kv_heads, n]``
(float32, higher = keep). How scores become kept positions (sum over heads, sinks/window
protection, top-k with the shared tie rule) is ``core/selection.py``'s job, not the scorer's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..types import LayerObservation


class Scorer(ABC):
    name: str = ""
    query_agnostic: bool = False  # True: scores do not depend on the window queries
    # True: a kv head's score is a sum over its query heads (SnapKV). Under tensor parallelism with
    # replicated kv heads each rank holds distinct query heads of a shared kv head, so every rank's
    # partial sum counts; otherwise (one score per kv head) only the first rank of each replica group
    # contributes (``core/rank_sum.py``).
    sums_query_heads: bool = False
    # True: a kv head's score mixes its query heads non-linearly (LaProx's inter-head terms), so it
    # cannot be split over ranks that each hold part of them: replicated kv heads are refused.
    mixes_query_heads: bool = False
    # The name of the score's formula, for scorers whose formula changed between versions of this
    # package: DepthKV profiles record it (``calibration.score``) and a profile measured with another
    # formula is refused instead of being served with this one. Empty: never changed.
    definition: str = ""

    @abstractmethod
    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Per-kv-head keep scores ``[kv_heads, n]``, float32, higher = keep."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
