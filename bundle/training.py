"""Training helpers used by ``configs/train_*.json``: data preparation and patch sampling."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

__all__ = [
    "prepare_phantom_data",
    "MakeSamplingMapd",
    "merge_datalists",
    "RandAcquisitiond",
    "save_hard_negatives",
    "load_hard_negatives",
]

logger = logging.getLogger("mcref.training")


def prepare_phantom_data(
    dataset_dir: str | os.PathLike,
    n_cases: int = 48,
    seed: int = 0,
    shape: Sequence[int] = (1024, 832),
    splits: Sequence[int] = (40, 8, 0),
    with_mcs: bool = True,
) -> str:
    """Make a seeded phantom training set in ``dataset_dir`` unless one with this recipe exists.

    The recipe (counts, seed, shape) is stored in ``recipe.json``; a folder holding another
    recipe is refused rather than silently reused.

    Args:
        dataset_dir: destination folder.
        n_cases: total number of phantom cases.
        seed: generator seed.
        shape: (rows, columns) of each phantom.
        splits: number of training, validation and test cases (sums to ``n_cases``).
        with_mcs: insert microcalcification clusters (False gives calcification-free data).

    Returns:
        Path of the ``datalist.json``.
    """
    from bundle.phantom import make_dataset

    folder = Path(dataset_dir)
    recipe = {"n_cases": int(n_cases), "seed": int(seed), "shape": [int(s) for s in shape],
              "splits": [int(s) for s in splits], "with_mcs": bool(with_mcs)}
    if sum(recipe["splits"]) != recipe["n_cases"]:
        raise ValueError(f"splits {splits} do not add up to n_cases {n_cases}")
    rfile = folder / "recipe.json"
    if (folder / "datalist.json").exists() and rfile.exists():
        old = json.loads(rfile.read_text())
        if old == recipe:
            return str(folder / "datalist.json")
        raise ValueError(f"{folder}: holds phantom data made with another recipe {old}; use another dataset_dir")
    logger.info("writing %d phantom cases to %s", n_cases, folder)
    make_dataset(folder, n_cases=n_cases, seed=seed, shape=tuple(shape), splits=tuple(splits), with_mcs=with_mcs)
    rfile.write_text(json.dumps(recipe, indent=2))
    return str(folder / "datalist.json")


def merge_datalists(paths: Sequence[str | os.PathLike], key: str = "training") -> list[dict]:
    """Concatenate one section of several MONAI datalists, making paths absolute.

    Args:
        paths: datalist JSON files (empty strings are skipped).
        key: section to read, e.g. ``"training"``.
    """
    from monai.data import load_decathlon_datalist

    out: list[dict] = []
    for p in paths:
        if not p:
            continue
        p = Path(p)
        try:
            out.extend(load_decathlon_datalist(str(p), data_list_key=key, base_dir=str(p.parent)))
        except ValueError:
            logger.warning("%s has no '%s' section", p, key)
    return out


class MakeSamplingMapd(MapTransform):
    """Build a sampling map: 0 background, 1 breast without MC, 2 MC (dilated), 3 hard negative.

    Used with ``RandCropByLabelClassesd(ratios=[0, 1, k, h])`` so that patches come only from the
    breast, MC patches are over-represented k-fold and, where a case names mined hard negatives
    (``scripts/mine_hard_negatives.py``), patches centred on them h-fold. A case without hard
    negatives simply has no class-3 pixels (MONAI then draws from the other classes).

    Args:
        keys: unused placeholder so the transform fits ``MapTransform``; pass the label key.
        label_key: MC mask key.
        breast_key: breast mask key.
        out_key: key of the sampling map.
        dilation: pixels of dilation around MCs in the sampling map.
        hardneg_key: optional key holding the path of a ``.npz`` written by
            :func:`save_hard_negatives` (pixel rows/cols on the working grid and that grid's
            shape); missing or empty for cases without mined hard negatives.
        allow_missing_keys: see ``MapTransform``.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        label_key: str = "label",
        breast_key: str = "breast",
        out_key: str = "sampling",
        dilation: int = 2,
        hardneg_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key, self.breast_key, self.out_key = label_key, breast_key, out_key
        self.dilation = int(dilation)
        self.hardneg_key = hardneg_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        label = torch.as_tensor(d[self.label_key]) > 0.5
        breast = torch.as_tensor(d[self.breast_key]) > 0.5
        if self.dilation > 0:
            k = 2 * self.dilation + 1
            label = torch.nn.functional.max_pool2d(label.float()[None], k, stride=1, padding=self.dilation)[0] > 0
        m = breast.to(torch.uint8)
        path = d.get(self.hardneg_key) if self.hardneg_key else None
        if path:
            rows, cols = load_hard_negatives(path, tuple(m.shape[-2:]))
            inside = breast[0, rows, cols]  # hard negatives count inside the breast only
            m[0, rows[inside], cols[inside]] = 3
        m[label] = 2
        d[self.out_key] = m
        return d


