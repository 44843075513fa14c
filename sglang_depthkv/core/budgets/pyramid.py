"""PyramidKV layer budgets (Cai et al. 2024): an arithmetic progression from the bottom layer
(largest) to the top layer (smallest), mean exactly ``b``.

Following PyramidKV's ``min_num = avg / beta``, ``max_num = 2·avg − min_num`` (kvpress 0.5.5
``PyramidKVPress.get_layer_budget``), applied to keep fractions:

    top    = b / beta
    bottom = 2·b − top
    if bottom > 1:  bottom = 1, top = 2·b − 1          (PyramidKV's cap at the sequence length)
    f_l    = bottom − l · (bottom − top) / (L − 1)      l = 0 .. L-1   (f_0 = b when L == 1)

The mean of an arithmetic progression is (bottom + top)/2 = b, and every f_l is in (0, 1]
(``top > 0``: either b/beta > 0, or 2b − 1 > b/beta when the cap applies). Difference from
PyramidKV: PyramidKV shapes only the tokens outside the observation window (the window is added to
every layer); here the shape applies to the whole keep fraction, the protected sinks + window
included (``apportion`` then keeps every layer at least ``min_keep``).
"""

from __future__ import annotations

import math

from .base import LayerBudgetAllocator, _check_int, check_budget


class PyramidAllocator(LayerBudgetAllocator):
    name = "pyramid"
    score_dependent = False

    def __init__(self, beta: float = 20):
        b = float(beta) if not isinstance(beta, bool) else float("nan")
        if not math.isfinite(b) or b < 1:
            raise ValueError(f"PyramidAllocator: beta must be a finite number >= 1, got {beta!r}")
        self.beta = b

    def layer_fractions(self, num_layers: int, budget: float) -> list[float]:
        L = _check_int("num_layers", num_layers, 1)
        b = check_budget(budget)
        if L == 1:
            return [b]
        top = b / self.beta
        bottom = 2.0 * b - top
        if bottom > 1.0:
            bottom, top = 1.0, 2.0 * b - 1.0
        step = (bottom - top) / (L - 1)
        return [min(1.0, bottom - l * step) for l in range(L)]

    def __repr__(self) -> str:
        return f"PyramidAllocator(beta={self.beta:g})"
