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


# Profile scorers that pool their scores along positions: the profile records the kernel
# (``calibration.pool_kernel``) and DepthKV serves with the kernel the profile was measured with.
POOLED_SCORERS = ("snapkv", "laprox")


def profile_scorer(name: str, pool_kernel=None) -> Scorer:
    """The scorer a DepthKV profile is calibrated and served with, by name; ``pool_kernel`` (pooled
    scorers only) overrides the scorer's default kernel."""
    if name not in PROFILE_SCORERS:
        raise ValueError(f"scorer {name!r} cannot calibrate or serve a DepthKV profile; choose one of "
                         f"{', '.join(PROFILE_SCORERS)}")
    if pool_kernel is None:
        return PROFILE_SCORERS[name]()
    if name not in POOLED_SCORERS:
        raise ValueError(f"scorer {name!r} does not pool its scores: it takes no pool_kernel (got {pool_kernel!r})")
    return PROFILE_SCORERS[name](pool_kernel=pool_kernel)


def scorer_record(scorer: Scorer) -> dict:
    """What a profile records about its scorer beyond the name: the pool kernel of a pooled scorer,
    and the name of the score's formula when it has one (``Scorer.definition``)."""
    record = {"pool_kernel": scorer.pool_kernel} if scorer.name in POOLED_SCORERS else {}
    if scorer.definition:
        record["score"] = scorer.definition
    return record


__all__ = ["Scorer", "FullScorer", "StreamingLLMScorer", "SnapKVScorer", "LaProxScorer", "PROFILE_SCORERS",
           "POOLED_SCORERS", "profile_scorer", "scorer_record"]
