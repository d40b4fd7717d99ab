"""The mcref MONAI Deploy application: mammograms in; refined DICOM SEG, probability SEG and
virtual normal image out.

Run in-process (CPU is fine)::

    python -m deploy.mcref_app -i INPUT_DICOM_FOLDER -o OUTPUT_FOLDER [--bundle BUNDLE_DIR_OR_ZIP]
        [--override KEY=VALUE ...]

``--bundle`` (or ``$MCREF_BUNDLE_PATH``) names a bundle folder or a bundle archive made by
``scripts/export_bundle.py``; by default the repository this app sits in is the bundle. The
models run through the bundle's own pipeline (``configs/inference.json#runner``), the same that
``python -m monai.bundle run`` runs. The SDK's own options (``-l LEVEL``, ``-w WORKDIR``) work as
usual; ``-m`` is not used (the networks come from the bundle). See ``docs/deploy.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

from .bundle_io import bundle_runner, default_bundle_path, parse_override, resolve_bundle
from .operators import (
    MG_SELECTION_RULES,
    MCRefDICOMLoaderOperator,
    MCRefPipelineOperator,
    MCResultWriterOperator,
    MGCaseOperator,
)
from .writer import ResultWriter

__all__ = ["MCRefApp", "main"]

logger = logging.getLogger("mcref.deploy")


class MCRefApp(Application):
    """Microcalcification segmentation of DICOM mammograms with the mcref bundle.

    Args:
        argv: command line (``[program, *args]``) with the SDK's options (``-i``, ``-o``, ``-l``, ``-w``).
        bundle: bundle folder or archive (default: :func:`bundle_io.default_bundle_path`).
        config_names: bundle configs merged in order for inference.
        overrides: bundle config overrides (config id -> value).
        write_prob: write the FRACTIONAL SEG of the refined probability.
        write_virtual_normal: write the virtual normal image.
    """

    name = "mcref-mc-segmentation"
    description = "Microcalcification segmentation of full-field digital mammograms (research use only)"
    version = "0.3.2"

    def __init__(
        self,
        argv: Sequence[str] | None = None,
        bundle: str | Path | None = None,
        config_names: Sequence[str] = ("inference",),
        overrides: Mapping[str, Any] | None = None,
        write_prob: bool = True,
        write_virtual_normal: bool = True,
    ) -> None:
        self._bundle_arg = Path(bundle) if bundle else default_bundle_path()
        self._config_names = list(config_names)
        self._overrides = dict(overrides or {})
        self._write_prob = write_prob
        self._write_virtual_normal = write_virtual_normal
        self.writer: MCResultWriterOperator | None = None
        super().__init__(list(argv) if argv else [])

    def compose(self) -> None:
        """Build the operator graph (called by ``run``)."""
        app_context: AppContext = Application.init_app_context(self.argv)
        app_context.models = None  # the networks come from the bundle, not the SDK's model factory
        in_path = Path(app_context.input_path)
        out_path = Path(app_context.output_path)
        workdir = Path(app_context.workdir) if app_context.workdir else None
        root = resolve_bundle(self._bundle_arg, cache_dir=workdir / "bundles" if workdir else None)
        info: dict[str, Any] = {}
        runner = bundle_runner(root, self._config_names, self._overrides,
                               scratch=workdir / "scratch" if workdir else None, info=info)
        from bundle.dicom import algorithm_name  # importable once the bundle root is on sys.path

        algorithm = algorithm_name(info.get("method"))
        logger.info("bundle %s (version %s, %s), input %s, output %s", root, runner.version, algorithm, in_path, out_path)
        out_path.mkdir(parents=True, exist_ok=True)
        writer = ResultWriter(out_path, version=runner.version,
                              virtual_normal_range=getattr(runner, "virtual_normal_range", (-0.5, 1.5)),
                              write_prob=self._write_prob, write_virtual_normal=self._write_virtual_normal,
                              algorithm=algorithm)

        loader = MCRefDICOMLoaderOperator(self, CountCondition(self, 1), input_folder=in_path, name="study_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=MG_SELECTION_RULES, all_matched=True, name="mg_selector")
        to_cases = MGCaseOperator(self, name="mg_cases")
        pipeline = MCRefPipelineOperator(self, runner=runner, name="mcref_pipeline")
        self.writer = MCResultWriterOperator(self, writer=writer, name="writer")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(loader, to_cases, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_cases, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_cases, pipeline, {("cases", "cases")})
        self.add_flow(pipeline, self.writer, {("results", "results")})
        self.add_flow(loader, self.writer, {("unread_files", "unread_files")})


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
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="bundle config override, VALUE as JSON or text (e.g. refined_threshold=0.7, device=cpu)")
    parser.add_argument("--no-prob", action="store_true", help="do not write the FRACTIONAL SEG of the refined probability")
    parser.add_argument("--no-virtual-normal", action="store_true", help="do not write the virtual normal image")
    parser.add_argument("-h", "--help", action="store_true")
    own, rest = parser.parse_known_args(args)
    if own.help:
        parser.print_help()
        print("\nSDK options:\n  -i/--input PATH  input DICOM folder\n  -o/--output PATH  output folder\n"
              "  -l/--log-level LEVEL\n  -w/--workdir PATH")
        return 0
    try:
        overrides = dict(parse_override(o) for o in own.override)
        app = MCRefApp(argv=[sys.executable, "mcref_app", *rest], bundle=own.bundle,
                       config_names=own.config or ["inference"], overrides=overrides,
                       write_prob=not own.no_prob, write_virtual_normal=not own.no_virtual_normal)
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
