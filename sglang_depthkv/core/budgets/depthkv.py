"""DepthKV layer budgets: per-layer keep fractions from a sensitivity profile.

Each layer ``l`` has a measured curve KL_l(f) at the profile's keep fractions ``f_1 < … < f_F``,
plus the point ``(1, 0)`` (nothing pruned), linear between the points. We replace each curve by its
lower convex hull (piecewise linear, slopes increasing) and solve

    minimise  Σ_l KL_l(f_l)   subject to   mean_l f_l = b,   f_1 ≤ f_l ≤ 1

exactly by greedy water-filling: every layer starts at ``f_1``; the remaining ``L·(b − f_1)``
fraction is poured into the hull segment with the steepest descent (most negative slope) across
all layers, segment by segment. Layers whose current segments have exactly the same slope advance
together by equal amounts (so identical curves get identical fractions). With convex curves this
greedy order is optimal, and every f_l is non-decreasing in ``b``. A layer whose curve is ``c``
times another's (c > 1) has steeper slopes, so it keeps at least as much.

Between measured points (``step``, default 0.01): with the hull's vertices alone the optimum sits
on them, so every layer but one lands on a measured fraction (at 10% kept, most layers at the
smallest one). A KL curve falls roughly geometrically with the keep fraction, and the chord of a
convex curve overstates it between its points, so each hull segment whose ends are both positive is
replaced by the geometric interpolation ``y0·(y1/y0)^((f−f0)/(f1−f0))`` (convex inside the
segment; linear where an end is 0, e.g. towards ``(1, 0)``), sampled at every multiple of ``step``
plus the vertices; water-filling then runs on the lower convex hull of those samples, so fractions
fall between measured points, on the ``step`` grid. ``step=None`` water-fills the measured hull.

Below the measured range (``b ≤ f_1``) the profile says nothing about the trade-off: every layer
gets ``b`` (uniform). The result has mean ``b`` (up to float rounding; ``apportion`` makes the
integer counts exact) and every fraction in (0, 1].
"""

from __future__ import annotations

import math
from typing import Optional

from .base import LayerBudgetAllocator, _check_int, check_budget


def lower_convex_hull(points: list) -> list:
    """Lower convex hull of points sorted by strictly increasing x (monotone chain)."""
    hull: list = []
    for p in points:
        while len(hull) >= 2:
            (ax, ay), (bx, by) = hull[-2], hull[-1]
            cross = (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax)
            if cross <= 0:  # hull[-1] lies on or above the chord hull[-2] -> p
                hull.pop()
            else:
                break
        hull.append((float(p[0]), float(p[1])))
    return hull


def hull_segments(points: list) -> list:
    """``[(x0, x1, slope), ...]`` of the lower convex hull, slopes non-decreasing."""
    h = lower_convex_hull(points)
    return [(x0, x1, (y1 - y0) / (x1 - x0)) for (x0, y0), (x1, y1) in zip(h, h[1:])]


def points_above_hull(curve: list, tol: float = 1e-12) -> list:
    """Measured points ``(f, KL)`` of one curve that lie above its lower convex hull, as
    ``(f, KL, hull KL at f, non_monotone)``: water-filling does not use them. ``non_monotone``: the
    point's KL is above that of a point with a smaller keep fraction (more kept, more loss: noise);
    otherwise the curve is merely non-convex there."""
    hull = lower_convex_hull(curve)
    out = []
    for i, (x, y) in enumerate(curve):
        j = next(k for k in range(1, len(hull)) if hull[k][0] >= x)
        (x0, y0), (x1, y1) = hull[j - 1], hull[j]
        h = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        if y > h + tol * max(1.0, abs(h)):
            out.append((float(x), float(y), float(h), any(yy < y for _, yy in curve[:i])))
    return out


def profile_points_above_hull(profile) -> list:
    """``(layer, f, KL, hull KL, non_monotone)`` for every profile point that does not shape the budgets."""
    return [(l, *p) for l in range(profile.num_layers) for p in points_above_hull(profile.curve(l))]


