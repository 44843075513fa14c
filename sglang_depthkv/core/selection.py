"""Token scores → kept positions: the one set of rules both the HF reference path and the SGLang
path use (they call these functions, never re-implement them).

- ``token_scores``: sum of the per-kv-head scores over kv heads, float32.
- ``protect``: ``+inf`` on the attention sinks ``[0, sinks)`` and the recent window ``[n-window, n)``.
- ``select_top``: the ``k`` best positions, returned in ascending position order.

Tie rule (everywhere): order by score descending; equal scores → lower position first, i.e.
``torch.sort(scores, descending=True, stable=True)``. NaN in scores is a ValueError; the NaN check
reads a device value back, so a caller that checks a whole batch at once (the serving path: one
check per forward) passes ``check_nan=False``.
"""

from __future__ import annotations

import torch


def _check_1d(scores: torch.Tensor, what: str) -> None:
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"{what}: scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1:
        raise ValueError(f"{what}: scores must be 1-D [n], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"{what}: scores must be floating point, got {scores.dtype}")


def check_no_nan(scores: torch.Tensor, what: str) -> None:
    if torch.isnan(scores).any():
        bad = torch.nonzero(torch.isnan(scores).reshape(-1))[:5].reshape(-1).tolist()
        raise ValueError(f"{what}: scores contain NaN (flat indices {bad}...)")


def token_scores(head_scores: torch.Tensor, check_nan: bool = True) -> torch.Tensor:
    """``[kv_heads, n]`` → ``[n]``: sum over kv heads, computed in float32."""
    if not isinstance(head_scores, torch.Tensor) or head_scores.dim() != 2:
        shape = tuple(head_scores.shape) if isinstance(head_scores, torch.Tensor) else type(head_scores).__name__
        raise ValueError(f"token_scores: head scores must be [kv_heads, n], got {shape}")
    if not head_scores.is_floating_point():
        raise ValueError(f"token_scores: head scores must be floating point, got {head_scores.dtype}")
    if check_nan:
        check_no_nan(head_scores, "token_scores")
    return head_scores.to(torch.float32).sum(dim=0)


def protect(scores: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """A copy of ``scores`` with ``+inf`` on ``[0, sinks)`` and ``[n - window, n)`` (clipped to n)."""
    _check_1d(scores, "protect")
    if int(sinks) != sinks or int(window) != window or sinks < 0 or window < 0:
        raise ValueError(f"protect: sinks and window must be non-negative integers, got {sinks}, {window}")
    n = scores.shape[0]
    out = scores.clone()
    out[: min(int(sinks), n)] = float("inf")
    if window > 0:
        out[max(0, n - int(window)) :] = float("inf")
    return out


def select_top(scores: torch.Tensor, k: int, check_nan: bool = True) -> torch.Tensor:
    """Positions of the ``k`` highest scores (ties → lower position first), sorted ascending (int64)."""
    _check_1d(scores, "select_top")
    n = scores.shape[0]
    if isinstance(k, bool) or int(k) != k or not (0 <= int(k) <= n):
        raise ValueError(f"select_top: k={k} is outside [0, {n}]")
    if check_nan:
        check_no_nan(scores, "select_top")
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[: int(k)]).values.to(torch.int64)
