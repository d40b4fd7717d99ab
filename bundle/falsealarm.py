"""Per-image false-alarm control: the operating point stated as expected false marks per image.

A fixed probability threshold gives a different number of marks on every device and site: the
same network that leaves five marks on one FFDM leaves thousands on a view with another noise
level or processing. :class:`FalseAlarmControl` instead reads the operating point from the
image's own candidates. On any mammogram almost every candidate mark (connected component of the
map above a low ``candidate_threshold``) is tissue, not calcification. Their ranked scores give
the image's own null tail: with ``k`` the rank of a candidate and ``s_k`` its score (maximum of
the map inside it, on the logit scale), ``log k`` falls about linearly with ``s_k`` in the tail (an
exponential tail of the null scores, as in a-contrario detection). A straight line fitted on ranks
``fit_ranks`` (far enough down the ranking that the few true MCs of an image barely move it) is
extrapolated to ``expected_false_marks``: candidates scoring above that point are kept.

A normal image therefore gets about ``expected_false_marks`` marks by construction, whatever its
device; calcifications survive when they stand out of the image's own tissue, which is what a
reader does. ``min_threshold`` keeps a floor (a clean image whose candidates are all weak gets
none), ``max_threshold`` a ceiling (a strong MC is never dropped because the tissue is busy).

Calcifications that matter come in clusters. With ``cluster_false_marks`` (> ``expected_false_marks``)
the control also keeps the weaker candidates that reach the image's threshold at that looser
rate *and* form a cluster among themselves (at least ``cluster_min_count`` centres linked at
``cluster_link_mm``, single linkage): a faint cluster is kept as a cluster, while isolated
tissue marks at that level are not.

The final mask is a hysteresis threshold (``skimage.filters.apply_hysteresis_threshold``): whole
candidate components whose peak reaches the image's threshold, so a kept mark keeps its extent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bundle.clusters import component_centroids, find_clusters, label_centroids, pixel_components

__all__ = ["FalseAlarmControl", "null_tail_threshold", "candidate_pixels", "candidate_scores"]


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1.0 - 1e-7)
    return np.log(q) - np.log1p(-q)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


def candidate_pixels(
    prob: np.ndarray, candidate_threshold: float, breast: np.ndarray | None = None, connectivity: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate marks of a map as pixel lists: the map's pixels at or above the threshold,
    labelled sparsely (:func:`bundle.clusters.pixel_components`), so the cost follows the number
    of candidate pixels, not the image size.

    Args:
        prob: (H, W) map in [0, 1] (NaN is never a candidate; +inf scores as the float32 maximum).
        candidate_threshold: pixels at or above it form candidates.
        breast: optional mask; candidates are taken inside it only.
        connectivity: 1 (4-) or 2 (8-connectivity).

    Returns:
        ``(idx, comp, scores)``: sorted flat indices of the candidate pixels, their (len(idx),)
        candidate ids 0..n-1 (numbered as ``ndimage.label`` numbers them, less one) and the
        (n,) float64 peak value of each candidate.
    """
    p = np.asarray(prob, dtype=np.float32)
    if p.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {p.shape}")
    flat = p.ravel()
    idx = np.flatnonzero(flat >= candidate_threshold)
    if breast is not None:
        b = np.asarray(breast)
        if b.shape != p.shape:
            raise ValueError(f"breast shape {b.shape} differs from map shape {p.shape}")
        idx = idx[b.ravel()[idx] > 0]
    comp, n = pixel_components(idx, p.shape, connectivity)
    scores = np.full(n, -np.inf)
    np.maximum.at(scores, comp, np.nan_to_num(flat[idx].astype(np.float64), posinf=float(np.finfo(np.float32).max)))
    return idx, comp, scores


