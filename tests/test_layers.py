"""The package is laid out by layer (docs/architecture.md): a module never imports a module of a
higher layer, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "bundle"

#: bottom to top; a module may import modules of its own layer or of a lower one.
LAYERS: dict[str, tuple[str, ...]] = {
    "io": ("utils", "readers", "imagemeta", "loading", "breastmask", "geometry", "preprocessing", "writers", "data",
           "dicom", "clusters", "runstate", "cli"),
    "synthesis": ("anatomy", "mcmodel", "phantomimage", "phantomio", "phantom"),
    "networks": ("networks", "inpainter", "rflow"),
    "inference": ("runtime", "inferers", "refine", "falsealarm", "pipeline", "mcgenref", "training",
                  "inpainting", "refine_maps", "synthetic_training", "ttgpr"),
    "evaluation": ("objects", "statistics", "image_metrics", "detection_curves", "batch_items", "metric_handlers",
                   "tracking_store", "tracking_identity", "mlflow_artifacts", "metrics", "reports", "study_settings",
                   "figures", "study_analysis", "study_report", "study_tracking", "evaluation_report", "study",
                   "tracking"),
    "application": ("engine", "runner_support"),
}
LEVEL = {m: i for i, (_, mods) in enumerate(LAYERS.items()) for m in mods}


def bundle_imports(path: Path) -> set[str]:
    """Names of the ``bundle.*`` modules ``path`` imports anywhere in its code."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "bundle":
                out.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bundle."))
    return out


def test_every_module_has_a_layer():
    modules = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert modules == set(LEVEL), f"give these modules a layer: {sorted(modules ^ set(LEVEL))}"


@pytest.mark.parametrize("module", sorted(LEVEL))
def test_no_module_imports_a_higher_layer(module):
    upward = sorted(m for m in bundle_imports(PKG / f"{module}.py") if m in LEVEL and LEVEL[m] > LEVEL[module])
    assert not upward, f"bundle/{module}.py imports higher-layer modules {upward}"


def test_the_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\n\ndef g():\n    from bundle.study import MCStudy\n    import bundle.engine\n")
    assert bundle_imports(f) == {"study", "engine"}
