"""Pruning policies: a scorer + a layer-budget allocator + budget, sinks and window.

``PrunePolicy.select(observations)`` is the single decision both the HF reference path and the
SGLang path take for one request at the end of its prefill:

1. if ``n <= sinks + window`` (or the budget is 1): keep everything;
2. per layer ``scores_l = protect(token_scores(scorer.score(obs_l)), sinks, window)``; under tensor
   parallelism the ``[L, n]`` token scores are first summed over the ranks (``score_sum``, a
   ``core.rank_sum.RankScoreSum``), so every rank selects from the same totals;
3. ``k = allocator.allocate(n, L, budget, sinks, window, layer_scores)`` (scores only passed to
   score-dependent allocators), ``Σ k == total_keep`` exactly;
4. ``keep_l = select_top(scores_l, k_l)`` (ascending positions, the shared tie rule).

Named policies (``make_policy``): ``full`` (budget forced to 1), ``streamingllm`` (uniform +
recency), ``snapkv`` (uniform + SnapKV), ``pyramid`` (PyramidKV + SnapKV), ``depthkv`` (DepthKV
profile + the scorer it was calibrated with, SnapKV by default), ``laprox`` (global top-k +
LaProx with ``head_mean_power`` 0.5, see ``core/scorers/laprox.py``), ``kvzip`` (global top-k + KVzip gates).
``profile`` / ``gates`` are only used by ``depthkv`` / ``kvzip`` and ignored by the others (so one
call site can build every policy with the same arguments).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .budgets import (DepthKVAllocator, GlobalTopKAllocator, LayerBudgetAllocator, PyramidAllocator,
                      UniformAllocator, check_budget)
from . import selection
from .profile import SensitivityProfile
from .rank_sum import RankScoreSum
from .scorers.base import Scorer
from .scorers.full import FullScorer
from .scorers.laprox import LaProxScorer
from .scorers.snapkv import SnapKVScorer
from .scorers.streaming_llm import StreamingLLMScorer
from .selection import protect, select_top, token_scores
from .types import LayerObservation

POLICY_NAMES = ("full", "streamingllm", "snapkv", "pyramid", "depthkv", "laprox", "kvzip")
# LaProx under the global top-k: scores over the square root of their kv head's mean (the measurement
# that chose it is in core/scorers/laprox.py)
LAPROX_GLOBAL_HEAD_MEAN_POWER = 0.5


def _non_negative_int(name: str, v) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    try:
        v = operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be a non-negative integer, got {v!r}") from None
    if v < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {v}")
    return v


@dataclass
class PrunePolicy:
    name: str
    scorer: Scorer
    allocator: LayerBudgetAllocator
    budget: float
    sinks: int = 4
    window: int = 32
    # tensor parallelism: partial token scores -> their sum over the ranks (None: a single rank)
    score_sum: Optional[RankScoreSum] = None

    def __post_init__(self):
        if not isinstance(self.scorer, Scorer):
            raise ValueError(f"policy {self.name!r}: scorer must be a Scorer, got {type(self.scorer).__name__}")
        if not isinstance(self.allocator, LayerBudgetAllocator):
            raise ValueError(f"policy {self.name!r}: allocator must be a LayerBudgetAllocator, "
                             f"got {type(self.allocator).__name__}")
        self.budget = check_budget(self.budget)
        self.sinks = _non_negative_int("sinks", self.sinks)
        self.window = _non_negative_int("window", self.window)

    def prunes(self, n: int) -> bool:
        """Whether an ``n``-token sequence is pruned at all."""
        return self.budget < 1.0 and n > self.sinks + self.window

    def keep_counts(self, n: int, num_layers: int, layer_scores: Optional[torch.Tensor] = None) -> list[int]:
        """Per-layer keep counts for an ``n``-token sequence (all ``n`` when it is not pruned)."""
        n = _non_negative_int("n", n)
        L = _non_negative_int("num_layers", num_layers)
        if L < 1:
            raise ValueError(f"num_layers must be >= 1, got {L}")
        if not self.prunes(n):
            return [n] * L
        if self.allocator.score_dependent:
            if layer_scores is None:
                raise ValueError(f"policy {self.name!r}: allocator {self.allocator.name} needs layer_scores [L, n]")
            return self.allocator.allocate(n, L, self.budget, self.sinks, self.window, layer_scores)
        return self.allocator.allocate(n, L, self.budget, self.sinks, self.window)

    def layer_scores(self, observations: Sequence[LayerObservation]) -> torch.Tensor:
        """``[L, n]`` protected token scores (float32), summed over tensor-parallel ranks first when
        ``score_sum`` is set. One NaN check, on the total (a NaN on one rank reaches every rank)."""
        raw = torch.stack([token_scores(self.scorer.score(o), check_nan=False) for o in observations])
        if self.score_sum is not None:
            raw = self.score_sum(raw)
        selection.check_no_nan(raw, "token_scores")
        return torch.stack([protect(raw[l], self.sinks, self.window) for l in range(raw.shape[0])])

    def select(self, observations: Sequence[LayerObservation]) -> list[torch.Tensor]:
        """Kept positions per layer (ascending int64, on the observations' device), one tensor per
        observation (layer order)."""
        obs = list(observations)
        if not obs:
            raise ValueError(f"policy {self.name!r}: no layer observations")
        for i, o in enumerate(obs):
            if not isinstance(o, LayerObservation):
                raise ValueError(f"policy {self.name!r}: observation {i} is a {type(o).__name__}, "
                                 "not a LayerObservation")
            if o.layer != i:
                raise ValueError(f"policy {self.name!r}: observation {i} is for layer {o.layer}; "
                                 "pass one observation per layer, in layer order")
        n = obs[0].num_tokens
        bad = [o.layer for o in obs if o.num_tokens != n]
        if bad:
            raise ValueError(f"policy {self.name!r}: layers {bad[:5]} have a different token count than layer 0 ({n})")
        for o in obs:
            o.check()
        if not self.prunes(n):
            return [torch.arange(n, dtype=torch.int64, device=o.keys.device) for o in obs]
        scores = self.layer_scores(obs)
        counts = self.keep_counts(n, len(obs), scores)
        return [select_top(scores[l], k) for l, k in enumerate(counts)]


def make_policy(name: str, budget: float, *, profile: Optional[SensitivityProfile] = None, gates=None,
                sinks: int = 4, window: int = 32) -> PrunePolicy:
    """A named policy (see the module docstring); ValueError for unknown names or bad arguments."""
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    budget = check_budget(budget)
    sinks = _non_negative_int("sinks", sinks)
    window = _non_negative_int("window", window)
    if name == "full":
        return PrunePolicy(name, FullScorer(), UniformAllocator(), 1.0, sinks, window)
    if name == "streamingllm":
        return PrunePolicy(name, StreamingLLMScorer(), UniformAllocator(), budget, sinks, window)
    if name == "snapkv":
        return PrunePolicy(name, SnapKVScorer(), UniformAllocator(), budget, sinks, window)
    if name == "pyramid":
        return PrunePolicy(name, SnapKVScorer(), PyramidAllocator(), budget, sinks, window)
    if name == "depthkv":
        if profile is None:
            raise ValueError("policy 'depthkv' needs a sensitivity profile (profile=load_profile(...))")
        if not isinstance(profile, SensitivityProfile):
            raise ValueError(f"policy 'depthkv': profile must be a SensitivityProfile, got {type(profile).__name__}")
        from .scorers import profile_scorer

        # the scorer the profile was calibrated with (and its recorded pool kernel): its sensitivities
        # measured that scorer's pruning
        scorer = profile_scorer(profile.scorer, profile.calibration.get("pool_kernel"))
        return PrunePolicy(name, scorer, DepthKVAllocator(profile), budget, sinks, window)
    if name == "laprox":
        return PrunePolicy(name, LaProxScorer(head_mean_power=LAPROX_GLOBAL_HEAD_MEAN_POWER), GlobalTopKAllocator(),
                           budget, sinks, window)
    # kvzip
    if gates is None:
        raise ValueError("policy 'kvzip' needs trained gates (gates=core.gates.load_gates(...))")
    from .scorers.kvzip import KVzipGateScorer

    return PrunePolicy(name, KVzipGateScorer(gates), GlobalTopKAllocator(), budget, sinks, window)


__all__ = ["POLICY_NAMES", "PrunePolicy", "make_policy"]
