"""Finding the MONAI bundle the application runs, and building its pipeline.

A zip archive (as made by ``scripts/export_bundle.py``) is unpacked once into a cache folder
keyed by its SHA-256 (safe extraction: no absolute paths, no ``..``, no links); the bundle root
is the folder holding ``configs/metadata.json`` and ``configs/inference.json``.
:func:`bundle_runner` parses the bundle's configs (with overrides) and returns its ``runner``
object, the one pipeline of the project that ``python -m monai.bundle run`` also runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "BundleError",
    "resolve_bundle",
    "default_bundle_path",
    "find_bundle_in",
    "bundle_parser",
    "parse_override",
    "bundle_runner",
    "APP_SET_IDS",
]

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


# Config ids the application sets itself: the bundle root, and folders the runner is built with
# but that ``predict`` never writes to (the app writes its own outputs).
APP_SET_IDS = ("bundle_root", "dataset_dir", "output_dir", "demo_dir")


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--override``: VALUE as JSON when it parses (numbers, true/false/null,
    lists), else the plain string; KEY may be nested (``genai_kwargs#device``).

    Args:
        text: the ``KEY=VALUE`` text.

    Raises:
        BundleError: without ``=``, with an empty key, or for a key the app sets itself.
    """
    import json

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise BundleError(f"--override {text!r}: expected KEY=VALUE")
    if key in APP_SET_IDS:
        raise BundleError(f"--override {key}: set by the application (use --bundle for the bundle)")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def bundle_runner(
    root: Path,
    config_names: Sequence[str] = ("inference",),
    overrides: Mapping[str, Any] | None = None,
    scratch: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
) -> Any:
    """The bundle's inference runner (config id ``runner``), built as ``monai.bundle run`` would.

    The configs are merged in order, ``bundle_root`` is the bundle folder (so the checkpoints
    resolve there), ``dataset_dir``/``output_dir``/``demo_dir`` point at ``scratch`` (the app
    calls ``runner.predict(path)`` per image, which writes nothing), then ``overrides`` apply and
    the config's ``initialize`` expressions run (e.g. the seed), as in a bundle run.

    Args:
        root: bundle root folder.
        config_names: config files (without extension) merged in order.
        overrides: config id -> value, e.g. ``{"refined_threshold": 0.7, "device": "cpu"}``.
        scratch: a folder path for the runner's unused folders (default: the temp folder).
        info: when given, filled with ``method`` (the config's ``refiner_name``, None without one).

    Returns:
        The runner, with ``predict(path)``, ``version`` and ``virtual_normal_range``.

    Raises:
        BundleError: when the configs have no ``runner``, the refinement is switched off, or the
            runner cannot be built (e.g. a missing checkpoint); the message names the bundle.
    """
    parser = bundle_parser(root, config_names)
    scratch_dir = str(Path(scratch) if scratch else Path(tempfile.gettempdir()) / "mcref_app_scratch")
    parser["dataset_dir"] = scratch_dir
    parser["output_dir"] = scratch_dir
    parser["demo_dir"] = scratch_dir
    for key, value in (overrides or {}).items():
        if key in APP_SET_IDS:
            raise BundleError(f"override {key}: set by the application")
        parser[key] = value
    if parser.get("runner") is None:
        raise BundleError(f"{root}: configs {list(config_names)} define no 'runner'")
    if parser.get("refine") is False:
        raise BundleError(f"{root}: 'refine' is false; the app writes the refined product (SegAI+R:GenAI)")
    try:
        if parser.get("initialize") is not None:
            parser.get_parsed_content("initialize")
        runner = parser.get_parsed_content("runner")
    except Exception as e:
        raise BundleError(f"{root}: building the bundle's runner failed: {type(e).__name__}: {e}") from e
    if not callable(getattr(runner, "predict", None)):
        raise BundleError(f"{root}: the bundle's 'runner' has no predict(path)")
    if info is not None:
        info["method"] = parser.get_parsed_content("refiner_name") if parser.get("refiner_name") is not None else None
    return runner
