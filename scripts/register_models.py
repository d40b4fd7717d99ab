#!/usr/bin/env python
"""Log every shipped network as an MLflow model (PyTorch flavour, signature, input example) and
register it under a stable name, so that a metric can be traced to the exact weights.

Usage::

    python scripts/register_models.py [--tracking-uri URI] [--models segai inpainter ...] [--force]

Registered names (one version per distinct weights file; the version carries the file's SHA-256,
the bundle version and the git commit as tags, and the alias ``bundle_<version>``):

=================== ========================= ==================================================
name                weights                   input example -> output
=================== ========================= ==================================================
mcref-segai         models/model.pt           tile (1, 1, 128, 128) -> MC logits (1, 1, 128, 128)
mcref-inpainter     models/inpainter.pt       [image, hole] (1, 2, 128, 128) -> image (1, 1, 128, 128)
mcref-mcgenref-seg  models/mcgenref_seg.pt    tile (1, 1, 128, 128) -> MC logits (1, 1, 128, 128)
mcref-rflow         models/rflow.pt           [x_t, condition] (1, 4, 64, 64), param ``timestep`` -> velocity
=================== ========================= ==================================================

The evaluation runs tag the SHA-256 of the weights they used (``mcref.weights.<name>.sha256``): the
model version with the same ``mcref.weights.sha256`` tag holds those weights. The store is the
bundle's (``$MLFLOW_TRACKING_URI``, else ``<bundle>/eval/mlruns.db``); an unreachable server falls
back to it. Weights already registered (same name, same SHA-256) are not registered again unless
``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["ShippedModel", "SHIPPED", "build_network", "register", "main"]

EXPERIMENT = "mcref_models"


@dataclass(frozen=True)
class ShippedModel:
    """A shipped network: where its architecture and weights are, and an input example.

    Attributes:
        key: short name (``--models``).
        registered_name: MLflow registered model name.
        config: train config holding ``network_def``.
        weights: weights file relative to the bundle root.
        input_shape: shape of the input example.
        timestep: for generators called ``net(x, t)``: the default timestep of :class:`TimestepAdapter`.
    """

    key: str
    registered_name: str
    config: str
    weights: str
    input_shape: tuple[int, ...]
    timestep: float | None = None


SHIPPED: tuple[ShippedModel, ...] = (
    ShippedModel("segai", "mcref-segai", "configs/train_segai.json", "models/model.pt", (1, 1, 128, 128)),
    ShippedModel("inpainter", "mcref-inpainter", "configs/train_inpainter.json", "models/inpainter.pt", (1, 2, 128, 128)),
    ShippedModel("mcgenref_seg", "mcref-mcgenref-seg", "configs/train_mcgenref_seg.json", "models/mcgenref_seg.pt",
                 (1, 1, 128, 128)),
    ShippedModel("rflow", "mcref-rflow", "configs/train_rflow.json", "models/rflow.pt", (1, 4, 64, 64), timestep=500.0),
)


def build_network(model: ShippedModel, bundle_root: str | os.PathLike = ROOT) -> Any:
    """The network of ``model`` with its shipped weights, in eval mode (wrapped in
    :class:`bundle.tracking.TimestepAdapter` for generators).

    Args:
        model: the shipped model.
        bundle_root: the bundle root.
    """
    from monai.bundle import ConfigParser

    from bundle.engine import load_checkpoint
    from bundle.tracking import TimestepAdapter

    parser = ConfigParser()
    # the train configs import blocks of configs/inference.json by a path relative to the working
    # directory (``%configs/...``): parse from the bundle root, whatever the caller's directory
    with contextlib.chdir(bundle_root):
        parser.read_config(str(Path(bundle_root) / model.config))
        network_def = parser.get_parsed_content("network_def")
    net = load_checkpoint(network_def, Path(bundle_root) / model.weights, "cpu")
    if model.timestep is not None:
        net = TimestepAdapter(net, model.timestep).eval()
    return net


def _example(model: ShippedModel) -> Any:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random(model.input_shape, dtype=np.float32)
    if model.key == "inpainter":  # last channel is the hole: a 24 x 24 square
        x[:, -1] = 0
        x[:, -1, 52:76, 52:76] = 1
    return x


def register(models: Sequence[ShippedModel] = SHIPPED, tracking_uri: str | None = None,
             bundle_root: str | os.PathLike = ROOT, force: bool = False) -> dict[str, dict[str, str]]:
    """Log and register ``models`` in one run of the experiment ``mcref_models``.

    Args:
        models: the shipped models to register.
        tracking_uri: tracking URI (see :func:`bundle.tracking.resolve_tracking_uri`).
        bundle_root: the bundle root.
        force: register again weights already registered under the same name.

    Returns:
        ``{key: {"name", "version", "sha256", "model_uri", "status"}}`` with status ``registered`` or
        ``already registered``.
    """
    import mlflow
    import monai
    import torch
    from mlflow.models import infer_signature

    from bundle.engine import bundle_version
    from bundle.tracking import (
        default_store_dir,
        file_sha256,
        get_or_create_experiment,
        git_state,
        log_identity,
        resolve_tracking_uri,
        ui_hint,
    )

    root = Path(bundle_root)
    uri = resolve_tracking_uri(tracking_uri, default_store_dir(root))
    client = mlflow.MlflowClient(tracking_uri=uri)
    version = bundle_version(root)
    alias = "bundle_" + "".join(c if c.isalnum() else "_" for c in version)
    git = git_state(root)
    out: dict[str, dict[str, str]] = {}
    todo = []
    for m in models:
        sha = file_sha256(root / m.weights)
        existing = [] if force else [
            mv for mv in client.search_model_versions(f"name='{m.registered_name}'")
            if mv.tags.get("mcref.weights.sha256") == sha
        ]
        if existing:
            mv = max(existing, key=lambda v: int(v.version))
            out[m.key] = {"name": m.registered_name, "version": str(mv.version), "sha256": sha,
                          "model_uri": f"models:/{m.registered_name}/{mv.version}", "status": "already registered"}
        else:
            todo.append((m, sha))
    if not todo:
        return out

    exp_id = get_or_create_experiment(client, EXPERIMENT, uri)
    # only the client API: no global tracking URI is set, so callers' environments stay as they were
    run = client.create_run(exp_id, run_name="register_models", tags={"mcref.role": "register"})
    rid = run.info.run_id
    status = "FAILED"
    try:
        log_identity(client, rid, "register", root, {m.key: root / m.weights for m, _ in todo}, log_config=False)
        reqs = [f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}",
                f"mlflow=={mlflow.__version__}", "einops", "numpy", "scipy"]
        for m, sha in todo:
            net = build_network(m, root)
            x = _example(m)
            with torch.no_grad():
                y = net(torch.from_numpy(x)).numpy()
            params = {"timestep": float(m.timestep)} if m.timestep is not None else None
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, m.key)
                mlflow.pytorch.save_model(
                    net, path, signature=infer_signature(x, y, params=params),
                    input_example=(x, params) if params else x, code_paths=[str(root / "bundle")],
                    pip_requirements=reqs, serialization_format="pickle",
                )
                client.log_artifacts(rid, path, m.key)
            if not client.search_registered_models(f"name='{m.registered_name}'"):
                client.create_registered_model(
                    m.registered_name, description=f"mcref shipped network {m.key}: weights {m.weights}, network_def of {m.config}")
            tags = {"mcref.weights.sha256": sha, "mcref.weights.path": m.weights, "mcref.bundle_version": version,
                    **({"mcref.git_commit": git["commit"], "mcref.git_dirty": git["dirty"]} if git else {})}
            mv = client.create_model_version(
                m.registered_name, source=f"{client.get_run(rid).info.artifact_uri}/{m.key}", run_id=rid, tags=tags,
                description=f"mcref {version}: {m.weights} (sha256 {sha})",
            )
            client.set_registered_model_alias(m.registered_name, alias, mv.version)
            out[m.key] = {"name": m.registered_name, "version": str(mv.version), "sha256": sha,
                          "model_uri": f"models:/{m.registered_name}/{mv.version}", "status": "registered"}
        status = "FINISHED"
    finally:
        client.set_terminated(rid, status)
    print(ui_hint(uri, exp_id, rid), flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status.

    Args:
        argv: arguments (default ``sys.argv[1:]``).
    """
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else <bundle>/eval/mlruns.db)")
    ap.add_argument("--models", nargs="+", default=[m.key for m in SHIPPED], choices=[m.key for m in SHIPPED])
    ap.add_argument("--force", action="store_true", help="register weights again even when already registered")
    args = ap.parse_args(argv)
    chosen = [m for m in SHIPPED if m.key in args.models]
    missing = [m.weights for m in chosen if not (ROOT / m.weights).is_file()]
    if missing:
        print(f"error: weights not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    for key, r in register(chosen, args.tracking_uri, ROOT, args.force).items():
        print(f"{key:<13} {r['name']:<20} version {r['version']:<4} {r['status']:<18} sha256 {r['sha256'][:16]}...  "
              f"mlflow.pytorch.load_model('models:/{r['name']}/{r['version']}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
