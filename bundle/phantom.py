"""Synthetic full-field digital mammograms (FFDM) with microcalcifications (MCs).

The generator builds a mammogram in the attenuation (log) domain, converts it to detector
counts, adds quantum (Poisson) and electronic (Gaussian) noise and maps the log signal to a
14-bit "for presentation" image in which bright means dense (MONOCHROME2 sense).

Model in one paragraph (details and references in ``docs/phantom.md``):

- geometry: a smooth breast outline (CC: semi-ellipse-like; MLO: axillary tail, pectoral
  muscle triangle in the top chest-wall corner, inframammary fold), chest wall at column 0
  for a left breast (mirrored for the right one);
- thickness: a compressed breast of thickness ``T`` with a semicircular periphery of radius
  ``T/2`` and a skin layer, so the path length (and the signal) falls off towards the skin line
  and the tangential path through the skin gives a bright skin line;
- tissue: fibroglandular density region, anatomical texture with a power-law spectrum
  ``1/f**beta`` (beta ~ 3), clustered lumps, a dense network of curvilinear structures
  (ligaments, ducts) and vessels;
- MCs: ``inject_mcs`` places clusters of round, irregular, rod-like and branching MCs; each
  MC's projected thickness profile ``p`` (pixel averaged, 1 = full thickness) is blurred by a
  Gaussian detector PSF and multiplies the detector signal by ``1 - c * blur(p)``. In the
  bright = dense log domain this is the additive term ``-gain * log(1 - c * blur(p))``.
  The exact label is ``p >= 0.5`` (plus the peak pixel of each MC, so every MC is labelled).

All randomness comes from ``numpy.random.Generator`` objects seeded by the caller.

This module is the public path of the generator; the code lives in modules of the synthesis
layer: :mod:`bundle.anatomy` (outline, pectoral muscle, tissue fields, vessels),
:mod:`bundle.mcmodel` (MC profiles and :func:`inject_mcs`), :mod:`bundle.phantomimage`
(:func:`make_phantom`: attenuation, detector, presentation, traps) and :mod:`bundle.phantomio`
(DICOM/NIfTI writers and :func:`make_dataset`).
"""

from __future__ import annotations

from bundle.mcmodel import MC_SHAPES, inject_mcs, mc_profile
from bundle.phantomimage import MAX_VALUE_14BIT, make_phantom
from bundle.phantomio import make_dataset, write_label_nifti, write_mg_dicom

__all__ = [
    "MC_SHAPES",
    "MAX_VALUE_14BIT",
    "mc_profile",
    "inject_mcs",
    "make_phantom",
    "write_mg_dicom",
    "write_label_nifti",
    "make_dataset",
]
