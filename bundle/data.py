"""Reading, orienting, resampling and normalising mammograms; breast masks; INbreast labels; writers.

Everything here keeps to ``docs/architecture.md``: a loaded mammogram is a
``monai.data.MetaTensor`` of shape ``(1, H, W)``, ``float32``, with ``image[0, r, c]`` equal to
the source ``pixel_array[r, c]`` (never transposed), "bright = dense", and plain python meta
data (``filename_or_obj``, ``stem``, ``spacing`` (row, col) in mm, ``original_shape``,
``laterality``, ``view``, ``bits_stored``, ``photometric``, ``modality``; ``flip_lr``,
``working_shape`` and ``working_spacing`` are added by the geometry transforms).

Reading and validation problems raise :class:`MammogramError` so that batch runners can record
them per case and go on.

This module is the public path of all of it (configs name ``bundle.data.X``); the code lives in
layer-sized modules of the io layer:

- :mod:`bundle.readers`: file formats, pixel readers, :class:`MammogramError`;
- :mod:`bundle.loading`: :func:`read_mammogram`, :class:`LoadMammogramd`, INbreast labels, data lists;
- :mod:`bundle.geometry`: orientation, resampling to the working spacing and back;
- :mod:`bundle.breastmask`: the breast mask;
- :mod:`bundle.preprocessing`: intensity normalisation and the preprocessing chain;
- :mod:`bundle.writers`: atomic NIfTI/PNG writers;
- :mod:`bundle.imagemeta`: MetaTensor helpers shared by the transforms.

The classes report their own module (e.g. ``bundle.geometry.OrientBreastd``) as ``__module__``,
as the other split modules' classes do; ``bundle.data.X`` stays a valid import path.
"""

from __future__ import annotations

from bundle.breastmask import BreastMaskd, compute_breast_mask, large_scale_structure
from bundle.geometry import OrientBreastd, ResampleToSpacingd, RestoreGeometryd, chest_wall_on_right
from bundle.loading import (
    LoadINbreastLabeld,
    LoadMammogramd,
    check_grey_levels,
    list_images,
    load_datalist,
    read_inbreast_xml,
    read_mammogram,
)
from bundle.preprocessing import NormalizeMammogramd, mammogram_preprocessing
from bundle.readers import MAX_PIXELS, MammogramError, PathLike, file_stem, image_format
from bundle.writers import save_nifti_atomic, save_png_atomic

__all__ = [
    "MammogramError",
    "image_format",
    "file_stem",
    "read_mammogram",
    "LoadMammogramd",
    "chest_wall_on_right",
    "OrientBreastd",
    "ResampleToSpacingd",
    "compute_breast_mask",
    "check_grey_levels",
    "large_scale_structure",
    "BreastMaskd",
    "NormalizeMammogramd",
    "RestoreGeometryd",
    "read_inbreast_xml",
    "LoadINbreastLabeld",
    "load_datalist",
    "list_images",
    "save_nifti_atomic",
    "save_png_atomic",
    "mammogram_preprocessing",
    "MAX_PIXELS",
    "PathLike",
]
