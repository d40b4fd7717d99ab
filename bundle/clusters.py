"""Marks and clusters on a binary map: the geometry shared by inference (``clusters.csv``) and evaluation.

An MC *mark* is a connected component of a predicted mask; a *cluster* is a single-linkage
group of mark centres (default link 5 mm) with at least ``min_count`` (default 3) members, the
clinical definition (>= 3 MCs within about 1 cm^2). scipy has single linkage
(``scipy.cluster.hierarchy``) but it needs the O(n^2) condensed distance matrix, which a map with
tens of thousands of marks does not fit in; the Delaunay route below is exact and O(n log n).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import Delaunay, QhullError, cKDTree

__all__ = [
    "single_linkage_groups",
    "find_clusters",
    "pixel_components",
    "dilate_indices",
    "component_centroids",
    "label_maxima",
    "label_centroids",
    "drop_large_marks",
    "grow_marks",
    "mark_table",
    "cluster_table",
]


def _pairs_within(points: np.ndarray, radius: float) -> np.ndarray:
    return cKDTree(points).query_pairs(r=radius, output_type="ndarray").reshape(-1, 2)


def single_linkage_groups(points: np.ndarray, link_distance: float) -> np.ndarray:
    """Single-linkage grouping: points closer than ``link_distance`` (inclusive) share a group.

    Exact and O(n log n): the Euclidean minimum spanning tree lies in the Delaunay triangulation, so
    the components of the Delaunay edges no longer than ``link_distance`` are the single-linkage
    groups. Degenerate inputs (fewer than 4 points, collinear points) use a k-d tree pair search.

    Args:
        points: (n, 2) coordinates.
        link_distance: largest linking distance (same unit as ``points``).

    Returns:
        (n,) int group ids 0..g-1.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    n = len(pts)
    if n == 0:
        return np.zeros(0, dtype=int)
    uniq, inverse = np.unique(pts, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    m = len(uniq)
    edges: np.ndarray | None = None
    if m >= 4:
        try:
            tri = Delaunay(uniq)
            if np.unique(tri.simplices).size == m:
                s = tri.simplices
                e = np.concatenate([s[:, [0, 1]], s[:, [1, 2]], s[:, [0, 2]]])
                e = np.unique(np.sort(e, axis=1), axis=0)
                d = np.linalg.norm(uniq[e[:, 0]] - uniq[e[:, 1]], axis=1)
                edges = e[d <= link_distance * (1.0 + 1e-9)]
        except (QhullError, ValueError):
            edges = None
    if edges is None:
        edges = _pairs_within(uniq, link_distance * (1.0 + 1e-9))
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(m, m))
    _, comp = connected_components(graph, directed=False)
    return comp[inverse].astype(int)


def find_clusters(points_mm: np.ndarray, link_mm: float, min_count: int = 3) -> tuple[np.ndarray, int]:
    """MC clusters: single-linkage groups (``link_mm``) with at least ``min_count`` members.

    Args:
        points_mm: (n, 2) MC centroids in mm.
        link_mm: linking distance in mm.
        min_count: smallest cluster.

    Returns:
        ``(cluster_ids, n_clusters)``: (n,) ids 0..n_clusters-1, -1 for MCs in no cluster; clusters are
        numbered in order of their first member.
    """
    groups = single_linkage_groups(points_mm, link_mm)
    ids = np.full(len(groups), -1, dtype=int)
    if len(groups) == 0:
        return ids, 0
    counts = np.bincount(groups)
    order: dict[int, int] = {}
    for i, g in enumerate(groups):
        if counts[g] >= min_count:
            ids[i] = order.setdefault(int(g), len(order))
    return ids, len(order)


