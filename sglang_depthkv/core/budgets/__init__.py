"""Layer-budget allocators (one file each) and the shared budget arithmetic."""

from .base import LayerBudgetAllocator, apportion, check_budget, min_keep, total_keep
from .depthkv import DepthKVAllocator
from .global_topk import GlobalTopKAllocator
from .pyramid import PyramidAllocator
from .uniform import UniformAllocator

__all__ = ["LayerBudgetAllocator", "apportion", "check_budget", "min_keep", "total_keep", "UniformAllocator",
           "PyramidAllocator", "DepthKVAllocator", "GlobalTopKAllocator"]
