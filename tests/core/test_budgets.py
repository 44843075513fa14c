"""Layer-budget allocators: exact totals, bounds, shapes, and references written out here."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_depthkv.core.budgets import (DepthKVAllocator, GlobalTopKAllocator, PyramidAllocator, UniformAllocator,
                                         apportion, min_keep, total_keep)
from sglang_depthkv.core.profile import SensitivityProfile
from sglang_depthkv.core.types import ModelIdentity

FAST = settings(max_examples=60, deadline=None)
budgets_st = st.floats(min_value=0.001, max_value=1.0, allow_nan=False)
shape_st = st.tuples(st.integers(1, 300), st.integers(1, 12), st.integers(0, 6), st.integers(0, 40))  # n, L, sinks, window


def make_profile(sens, fractions=(0.1, 0.25, 0.5)):
    L = len(sens)
    ident = ModelIdentity(num_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=32)
    return SensitivityProfile(ident, "snapkv", list(fractions), [list(r) for r in sens])


curve_st = st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=3, max_size=3)
profiles_st = st.integers(1, 8).flatmap(lambda L: st.lists(curve_st, min_size=L, max_size=L)).map(make_profile)


def check_counts(k, n, L, b, sinks, window):
    lo = min_keep(n, sinks, window)
    assert len(k) == L and all(isinstance(x, int) for x in k)
    assert sum(k) == total_keep(n, L, b, sinks, window)
    assert all(lo <= x <= n for x in k)


def test_formulas():
    assert min_keep(10, 4, 32) == 10 and min_keep(100, 4, 32) == 36
    assert total_keep(100, 3, 0.5, 4, 32) == 150
    assert total_keep(100, 3, 0.1, 4, 32) == 108  # clipped up to L * min_keep
    assert total_keep(7, 2, 0.25, 0, 0) == 4  # floor(3.5 + 0.5)
    assert total_keep(100, 3, 1.0, 4, 32) == 300


def test_apportion_largest_remainder_and_ties():
    assert apportion([0.5, 0.5, 0.5], 5, 8, 0) == [3, 3, 2]  # equal remainders -> lower layers first
    assert apportion([0.34, 0.33, 0.33], 10, 10, 0) == [4, 3, 3]
    assert apportion([0.0, 1.0], 10, 12, 3) == [3, 9]  # clipping layer 0 up to lo costs layer 1
    with pytest.raises(ValueError, match="outside"):
        apportion([0.5, 0.5], 10, 30, 0)
    with pytest.raises(ValueError, match="fractions"):
        apportion([float("nan")], 10, 5, 0)


@FAST
@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=10), st.integers(1, 200), st.data())
def test_apportion_exact_and_bounded(fr, n, data):
    L = len(fr)
    lo = data.draw(st.integers(0, n))
    total = data.draw(st.integers(L * lo, L * n))
    k = apportion(fr, n, total, lo)
    assert sum(k) == total and all(lo <= x <= n for x in k)


@FAST
@given(shape_st, budgets_st)
def test_uniform(shape, b):
    n, L, sinks, window = shape
    fr = UniformAllocator().layer_fractions(L, b)
    assert fr == [b] * L
    k = UniformAllocator().allocate(n, L, b, sinks, window)
    check_counts(k, n, L, b, sinks, window)
    assert max(k) - min(k) <= 1


@FAST
@given(shape_st, budgets_st, budgets_st)
def test_uniform_total_monotone(shape, b1, b2):
    n, L, sinks, window = shape
    lo, hi = sorted((b1, b2))
    assert sum(UniformAllocator().allocate(n, L, lo, sinks, window)) <= sum(UniformAllocator().allocate(n, L, hi, sinks, window))


@FAST
@given(shape_st, budgets_st, st.floats(1.0, 50.0))
def test_pyramid(shape, b, beta):
    n, L, sinks, window = shape
    alloc = PyramidAllocator(beta)
    fr = alloc.layer_fractions(L, b)
    assert len(fr) == L and all(0 < f <= 1 for f in fr)
    assert sum(fr) / L == pytest.approx(b, rel=1e-12, abs=1e-12)
    assert all(a >= c for a, c in zip(fr, fr[1:]))  # decreasing with depth
    diffs = [a - c for a, c in zip(fr, fr[1:])]
    assert all(d == pytest.approx(diffs[0], abs=1e-12) for d in diffs)  # arithmetic progression
    check_counts(alloc.allocate(n, L, b, sinks, window), n, L, b, sinks, window)


def test_pyramid_pyramidkv_numbers():
    fr = PyramidAllocator(20).layer_fractions(5, 0.2)
    top, bottom = 0.2 / 20, 0.4 - 0.2 / 20
    assert fr == pytest.approx([bottom - i * (bottom - top) / 4 for i in range(5)], abs=1e-15)
    fr = PyramidAllocator(20).layer_fractions(3, 0.8)  # bottom 1.59 > 1: capped, top = 2b - 1
    assert fr == pytest.approx([1.0, 0.8, 0.6], abs=1e-15)
    assert PyramidAllocator().layer_fractions(4, 1.0) == [1.0] * 4
    with pytest.raises(ValueError, match="beta"):
        PyramidAllocator(0.5)


def hull_kl(curve, f):
    """Brute force: the lower convex hull value at f = min over pairs of points bracketing f of the chord."""
    best = math.inf
    for (x0, y0) in curve:
        for (x1, y1) in curve:
            if x0 <= f <= x1:
                y = y0 if x1 == x0 else y0 + (y1 - y0) * (f - x0) / (x1 - x0)
                best = min(best, y)
    return best


@FAST
@given(profiles_st, st.floats(0.1, 1.0))
def test_depthkv_mean_bounds_and_optimal(profile, b):
    L = profile.num_layers
    alloc = DepthKVAllocator(profile, step=None)
    fr = alloc.layer_fractions(L, b)
    assert len(fr) == L and all(0.1 - 1e-12 <= f <= 1.0 for f in fr)
    assert sum(fr) / L == pytest.approx(b, abs=1e-9)
    curves = [profile.curve(l) for l in range(L)]
    cost = sum(hull_kl(c, f) for c, f in zip(curves, fr))
    # no pairwise transfer of fraction between two layers lowers the summed hull KL (convex => optimal)
    for i in range(L):
        for j in range(L):
            for eps in (1e-3, 0.02):
                if i != j and fr[i] - eps >= 0.1 and fr[j] + eps <= 1.0:
                    moved = list(fr)
                    moved[i] -= eps
                    moved[j] += eps
                    assert sum(hull_kl(c, f) for c, f in zip(curves, moved)) >= cost - 1e-7


@FAST
@given(profiles_st, budgets_st, budgets_st, st.integers(1, 300), st.integers(0, 4), st.integers(0, 20),
       st.sampled_from([None, 0.01, 0.07]))
def test_depthkv_monotone_and_exact(profile, b1, b2, n, sinks, window, step):
    L = profile.num_layers
    alloc = DepthKVAllocator(profile, step=step)
    lo, hi = sorted((b1, b2))
    f_lo, f_hi = alloc.layer_fractions(L, lo), alloc.layer_fractions(L, hi)
    assert all(a <= c + 1e-12 for a, c in zip(f_lo, f_hi))
    k_lo, k_hi = alloc.allocate(n, L, lo, sinks, window), alloc.allocate(n, L, hi, sinks, window)
    check_counts(k_lo, n, L, lo, sinks, window)
    check_counts(k_hi, n, L, hi, sinks, window)
    assert sum(k_lo) <= sum(k_hi)


@FAST
@given(curve_st, st.floats(1.01, 10.0), st.floats(0.1, 1.0), st.sampled_from([None, 0.01]))
def test_depthkv_dominating_layer_keeps_more(curve, c, b, step):
    profile = make_profile([curve, [c * v for v in curve]])
    f0, f1 = DepthKVAllocator(profile, step=step).layer_fractions(2, b)
    assert f1 >= f0 - 1e-12


def test_depthkv_known_solution():
    # layer 0 barely sensitive, layer 1 very sensitive: layer 1 fills up to 1.0 first
    p = make_profile([[0.2, 0.1, 0.05], [8.0, 4.0, 2.0]])
    assert DepthKVAllocator(p, step=None).layer_fractions(2, 0.55) == pytest.approx([0.1, 1.0], abs=1e-12)
    assert DepthKVAllocator(p, step=None).layer_fractions(2, 0.3) == pytest.approx([0.1, 0.5], abs=1e-12)
    # identical layers get identical fractions; below the measured range: uniform
    q = make_profile([[3.0, 2.0, 1.0]] * 3)
    for step in (None, 0.01):
        assert DepthKVAllocator(q, step=step).layer_fractions(3, 0.4) == pytest.approx([0.4] * 3, abs=1e-12)
        assert DepthKVAllocator(p, step=step).layer_fractions(2, 0.05) == [0.05, 0.05]
    with pytest.raises(ValueError, match="2 layers"):
        DepthKVAllocator(p).layer_fractions(3, 0.5)
    with pytest.raises(ValueError, match="SensitivityProfile"):
        DepthKVAllocator({"sensitivity": []})
    for bad in (0, 1, -0.1, "0.01"):
        with pytest.raises(ValueError, match="step"):
            DepthKVAllocator(p, step=bad)


def brute_hull_vertices(curve):
    """Measured points on their lower hull (brute force: a point is a vertex iff it is not above any
    chord of two other points bracketing it and not in the middle of a straight chord)."""
    verts = []
    for i, (x, y) in enumerate(curve):
        inner = [hull_kl([p for j, p in enumerate(curve) if j != i], x)] if 0 < i < len(curve) - 1 else [math.inf]
        if y < inner[0] - 1e-12:
            verts.append((x, y))
    return verts


def geometric_kl(curve, f):
    """Float64 reference of the interpolated curve: between the brute-force hull's vertices
    ``y0 * (y1 / y0) ** t`` when both are positive, else the chord."""
    v = brute_hull_vertices(curve)
    for (x0, y0), (x1, y1) in zip(v, v[1:]):
        if x0 <= f <= x1:
            t = (f - x0) / (x1 - x0)
            return y0 * (y1 / y0) ** t if y0 > 0 and y1 > 0 else y0 + (y1 - y0) * t
    raise AssertionError(f"{f} outside {v}")


@FAST
@given(curve_st)
def test_interpolated_curve_is_the_geometric_formula(curve):
    from sglang_depthkv.core.budgets.depthkv import interpolated_curve

    pts = make_profile([curve]).curve(0)  # measured fractions plus (1, 0)
    got = interpolated_curve(pts, 0.01)
    xs = [x for x, _ in got]
    assert xs == sorted(xs) and xs[0] == 0.1 and xs[-1] == 1.0
    assert all(any(abs(x - k / 100) < 1e-9 for k in range(101)) or x in (0.25, 0.5) for x in xs)
    assert len(got) >= 91
    for x, y in got:
        assert y == pytest.approx(geometric_kl(pts, x), rel=1e-9, abs=1e-12)


@FAST
@given(profiles_st, st.floats(0.1, 1.0))
def test_depthkv_between_grid_points_is_optimal_on_the_interpolated_curves(profile, b):
    """With ``step`` 0.01 the fractions minimise the summed hull of the interpolated curves (float64
    reference above): no transfer of 0.01 or 0.001 between two layers lowers it, the mean is b."""
    L = profile.num_layers
    fr = DepthKVAllocator(profile, step=0.01).layer_fractions(L, b)
    assert sum(fr) / L == pytest.approx(b, abs=1e-9)
    samples = [[(k / 100, geometric_kl(profile.curve(l), k / 100)) for k in range(10, 101)]
               + [(x, geometric_kl(profile.curve(l), x)) for x in (0.25,)] for l in range(L)]
    samples = [sorted(s) for s in samples]
    cost = sum(hull_kl(s, f) for s, f in zip(samples, fr))
    for i in range(L):
        for j in range(L):
            for eps in (1e-3, 0.01):
                if i != j and fr[i] - eps >= 0.1 - 1e-12 and fr[j] + eps <= 1.0 + 1e-12:
                    moved = list(fr)
                    moved[i] -= eps
                    moved[j] += eps
                    assert sum(hull_kl(s, f) for s, f in zip(samples, moved)) >= cost - 1e-7


def brute_global_topk(scores, n, L, b, sinks, window, max_fraction):
    lo = min_keep(n, sinks, window)
    cap = max(lo, min(n, math.floor(max_fraction * n)))
    total = total_keep(n, L, b, sinks, window)
    taken = set()
    counts = [0] * L
    for l in range(L):
        for t in sorted(range(n), key=lambda t: (-scores[l][t], t))[:lo]:
            taken.add((l, t))
            counts[l] += 1
    pairs = sorted(((l, t) for l in range(L) for t in range(n)), key=lambda p: (-scores[p[0]][p[1]], p[0], p[1]))
    for l, t in pairs:
        if sum(counts) == total:
            break
        if (l, t) not in taken and counts[l] < cap:
            taken.add((l, t))
            counts[l] += 1
    return counts


@FAST
@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 3), st.integers(0, 6), budgets_st, st.data())
def test_global_topk_matches_bruteforce(n, L, sinks, window, b, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    from sglang_depthkv.core.selection import protect

    raw = torch.randint(0, 5, (L, n), generator=g).float()  # integer scores: many ties across layers
    scores = torch.stack([protect(r, sinks, window) for r in raw])
    max_fraction = data.draw(st.sampled_from([1.0, 0.75, 0.5]))
    cap = max(min_keep(n, sinks, window), min(n, math.floor(max_fraction * n)))
    alloc = GlobalTopKAllocator(max_fraction)
    if L * cap < total_keep(n, L, b, sinks, window):
        with pytest.raises(ValueError, match="max_fraction"):
            alloc.allocate(n, L, b, sinks, window, scores)
        return
    k = alloc.allocate(n, L, b, sinks, window, scores)
    check_counts(k, n, L, b, sinks, window)
    assert all(x <= cap for x in k)
    assert k == brute_global_topk(scores.tolist(), n, L, b, sinks, window, max_fraction)


def test_global_topk_prefers_high_scoring_layer_and_errors():
    scores = torch.tensor([[1.0] * 10, [5.0] * 10])
    assert GlobalTopKAllocator().allocate(10, 2, 0.5, 0, 0, scores) == [0, 10]
    assert GlobalTopKAllocator().allocate(10, 2, 0.5, 0, 0, torch.ones(2, 10)) == [10, 0]  # tie -> lower layer
    with pytest.raises(ValueError, match="layer_scores"):
        GlobalTopKAllocator().allocate(10, 2, 0.5, 0, 0)
    with pytest.raises(ValueError, match=r"\[2, 10\]"):
        GlobalTopKAllocator().allocate(10, 2, 0.5, 0, 0, torch.ones(3, 10))
    with pytest.raises(ValueError, match="NaN"):
        GlobalTopKAllocator().allocate(10, 2, 0.5, 0, 0, torch.full((2, 10), float("nan")))
    with pytest.raises(ValueError, match="score dependent"):
        GlobalTopKAllocator().layer_fractions(2, 0.5)
    with pytest.raises(ValueError, match="max_fraction"):
        GlobalTopKAllocator(0.0)


@pytest.mark.parametrize("b", [0.0, -0.1, 1.5, float("nan"), "x"])
def test_bad_budget(b):
    with pytest.raises(ValueError, match="budget"):
        UniformAllocator().allocate(10, 2, b, 0, 0)


@FAST
@given(profiles_st)
def test_points_above_hull_are_the_points_water_filling_ignores(profile):
    """Every measured point is reported iff it lies above the brute-force lower hull; non-monotone
    iff some point with a smaller keep fraction has a lower KL."""
    from sglang_depthkv.core.budgets.depthkv import profile_points_above_hull

    got = {(l, f): (y, h, nm) for l, f, y, h, nm in profile_points_above_hull(profile)}
    for l in range(profile.num_layers):
        curve = profile.curve(l)
        for i, (f, y) in enumerate(curve):
            h = hull_kl(curve, f)
            if y > h + 1e-9 * max(1.0, abs(h)):
                assert (l, f) in got, (l, f, y, h)
                assert got[(l, f)][1] == pytest.approx(h, rel=1e-9, abs=1e-12)
                assert got[(l, f)][2] == any(yy < y for _, yy in curve[:i])
            elif y < h - 1e-9 * max(1.0, abs(h)) or y == h:
                assert (l, f) not in got


def test_points_above_hull_named_in_one_line():
    from sglang_depthkv.core.budgets.depthkv import describe_points_above_hull, profile_points_above_hull

    # layer 0: 0.6 at f=0.25 rises above 0.5 at f=0.1 (non-monotone); layer 1: convex, all on the hull
    profile = make_profile([[0.5, 0.6, 0.1], [0.9, 0.4, 0.1]])
    pts = profile_points_above_hull(profile)
    assert [(l, f, nm) for l, f, _, _, nm in pts] == [(0, 0.25, True)]
    assert pts[0][3] == pytest.approx(0.5 + (0.1 - 0.5) * (0.25 - 0.1) / (0.5 - 0.1))
    line = describe_points_above_hull(pts, 6)
    assert line.startswith("1 of 6 measured points lie above") and "layer 0 f=0.25 KL 0.6 > hull 0.35" in line
    assert "(1 non-monotone" in line
    assert describe_points_above_hull([], 6) == "all 6 measured points are on their layer's lower convex hull"
