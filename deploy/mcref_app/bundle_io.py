"""Finding the MONAI bundle the application runs: a bundle folder or a bundle archive (zip).

A zip archive (as made by ``scripts/export_bundle.py``) is unpacked once into a cache folder
keyed by its SHA-256 (safe extraction: no absolute paths, no ``..``, no links); the bundle root
is the folder holding ``configs/metadata.json`` and ``configs/inference.json``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["BundleError", "resolve_bundle", "default_bundle_path", "find_bundle_in", "bundle_parser", "bundle_loader", "bundle_version"]

logger = logging.getLogger("mcref.deploy")

REQUIRED_CONFIGS = ("configs/metadata.json", "configs/inference.json")


class BundleError(RuntimeError):
    """The bundle folder or archive is missing or unusable."""


def default_bundle_path() -> Path:
    """Where the bundle is when ``--bundle`` is not given.

    ``$MCREF_BUNDLE_PATH`` when set; else, inside a MONAI Application Package, the bundle folder or
    archive found under ``$HOLOSCAN_MODEL_PATH`` (``monai-deploy package -m BUNDLE``); else the
    repository this app sits in (its root is the bundle root).
    """
    env = os.environ.get("MCREF_BUNDLE_PATH", "").strip()
    if env:
        return Path(env)
    models = os.environ.get("HOLOSCAN_MODEL_PATH", "").strip()
    if models and Path(models).exists():
        found = find_bundle_in(Path(models))
        if found is not None:
            return found
    return Path(__file__).resolve().parents[2]


def find_bundle_in(folder: Path, depth: int = 3) -> Path | None:
    """A bundle root folder or a ``.zip`` archive at most ``depth`` levels below ``folder``.

    Args:
        folder: where to look (a file is returned as is when it is a zip archive).
        depth: how many folder levels to descend.
    """
    if folder.is_file():
        return folder if zipfile.is_zipfile(folder) else None
    if _is_bundle_root(folder):
        return folder
    if depth <= 0 or not folder.is_dir():
        return None
    for child in sorted(folder.iterdir()):
        if child.is_file() and child.suffix.lower() == ".zip" and zipfile.is_zipfile(child):
            return child
    for child in sorted(folder.iterdir()):
        if child.is_dir():
            found = find_bundle_in(child, depth - 1)
            if found is not None:
                return found
    return None


def _is_bundle_root(p: Path) -> bool:
    return all((p / c).is_file() for c in REQUIRED_CONFIGS)


def _safe_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    members = []
    for info in zf.infolist():
        name = PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts or info.filename.startswith(("/", "\\")):
            raise BundleError(f"unsafe path {info.filename!r} in bundle archive")
        mode = (info.external_attr >> 16) & 0o170000
        if mode == 0o120000:  # symbolic link
            raise BundleError(f"symbolic link {info.filename!r} in bundle archive")
        members.append(info)
    return members


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_bundle(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The bundle root folder for a bundle folder or a bundle zip archive.

    Args:
        path: bundle folder, or ``.zip`` archive holding one (at its top or in one top folder).
        cache_dir: where archives are unpacked (default: the system temporary folder).

    Raises:
        BundleError: when the path is missing, not a bundle, or an unsafe archive.
    """
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        if not _is_bundle_root(p):
            raise BundleError(f"{p}: not a MONAI bundle folder (needs {', '.join(REQUIRED_CONFIGS)})")
        return p
    if not p.is_file():
        raise BundleError(f"{p}: bundle folder or archive not found")
    if not zipfile.is_zipfile(p):
        raise BundleError(f"{p}: not a zip archive (give a bundle folder or a bundle .zip)")
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "mcref_bundles"
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / _sha256(p)[:20]
    if not dest.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".unpack.", dir=cache))
        try:
            with zipfile.ZipFile(p) as zf:
                zf.extractall(tmp, members=_safe_members(zf))
            try:
                os.replace(tmp, dest)
            except OSError:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("unpacked bundle archive %s to %s", p, dest)
    if _is_bundle_root(dest):
        return dest
    subs = [d for d in dest.iterdir() if d.is_dir() and _is_bundle_root(d)]
    if len(subs) == 1:
        return subs[0]
    raise BundleError(f"{p}: archive holds no bundle ({', '.join(REQUIRED_CONFIGS)} not found)")


def _put_on_path(root: Path) -> None:
    """Make the bundle's own Python package importable, and check no other copy is loaded."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    mod = sys.modules.get("bundle")
    if mod is not None and getattr(mod, "__file__", None):
        loaded = Path(mod.__file__).resolve().parent.parent
        if loaded != root:
            logger.warning("the 'bundle' package is already imported from %s, not from %s", loaded, root)


def bundle_parser(root: Path, config_names: Sequence[str] = ("inference",)) -> Any:
    """A ``monai.bundle.ConfigParser`` of the bundle's configs with ``bundle_root`` set to ``root``.

    Args:
        root: bundle root folder.
        config_names: config files (without extension) merged in order.
    """
    from monai.bundle import ConfigParser

    _put_on_path(root)
    parser = ConfigParser()
    parser.read_meta(str(root / "configs" / "metadata.json"))
    files = []
    for name in config_names:
        f = root / "configs" / f"{name}.json"
        if not f.is_file():
            raise BundleError(f"{f}: config not found")
        files.append(str(f))
    parser.read_config(files)
    parser["bundle_root"] = str(root)
    return parser


def bundle_version(root: Path) -> str:
    """The bundle's version from ``configs/metadata.json`` ("0" when unknown).

    Args:
        root: bundle root folder.
    """
    import json

    try:
        return str(json.loads((root / "configs" / "metadata.json").read_text()).get("version", "0"))
    except (OSError, ValueError):
        return "0"


def bundle_loader(parser: Any, preproc_id: str = "preprocessing") -> Callable[[str], Any]:
    """The bundle's own file loader (the first ``Load*`` transform of its preprocessing).

    The application reads each mammogram with exactly the loader (and its settings, e.g. a pixel
    spacing override) that ``configs/inference.json`` uses, so the image handed to the bundle
    operator equals what the bundle's own runner sees.

    Args:
        parser: the bundle's ConfigParser (see :func:`bundle_parser`).
        preproc_id: config id of the preprocessing Compose.

    Returns:
        A callable ``path -> MetaTensor (1, H, W)``.
    """
    pre = parser.get_parsed_content(preproc_id)
    transforms = getattr(pre, "transforms", pre if isinstance(pre, (list, tuple)) else [pre])
    for t in transforms:
        if type(t).__name__.startswith("Load") and hasattr(t, "keys"):
            key = t.keys[0]
            return lambda path, _t=t, _k=key: _t({_k: str(path)})[_k]
    raise BundleError(f"the bundle's {preproc_id!r} has no Load* transform to read files with")