def pixel_components(idx: np.ndarray, shape: tuple[int, int], connectivity: int = 2) -> tuple[np.ndarray, int]:
    """Connected components of the pixels at flat indices ``idx`` of an ``(H, W)`` grid.

    The sparse twin of ``scipy.ndimage.label``: the pixels are the nodes of a graph whose edges
    join grid neighbours (found by binary search in ``idx``), and
    ``scipy.sparse.csgraph.connected_components`` labels it. Cost follows the number of pixels,
    not the image size, which is what the refinement needs on a full-field view where SegAI
    marks a few thousand pixels out of ten million. Components are numbered like
    ``ndimage.label`` numbers them (raster order of their first pixel), less one.

    Args:
        idx: sorted, unique flat indices (as :func:`numpy.flatnonzero` gives them).
        shape: the grid ``(H, W)``.
        connectivity: 1 (4-) or 2 (8-connectivity).

    Returns:
        ``(component, n)``: (len(idx),) int component ids 0..n-1 and their number.
    """
    idx = np.asarray(idx, dtype=np.int64).ravel()
    n = idx.size
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    if n > 1 and not bool(np.all(idx[1:] > idx[:-1])):
        raise ValueError("pixel_components: idx must be sorted and unique (np.flatnonzero order)")
    h, w = int(shape[0]), int(shape[1])
    rows, cols = np.divmod(idx, w)
    steps = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 2 else [])
    src, dst = [], []
    for dr, dc in steps:  # each edge once: towards the right and the rows below
        rr, cc = rows + dr, cols + dc
        inside = np.flatnonzero((rr < h) & (cc >= 0) & (cc < w))
        nb = rr[inside] * w + cc[inside]
        pos = np.minimum(np.searchsorted(idx, nb), n - 1)
        hit = idx[pos] == nb
        src.append(inside[hit])
        dst.append(pos[hit])
    s_all, d_all = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(s_all.size, dtype=np.int8), (s_all, d_all)), shape=(n, n))
    k, comp = connected_components(graph, directed=False)
    return comp.astype(np.int64), int(k)


def dilate_indices(idx: np.ndarray, shape: tuple[int, int], radius: int) -> np.ndarray:
    """Flat indices of the binary dilation by ``skimage.morphology.disk(radius)`` of the pixels at ``idx``.

    The sparse twin of ``ndimage.binary_dilation(mask, disk(radius))`` for masks of a few
    thousand pixels on a full-field grid.

    Args:
        idx: flat indices of the pixels (any order).
        shape: the grid ``(H, W)``.
        radius: disk radius in pixels (0: the pixels themselves).

    Returns:
        sorted unique flat indices.
    """
    idx = np.asarray(idx, dtype=np.int64).ravel()
    if radius <= 0 or idx.size == 0:
        return np.unique(idx)
    from skimage.morphology import disk

    h, w = int(shape[0]), int(shape[1])
    rows, cols = np.divmod(idx, w)
    out = []
    for dr, dc in np.argwhere(disk(int(radius)).astype(bool)) - int(radius):
        rr, cc = rows + dr, cols + dc
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        out.append(rr[ok] * w + cc[ok])
    return np.unique(np.concatenate(out))


