"""Layer sensitivity calibration for DepthKV (the ``calibrate`` command).

For each calibration sample (``context_tokens`` context + ``continuation_tokens`` continuation,
consecutive non-overlapping windows of the token stream from its start):

1. prefill the context once with the full cache (reference path);
2. teacher-force the continuation over the full cache: reference distributions ``P[t]``;
3. for every layer ``l`` and keep fraction ``f``: prune ONLY layer ``l`` to
   ``k = min(n, max(min(n, sinks + window), floor(f * n + 0.5)))`` tokens chosen by the scorer
   (``token_scores`` → ``protect(sinks, window)`` → ``select_top``, the shared selection rules),
   keep every other layer full, teacher-force the same continuation and record
   ``mean_t KL(P[t] || Q[t])`` over the continuation positions (KL in float64 from log-softmax;
   the first continuation token is fed over the pruned cache, so every position is affected).

Sensitivities are averaged over samples and written as a versioned profile
(``core/profile.py``'s format) with the model identity from the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .reference import PrunedCache, ReferenceModel
from .scorers import profile_scorer

METRIC = "kl_next_token"


def make_scorer(name: str):
    """A calibration scorer by name (scorers that need no extra files); the profile records it and
    DepthKV serves with the same one."""
    try:
        return profile_scorer(name)
    except ValueError as e:
        raise ValueError(f"--scorer: {e}") from None


def keep_count(n: int, fraction: float, sinks: int, window: int) -> int:
    """Tokens kept at keep fraction ``fraction`` of an ``n``-token layer (never below sinks + window)."""
    return min(n, max(min(n, sinks + window), int(math.floor(fraction * n + 0.5))))


def check_fractions(fractions: Sequence[float]) -> list[float]:
    fr = [float(f) for f in fractions]
    if not fr:
        raise ValueError("--keep-fractions is empty")
    for f in fr:
        if not (0.0 < f <= 1.0) or math.isnan(f):
            raise ValueError(f"--keep-fractions: {f} is outside (0, 1]")
    if any(b <= a for a, b in zip(fr, fr[1:])):
        raise ValueError(f"--keep-fractions must be strictly increasing, got {fr}")
    return fr


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(p) || softmax(q)) in float64, clamped at 0 (rounding)."""
    lp = torch.log_softmax(p_logits.double(), dim=-1)
    lq = torch.log_softmax(q_logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def keep_sets_from_scores(layer_scores, n: int, fractions, sinks: int, window: int) -> list[list]:
    """``keep[l][i]``: positions layer ``l`` keeps at ``fractions[i]``, from its raw token scores ``[n]``
    (``protect(sinks, window)`` → ``select_top``, the shared selection rules)."""
    from .selection import protect, select_top

    return [[select_top(protect(s, sinks, window), keep_count(n, f, sinks, window)) for f in fractions]
            for s in layer_scores]


def layer_keep_sets(ref: ReferenceModel, prefill, scorer, fractions, sinks: int, window: int) -> list[list]:
    """``keep[l][i]``: positions layer ``l`` keeps at ``fractions[i]`` (shared selection rules)."""
    from .selection import token_scores

    scores = [token_scores(scorer.score(obs)) for obs in prefill.observations]
    return keep_sets_from_scores(scores, prefill.length, fractions, sinks, window)


def sensitivity_table(keeps, n: int, full_logits: torch.Tensor, pruned_logits: Callable[[int, torch.Tensor], torch.Tensor],
                      on_step: Optional[Callable[[], None]] = None,
                      on_layer: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """``[L, F]`` mean KL over the continuation: ``keeps[l][i]`` the positions layer ``l`` keeps at
    fraction ``i``, ``full_logits [T, V]`` the continuation over the full cache and
    ``pruned_logits(l, keep)`` the same continuation with only layer ``l`` pruned to ``keep``. The
    one loop of both calibration paths (the HF reference here, SGLang's model runner at start-up)."""
    L, F = len(keeps), len(keeps[0])
    out = torch.zeros(L, F, dtype=torch.float64)
    for l in range(L):
        for i in range(F):
            if keeps[l][i].numel() == n:
                out[l, i] = 0.0  # nothing pruned: identical cache, KL exactly 0
            else:
                out[l, i] = kl_divergence(full_logits, pruned_logits(l, keeps[l][i])).mean()
            if on_step is not None:
                on_step()
        if on_layer is not None:
            on_layer(l)
    return out


def sample_sensitivity(ref: ReferenceModel, context, continuation, scorer, fractions, sinks: int = 4,
                       window: int = 32, on_step: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """``[L, F]`` mean KL over the continuation for one sample."""
    context = torch.as_tensor(context, dtype=torch.int64)
    continuation = torch.as_tensor(continuation, dtype=torch.int64)
    pf = ref.prefill(context, window=window, capture_hidden=True)
    full = ref.extend(PrunedCache.from_prefill(pf, None), continuation)
    keeps = layer_keep_sets(ref, pf, scorer, fractions, sinks, window)
    L, n = ref.num_layers, pf.length
    everything = torch.arange(n, device=pf.keys[0].device)

    def pruned(l, keep_l):
        keep = [everything] * L
        keep[l] = keep_l
        return ref.extend(PrunedCache.from_prefill(pf, keep), continuation)

    return sensitivity_table(keeps, n, full, pruned, on_step=on_step)


def token_samples(tokens: torch.Tensor, context_tokens: int, continuation_tokens: int, samples: int):
    """Consecutive non-overlapping (context, continuation) windows from the start of ``tokens``."""
    if context_tokens < 1 or continuation_tokens < 1 or samples < 1:
        raise ValueError("--context-tokens, --continuation-tokens and --samples must be positive")
    span = context_tokens + continuation_tokens
    if tokens.numel() < span * samples:
        raise ValueError(
            f"calibration text has {tokens.numel()} tokens, need {span * samples} "
            f"({samples} samples x ({context_tokens} + {continuation_tokens}))"
        )
    return [(tokens[s * span : s * span + context_tokens], tokens[s * span + context_tokens : (s + 1) * span])
            for s in range(samples)]


@dataclass
class CalibrationResult:
    keep_fractions: list
    sensitivity: torch.Tensor  # [L, F] float64, mean over samples
    per_sample: list  # [L, F] per sample
    settings: dict



def calibrate(ref: ReferenceModel, tokens, *, keep_fractions=(0.1, 0.2, 0.3, 0.5), context_tokens: int = 1024,
              continuation_tokens: int = 64, samples: int = 2, scorer: str = "snapkv", window: int = 32,
              sinks: int = 4, progress: bool = False) -> CalibrationResult:
    """Run the calibration over a token stream; see the module docstring."""
    fractions = check_fractions(keep_fractions)
    if window < 1 or sinks < 0:
        raise ValueError(f"--window must be >= 1 and --sinks >= 0, got {window}, {sinks}")
    tokens = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
    scorer_obj = make_scorer(scorer)
    pairs = token_samples(tokens, context_tokens, continuation_tokens, samples)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs) * ref.num_layers * len(fractions), desc="calibrate (layer x fraction)")
    try:
        per = [sample_sensitivity(ref, c, t, scorer_obj, fractions, sinks, window,
                                  on_step=bar.update if bar is not None else None) for c, t in pairs]
    finally:
        if bar is not None:
            bar.close()
    sens = torch.stack(per).mean(0)
    return CalibrationResult(fractions, sens, per, calibration_settings(samples, context_tokens, continuation_tokens,
                                                                      window, sinks, scorer_obj))


def calibration_settings(samples: int, context_tokens: int, continuation_tokens: int, window: int, sinks: int,
                         scorer) -> dict:
    """The ``calibration`` record of a profile (both calibration paths write the same keys), with the
    scorer's pool kernel when it pools (DepthKV then serves with that kernel)."""
    from .scorers import scorer_record

    return {"samples": samples, "context_tokens": context_tokens, "continuation_tokens": continuation_tokens,
            "window": window, "sinks": sinks, "keep_rule": "min(n, max(min(n, sinks+window), floor(f*n+0.5)))",
            **scorer_record(scorer)}


def write_profile(result: CalibrationResult, identity, scorer: str, path):
    """Write the versioned profile with ``core.profile.save_profile`` (validated before writing)."""
    from .profile import SensitivityProfile, save_profile

    profile = SensitivityProfile(model=identity, scorer=scorer, keep_fractions=list(result.keep_fractions),
                                 sensitivity=result.sensitivity.tolist(), metric=METRIC,
                                 calibration=dict(result.settings))
    return save_profile(profile, path)
