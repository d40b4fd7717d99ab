"""Batch inference runner used by ``configs/inference.json``.

It walks the input folder (or a datalist), runs the preprocessing chain, the inferer and the
optional refinement on each case, writes the output contract of ``docs/architecture.md``
atomically and keeps going when one case fails; every failure lands in ``summary.csv`` and
the log. The bookkeeping around the cases (argument checks, warnings of a case, finished cases,
the run record, the command line's merged config) is in :mod:`bundle.runner_support`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.cli import check_command_line
from bundle.networks import load_checkpoint  # noqa: F401  (re-exported for configs and scripts)
from bundle.runner_support import (
    QUIET_WARNINGS,
    case_finished,
    check_arguments,
    input_problem,
    invocation_config,
    warning_texts,
    write_run_record,
)
from bundle.utils import bundle_version  # noqa: F401  (re-exported)

__all__ = [
    "MammogramInference",
    "CLUSTER_COLUMNS",
    "check_command_line",
    "ensure_demo_data",
    "load_checkpoint",
    "bundle_version",
    "invocation_config",
]

logger = logging.getLogger("mcref.inference")


def ensure_demo_data(folder: str | os.PathLike, n_cases: int = 3, seed: int = 2024, shape: Sequence[int] = (1280, 1024)) -> str:
    """Write a handful of seeded demo phantom DICOMs (with labels) into ``folder`` unless present.

    Args:
        folder: destination folder.
        n_cases: number of phantom cases.
        seed: random seed of the phantom generator.
        shape: (rows, columns) of each phantom.

    Returns:
        The folder path as a string.
    """
    from bundle.phantom import make_dataset

    folder = Path(folder)
    if not (folder / "datalist.json").exists():
        logger.info("no dataset_dir given: writing %d demo phantom cases to %s", n_cases, folder)
        make_dataset(folder, n_cases=n_cases, seed=seed, shape=tuple(shape), splits=(0, 0, n_cases), progress=False)
    return str(folder)


CLUSTER_COLUMNS = ("cluster", "centre_row", "centre_col", "n_marks", "extent_mm", "max_score")
"""Columns of ``<stem>_clusters.csv`` (centres in pixels of the input's pixel array)."""


class MammogramInference:
    """Run SegAI (and optionally a refinement) on every image of a folder, case by case.

    Args:
        dataset_dir: folder of mammograms (DICOM, PNG/TIFF, NIfTI, MHA); label files named
            ``*_label.*`` and ``datalist.json`` are ignored. Empty or None: demo phantoms are
            written to ``demo_dir`` and used.
        output_dir: where ``<stem>/<stem>_*.nii.gz`` and ``summary.csv`` go.
        preprocessing: callable taking ``{"image": path}`` and returning the dict with
            ``image`` (1, H, W) and ``breast`` (1, H, W) on the working grid.
        inferer: :class:`bundle.inferers.BreastTileInferer`-like callable.
        network: SegAI network (already holding weights, see :func:`load_checkpoint`).
        postprocessing: callable restoring keys ``prob``/``mask`` (and refined ones) to the
            source grid, e.g. ``bundle.data.RestoreGeometryd``.
        threshold: probability threshold of the SegAI mask.
        refiner: optional callable ``(image (H,W), prob (H,W), breast (H,W)) -> dict`` with
            ``prob`` and optionally ``virtual_normal``; its outputs are written with the
            ``refined_`` prefix.
        refined_threshold: threshold of the refined mask.
        device: torch device for the network.
        demo_dir: where demo phantoms go when no dataset is given.
        save_overlay: write ``<stem>_overlay.png``.
        progress: show a progress bar over cases.
        save_virtual_normal_dicom: for DICOM inputs, also write the virtual normal image as
            ``<stem>_virtual_normal.dcm``, a Secondary Capture with the source's pixel grid,
            spacing, laterality and patient/study identifiers, a new series and SOP instance,
            and a reference to the source (:func:`bundle.dicom.make_map_sc`).
        virtual_normal_range: normalised values ``(lo, hi)`` stored in that DICOM (breast
            percentiles 1 and 99 are 0 and 1); values outside are clipped.
        version: version written into derived UIDs and the DICOM (new version, new UIDs);
            ``configs/inference.json`` passes ``metadata.json#version``.
        cluster_link_mm: single-linkage distance between mark centres of one cluster
            (``<stem>_clusters.csv``, :func:`bundle.clusters.cluster_table`).
        cluster_min_count: fewest marks in a cluster.
        save_cluster_panels: write ``<stem>_clusters.png``, full-resolution zoom panels around the
            strongest clusters (:func:`bundle.reports.cluster_panels_png`).
        cluster_panel_crop: side of each panel in source pixels.
        max_cluster_panels: most panels in ``<stem>_clusters.png``.
        false_alarm: optional per-image operating point of the refined mask, e.g.
            :class:`bundle.falsealarm.FalseAlarmControl`: a callable ``(refined_prob (H, W),
            breast (H, W)) -> {"mask", "threshold", ...}``; when given it replaces
            ``refined_threshold``, and the image's threshold goes into the summary row
            (``refined_threshold_image``).
        hole_control: optional per-image operating point of the refinement's hole (same kind of
            callable, applied to SegAI's probability): the refiner then sees SegAI's map only
            inside the marks it keeps, so it verifies a bounded number of candidates per image.
        pipeline: the :class:`bundle.pipeline.MCPipeline` that runs SegAI and the refiner; None
            builds one from ``network``, ``inferer``, ``refiner``, ``threshold``,
            ``refined_threshold``, ``hole_control``, ``false_alarm`` and ``device``.
        resume: skip a case whose folder holds a completion marker (``case.json``) written with
            the same settings, weights and input bytes; False recomputes every case.
        cli: behave as the command line (``python -m monai.bundle run``): ``--help`` and unknown
            options are handled when the runner is built (:func:`bundle.cli.check_command_line`),
            setup problems end the process with one line on stderr and exit status 2, and the
            exit status is 1 when any case failed. None: detected from ``sys.argv``.

    Output folder (see :mod:`bundle.runstate`): each case is written into a hidden staging folder
    and renamed to ``<case>`` as a whole once complete, with ``<case>/case.json`` (settings
    fingerprint, bundle version, weights and input hashes, the summary row); ``run.json`` records
    the run; ``summary.csv`` is rewritten after every case. Case folder names never collide with
    each other or with the run's own files (:func:`bundle.runstate.case_names`).
    """

    def __init__(
        self,
        dataset_dir: str | None,
        output_dir: str,
        preprocessing: Callable[[dict], dict],
        inferer: Callable[..., torch.Tensor],
        network: torch.nn.Module,
        postprocessing: Callable[[dict], dict] | None = None,
        threshold: float = 0.5,
        refiner: Callable[..., dict] | None = None,
        refined_threshold: float = 0.5,
        device: str | torch.device = "cpu",
        demo_dir: str | None = None,
        save_overlay: bool = True,
        progress: bool = True,
        save_virtual_normal_dicom: bool = True,
        virtual_normal_range: Sequence[float] = (-0.5, 1.5),
        version: str = "unversioned",
        cluster_link_mm: float = 5.0,
        cluster_min_count: int = 3,
        save_cluster_panels: bool = True,
        cluster_panel_crop: int = 256,
        max_cluster_panels: int = 4,
        false_alarm: Callable[..., dict] | None = None,
        hole_control: Callable[..., dict] | None = None,
        pipeline: Any | None = None,
        resume: bool = True,
        cli: bool | None = None,
    ) -> None:
        from bundle.cli import bundle_cli_argv, check_command_line

        self.cli = bundle_cli_argv() is not None if cli is None else bool(cli)
        if self.cli:
            check_command_line()  # --help, unknown options: before anything is read or written
        self.resume = bool(resume)
        try:
            check_arguments(threshold=threshold, refined_threshold=refined_threshold, output_dir=output_dir,
                             virtual_normal_range=virtual_normal_range)
        except ValueError as e:
            if self.cli:
                from bundle.cli import fail

                fail(str(e))
            raise
        self.dataset_dir = dataset_dir or None
        self.output_dir = Path(output_dir)
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.network = network
        self.postprocessing = postprocessing
        self.threshold = float(threshold)
        self.refiner = refiner
        self.refined_threshold = float(refined_threshold)
        self.false_alarm = false_alarm
        self.hole_control = hole_control
        self.device = torch.device(device)
        self.demo_dir = demo_dir or str(self.output_dir / "demo_inputs")
        self.save_overlay = save_overlay
        self.progress = progress
        self.save_virtual_normal_dicom = save_virtual_normal_dicom
        self.virtual_normal_range = (float(virtual_normal_range[0]), float(virtual_normal_range[1]))
        self.version = str(version)
        self.cluster_link_mm = float(cluster_link_mm)
        self.cluster_min_count = int(cluster_min_count)
        self.save_cluster_panels = save_cluster_panels
        self.cluster_panel_crop = int(cluster_panel_crop)
        self.max_cluster_panels = int(max_cluster_panels)
        self.rows: list[dict[str, Any]] = []
        if pipeline is None:
            from bundle.pipeline import MCPipeline

            pipeline = MCPipeline(
                network, inferer, refiner, threshold=threshold, refined_threshold=refined_threshold,
                hole_control=hole_control, false_alarm=false_alarm, device=device,
            )
        self.pipeline = pipeline

    # ------------------------------------------------------------------ inputs
    def input_files(self) -> list[Path]:
        """The files this run will process (demo phantoms when no dataset is given).

        ``dataset_dir`` may be one file. In a folder, hidden files, label files (``*_label.*``)
        and lists/notes (``.json``, ``.csv``, ``.txt``, ``.md``, ``.xml``, ``.log``) are skipped;
        every other file gets a row, images or not.

        Raises:
            RunSetupError: when ``dataset_dir`` does not exist or holds no file to process.
        """
        from bundle.runstate import RunSetupError

        folder = Path(self.dataset_dir).expanduser() if self.dataset_dir else Path(ensure_demo_data(self.demo_dir))
        if folder.is_file():
            return [folder]
        if not folder.exists():
            raise RunSetupError(f"{folder}: dataset_dir not found; pass an existing folder with --dataset_dir")
        if not folder.is_dir():
            raise RunSetupError(f"{folder}: dataset_dir is neither a folder nor a file")
        skip_suffixes = (".json", ".csv", ".txt", ".md", ".xml", ".log")
        files = []
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.name.lower().endswith(skip_suffixes) or "_label." in p.name:
                continue
            files.append(p)
        if not files:
            raise RunSetupError(f"{folder}: dataset_dir holds no file to process")
        return files

    # ------------------------------------------------------------------ one case
    @torch.no_grad()
    def predict(self, path: str | os.PathLike) -> dict[str, Any]:
        """Run preprocessing, SegAI, refinement and postprocessing on one file.

        Args:
            path: input image file.

        Returns:
            The data dict with ``prob``/``mask`` (and ``refined_*``, ``virtual_normal``) on the
            source grid as (1, H, W) tensors.
        """
        d = self.preprocessing({"image": str(path)})
        image = d["image"]
        breast = d.get("breast")
        maps = self.pipeline(image, breast)
        keys = []
        for k in ("prob", "mask", "refined_prob", "refined_mask", "virtual_normal"):
            if maps.get(k) is not None:
                d[k] = _like(image, torch.as_tensor(np.asarray(maps[k], dtype=np.float32))[None])
                keys.append(k)
        if "refined_prob" in maps:
            d["_row_extra"] = dict(maps.get("extras", {}))
        d["image_work"] = image
        if self.postprocessing is not None:
            d = self.postprocessing(d)
        d["_output_keys"] = keys
        return d

    def write_case(self, stem: str, d: dict[str, Any], source: Path, case_dir: Path | None = None) -> dict[str, Any]:
        """Write the output files of one case atomically and return its summary row.

        Besides the maps: ``<stem>_clusters.csv`` (one row per cluster of the final mask, the
        refined one when present, strongest first; header only when there is none),
        ``<stem>_overlay.png`` (marks outlined) and ``<stem>_clusters.png`` (full-resolution zoom
        panels around the strongest clusters). The row gets ``marks`` (connected components of the
        final mask) and ``clusters``. The derived DICOM is optional: when it cannot be made (e.g.
        highdicom refuses the source's header) a warning naming the file is issued and the maps
        stand.

        Args:
            stem: the case name (file names are ``<stem>_<map>``).
            d: :meth:`predict`'s result.
            source: the input file (never overwritten).
            case_dir: where to write; default ``output_dir/<stem>`` (:meth:`run` passes a staging folder).
        """
        from bundle.clusters import cluster_table, mark_table
        from bundle.data import save_nifti_atomic
        from bundle.reports import cluster_panels_png, grey_levels, overlay_png, write_csv_atomic

        case_dir = self.output_dir / stem if case_dir is None else Path(case_dir)
        case_dir.mkdir(parents=True, exist_ok=True)
        spacing = tuple(float(s) for s in d["image"].meta.get("spacing", (1.0, 1.0)))
        row: dict[str, Any] = {}
        saved: dict[str, np.ndarray] = {}
        for key in d["_output_keys"]:
            arr = np.asarray(d[key][0].cpu()) if isinstance(d[key], torch.Tensor) else np.asarray(d[key][0])
            if key.endswith("mask"):
                arr = (arr > 0.5).astype(np.uint8)
                row[f"{key}_pixels"] = int(arr.sum())
            elif key.endswith("prob"):
                arr = np.clip(np.nan_to_num(arr), 0.0, 1.0).astype(np.float32)
            else:
                arr = arr.astype(np.float32)
            saved[key] = arr
            save_nifti_atomic(arr, case_dir / f"{stem}_{key}.nii.gz", spacing=spacing, protect=[source])
            if key == "virtual_normal" and self.save_virtual_normal_dicom:
                try:
                    self._write_virtual_normal_dicom(arr, case_dir / f"{stem}_virtual_normal.dcm", source)
                except Exception as e:  # an optional derived object: the maps are the product
                    from bundle.data import MammogramError

                    if isinstance(e, MammogramError):
                        raise
                    warnings.warn(f"{source}: {stem}_virtual_normal.dcm not written ({type(e).__name__}: {e}); "
                                  "the maps are complete", stacklevel=2)
        mask_key, score_key = ("refined_mask", "refined_prob") if "refined_mask" in saved else ("mask", "prob")
        final = saved[mask_key] > 0
        _, marks = mark_table(final, saved.get(score_key), spacing)
        clusters = cluster_table(marks, spacing, link_mm=self.cluster_link_mm, min_count=self.cluster_min_count)
        write_csv_atomic(clusters, case_dir / f"{stem}_clusters.csv", columns=CLUSTER_COLUMNS)
        row["marks"] = len(marks)
        row["clusters"] = len(clusters)
        if self.save_overlay or self.save_cluster_panels:
            img = np.asarray(d["image"][0].cpu(), dtype=np.float32)
            levels = grey_levels(img)
            if self.save_overlay:
                overlay_png(img, final, None, case_dir / f"{stem}_overlay.png", style="outline", levels=levels)
            if self.save_cluster_panels:
                cluster_panels_png(img, final, clusters, case_dir / f"{stem}_clusters.png", levels=levels,
                                   crop=self.cluster_panel_crop, max_panels=self.max_cluster_panels)
        breast = d.get("breast")
        if breast is not None:
            b = np.asarray(breast[0].cpu() if isinstance(breast, torch.Tensor) else breast[0]) > 0.5
            row["breast_pixels"] = int(b.sum())
            for key in d["_output_keys"]:
                if key.endswith("mask"):
                    m = np.asarray(d[key][0].cpu()) > 0.5
                    row[f"{key[:-4]}activation_rate"] = float((m & b).sum() / max(int(b.sum()), 1))
        return row

    def _write_virtual_normal_dicom(self, values: np.ndarray, path: Path, source: Path) -> None:
        """``values`` (on the source grid) as a DICOM beside the NIfTI, when ``source`` is DICOM."""
        import pydicom
        from pydicom.errors import InvalidDicomError

        from bundle.dicom import make_map_sc, write_dataset_atomic

        try:
            ds = pydicom.dcmread(str(source), stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            return  # not a DICOM input: the NIfTI is the output
        if "SOPInstanceUID" not in ds or "Rows" not in ds:
            return
        if path.resolve() == source.resolve():
            from bundle.data import MammogramError

            raise MammogramError(str(source), "refusing to overwrite the input")
        sc = make_map_sc(ds, values, "virtual_normal", self.version, value_range=self.virtual_normal_range,
                         description="mcref virtual normal image (research; normalised units)")
        write_dataset_atomic(sc, path)

    # ------------------------------------------------------------------ batch
    def settings(self) -> tuple[dict[str, Any], dict[str, str]]:
        """What decides this runner's outputs, JSON-friendly, and the hashes of the weights in it.

        Every public attribute except the folders and the run options (``progress``, ``resume``,
        ``cli``), described by :func:`bundle.runstate.describe`: thresholds, the preprocessing
        chain's parameters, the inferer, refiner and controls with their parameters, the networks
        by class and weights hash, the bundle version.

        Returns:
            ``(settings, {attribute path: weights sha256})``.
        """
        from bundle.runstate import describe

        weights: dict[str, str] = {}
        skip = {"dataset_dir", "output_dir", "demo_dir", "progress", "rows", "resume", "cli"}
        attrs = {k: v for k, v in sorted(vars(self).items()) if not k.startswith("_") and k not in skip}
        return describe(attrs, weights), weights

    def run(self) -> list[dict[str, Any]]:
        """Process every input; failures are logged and recorded, the batch goes on.

        The output folder is checked (created, writable, not a file) and locked before any input
        is read; leftovers of a killed run are removed; finished cases with the same settings are
        skipped (``resume``); each case folder is replaced as a whole; ``summary.csv`` is rewritten
        after every case and ``run.json`` records the run. Warnings raised while a case runs go to
        its row (``warnings``) and the log, naming the file.

        Returns:
            One summary row per input (also written to ``output_dir/summary.csv``).

        Raises:
            RunSetupError: the output or input folder is unusable (as the command line: one line
                on stderr, exit status 2). As the command line, the exit status is 1 when any case
                failed (after the summary is written).
        """
        from bundle.runstate import RunSetupError

        try:
            rows = self._run()
        except RunSetupError as e:
            if self.cli:
                from bundle.cli import fail

                fail(str(e))
            raise
        n_fail = sum(r["status"] != "ok" for r in rows)
        if self.cli and n_fail:
            from bundle.cli import fail

            fail(f"{n_fail} of {len(rows)} cases failed; see {self.output_dir / 'summary.csv'}", code=1)
        return rows

    def _run(self) -> list[dict[str, Any]]:
        from bundle.reports import write_csv_atomic
        from bundle.runstate import (
            case_names,
            check_output_dir,
            clean_stale,
            current_umask,
            fingerprint,
            honour_umask,
            new_run_id,
            output_lock,
        )

        umask = current_umask()
        out = check_output_dir(self.output_dir)
        with output_lock(out):
            files = self.input_files()
            reserved = []
            for folder in (self.dataset_dir, self.demo_dir):
                if folder:
                    try:
                        reserved.append(Path(folder).resolve().relative_to(out.resolve()).parts[0])
                    except (ValueError, IndexError):
                        pass
            names = case_names(files, out, reserved)
            for msg in clean_stale(out, names.values()):
                logger.info(msg)
            settings, weights = self.settings()
            run = {
                "run_id": new_run_id(),
                "status": "running",
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "finished": None,
                "bundle_version": self.version,
                "settings_sha256": fingerprint(settings),
                "weights_sha256": weights,
                "command": list(sys.argv) if self.cli else None,
                "dataset_dir": str(self.dataset_dir or self.demo_dir),
                "output_dir": str(out),
                "cases": len(files),
                "settings": settings,
            }
            write_run_record(out, run, umask)
            self.rows = []
            iterator: Any = files
            if self.progress:
                from tqdm.auto import tqdm

                iterator = tqdm(files, desc="cases", unit="case")
            summary = out / "summary.csv"
            for f in iterator:
                self.rows.append(self._run_case(f, names[str(f)], out, run, umask))
                write_csv_atomic(self.rows, summary)  # a killed run still leaves the rows so far
                honour_umask([summary], umask)
            n_fail = sum(r["status"] != "ok" for r in self.rows)
            run.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       ok=len(self.rows) - n_fail, failed=n_fail, reused=sum(bool(r.get("reused")) for r in self.rows))
            write_run_record(out, run, umask)
        logger.info("%d cases, %d failed, %d reused from an earlier run; summary in %s", len(self.rows), n_fail,
                    run["reused"], summary)
        for r in self.rows:
            if r["status"] != "ok":
                logger.warning("FAILED %s: %s", r["case"], r["error"])
        return self.rows

    def _run_case(self, f: Path, name: str, out: Path, run: dict[str, Any], umask: int) -> dict[str, Any]:
        """One case: reuse a finished folder, or compute it into a staging folder and put that in place.

        Args:
            f: the input file.
            name: its case folder name.
            out: the output folder.
            run: the run record (``run_id``, ``settings_sha256``, ``weights_sha256``, ...).
            umask: the process umask (output permissions).

        Returns:
            The summary row.
        """
        from bundle.data import MammogramError
        from bundle.runstate import (
            MARKER_NAME,
            commit_case,
            discard,
            file_sha256,
            honour_umask,
            read_marker,
            staging_dir,
            write_json_atomic,
        )

        t0 = time.perf_counter()
        row: dict[str, Any] = {"case": name, "input": str(f)}
        final = out / name
        staging: Path | None = None
        reused = False
        input_sha = ""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for category in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", category=category)
            # pydicom's nag about single-component person names (e.g. "ANON") says nothing about the maps
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
            try:
                input_sha = file_sha256(f)
                marker = read_marker(final) if self.resume else None
                if case_finished(marker, name, run["settings_sha256"], input_sha, final):
                    row = {**marker["row"], "case": name, "input": str(f)}
                    reused = True
                else:
                    d = self.predict(f)
                    staging = staging_dir(out, name, run["run_id"])
                    row.update(self.write_case(name, d, f, case_dir=staging))
                    row.update(d.get("_row_extra", {}))
                    row.update(status="ok", error="")
            except Exception as e:  # keep the batch alive, but say what broke
                discard(staging)
                staging = None
                cause = input_problem(e, MammogramError)
                if cause is not None:
                    row.update(status="failed", error=str(cause))
                    logger.error("case %s failed: %s", name, cause)
                else:
                    row.update(status="failed", error=f"{f}: {type(e).__name__}: {e}")
                    logger.exception("case %s failed", name)
        if not reused:
            texts = warning_texts(caught, f)
            for text in texts:
                logger.warning("%s", text)
            row["warnings"] = " | ".join(texts)
            row["seconds"] = round(time.perf_counter() - t0, 3)
        row["reused"] = reused
        if staging is not None:  # complete: marker, permissions, then the folder as a whole
            try:
                marker = {
                    "case": name,
                    "input": str(f),
                    "input_sha256": input_sha,
                    "run_id": run["run_id"],
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "bundle_version": self.version,
                    "settings_sha256": run["settings_sha256"],
                    "weights_sha256": run["weights_sha256"],
                    "outputs": sorted(p.name for p in staging.iterdir()),
                    "row": {k: v for k, v in row.items() if k != "reused"},
                }
                write_json_atomic(marker, staging / MARKER_NAME, umask)
                honour_umask([staging], umask)
                commit_case(staging, final, run["run_id"])
            except OSError as e:
                discard(staging)
                row.update(status="failed", error=f"{final}: cannot put the case folder in place ({e})")
                logger.error("case %s failed: %s", name, row["error"])
        return row


def _like(ref: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Wrap ``data`` as a MetaTensor carrying ``ref``'s meta data (geometry for restoring)."""
    from monai.data import MetaTensor

    meta = dict(getattr(ref, "meta", {}) or {})
    return MetaTensor(data, meta=meta)
