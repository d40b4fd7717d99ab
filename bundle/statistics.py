"""Statistics of the study's tables: paired tests, bootstrap confidence intervals, formatting.

``scipy.stats.wilcoxon`` does the paired test. The bootstrap is a percentile bootstrap over
images on fixed, seeded resample indices shared by all methods, so that the intervals of two
methods come from the same resamples (``scipy.stats.bootstrap`` draws its own resamples on each
call, which is why the indices are kept here).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["paired_wilcoxon", "bootstrap_indices", "bootstrap_ci", "format_ci", "format_p"]

NAN = float("nan")


def _nanmean(x: np.ndarray, axis: int | None = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank test of paired per-image values (``scipy.stats.wilcoxon``).

    Pairs with a NaN on either side are dropped; zero differences are dropped (``zero_method=
    "wilcox"``). When every difference is zero the methods agree on every image: ``p_value`` = 1.
    With no pair at all ``p_value`` is NaN.

    Args:
        a: per-image values of method A.
        b: per-image values of method B (same images, same order).

    Returns:
        ``{"p_value", "statistic", "n_pairs", "n_nonzero", "mean_difference", "median_difference"}``
        (differences are A - B).
    """
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    nz = d[d != 0]
    out = {
        "n_pairs": float(ok.sum()),
        "n_nonzero": float(nz.size),
        "mean_difference": float(d.mean()) if d.size else NAN,
        "median_difference": float(np.median(d)) if d.size else NAN,
        "statistic": NAN,
        "p_value": NAN,
    }
    if d.size == 0:
        return out
    if nz.size == 0:
        out["p_value"] = 1.0
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.wilcoxon(nz, zero_method="wilcox", alternative="two-sided")
    out["statistic"] = float(res.statistic)
    out["p_value"] = float(res.pvalue) if np.isfinite(res.pvalue) else NAN
    return out


def bootstrap_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Seeded bootstrap resamples of ``n`` items (with replacement).

    Args:
        n: number of items (images).
        n_resamples: number of resamples.
        seed: random seed.

    Returns:
        (n_resamples, n) int array.
    """
    rng = np.random.default_rng(seed)
    return rng.integers(0, max(n, 1), size=(int(n_resamples), n)) if n else np.zeros((int(n_resamples), 0), int)


def bootstrap_ci(
    values: Sequence[float] | None = None,
    statistic: Callable[[np.ndarray], float] | None = None,
    n: int | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    indices: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval over images.

    Either ``values`` (per-image values; the statistic is their NaN-ignoring mean) or ``statistic``
    (a function of an index array into the images) with ``n`` images.

    Args:
        values: per-image values (NaN = image without a value).
        statistic: ``f(indices) -> float`` for statistics that are not per-image means (pooled
            ratios, FROC scores).
        n: number of images for ``statistic``.
        n_resamples: resamples.
        confidence: e.g. 0.95.
        seed: seed of the resamples (the same seed gives the same resamples for every method).
        indices: precomputed (R, n) resamples; overrides ``n_resamples``/``seed``.

    Returns:
        ``(low, high)``; NaN when no resample gives a finite statistic.
    """
    if values is None and statistic is None:
        raise ValueError("give values or statistic")
    if values is not None:
        v = np.asarray(values, dtype=float)
        n = v.size
    if n is None:
        raise ValueError("statistic needs n")
    idx = indices if indices is not None else bootstrap_indices(n, n_resamples, seed)
    if n == 0:
        return NAN, NAN
    if values is not None:
        boots = _nanmean(v[idx], axis=1)
    else:
        boots = np.array([statistic(row) for row in idx], dtype=float)  # type: ignore[misc]
    boots = boots[np.isfinite(boots)]
    if boots.size == 0:
        return NAN, NAN
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(boots, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def format_ci(value: float, lo: float, hi: float, scale: float = 100.0, digits: int = 1) -> str:
    """``"95.3 [93.1, 97.2]"`` (values times ``scale``); ``"n/a"`` for NaN.

    Args:
        value: point estimate.
        lo: lower bound.
        hi: upper bound.
        scale: multiplier (100 for percent).
        digits: decimals.
    """
    if value is None or not np.isfinite(value):
        return "n/a"
    s = f"{value * scale:.{digits}f}"
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        s += f" [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"
    return s


def format_p(p: float) -> str:
    """p-value for a table: ``"<0.001"``, ``"0.034"``, ``"n/a"``.

    Args:
        p: the p-value.
    """
    if p is None or not np.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
