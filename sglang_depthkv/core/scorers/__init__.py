"""Token scorers (one file each). ``kvzip`` is not imported here: it needs ``core.gates``; import
``sglang_depthkv.core.scorers.kvzip`` explicitly (``make_policy("kvzip", ...)`` does it lazily)."""

from .base import Scorer
from .full import FullScorer
from .laprox import LaProxScorer
from .snapkv import SnapKVScorer
from .streaming_llm import StreamingLLMScorer

__all__ = ["Scorer", "FullScorer", "StreamingLLMScorer", "SnapKVScorer", "LaProxScorer"]
