"""Token scorers (one file each). ``kvzip`` is not imported here: it needs ``core.gates``; import
``sglang_depthkv.core.scorers.kvzip`` explicitly (``make_policy("kvzip", ...)`` does it lazily)."""

from .base import Scorer
from .full import FullScorer
from .laprox import LaProxScorer
from .snapkv import SnapKVScorer
from .streaming_llm import StreamingLLMScorer

# Scorers that need nothing but the observations: DepthKV calibrates with one of them and serves with
# the same one (the profile records which).
PROFILE_SCORERS = {"snapkv": SnapKVScorer, "streamingllm": StreamingLLMScorer, "laprox": LaProxScorer}


def profile_scorer(name: str) -> Scorer:
    """The scorer a DepthKV profile is calibrated and served with, by name."""
    if name not in PROFILE_SCORERS:
        raise ValueError(f"scorer {name!r} cannot calibrate or serve a DepthKV profile; choose one of "
                         f"{', '.join(PROFILE_SCORERS)}")
    return PROFILE_SCORERS[name]()


__all__ = ["Scorer", "FullScorer", "StreamingLLMScorer", "SnapKVScorer", "LaProxScorer", "PROFILE_SCORERS",
           "profile_scorer"]