def label_maxima(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Maximum of ``values`` over each label 1..n.

    ``scipy.ndimage.maximum(values, labels, index)`` gives the same but takes seconds on a
    full-field view with thousands of labels; this scatter over the labelled pixels only takes
    tens of milliseconds.

    Args:
        values: (H, W) values.
        labels: (H, W) int labels, 0 = none.
        n: number of labels.

    Returns:
        (n,) float64 maxima (-inf for a label with no pixel).
    """
    if values.shape != labels.shape:
        raise ValueError(f"values shape {values.shape} differs from labels shape {labels.shape}")
    flat = labels.ravel()
    idx = np.flatnonzero(flat)
    out = np.full(n + 1, -np.inf)
    np.maximum.at(out, flat[idx], np.asarray(values).ravel()[idx].astype(np.float64))
    return out[1:]


def label_centroids(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre (row, col) in pixels and size of each label 1..n.

    ``scipy.ndimage.center_of_mass(labels > 0, labels, index)`` gives the same centres but scans
    the whole image once per statistic (0.6 s on a full-field view); this bins the labelled pixels
    only.

    Args:
        labels: (H, W) int labels, 0 = none.
        n: number of labels.

    Returns:
        ``(centres, sizes)``: (n, 2) float64 centres (NaN for a label with no pixel) and (n,) sizes.
    """
    rows, cols = np.nonzero(labels)
    return component_centroids(rows, cols, labels[rows, cols].astype(np.int64) - 1, n)


def component_centroids(rows: np.ndarray, cols: np.ndarray, comp: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre (row, col) and size of each component 0..n-1 of the pixels ``(rows, cols)``.

    Args:
        rows: (m,) row of each pixel.
        cols: (m,) column of each pixel.
        comp: (m,) component id 0..n-1 of each pixel (as :func:`pixel_components` gives them).
        n: number of components.

    Returns:
        ``(centres, sizes)``: (n, 2) float64 centres (NaN for a component with no pixel) and (n,) sizes.
    """
    sizes = np.bincount(comp, minlength=n)[:n]
    with np.errstate(invalid="ignore", divide="ignore"):
        cr = np.bincount(comp, weights=rows, minlength=n)[:n] / sizes
        cc = np.bincount(comp, weights=cols, minlength=n)[:n] / sizes
    return np.stack([cr, cc], axis=1).reshape(-1, 2), sizes


def drop_large_marks(mask: np.ndarray, max_diameter_mm: float, spacing_mm: float, connectivity: int = 2) -> np.ndarray:
    """``mask`` without the marks larger than a microcalcification.

    A mark (connected component) whose area exceeds that of a disk of ``max_diameter_mm`` is
    removed: calcifications of 1 mm or more are macrocalcifications (vascular, dystrophic), and on
    real FFDM such large marks are mostly tissue edges, vessels and markers. It is the size
    counterpart of :class:`skimage.morphology.remove_small_objects` (which keeps only objects
    *above* a size); the marks are labelled sparsely (:func:`pixel_components`), as they are few.

    Args:
        mask: (H, W) binary mask.
        max_diameter_mm: largest equivalent-disk diameter kept, in mm.
        spacing_mm: pixel spacing of ``mask`` in mm.
        connectivity: 1 (4-) or 2 (8-connectivity) of the marks.

    Returns:
        (H, W) bool mask.
    """
    if max_diameter_mm <= 0 or spacing_mm <= 0:
        raise ValueError(f"max_diameter_mm and spacing_mm must be > 0, got {max_diameter_mm}, {spacing_mm}")
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    idx = np.flatnonzero(m)
    out = np.zeros(m.shape, dtype=bool)
    if idx.size == 0:
        return out
    comp, n = pixel_components(idx, m.shape, connectivity)
    max_px = np.pi * (0.5 * max_diameter_mm / spacing_mm) ** 2
    keep = np.bincount(comp, minlength=n) <= max_px
    out.ravel()[idx[keep[comp]]] = True
    return out


def grow_marks(seeds: np.ndarray, support: np.ndarray, connectivity: int = 2) -> np.ndarray:
    """The connected parts of ``support`` that hold a seed pixel, plus the seeds (hysteresis).

    The refined mask keeps each MC's bright core (refined map >= the operating point); its rim,
    where the difference to the virtual normal is weaker, is below it. Growing every kept mark into
    the connected pixels of a looser support (e.g. refined map >= a lower threshold) restores the
    rim without adding a mark: a support component without a seed is not kept. This is
    ``skimage.filters.apply_hysteresis_threshold`` on two given masks, labelled sparsely
    (:func:`pixel_components`) because both masks hold a few thousand pixels of a full-field view.

    Args:
        seeds: (H, W) binary mask of the marks (e.g. the refined mask).
        support: (H, W) binary mask the marks may grow into.
        connectivity: 1 (4-) or 2 (8-connectivity).

    Returns:
        (H, W) bool mask: ``seeds`` or'ed with every ``support`` component touching a seed.
    """
    s, g = np.asarray(seeds), np.asarray(support)
    if s.ndim != 2 or s.shape != g.shape:
        raise ValueError(f"seeds and support must be 2-D masks of one shape, got {s.shape} and {g.shape}")
    sidx = np.flatnonzero(s)
    out = np.zeros(s.shape, dtype=bool)
    if sidx.size == 0:
        return out
    idx = np.union1d(np.flatnonzero(g), sidx)
    comp, n = pixel_components(idx, s.shape, connectivity)
    seeded = np.zeros(n, dtype=bool)
    seeded[comp[np.searchsorted(idx, sidx)]] = True
    out.ravel()[idx[seeded[comp]]] = True
    return out


def _diameter(points: np.ndarray) -> float:
    """Largest distance between two points (on the convex hull's vertices when there are many)."""
    if len(points) < 2:
        return 0.0
    if len(points) > 64:
        from scipy.spatial import ConvexHull

        try:
            points = points[ConvexHull(points).vertices]
        except (QhullError, ValueError):  # collinear: the extremes along the first axis of spread
            pass
    if len(points) > 2000:
        axis = np.argmax(np.ptp(points, axis=0))
        points = points[[np.argmin(points[:, axis]), np.argmax(points[:, axis])]]
    return float(np.max(np.linalg.norm(points[:, None] - points[None], axis=-1)))


def mark_table(
    mask: Any,
    score: Any | None = None,
    spacing_mm: float | Sequence[float] = 1.0,
    connectivity: int = 2,
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Connected components (marks) of a binary map with their centre, size and score.

    Args:
        mask: (H, W) binary map (non-zero = marked).
        score: optional (H, W) map; each mark gets its maximum (``max_score``), NaN without it.
        spacing_mm: pixel spacing, a float or (row, col) pair.
        connectivity: 1 (4-) or 2 (8-connectivity).

    Returns:
        ``(labels, marks)``: (H, W) int32 labels 1..n and one dict per mark with ``row``, ``col``
        (centre in pixels), ``size_px`` and ``max_score``.
    """
    m = np.asarray(mask) > 0
    if m.ndim != 2:
        raise ValueError(f"mark_table expects a 2-D mask, got shape {m.shape}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 1 else 2)
    labels, n = ndimage.label(m, structure=structure)
    if n == 0:
        return labels.astype(np.int32), []
    centres, sizes = label_centroids(labels, n)
    cr, cc = centres[:, 0], centres[:, 1]
    if score is not None:
        s = np.asarray(score)
        if s.shape != m.shape:
            raise ValueError(f"score shape {s.shape} differs from mask shape {m.shape}")
        mx = label_maxima(s, labels, n)
    else:
        mx = np.full(n, np.nan)
    marks = [
        {"row": float(cr[i]), "col": float(cc[i]), "size_px": int(sizes[i]), "max_score": float(mx[i])}
        for i in range(n)
    ]
    return labels.astype(np.int32), marks


def cluster_table(
    marks: Sequence[dict[str, float]],
    spacing_mm: float | Sequence[float],
    link_mm: float = 5.0,
    min_count: int = 3,
) -> list[dict[str, float]]:
    """Clusters of marks (single linkage of their centres), strongest first.

    Args:
        marks: mark dicts from :func:`mark_table`.
        spacing_mm: pixel spacing, a float or (row, col) pair.
        link_mm: linking distance in mm.
        min_count: smallest number of marks in a cluster.

    Returns:
        One dict per cluster: ``cluster``, ``centre_row``, ``centre_col`` (mean of its mark
        centres, pixels), ``n_marks``, ``extent_mm`` (largest distance between two mark centres)
        and ``max_score``; sorted by ``max_score`` then ``n_marks``, descending.
    """
    sp = np.broadcast_to(np.asarray(spacing_mm, dtype=float).reshape(-1), (2,)) if np.size(spacing_mm) in (1, 2) else None
    if sp is None:
        raise ValueError(f"spacing_mm must be a float or a (row, col) pair, got {spacing_mm!r}")
    if not marks:
        return []
    pix = np.array([[m["row"], m["col"]] for m in marks], dtype=float)
    pts = pix * sp[None, :]
    ids, k = find_clusters(pts, link_mm, min_count)
    out = []
    for c in range(k):
        sel = ids == c
        p = pts[sel]
        extent = _diameter(p)
        scores = np.array([marks[i]["max_score"] for i in np.flatnonzero(sel)], dtype=float)
        out.append({
            "centre_row": float(pix[sel, 0].mean()), "centre_col": float(pix[sel, 1].mean()),
            "n_marks": int(sel.sum()), "extent_mm": extent,
            "max_score": float(np.nanmax(scores)) if np.isfinite(scores).any() else float("nan"),
        })
    out.sort(key=lambda r: (-(r["max_score"] if np.isfinite(r["max_score"]) else -np.inf), -r["n_marks"]))
    for i, r in enumerate(out):
        r["cluster"] = i + 1
    return [{"cluster": r["cluster"], **{k: v for k, v in r.items() if k != "cluster"}} for r in out]
