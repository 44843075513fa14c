"""Shared budget arithmetic and the allocator interface.

Global budget ``b ∈ (0, 1]`` = fraction of all KV slots (layers × tokens) kept.

    min_keep(n, sinks, window)      = min(n, sinks + window)
    total_keep(n, L, b, sinks, win) = clip(floor(b·n·L + 0.5), L·min_keep, L·n)

``apportion(fractions, n, total, lo)`` turns per-layer fractions into integer counts
``k_l ∈ [lo, n]`` with ``Σ k_l == total`` exactly:

1. ``x_l = clip(fraction_l · n, lo, n)``, ``k_l = floor(x_l)``, remainder ``r_l = x_l − k_l``;
2. while ``Σ k < total``: one more token to each layer with ``k_l < n``, in order of remainder
   descending, ties → lower layer index (rounds repeat if needed);
3. while ``Σ k > total`` (only when clipping up to ``lo`` added tokens): one token less from each
   layer with ``k_l > lo``, in order of remainder ascending, ties → lower layer index.

Deterministic; the SGLang path and the HF reference path both call these functions.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from typing import Optional, Sequence

import torch


def _check_int(name: str, v, lo: int = 0) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    try:
        v = operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {v!r}") from None
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def check_budget(budget) -> float:
    """``budget`` as a float in (0, 1], else ValueError."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if not (0.0 < b <= 1.0):  # also rejects NaN
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    return b


def min_keep(n: int, sinks: int, window: int) -> int:
    """Tokens a layer always keeps: ``min(n, sinks + window)``."""
    n = _check_int("n", n)
    return min(n, _check_int("sinks", sinks) + _check_int("window", window))


def total_keep(n: int, num_layers: int, budget: float, sinks: int, window: int) -> int:
    """KV slots kept over all layers: ``clip(floor(b·n·L + 0.5), L·min_keep, L·n)``."""
    n = _check_int("n", n)
    L = _check_int("num_layers", num_layers, 1)
    b = check_budget(budget)
    lo = min_keep(n, sinks, window)
    return int(min(L * n, max(L * lo, math.floor(b * n * L + 0.5))))


def apportion(fractions: Sequence[float], n: int, total: int, lo: int) -> list[int]:
    """Integer counts ``k_l ∈ [lo, n]`` summing to ``total`` (see the module docstring)."""
    n = _check_int("n", n)
    lo = _check_int("lo", lo)
    total = _check_int("total", total)
    fr = [float(f) for f in fractions]
    L = len(fr)
    if L == 0:
        raise ValueError("apportion: no layer fractions")
    if lo > n:
        raise ValueError(f"apportion: lo={lo} > n={n}")
    if any(math.isnan(f) or f < 0 for f in fr):
        raise ValueError(f"apportion: fractions must be >= 0 and not NaN, got {fr}")
    if not (L * lo <= total <= L * n):
        raise ValueError(f"apportion: total {total} outside [{L * lo}, {L * n}] for {L} layers, n={n}, lo={lo}")
    x = [min(float(n), max(float(lo), f * n)) for f in fr]
    k = [int(math.floor(v)) for v in x]
    rem = [v - kv for v, kv in zip(x, k)]
    diff = total - sum(k)
    if diff > 0:
        order = sorted(range(L), key=lambda l: (-rem[l], l))
        while diff > 0:
            for l in order:
                if diff == 0:
                    break
                if k[l] < n:
                    k[l] += 1
                    diff -= 1
    elif diff < 0:
        order = sorted(range(L), key=lambda l: (rem[l], l))
        while diff < 0:
            for l in order:
                if diff == 0:
                    break
                if k[l] > lo:
                    k[l] -= 1
                    diff += 1
    return k


class LayerBudgetAllocator(ABC):
    """Splits a global budget over layers: ``allocate`` → per-layer keep counts summing to
    ``total_keep`` exactly, each in ``[min_keep, n]``."""

    name: str = ""
    score_dependent: bool = False  # True only for the global top-k allocator

    def layer_fractions(self, num_layers: int, budget: float) -> list[float]:
        """Static per-layer keep fractions, mean ``budget``, each in (0, 1]."""
        raise ValueError(f"{type(self).__name__} is score dependent: it has no static per-layer fractions")

    def allocate(self, n: int, num_layers: int, budget: float, sinks: int, window: int,
                 layer_scores: Optional[torch.Tensor] = None) -> list[int]:
        """Default for static allocators: ``apportion(layer_fractions)`` to ``total_keep``."""
        L = _check_int("num_layers", num_layers, 1)
        total = total_keep(n, L, budget, sinks, window)
        return apportion(self.layer_fractions(L, budget), n, total, min_keep(n, sinks, window))

    def allocate_many(self, segments, num_layers: int, budget: float, window: int) -> list[list[int]]:
        """``allocate`` for each ``(n, sinks, layer_scores)`` of a batch of segments. Score-dependent
        allocators override it to read all keep counts back at once; the caller has checked the
        scores for NaN."""
        return [self.allocate(n, num_layers, budget, sinks, window, scores) for n, sinks, scores in segments]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