def describe_points_above_hull(points: list, total: int, limit: int = 5) -> str:
    """One line for logs and the ``calibrate`` output: how many of ``total`` measured points lie above
    their layer's hull, how many of them are non-monotone, and the largest gaps."""
    if not points:
        return f"all {total} measured points are on their layer's lower convex hull"
    worst = sorted(points, key=lambda p: p[2] - p[3], reverse=True)[:limit]
    shown = "; ".join(f"layer {l} f={f:g} KL {y:.4g} > hull {h:.4g}{' (non-monotone)' if nm else ''}"
                      for l, f, y, h, nm in worst)
    return (f"{len(points)} of {total} measured points lie above their layer's lower convex hull and do not shape "
            f"the budgets ({sum(p[4] for p in points)} non-monotone: KL rising with the keep fraction); "
            f"largest: {shown}")


def profile_hull_report(profile) -> tuple[str, bool]:
    """The ``describe_points_above_hull`` line of a whole profile, and whether any point is
    non-monotone (the ``calibrate`` output and the server's start-up log both print it)."""
    points = profile_points_above_hull(profile)
    line = describe_points_above_hull(points, profile.num_layers * len(profile.keep_fractions))
    return line, any(p[4] for p in points)


def interpolated_curve(curve: list, step: float) -> list:
    """The measured curve's lower convex hull with each segment interpolated geometrically (linearly
    where an end is 0), sampled at every multiple of ``step`` inside it plus the hull's vertices
    (see the module docstring); sorted by keep fraction."""
    hull = lower_convex_hull(curve)
    xs = {x for x, _ in hull}
    k = math.ceil(hull[0][0] / step - 1e-9)
    while k * step < hull[-1][0] - 1e-9:
        xs.add(k * step)
        k += 1
    out = []
    j = 1
    for x in sorted(xs):
        while hull[j][0] < x:
            j += 1
        (x0, y0), (x1, y1) = hull[j - 1], hull[j]
        t = (x - x0) / (x1 - x0)
        y = y0 * (y1 / y0) ** t if y0 > 0 and y1 > 0 else y0 + (y1 - y0) * t
        out.append((x, y))
    return out


def water_fill(curves: list, budget: float) -> list:
    """Fractions minimising the summed hull KL with mean ``budget`` (see the module docstring)."""
    L = len(curves)
    start = curves[0][0][0]
    if budget <= start:
        return [budget] * L
    segs = [hull_segments(c) for c in curves]
    pos = [start] * L
    idx = [0] * L
    remaining = L * (budget - start)
    while remaining > 0:
        active = [l for l in range(L) if idx[l] < len(segs[l])]
        if not active:
            break
        slope = min(segs[l][idx[l]][2] for l in active)
        tied = [l for l in active if segs[l][idx[l]][2] == slope]
        room = min(segs[l][idx[l]][1] - pos[l] for l in tied)
        share = remaining / len(tied)
        if share < room:
            for l in tied:
                pos[l] += share
            remaining = 0.0
        else:
            for l in tied:
                end = segs[l][idx[l]][1]
                if end - pos[l] <= room:
                    pos[l], idx[l] = end, idx[l] + 1
                else:
                    pos[l] += room
            remaining -= room * len(tied)
    return [min(1.0, p) for p in pos]


DEFAULT_STEP = 0.01


class DepthKVAllocator(LayerBudgetAllocator):
    name = "depthkv"
    score_dependent = False

    def __init__(self, profile, step: Optional[float] = DEFAULT_STEP):
        from ..profile import SensitivityProfile

        if not isinstance(profile, SensitivityProfile):
            raise ValueError(f"DepthKVAllocator needs a SensitivityProfile (core.profile.load_profile), "
                             f"got {type(profile).__name__}")
        if step is not None and not (isinstance(step, (int, float)) and 0 < step < 1):
            raise ValueError(f"DepthKVAllocator: step must be None or in (0, 1), got {step!r}")
        self.profile = profile
        self.step = step
        curves = [profile.curve(l) for l in range(profile.num_layers)]
        self._curves = curves if step is None else [interpolated_curve(c, step) for c in curves]
        self._fractions: dict = {}  # budget -> fractions (water-filling runs once per budget)

    def layer_fractions(self, num_layers: int, budget: float) -> list[float]:
        L = _check_int("num_layers", num_layers, 1)
        if L != self.profile.num_layers:
            raise ValueError(f"DepthKVAllocator: the profile has {self.profile.num_layers} layers, asked for {L}")
        b = check_budget(budget)
        if b not in self._fractions:
            self._fractions[b] = water_fill(self._curves, b)
        return list(self._fractions[b])

    def __repr__(self) -> str:
        return (f"DepthKVAllocator(profile for {self.profile.num_layers} layers, scorer {self.profile.scorer!r}, "
                f"step {self.step})")
