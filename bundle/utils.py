"""Small helpers of the bottom (I/O) layer that every other layer may use."""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["bundle_version"]

logger = logging.getLogger("mcref.inference")


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
