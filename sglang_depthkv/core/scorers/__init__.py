"""Token scorers (one file each). ``kvzip`` is not imported here: it needs ``core.gates``; import
``sglang_depthkv.core.scorers.kvzip`` explicitly (``make_policy("kvzip", ...)`` does it lazily)."""

from .base import Scorer

__all__ = ["Scorer"]
