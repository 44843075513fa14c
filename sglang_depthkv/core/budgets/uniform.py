"""Uniform layer budgets: every layer keeps the fraction ``b``."""

from __future__ import annotations

from .base import LayerBudgetAllocator, _check_int, check_budget


class UniformAllocator(LayerBudgetAllocator):
    name = "uniform"
    score_dependent = False

    def layer_fractions(self, num_layers: int, budget: float) -> list[float]:
        L = _check_int("num_layers", num_layers, 1)
        return [check_budget(budget)] * L
