"""The mcref MONAI Deploy application: mammograms in, DICOM SEG + probability map out.

Run in-process (CPU is fine)::

    python -m deploy.mcref_app -i INPUT_DICOM_FOLDER -o OUTPUT_FOLDER [--bundle BUNDLE_DIR_OR_ZIP]

``--bundle`` (or ``$MCREF_BUNDLE_PATH``) names a bundle folder or a bundle archive made by
``scripts/export_bundle.py``; by default the repository this app sits in is the bundle. The
SDK's own options (``-l LEVEL``, ``-w WORKDIR``) work as usual; ``-m`` is not used (the network
comes from the bundle). See ``docs/deploy.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

from .bundle_io import bundle_loader, bundle_parser, bundle_version, default_bundle_path, resolve_bundle
from .operators import MG_SELECTION_RULES, MCRefBundleInferenceOperator, MCResultWriterOperator, MGImageOperator

__all__ = ["MCRefApp", "main"]

logger = logging.getLogger("mcref.deploy")


class MCRefApp(Application):
    """Microcalcification segmentation of DICOM mammograms with the mcref bundle.

    Args:
        argv: command line (``[program, *args]``) with the SDK's options (``-i``, ``-o``, ``-l``, ``-w``).
        bundle: bundle folder or archive (default: :func:`bundle_io.default_bundle_path`).
        config_names: bundle configs merged in order for inference.
        write_prob: also write the probability map object.
    """

    name = "mcref-mc-segmentation"
    description = "Microcalcification segmentation of full-field digital mammograms (research use only)"
    version = "0.1.0"

    def __init__(
        self,
        argv: Sequence[str] | None = None,
        bundle: str | Path | None = None,
        config_names: Sequence[str] = ("inference",),
        write_prob: bool = True,
    ) -> None:
        self._bundle_arg = Path(bundle) if bundle else default_bundle_path()
        self._config_names = list(config_names)
        self._write_prob = write_prob
        self.writer: MCResultWriterOperator | None = None
        super().__init__(list(argv) if argv else [])

    def compose(self) -> None:
        """Build the operator graph (called by ``run``)."""
        app_context: AppContext = Application.init_app_context(self.argv)
        # The network is loaded from the bundle folder by the bundle operator; the SDK's model
        # factory (``-m``) would hand it an unloaded Model object instead.
        app_context.models = None
        in_path = Path(app_context.input_path)
        out_path = Path(app_context.output_path)
        out_path.mkdir(parents=True, exist_ok=True)
        cache = Path(app_context.workdir) / "bundles" if app_context.workdir else None
        root = resolve_bundle(self._bundle_arg, cache_dir=cache)
        logger.info("bundle %s (version %s), input %s, output %s", root, bundle_version(root), in_path, out_path)
        loader = bundle_loader(bundle_parser(root, self._config_names))

        study_loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=in_path, name="study_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=MG_SELECTION_RULES, all_matched=True, name="mg_selector")
        to_image = MGImageOperator(self, loader=loader, name="mg_image")
        infer = MCRefBundleInferenceOperator(
            self, app_context=app_context, bundle_path=root, config_names=self._config_names, name="mcref_bundle"
        )
        self.writer = MCResultWriterOperator(
            self, output_folder=out_path, version=bundle_version(root), write_prob=self._write_prob, name="writer"
        )
        self.add_flow(study_loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(study_loader, to_image, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_image, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_image, infer, {("cases", "cases")})
        self.add_flow(infer, self.writer, {("results", "results")})


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: ``python -m deploy.mcref_app -i IN -o OUT [--bundle PATH]``.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 when the run completed (skipped inputs included, see ``summary.json``), 1 when an
        instance failed for a reason other than its input, 2 for a bad command line or bundle.
    """
    from .bundle_io import BundleError

    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m deploy.mcref_app", add_help=False,
        description="mcref microcalcification segmentation (MONAI Deploy app). SDK options: -i IN -o OUT [-l LEVEL] [-w WORKDIR].",
    )
    parser.add_argument("--bundle", default=None, help="bundle folder or .zip archive (default: $MCREF_BUNDLE_PATH or this repository)")
    parser.add_argument("--config", action="append", default=None, help="bundle config name(s) merged in order (default: inference)")
    parser.add_argument("--no-prob", action="store_true", help="do not write the probability map object")
    parser.add_argument("-h", "--help", action="store_true")
    own, rest = parser.parse_known_args(args)
    if own.help:
        parser.print_help()
        print("\nSDK options:\n  -i/--input PATH  input DICOM folder\n  -o/--output PATH  output folder\n"
              "  -l/--log-level LEVEL\n  -w/--workdir PATH")
        return 0
    try:
        app = MCRefApp(argv=[sys.executable, "mcref_app", *rest], bundle=own.bundle,
                       config_names=own.config or ["inference"], write_prob=not own.no_prob)
        app.run()
    except BundleError as e:
        logging.getLogger("mcref.deploy").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = app.writer.summary if app.writer is not None else {}
    if not summary:
        return 1
    counts: dict[str, Any] = summary.get("counts", {})
    print(json.dumps({"counts": counts}))
    return 1 if counts.get("failed", 0) else 0
