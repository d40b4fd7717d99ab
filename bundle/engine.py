"""Batch inference runner used by ``configs/inference.json``.

It walks the input folder (or a datalist), runs the preprocessing chain, the inferer and the
optional refinement on each case, writes the output contract of ``docs/architecture.md``
atomically and keeps going when one case fails; every failure lands in ``summary.csv`` and
the log.
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

__all__ = ["MammogramInference", "ensure_demo_data", "load_checkpoint"]

logger = logging.getLogger("mcref.inference")


def load_checkpoint(network: torch.nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load weights into ``network`` with a clear error when the file is missing or does not fit.

    Accepts a plain state dict or a MONAI ``CheckpointSaver`` file holding ``{"network": ...}``.

    Args:
        network: the module to fill.
        path: checkpoint file.
        device: where to map the tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found; train it with the train config or pass --ckpt_path")
    state = torch.load(p, map_location=device, weights_only=True)
    if isinstance(state, Mapping) and "network" in state and isinstance(state["network"], Mapping):
        state = state["network"]
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise RuntimeError(f"{p}: weights do not fit the network in the config: {e}") from e
    return network.to(device).eval()


def bundle_version(bundle_root: str | os.PathLike) -> str:
    """The bundle's version, ``configs/metadata.json#version`` (``"unversioned"`` without one).

    Args:
        bundle_root: the bundle root folder.
    """
    import json

    meta = Path(bundle_root) / "configs" / "metadata.json"
    try:
        return str(json.loads(meta.read_text(encoding="utf-8")).get("version", "unversioned"))
    except (OSError, ValueError):
        logger.warning("%s: no readable metadata; derived objects are marked 'unversioned'", meta)
        return "unversioned"


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
    ) -> None:
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

    # ------------------------------------------------------------------ inputs
    def input_files(self) -> list[Path]:
        """The files this run will process (demo phantoms when no dataset is given)."""
        folder = Path(self.dataset_dir) if self.dataset_dir else Path(ensure_demo_data(self.demo_dir))
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: dataset_dir is not a folder")
        skip_suffixes = (".json", ".csv", ".txt", ".md", ".xml", ".log")
        files = []
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.name.lower().endswith(skip_suffixes) or "_label." in p.name:
                continue
            files.append(p)
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
        x = image[None].to(self.device)
        bm = breast[None].to(self.device) if breast is not None else None
        self.network.eval()
        prob = self.inferer(x, self.network, breast=bm)[0].cpu()
        d["prob"] = _like(image, prob)
        d["mask"] = _like(image, (prob >= self.threshold).to(torch.float32))
        keys = ["prob", "mask"]
        if self.refiner is not None:
            img2 = torch.as_tensor(np.asarray(image[0].cpu()))
            b2 = None if breast is None else np.asarray(breast[0].cpu()) > 0
            seg = prob[0].numpy()
            extra: dict[str, Any] = {}
            if self.hole_control is not None:  # the refiner sees only the marks the control keeps
                hc = self.hole_control(seg, b2)
                seg = seg * np.asarray(hc["mask"], dtype=seg.dtype)
                extra["hole_threshold_image"] = round(float(hc["threshold"]), 6)
            out = self.refiner(img2.numpy(), seg, b2)
            rp = torch.as_tensor(np.asarray(out["prob"], dtype=np.float32))[None]
            d["refined_prob"] = _like(image, rp)
            if self.false_alarm is not None:
                fa = self.false_alarm(rp[0].numpy(), b2)
                rm = torch.as_tensor(np.asarray(fa["mask"], dtype=np.float32))[None]
                extra["refined_threshold_image"] = round(float(fa["threshold"]), 6)
            d["_row_extra"] = extra
            if self.false_alarm is None:
                rm = (rp >= self.refined_threshold).to(torch.float32)
            d["refined_mask"] = _like(image, rm)
            keys += ["refined_prob", "refined_mask"]
            if out.get("virtual_normal") is not None:
                d["virtual_normal"] = _like(image, torch.as_tensor(np.asarray(out["virtual_normal"], dtype=np.float32))[None])
                keys.append("virtual_normal")
        d["image_work"] = image
        if self.postprocessing is not None:
            d = self.postprocessing(d)
        d["_output_keys"] = keys
        return d

    def write_case(self, stem: str, d: dict[str, Any], source: Path) -> dict[str, Any]:
        """Write the output files of one case atomically and return its summary row.

        Besides the maps: ``<stem>_clusters.csv`` (one row per cluster of the final mask, the
        refined one when present, strongest first; header only when there is none),
        ``<stem>_overlay.png`` (marks outlined) and ``<stem>_clusters.png`` (full-resolution zoom
        panels around the strongest clusters). The row gets ``marks`` (connected components of the
        final mask) and ``clusters``.
        """
        from bundle.clusters import cluster_table, mark_table
        from bundle.data import save_nifti_atomic
        from bundle.reports import cluster_panels_png, grey_levels, overlay_png, write_csv_atomic

        case_dir = self.output_dir / stem
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
                self._write_virtual_normal_dicom(arr, case_dir / f"{stem}_virtual_normal.dcm", source)
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
    def run(self) -> list[dict[str, Any]]:
        """Process every input; failures are logged and recorded, the batch goes on.

        Returns:
            One summary row per input (also written to ``output_dir/summary.csv``).
        """
        from bundle.data import MammogramError
        from bundle.reports import write_csv_atomic

        files = self.input_files()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.rows = []
        iterator: Any = files
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(files, desc="cases", unit="case")
        for f in iterator:
            stem = _stem(f)
            t0 = time.perf_counter()
            row: dict[str, Any] = {"case": stem, "input": str(f)}
            try:
                d = self.predict(f)
                row.update(self.write_case(stem, d, f))
                row.update(d.get("_row_extra", {}))
                row["status"] = "ok"
                row["error"] = ""
            except Exception as e:  # keep the batch alive, but say what broke
                cause = _input_problem(e, MammogramError)
                if cause is not None:
                    row.update(status="failed", error=str(cause))
                    logger.error("case %s failed: %s", stem, cause)
                else:
                    row.update(status="failed", error=f"{f}: {type(e).__name__}: {e}")
                    logger.exception("case %s failed", stem)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            self.rows.append(row)
        write_csv_atomic(self.rows, self.output_dir / "summary.csv")
        n_fail = sum(r["status"] != "ok" for r in self.rows)
        logger.info("%d cases, %d failed; summary in %s", len(self.rows), n_fail, self.output_dir / "summary.csv")
        for r in self.rows:
            if r["status"] != "ok":
                logger.warning("FAILED %s: %s", r["case"], r["error"])
        return self.rows


def _input_problem(exc: BaseException, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in the cause/context chain of ``exc`` (MONAI's
    Compose wraps transform errors in ``RuntimeError: applying transform ...``)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".tiff", ".tif", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _like(ref: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Wrap ``data`` as a MetaTensor carrying ``ref``'s meta data (geometry for restoring)."""
    from monai.data import MetaTensor

    meta = dict(getattr(ref, "meta", {}) or {})
    return MetaTensor(data, meta=meta)


