"""Study-level evaluation of microcalcification (MC) methods: objects, patients, clusters, statistics.

One :class:`MCStudy` run (``configs/evaluate_study.json``) takes a labelled data set, runs SegAI once
per case, applies every chosen refinement method (``bundle.refine``) to that SegAI map and computes,
case by case (streaming: whole-image arrays are dropped once a case's numbers are computed):

- pixel metrics (seed Table 1: sensitivity, PPV, Dice, activation rate, true activation rate);
- truth MC objects (connected components) with size (pixels, mm^2), interior density (mean raw
  value inside) and exterior density (mean raw value of a ring around it), and the highest
  probability inside each object (an object is detected at threshold ``t`` when that value is
  ``>= t``, i.e. when a predicted-positive pixel falls inside it);
- image (patient) level detection by object size and density (seed Fig. 6, Table 3) and image
  level specificity on images without MCs;
- MC clusters (single linkage of MC centroids, at least ``min_count`` MCs) for truth and prediction,
  and the cluster FROC swept over the probability threshold;
- the reader-facing detection metrics of :mod:`bundle.metrics`: false marks and false-positive
  clusters per image (also on the images without MCs alone), object IoU, and the object TPR at given
  false marks per cm^2 of breast from the same sweep;
- per-case panels like the seed's Figure A2.

It then writes Tables 1-3, the FROC summary, paired Wilcoxon tests and bootstrap confidence
intervals to markdown, CSV, PNG and HTML files and to one MLflow experiment (one run per method
plus a summary run). See ``docs/study.md``.

This module holds :class:`MCStudy` (the run over cases and methods) and
:func:`build_study_refiners`, and re-exports the study's other pieces under the names configs,
scripts and tests use (``bundle.study.X``):

- :mod:`bundle.study_settings`: :class:`StudySettings`, :func:`method_label`, :func:`method_needs`,
  the table layout constants;
- :mod:`bundle.study_analysis`: :func:`truth_objects`, :func:`case_statistics` and the study-level
  tables (``summarise_study``);
- :mod:`bundle.objects`, :mod:`bundle.clusters`, :mod:`bundle.statistics`: the pure functions
  (:func:`predicted_objects`, :func:`find_clusters`, :func:`image_detection`, :func:`froc_curve`,
  :func:`paired_wilcoxon`, :func:`bootstrap_ci`, ...), which work on numpy arrays and are tested
  on hand-built cases;
- :mod:`bundle.figures`: :func:`case_panel`, :func:`plot_curves`, :func:`plot_froc`;
- :mod:`bundle.study_report`: the markdown/HTML/CSV outputs, :func:`replace_marked_section`,
  :func:`invocation_command`;
- :mod:`bundle.study_tracking`: the MLflow runs of a study.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.clusters import find_clusters, single_linkage_groups
from bundle.figures import case_panel, plot_curves, plot_froc
from bundle.objects import (  # noqa: F401  (re-exported: the study's public functions)
    _mask,
    _np2d,
    _spacing,
    cluster_counts,
    froc_curve,
    froc_summary,
    image_detection,
    object_max_prob,
    predicted_objects,
    resolve_density_threshold,
)
from bundle.statistics import bootstrap_ci, bootstrap_indices, format_ci, format_p, paired_wilcoxon
from bundle.study_analysis import case_statistics, summarise_study, truth_objects
from bundle.study_report import (
    invocation_command,
    replace_marked_section,
    study_html,
    study_markdown,
    write_study_outputs,
)
from bundle.study_settings import (  # noqa: F401  (re-exported: configs and scripts name them here)
    DETECTION_COLUMNS,
    FILTERS,
    SECTION_MARK,
    TABLE1_METRICS,
    TABLE4_HEADERS,
    TABLE4_METRICS,
    TABLE4_PAIRS,
    TESTED_METRICS,
    StudySettings,
    _registry,
    method_label,
    method_needs,
)
from bundle.study_tracking import log_study_mlflow

__all__ = [
    "StudySettings",
    "method_needs",
    "method_label",
    "truth_objects",
    "object_max_prob",
    "predicted_objects",
    "single_linkage_groups",
    "find_clusters",
    "cluster_counts",
    "case_statistics",
    "resolve_density_threshold",
    "image_detection",
    "froc_curve",
    "froc_summary",
    "paired_wilcoxon",
    "bootstrap_indices",
    "bootstrap_ci",
    "format_ci",
    "format_p",
    "replace_marked_section",
    "invocation_command",
    "case_panel",
    "plot_curves",
    "plot_froc",
    "build_study_refiners",
    "MCStudy",
]

logger = logging.getLogger("mcref.study")

NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
def build_study_refiners(
    methods: Sequence[str],
    segai_available: bool,
    segai_reason: str,
    inpainter: torch.nn.Module | None,
    inpainter_reason: str,
    refiner_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    extra_refiners: Mapping[str, Callable[..., dict]] | None = None,
    needs: Mapping[str, Sequence[str]] | None = None,
) -> tuple[dict[str, Callable[..., dict]], dict[str, str]]:
    """Instantiate the study's methods, or give the reason each one is skipped.

    Args:
        methods: method names (``bundle.refine.REFINERS`` or ``extra_refiners``).
        segai_available: SegAI weights loaded.
        segai_reason: why not, when not.
        inpainter: the loaded inpainting network, or None.
        inpainter_reason: why there is none.
        refiner_kwargs: per-method keyword arguments of ``build_refiner``.
        extra_refiners: ready refiners by name (tests, new methods); they need SegAI unless
            ``needs`` says otherwise.
        needs: per-method requirements overriding the registered ones (:func:`method_needs`).

    Returns:
        ``(refiners, skipped)``: name -> refiner, and name -> reason.
    """
    REFINERS, build_refiner = _registry().REFINERS, _registry().build_refiner

    req = {k: tuple(v) for k, v in (needs or {}).items()}
    kwargs_all = refiner_kwargs or {}
    extra = dict(extra_refiners or {})
    refiners: dict[str, Callable[..., dict]] = {}
    skipped: dict[str, str] = {}
    for name in methods:
        if name in refiners or name in skipped:
            continue
        if name not in REFINERS and name not in extra:
            skipped[name] = f"unknown method (known: {sorted(set(REFINERS) | set(extra))})"
            continue
        need = req.get(name, method_needs(name))
        if "segai" in need and not segai_available:
            skipped[name] = f"needs SegAI weights: {segai_reason}"
            continue
        if "inpainter" in need and inpainter is None:
            skipped[name] = f"needs inpainter weights: {inpainter_reason}"
            continue
        try:
            if name in extra:
                refiners[name] = extra[name]
            else:
                kw = dict(kwargs_all.get(name, {}))
                if "inpainter" in need:
                    kw.setdefault("net", inpainter)
                refiners[name] = build_refiner(name, **kw)
        except Exception as e:  # a bad method config skips the method, never the study
            skipped[name] = f"could not be built: {type(e).__name__}: {e}"
    return refiners, skipped


def _load_weights(
    network: torch.nn.Module | None, path: str | os.PathLike | None, device: Any, what: str
) -> tuple[torch.nn.Module | None, str]:
    from bundle.networks import load_checkpoint

    if network is None:
        return None, f"no {what} network configured"
    if not path:
        return None, f"no {what} checkpoint path given"
    try:
        return load_checkpoint(network, path, device), ""
    except (FileNotFoundError, RuntimeError, OSError, ValueError, KeyError) as e:
        return None, str(e)


# ----------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------
def _case_name(item: Mapping[str, Any]) -> str:
    src = item.get("image")
    name = Path(str(src)).name if src is not None else "case"
    for ext in (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".tiff", ".tif", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _meta(x: Any) -> dict[str, Any]:
    return dict(getattr(x, "meta", {}) or {})


class MCStudy:
    """Runs the whole study (see the module docstring and ``docs/study.md``).

    Args:
        datalists: datalist JSON path(s) (MONAI decathlon style; empty strings are skipped). Entries
            need ``image`` and ``label`` (``"label": null`` = image without MCs).
        output_dir: where everything is written.
        preprocessing: callable mapping ``{"image": path, "label": path|None}`` to the dict with
            ``image`` (normalised, (1, H, W)), ``label``, ``breast`` and ``image_raw`` (the image before
            normalisation; recovered from the ``norm_lower``/``norm_upper`` meta data when absent).
        network: the SegAI network (architecture only; weights come from ``ckpt_path``).
        ckpt_path: SegAI weights.
        inferer: SegAI inferer called ``inferer(x, network, breast=b)`` (e.g. ``BreastTileInferer``).
        methods: methods to evaluate (names of ``bundle.refine.REFINERS``).
        inpainter: the inpainting network (architecture only), or None.
        inpainter_ckpt_path: inpainter weights.
        refiner_kwargs: per-method keyword arguments of ``bundle.refine.build_refiner``.
        settings: :class:`StudySettings` or a dict of its fields.
        reference_method: the method the paired tests compare against (Table 1).
        table2_methods: the two methods of Table 2 (with / without the SegAI mask).
        datalist_key: datalist section.
        device: torch device.
        experiment_name: MLflow experiment (one per study series; one run per method and a summary run).
        tracking_uri: MLflow URI; None: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir>/mlruns.db``.
        log_mlflow: log to MLflow.
        results_md: markdown file of the results (default ``<output_dir>/results.md``).
        results_doc: optional markdown file (e.g. ``docs/results.md``) whose marked section
            ``results_section`` is written or replaced.
        results_section: name of that section.
        command: the command to print in the results (default: this process's command line).
        config: the merged configuration, logged as ``config.json`` to the summary run.
        dataset_note: one line describing the data set in the report.
        extra_refiners: ready refiners by name (see :func:`build_study_refiners`).
        progress: progress bar over cases.
        weights: further weights files (name -> path) named and hashed in the MLflow run identity
            (the SegAI and inpainter checkpoints always are).
        dataset_name: data set name in the MLflow runs (default: the folder of the first datalist).
    """

    def __init__(
        self,
        datalists: str | Sequence[str],
        output_dir: str | os.PathLike,
        preprocessing: Callable[[dict], dict],
        network: torch.nn.Module | None,
        ckpt_path: str | os.PathLike | None,
        inferer: Callable[..., torch.Tensor],
        methods: Sequence[str] = ("segai", "segai+sp1", "segai+sp2", "segai+classical", "segai+genai", "grid_genai"),
        inpainter: torch.nn.Module | None = None,
        inpainter_ckpt_path: str | os.PathLike | None = None,
        refiner_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        settings: StudySettings | Mapping[str, Any] | None = None,
        reference_method: str = "segai+genai",
        table2_methods: Sequence[str] = ("segai+genai", "grid_genai"),
        datalist_key: str = "test",
        device: str | torch.device = "cpu",
        experiment_name: str = "mcref_study",
        tracking_uri: str | None = None,
        log_mlflow: bool = True,
        results_md: str | os.PathLike | None = None,
        results_doc: str | os.PathLike | None = None,
        results_section: str = "study",
        command: str | None = None,
        config: Mapping[str, Any] | None = None,
        dataset_note: str = "",
        extra_refiners: Mapping[str, Callable[..., dict]] | None = None,
        progress: bool = True,
        weights: Mapping[str, str | os.PathLike | None] | None = None,
        dataset_name: str | None = None,
    ) -> None:
        self.datalists = [datalists] if isinstance(datalists, (str, os.PathLike)) else list(datalists or [])
        self.output_dir = Path(output_dir)
        self.preprocessing = preprocessing
        self.network = network
        self.ckpt_path = ckpt_path
        self.inferer = inferer
        self.methods = list(methods)
        self.inpainter = inpainter
        self.inpainter_ckpt_path = inpainter_ckpt_path
        self.refiner_kwargs = dict(refiner_kwargs or {})
        self.settings = StudySettings.from_any(settings)
        self.reference_method = reference_method
        self.table2_methods = list(table2_methods)
        self.datalist_key = datalist_key
        self.device = torch.device(device)
        self.experiment_name = experiment_name
        self.tracking_uri = tracking_uri
        self.log_mlflow = log_mlflow
        self.results_md = Path(results_md) if results_md else self.output_dir / "results.md"
        self.results_doc = Path(results_doc) if results_doc else None
        self.results_section = results_section
        self.command = command
        self.config = dict(config) if config is not None else None
        self.dataset_note = dataset_note
        self.extra_refiners = dict(extra_refiners or {})
        self.progress = progress
        self.weights = dict(weights or {})
        self.dataset_name = dataset_name
        self.result: dict[str, Any] = {}

    # ------------------------------------------------------------------ inputs
    def load_items(self) -> list[dict[str, Any]]:
        """The datalist entries of all datalists, with unique ``case`` names."""
        from bundle.data import load_datalist

        items: list[dict[str, Any]] = []
        seen: dict[str, int] = {}
        for dl in self.datalists:
            if not dl:
                continue
            entries = load_datalist(dl, section=self.datalist_key)
            for e in entries:
                d = dict(e)
                name = str(d.get("case") or _case_name(d))
                if name in seen:  # e.g. case_000 in two phantom folders: prefix the folder name
                    name = f"{Path(str(dl)).parent.name}_{name}"
                base, k = name, 0
                while name in seen:
                    k += 1
                    name = f"{base}_{k}"
                seen[name] = 0
                d["case"] = name
                d["_datalist"] = str(dl)
                items.append(d)
        return items

    def _prepare_case(self, item: Mapping[str, Any]) -> dict[str, Any]:
        if "label" not in item:
            raise ValueError(f"{item.get('image')}: datalist entry has no 'label' (use null for images without MCs)")
        d = self.preprocessing({"image": item["image"], "label": item["label"]})
        img_t = d["image"]
        meta = _meta(img_t)
        image = _np2d(img_t, "image", np.float32)
        if "image_raw" in d and d["image_raw"] is not None:
            raw = _np2d(d["image_raw"], "image_raw", np.float32)
        elif "norm_lower" in meta and "norm_upper" in meta:
            raw = image * np.float32(meta["norm_upper"] - meta["norm_lower"]) + np.float32(meta["norm_lower"])
        else:
            raw = image
            logger.warning("%s: no image_raw and no normalisation meta data; densities use the normalised image", item["case"])
        truth = _mask(d["label"], "label") if d.get("label") is not None else np.zeros(image.shape, bool)
        breast = _mask(d["breast"], "breast") if d.get("breast") is not None else np.ones(image.shape, bool)
        if truth.shape != image.shape or breast.shape != image.shape or raw.shape != image.shape:
            raise ValueError(f"shapes differ: image {image.shape}, label {truth.shape}, breast {breast.shape}, raw {raw.shape}")
        sp = meta.get("working_spacing")
        spacing = (float(sp), float(sp)) if sp else _spacing(meta.get("spacing", (0.07, 0.07)))
        return {"image": image, "raw": raw, "truth": truth, "breast": breast, "spacing": spacing}

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Run the study: every case, every method, then tables, curves, files and MLflow.

        Returns:
            the result dictionary (also ``self.result``): ``methods``, ``skipped``, ``cases``,
            ``failed``, ``tables``, ``files``, ``mlflow_runs``, ``markdown``.
        """
        s = self.settings
        t_start = time.time()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        items = self.load_items()
        logger.info("study: %d cases from %s", len(items), [str(x) for x in self.datalists if x])

        seg_net, seg_reason = _load_weights(self.network, self.ckpt_path, self.device, "SegAI")
        if seg_net is not None:  # as inference runs it: batch norms folded, channels-last
            from bundle.networks import prepare_for_inference

            prepare_for_inference(seg_net)
        needs_inp = any("inpainter" in method_needs(m) for m in self.methods)
        inp_net, inp_reason = (None, "not needed")
        if needs_inp:
            inp_net, inp_reason = _load_weights(self.inpainter, self.inpainter_ckpt_path, self.device, "inpainter")
        self.network = seg_net if seg_net is not None else self.network
        refiners, skipped = build_study_refiners(
            self.methods, seg_net is not None, seg_reason, inp_net, inp_reason, self.refiner_kwargs, self.extra_refiners
        )
        for m, why in skipped.items():
            logger.warning("method %s skipped: %s", m, why)
        methods = [m for m in self.methods if m in refiners]
        run_segai = seg_net is not None and any("segai" in method_needs(m) for m in methods)
        from bundle.pipeline import MCPipeline

        pipe = MCPipeline(seg_net, self.inferer, device=self.device)  # the one two-stage pipeline

        cases: list[dict[str, Any]] = []  # one per successfully prepared case
        failed: list[dict[str, str]] = []
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        objects: list[dict[str, Any]] = []
        maxprob: dict[str, list[float]] = {m: [] for m in methods}
        froc: dict[str, dict[str, list[Any]]] = {m: {"detected": [], "fp": [], "case": [], "curves": []} for m in methods}
        grids = {m: s.froc_grid(m) for m in methods}
        panels: dict[str, dict[str, str]] = {m: {} for m in methods}

        iterator: Any = items
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(items, desc="study cases", unit="case")
        for item in iterator:
            name = item["case"]
            t0 = time.perf_counter()
            try:
                c = self._prepare_case(item)
                seg = pipe.segai(c["image"], c["breast"]) if run_segai else None
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                logger.error("case %s failed: %s", name, msg)
                failed.append({"case": name, "method": "(all)", "error": msg})
                continue
            t_seg = time.perf_counter() - t0
            ci = len(cases)
            labels, objs = truth_objects(c["truth"], c["spacing"], c["raw"], s.ring_px, s.connectivity)
            row_mm, col_mm = c["spacing"]
            cents = np.array([[o["centroid_row"] * row_mm, o["centroid_col"] * col_mm] for o in objs]).reshape(-1, 2)
            tcid, n_tc = find_clusters(cents, s.cluster_link_mm, s.cluster_min_count)
            n_incl = sum(o["size_px"] >= s.min_object_px for o in objs)
            cases.append(
                {"case": name, "index": ci, "has_mcs": n_incl > 0, "n_objects": len(objs), "n_clusters": int(n_tc),
                 "height": c["image"].shape[0], "width": c["image"].shape[1], "spacing_mm": row_mm,
                 "segai_seconds": round(t_seg, 3), "datalist": item.get("_datalist", "")}
            )
            for o, cid in zip(objs, tcid):
                objects.append({"case": name, "case_index": ci, **o, "cluster_id": int(cid)})
            for m in methods:
                t1 = time.perf_counter()
                try:
                    out = pipe.refine(c["image"], seg, c["breast"], refiner=refiners[m], threshold=s.threshold_for(m))
                    prob = out["refined_prob"]
                    st = case_statistics(prob, c["truth"], c["breast"], c["spacing"], s, m, labels, objs, tcid, n_tc)
                except Exception as e:
                    msg = f"{type(e).__name__}: {e}"
                    logger.error("case %s, method %s failed: %s", name, m, msg)
                    failed.append({"case": name, "method": m, "error": msg})
                    maxprob[m].extend([NAN] * len(objs))
                    continue
                row = {"case": name, **st["row"], "seconds": round(time.perf_counter() - t1, 3)}
                rows[m].append(row)
                maxprob[m].extend(st["max_prob"].tolist())
                froc[m]["detected"].append(st["froc"]["detected"])
                froc[m]["fp"].append(st["froc"]["fp"])
                froc[m]["case"].append(ci)
                froc[m]["curves"].append(st["curve"])
                if len(panels[m]) < s.max_panels:
                    ppath = self.output_dir / m / "panels" / f"{name}.png"
                    try:
                        det = st["max_prob"] >= s.threshold_for(m)
                        case_panel(
                            ppath, c["image"], prob, prob >= s.threshold_for(m), c["truth"], objs, det,
                            out.get("virtual_normal"), c["breast"],
                            title=f"{name} - {method_label(m)} (threshold {s.threshold_for(m):g})",
                            max_side=s.panel_max_side, zoom_px=s.zoom_px,
                        )
                        panels[m][name] = str(ppath)
                    except Exception as e:  # a picture never stops the study
                        logger.warning("panel of %s / %s failed: %s", name, m, e)
                del out, prob
            del c, seg, labels

        self.result = summarise_study(
            s, self.reference_method, self.table2_methods, methods, skipped, cases, failed, rows, objects, maxprob,
            froc, grids, panels, seg_reason, inp_reason,
        )
        self.result["seconds"] = round(time.time() - t_start, 1)
        self._write_outputs()
        return self.result

    # ------------------------------------------------------------------ outputs
    def _write_outputs(self) -> None:
        """Write the files and MLflow runs of ``self.result`` (:func:`bundle.study_report.write_study_outputs`)."""
        write_study_outputs(self)

    def _command(self) -> str:
        return self.command if self.command else invocation_command()

    def markdown(self) -> str:
        """The results as markdown (the tables, the curves as linked PNGs, failures, the command)."""
        return study_markdown(self)

    def html(self, html_path: Path) -> str:
        """A self-contained HTML report: tables, embedded curve PNGs, links to the per-case panels.

        Args:
            html_path: where the report will be written (panel links are relative to it).
        """
        return study_html(self, html_path)

    def _log_mlflow(self) -> dict[str, str]:
        """One parent MLflow run for the study and one child run per method
        (:func:`bundle.study_tracking.log_study_mlflow`)."""
        return log_study_mlflow(self)