def save_hard_negatives(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a hard-negative mask (working grid) as its pixel coordinates, atomically.

    Args:
        path: ``.npz`` file to write.
        mask: (H, W) boolean mask of hard-negative pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(mask)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, rows=rows.astype(np.int32), cols=cols.astype(np.int32), shape=np.asarray(mask.shape))
    os.replace(tmp, path)


def load_hard_negatives(path: str | os.PathLike, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the pixel coordinates written by :func:`save_hard_negatives`.

    Args:
        path: the ``.npz`` file.
        shape: the working-grid shape of the case's image; a file mined on another grid (other
            preprocessing or spacing) is refused rather than misplaced.

    Returns:
        (rows, cols) long tensors.
    """
    with np.load(path) as z:
        if tuple(int(v) for v in z["shape"]) != tuple(shape):
            raise ValueError(
                f"{path}: hard negatives were mined on a {tuple(z['shape'])} grid, the image is {tuple(shape)};"
                " mine them again with scripts/mine_hard_negatives.py"
            )
        return torch.as_tensor(z["rows"], dtype=torch.long), torch.as_tensor(z["cols"], dtype=torch.long)


class RandAcquisitiond(Randomizable, MapTransform):
    """Random acquisition and processing changes of a normalised mammogram crop (training only).

    Real FFDM differ by device and site processing more than by anatomy; a SegAI trained on one
    kind learns its noise and sharpening as "tissue". Each effect is applied with probability
    ``prob`` (independently, in this order), with parameters drawn uniformly from its range:

    - gamma / VOI LUT change: ``x -> lo + (hi - lo) * ((x - lo) / (hi - lo)) ** g`` on the crop's
      own 1-99 % range, ``g`` in ``gamma``;
    - vendor-like unsharp masking: ``x + a * (x - G_s * x)``, ``a`` in ``unsharp_amount``, ``s`` in
      ``unsharp_sigma`` pixels;
    - detector blur: Gaussian of sigma in ``blur_sigma`` pixels;
    - noise: additive Gaussian, std in ``noise_std`` (units of the normalised breast range);
    - quantisation (8-bit export, low bit depth): values rounded to a step in ``quant_step``, with
      the step's offset drawn at random;
    - JPEG compression of an 8-bit rendering of the crop at a quality in ``jpeg_quality``, the
      compression error added back to the float crop.

    MONAI has each of these but the last two as separate transforms (``RandAdjustContrastd``,
    ``RandGaussianSharpend``, ...); they act on [0, 1] images or sharpen differently from the
    processing of mammography workstations, so one transform with the ranges of real devices is
    kept here.

    Args:
        keys: image keys.
        prob: probability of each effect.
        gamma: range of the gamma exponent.
        unsharp_amount: range of the unsharp-mask amount.
        unsharp_sigma: range of the unsharp-mask sigma in pixels.
        blur_sigma: range of the blur sigma in pixels.
        noise_std: range of the noise std.
        quant_step: range of the quantisation step.
        jpeg_quality: range of the JPEG quality (PIL, 1-95).
        seed: seed of the transform's generator (MONAI's ``set_random_state`` reseeds it).
        allow_missing_keys: see ``MapTransform``.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        prob: float = 0.3,
        gamma: Sequence[float] = (0.6, 1.6),
        unsharp_amount: Sequence[float] = (0.3, 2.0),
        unsharp_sigma: Sequence[float] = (1.5, 8.0),
        blur_sigma: Sequence[float] = (0.3, 1.0),
        noise_std: Sequence[float] = (0.003, 0.03),
        quant_step: Sequence[float] = (1.0 / 400, 1.0 / 80),
        jpeg_quality: Sequence[int] = (60, 95),
        seed: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob}")
        self.prob = float(prob)
        self.gamma, self.unsharp_amount, self.unsharp_sigma = tuple(gamma), tuple(unsharp_amount), tuple(unsharp_sigma)
        self.blur_sigma, self.noise_std, self.quant_step = tuple(blur_sigma), tuple(noise_std), tuple(quant_step)
        self.jpeg_quality = (int(jpeg_quality[0]), int(jpeg_quality[1]))
        self.set_random_state(seed)

    def _u(self, rng: Sequence[float]) -> float:
        return float(self.R.uniform(rng[0], rng[1]))

    def _apply(self, x: np.ndarray) -> np.ndarray:
        from scipy import ndimage as ndi

        if self.R.rand() < self.prob:
            lo, hi = np.percentile(x, [1.0, 99.0])
            if hi - lo > 1e-6:
                t = np.clip((x - lo) / (hi - lo), 0.0, None)
                x = lo + (hi - lo) * t ** self._u(self.gamma)
        if self.R.rand() < self.prob:
            x = x + self._u(self.unsharp_amount) * (x - ndi.gaussian_filter(x, self._u(self.unsharp_sigma)))
        if self.R.rand() < self.prob:
            x = ndi.gaussian_filter(x, self._u(self.blur_sigma))
        if self.R.rand() < self.prob:
            x = x + self.R.normal(0.0, self._u(self.noise_std), size=x.shape)
        if self.R.rand() < self.prob:
            step = self._u(self.quant_step)
            off = self.R.uniform(0.0, step)
            x = np.round((x - off) / step) * step + off
        if self.R.rand() < self.prob:
            x = x + self._jpeg_error(x)
        return x.astype(np.float32)

    def _jpeg_error(self, x: np.ndarray) -> np.ndarray:
        import io

        from PIL import Image

        lo, hi = float(x.min()), float(x.max())
        if hi - lo < 1e-6:
            return np.zeros_like(x)
        u8 = np.clip(np.round((x - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(u8).save(buf, format="JPEG", quality=int(self.R.randint(self.jpeg_quality[0], self.jpeg_quality[1] + 1)))
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32)
        return (dec - u8.astype(np.float32)) / 255.0 * (hi - lo)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Apply the random effects to each key's 2-D channels."""
        d = dict(data)
        for key in self.key_iterator(d):
            t = torch.as_tensor(d[key])
            arr = t.detach().cpu().numpy().astype(np.float64)
            out = np.stack([self._apply(c) for c in arr.reshape(-1, *arr.shape[-2:])]).reshape(arr.shape)
            d[key] = torch.as_tensor(out, dtype=torch.float32)
        return d


def count_parameters(net: torch.nn.Module) -> int:
    """Number of trainable parameters of ``net``.

    Args:
        net: a torch module.
    """
    return int(sum(p.numel() for p in net.parameters() if p.requires_grad))




def prepare_png_negatives(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    spacing: float = 0.1,
    laterality_from_name: bool = True,
    test_names: Sequence[str] = (),
) -> str:
    """Convert a folder of calcification-free 8/16-bit PNG mammograms into MG DICOMs + a datalist.

    The DICOMs carry the given pixel spacing so that they can be mixed with other data in one
    training set (PNG files carry no spacing). Values are scaled to 14 bits. Views and laterality
    are read from names such as ``L-CC.png`` when ``laterality_from_name``.

    Args:
        src_dir: folder of PNG files (e.g. the NYU negatives named in docs/data_license.txt).
        out_dir: destination folder.
        spacing: pixel spacing of the PNGs in mm.
        laterality_from_name: parse ``L``/``R`` and ``CC``/``MLO`` from the file names.
        test_names: file stems (case-insensitive, e.g. ``["R-MLO"]``) held out of training: they
            go to the ``test`` list, so that no training step sees them.

    Returns:
        Path of the written ``datalist.json`` (``training`` = all files not in ``test_names``).
    """
    from PIL import Image

    from bundle.data import chest_wall_on_right
    from bundle.phantom import write_mg_dicom

    src, out = Path(src_dir), Path(out_dir)
    files = sorted(p for p in src.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"{src}: no PNG files")
    out.mkdir(parents=True, exist_ok=True)
    held_out = {n.upper() for n in test_names}
    unknown = held_out - {f.stem.upper() for f in files}
    if unknown:
        raise ValueError(f"{src}: test_names {sorted(unknown)} match no PNG file")
    items, test_items = [], []
    for i, f in enumerate(files):
        arr = np.asarray(Image.open(f))
        if arr.ndim != 2:
            raise ValueError(f"{f}: expected a grey-level PNG, got shape {arr.shape}")
        scale = 16383.0 / (255.0 if arr.dtype == np.uint8 else 65535.0)
        pix = np.clip(np.round(arr.astype(np.float64) * scale), 0, 16383).astype(np.uint16)
        name = f.stem.upper()
        lat = "R" if laterality_from_name and name.startswith("R") else "L"
        view = "MLO" if laterality_from_name and "MLO" in name else "CC"
        # presentation convention: a right breast has its chest wall on the right. Some
        # exports store every view with the chest wall on the left: mirror those.
        if chest_wall_on_right(pix, method="intensity") != (lat == "R"):
            pix = np.ascontiguousarray(pix[:, ::-1])
        dst = out / f"{f.stem}.dcm"
        write_mg_dicom(dst, pix, spacing=spacing, laterality=lat, view=view, seed=i, patient_id="NEGATIVE")
        (test_items if name in held_out else items).append({"image": dst.name})
    dl = out / "datalist.json"
    dl.write_text(json.dumps({"training": items, "validation": [], "test": test_items}, indent=2))
    return str(dl)