def candidate_scores(
    prob: np.ndarray, candidate_threshold: float, breast: np.ndarray | None = None, connectivity: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate marks of a map and their peak scores, as a label image (see :func:`candidate_pixels`).

    Args:
        prob: (H, W) map in [0, 1].
        candidate_threshold: pixels at or above it form candidates.
        breast: optional mask; candidates are taken inside it only.
        connectivity: 1 (4-) or 2 (8-connectivity).

    Returns:
        ``(labels, scores)``: (H, W) int32 candidate labels 1..n and their (n,) peak values.
    """
    idx, comp, scores = candidate_pixels(prob, candidate_threshold, breast, connectivity)
    labels = np.zeros(np.shape(prob), dtype=np.int32)
    labels.ravel()[idx] = comp + 1
    return labels, scores


def null_tail_threshold(
    scores: Sequence[float] | np.ndarray,
    expected_false_marks: float,
    fit_ranks: Sequence[int] = (30, 300),
    min_threshold: float = 0.5,
    max_threshold: float = 0.999,
) -> float:
    """The score above which ``expected_false_marks`` null candidates are expected.

    Args:
        scores: peak scores of one image's candidates, in (0, 1).
        expected_false_marks: wanted expected number of false marks on the image.
        fit_ranks: ``(first, last)`` ranks (1 = strongest) of the tail fit; with fewer than
            ``first`` candidates no fit is made and ``min_threshold`` is returned.
        min_threshold: lowest threshold returned.
        max_threshold: highest threshold returned.

    Returns:
        The threshold, in ``[min_threshold, max_threshold]``.
    """
    if expected_false_marks <= 0:
        raise ValueError(f"expected_false_marks must be > 0, got {expected_false_marks}")
    lo, hi = int(fit_ranks[0]), int(fit_ranks[1])
    if not 1 <= lo < hi:
        raise ValueError(f"fit_ranks must be 1 <= first < last, got {fit_ranks}")
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())[::-1]
    if s.size < lo:
        return float(min_threshold)
    hi = min(hi, s.size)
    ranks = np.arange(lo, hi + 1, dtype=np.float64)
    g = _logit(s[lo - 1 : hi])
    if hi - lo < 2 or np.ptp(g) < 1e-9:
        return float(min_threshold)
    slope, intercept = np.polyfit(g, np.log(ranks), 1)  # log k = intercept + slope * g, slope < 0
    if not slope < 0:
        return float(min_threshold)
    g_star = (math.log(expected_false_marks) - intercept) / slope
    return float(min(max(_sigmoid(g_star), min_threshold), max_threshold))


class FalseAlarmControl:
    """Final mask of a map at ``expected_false_marks`` expected false marks per image.

    Args:
        expected_false_marks: the operating point: false marks expected on a normal image.
        candidate_threshold: the map's low threshold that forms candidate marks (and the extent
            of a kept mark).
        fit_ranks: ranks of the null-tail fit (see :func:`null_tail_threshold`).
        min_threshold: floor of the per-image threshold.
        max_threshold: ceiling of the per-image threshold.
        connectivity: 1 (4-) or 2 (8-connectivity) of the marks.
        cluster_false_marks: optional looser operating point for clustered candidates (see the
            module docstring); ``None`` keeps single marks only.
        cluster_link_mm: linking distance of a cluster in mm.
        cluster_min_count: fewest candidates of a cluster.
        spacing_mm: pixel spacing of the maps in mm (the working grid), for the clusters.
    """

    def __init__(
        self,
        expected_false_marks: float = 10.0,
        candidate_threshold: float = 0.1,
        fit_ranks: Sequence[int] = (30, 300),
        min_threshold: float = 0.5,
        max_threshold: float = 0.999,
        connectivity: int = 2,
        cluster_false_marks: float | None = None,
        cluster_link_mm: float = 5.0,
        cluster_min_count: int = 3,
        spacing_mm: float = 0.07,
    ) -> None:
        if cluster_false_marks is not None and cluster_false_marks < expected_false_marks:
            raise ValueError(f"cluster_false_marks ({cluster_false_marks}) must be >= expected_false_marks ({expected_false_marks})")
        if spacing_mm <= 0:
            raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
        if not 0.0 < candidate_threshold < 1.0:
            raise ValueError(f"candidate_threshold must lie in (0, 1), got {candidate_threshold}")
        if not candidate_threshold <= min_threshold <= max_threshold:
            raise ValueError(
                f"need candidate_threshold <= min_threshold <= max_threshold, got {candidate_threshold}, "
                f"{min_threshold}, {max_threshold}"
            )
        self.expected_false_marks = float(expected_false_marks)
        self.candidate_threshold = float(candidate_threshold)
        self.fit_ranks = (int(fit_ranks[0]), int(fit_ranks[1]))
        self.min_threshold = float(min_threshold)
        self.max_threshold = float(max_threshold)
        self.connectivity = int(connectivity)
        self.cluster_false_marks = None if cluster_false_marks is None else float(cluster_false_marks)
        self.cluster_link_mm = float(cluster_link_mm)
        self.cluster_min_count = int(cluster_min_count)
        self.spacing_mm = float(spacing_mm)
        null_tail_threshold([], 1.0, self.fit_ranks)  # validates fit_ranks early

    def select(
        self, labels: np.ndarray | None, scores: np.ndarray, centres: np.ndarray | None = None
    ) -> tuple[np.ndarray, float, float]:
        """Which candidates to keep (see :func:`candidate_scores` for ``labels`` and ``scores``).

        Args:
            labels: (H, W) candidate labels 1..n (only read for the candidates' centres when
                ``centres`` is None).
            scores: (n,) candidate peak scores.
            centres: optional (n, 2) candidate centres (row, col) in pixels.

        Returns:
            ``(keep, threshold, cluster_threshold)``: (n,) bool, the image's threshold and the
            looser one of clustered candidates (NaN without ``cluster_false_marks``).
        """
        t = null_tail_threshold(scores, self.expected_false_marks, self.fit_ranks, self.min_threshold, self.max_threshold)
        keep = scores >= t
        t_cl = float("nan")
        if self.cluster_false_marks is not None and scores.size:
            t_cl = null_tail_threshold(scores, self.cluster_false_marks, self.fit_ranks, self.min_threshold, self.max_threshold)
            loose = np.flatnonzero((scores >= t_cl) & ~keep)
            if loose.size:
                pool = np.flatnonzero(scores >= t_cl)
                if centres is None:
                    if labels is None:
                        raise ValueError("select: give labels or centres")
                    centres = label_centroids(labels, scores.size)[0]
                cents = np.asarray(centres)[pool] * self.spacing_mm
                ids, _ = find_clusters(cents, self.cluster_link_mm, self.cluster_min_count)
                keep[pool[ids >= 0]] = True
        return keep, t, t_cl

    def __call__(self, prob: Any, breast: Any | None = None) -> dict[str, Any]:
        """Mask and operating point of one image.

        The candidates are labelled sparsely (:func:`bundle.clusters.pixel_components` on the
        pixels at or above ``candidate_threshold``), so the cost follows the number of candidate
        pixels, not the image size; the result equals labelling the whole map
        (:func:`candidate_scores`).

        Args:
            prob: (H, W) map in [0, 1] (SegAI or refined probability).
            breast: optional (H, W) breast mask; marks are kept inside it only.

        Returns:
            dict with ``mask`` (H, W) bool, ``indices`` (the mask's flat indices, sorted),
            ``threshold`` (this image's), ``cluster_threshold`` (NaN without clusters),
            ``n_candidates`` and ``n_marks``.
        """
        p = np.asarray(prob, dtype=np.float32)
        idx, comp, scores = candidate_pixels(p, self.candidate_threshold, breast, self.connectivity)
        n = scores.size
        centres = component_centroids(*np.divmod(idx, p.shape[-1]), comp, n)[0]
        keep, t, t_cl = self.select(None, scores, centres)
        kept = idx[keep[comp]] if n else idx
        mask = np.zeros(p.shape, dtype=bool)
        mask.ravel()[kept] = True
        return {"mask": mask, "indices": kept, "threshold": t, "cluster_threshold": t_cl, "n_candidates": int(n),
                "n_marks": int(keep.sum())}