def invocation_config(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Rebuild the merged config of the running ``python -m monai.bundle run`` from its arguments.

    The config files named by ``--config_file`` are merged and every other ``--key value`` pair
    is applied as an override, as ``monai.bundle`` does; the result is what MLflow records as
    the run's configuration. Returns ``{}`` when no ``--config_file`` is found.

    Args:
        argv: the argument list; defaults to ``sys.argv``.
    """
    import ast
    import sys

    from monai.bundle import ConfigParser

    args = list(sys.argv if argv is None else argv)
    pairs: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            key, _, val = a[2:].partition("=")
            if not _ and i + 1 < len(args) and not args[i + 1].startswith("--"):
                val = args[i + 1]
                i += 1
            try:
                pairs[key] = ast.literal_eval(val)
            except (ValueError, SyntaxError):
                pairs[key] = val
        i += 1
    files = pairs.pop("config_file", None)
    if not files:
        return {}
    files = [files] if isinstance(files, str) else list(files)
    parser = ConfigParser()
    parser.read_config(files)
    for k in ("meta_file", "logging_file", "args_file", "tracking", "run_id", "init_id", "final_id"):
        pairs.pop(k, None)
    for k, v in pairs.items():
        parser[k] = v
    merged = parser.get()
    merged["_config_files"] = files
    return merged
