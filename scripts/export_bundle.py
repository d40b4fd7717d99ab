#!/usr/bin/env python
"""Export the bundle's networks to TorchScript and build a deployable bundle archive (zip).

For every network of ``NETWORKS`` (or of ``--networks FILE.json``) whose checkpoint exists:

1. ``python -m monai.bundle verify_net_in_out NET_ID`` (random weights, the input/output
   contract of ``configs/metadata.json``),
2. ``python -m monai.bundle ckpt_export NET_ID --filepath models/<name>.ts --ckpt_file ...``
   (metadata and the config embedded; ``key_in_ckpt`` detected from the checkpoint).

Then ``python -m monai.bundle verify_metadata`` against the schema copy in
``docs/monai_meta_schema_20240725.json`` (offline), and the archive: ``configs/``, ``models/``
(checkpoints and their TorchScript exports), ``docs/``, the ``bundle/`` Python package and
``LICENSE``, under one top folder; no tests, caches, evaluation outputs or training data. Entries
are sorted and time-stamped 1980-01-01 so that the same inputs give the same archive bytes.

usage::

    python scripts/export_bundle.py                                  # dist/mcref_bundle.zip
    python scripts/export_bundle.py --ckpt network_def=/tmp/model.pt --output /tmp/b.zip
    python scripts/export_bundle.py --in_place                       # also write models/model.ts
    python -m deploy.mcref_app -i IN -o OUT --bundle dist/mcref_bundle.zip
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# One entry per exported network. ``required``: fail when its checkpoint is missing (otherwise
# the entry is skipped with a note). Add an entry for every new network of the bundle.
NETWORKS: tuple[dict[str, Any], ...] = (
    {
        "name": "segai",
        "net_id": "network_def",
        "config_file": "configs/inference.json",
        "ckpt_file": "models/model.pt",
        "filepath": "models/model.ts",
        # SegAINet.forward calls super().forward, which TorchScript cannot script: trace it.
        "use_trace": True,
        "input_shape": [1, 1, 512, 512],
        "verify_n": 32,  # verify_net_in_out: spatial shape 8*n
        "required": True,
    },
)

INCLUDE_DIRS = ("configs", "models", "docs", "bundle")
INCLUDE_FILES = ("LICENSE", "README.md")
EXCLUDE_PARTS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints", "eval", "work_data", "mlruns", "tests"}
EXCLUDE_SUFFIXES = (".pyc", ".pyo", ".tmp", ".lock", ".log")
SCHEMA = "docs/monai_meta_schema_20240725.json"


def _bundle_cmd(args: Sequence[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def key_in_checkpoint(path: Path) -> str:
    """``"network"`` for a ``{"network": state_dict}`` checkpoint, ``""`` for a plain state dict.

    Args:
        path: checkpoint file.
    """
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "network" in state and isinstance(state["network"], Mapping):
        return "network"
    return ""


def export_network(spec: Mapping[str, Any], root: Path, ckpt: Path, out_file: Path, verify: bool, timeout: int) -> dict:
    """Verify and export one network to TorchScript.

    Args:
        spec: one entry of :data:`NETWORKS`.
        root: bundle root (the working directory of the MONAI commands).
        ckpt: checkpoint to export.
        out_file: TorchScript destination.
        verify: run ``verify_net_in_out`` first.
        timeout: seconds per command.

    Returns:
        A record of what was done.
    """
    meta = str(root / "configs" / "metadata.json")
    config = str(root / spec["config_file"])
    if verify:
        _bundle_cmd(
            ["verify_net_in_out", spec["net_id"], "--meta_file", meta, "--config_file", config,
             "--n", str(spec.get("verify_n", 1)), "--device", "cpu"],
            root, timeout,
        )
    args = ["ckpt_export", spec["net_id"], "--filepath", str(out_file), "--ckpt_file", str(ckpt),
            "--meta_file", meta, "--config_file", config]
    key = key_in_checkpoint(ckpt)
    if key:
        args += ["--key_in_ckpt", key]
    if spec.get("use_trace"):
        args += ["--use_trace", "True", "--input_shape", json.dumps(list(spec["input_shape"]))]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    _bundle_cmd(args, root, timeout)
    if not out_file.is_file():
        raise RuntimeError(f"ckpt_export wrote no {out_file}")
    return {"name": spec["name"], "net_id": spec["net_id"], "ckpt_file": str(ckpt), "filepath": spec["filepath"],
            "key_in_ckpt": key, "verified": verify}


def _excluded(rel: Path) -> bool:
    return any(part in EXCLUDE_PARTS or part.startswith(".") for part in rel.parts) or rel.name.endswith(EXCLUDE_SUFFIXES)


def bundle_files(root: Path) -> dict[str, Path]:
    """The files of the bundle that go into the archive, by archive-relative name.

    Args:
        root: bundle root.
    """
    files: dict[str, Path] = {}
    for d in INCLUDE_DIRS:
        base = root / d
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(root)
            if p.is_file() and not p.is_symlink() and not _excluded(rel):
                files[rel.as_posix()] = p
    for f in INCLUDE_FILES:
        if (root / f).is_file():
            files[f] = root / f
    return files


def write_archive(files: Mapping[str, Path], archive: Path, top: str) -> str:
    """Write a deterministic zip (sorted entries, fixed time stamps) atomically; return its SHA-256.

    Args:
        files: archive-relative name -> source file.
        archive: destination ``.zip``.
        top: top folder name inside the archive.
    """
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{archive.name}.", suffix=".tmp", dir=archive.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in sorted(files):
                info = zipfile.ZipInfo(f"{top}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, files[name].read_bytes())
        os.replace(tmp, archive)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return hashlib.sha256(archive.read_bytes()).hexdigest()


def build(
    root: Path,
    output: Path,
    ckpts: Mapping[str, Path] | None = None,
    networks: Sequence[Mapping[str, Any]] = NETWORKS,
    verify: bool = True,
    in_place: bool = False,
    timeout: int = 900,
) -> dict[str, Any]:
    """Export the networks and write the archive.

    Args:
        root: bundle root.
        output: archive path.
        ckpts: checkpoint per ``net_id`` overriding the spec's ``ckpt_file``.
        networks: network specs (see :data:`NETWORKS`).
        verify: run ``verify_net_in_out`` and ``verify_metadata``.
        in_place: also copy the TorchScript files into the bundle's ``models/``.
        timeout: seconds per MONAI command.

    Returns:
        A report (also stored in the archive as ``models/export.json``).
    """
    ckpts = dict(ckpts or {})
    files = bundle_files(root)
    report: dict[str, Any] = {"networks": [], "skipped": []}
    if verify:
        schema = root / SCHEMA
        if not schema.is_file():
            raise FileNotFoundError(f"{schema}: schema copy needed for an offline verify_metadata")
        _bundle_cmd(["verify_metadata", "--meta_file", str(root / "configs" / "metadata.json"),
                     "--filepath", str(schema)], root, timeout)
        report["metadata_verified"] = True
    with tempfile.TemporaryDirectory(prefix="mcref_export_") as stage_dir:
        stage = Path(stage_dir)
        for spec in networks:
            ckpt = Path(ckpts.get(spec["net_id"], ckpts.get(spec["name"], root / spec["ckpt_file"])))
            if not ckpt.is_file():
                if spec.get("required", False):
                    raise FileNotFoundError(f"{ckpt}: checkpoint of {spec['name']} ({spec['net_id']}) not found; "
                                            f"train it or pass --ckpt {spec['net_id']}=PATH")
                report["skipped"].append({"name": spec["name"], "reason": f"{ckpt} not found"})
                continue
            ts = stage / spec["filepath"]
            report["networks"].append(export_network(spec, root, ckpt, ts, verify, timeout))
            files[spec["filepath"]] = ts
            files[spec["ckpt_file"]] = ckpt
            if in_place:
                dest = root / spec["filepath"]
                if dest.resolve() != ts.resolve():
                    shutil.copyfile(ts, dest)
        rep_file = stage / "export.json"
        rep_file.write_text(json.dumps(report, indent=2) + "\n")
        files["models/export.json"] = rep_file
        top = json.loads((root / "configs" / "metadata.json").read_text()).get("name", "bundle")
        report["sha256"] = write_archive(files, output, top)
    report["archive"] = str(output)
    report["entries"] = len(files)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle_root", default=str(ROOT), help="bundle root (default: this repository)")
    ap.add_argument("--output", default=None, help="archive path (default: BUNDLE_ROOT/dist/<name>_bundle.zip)")
    ap.add_argument("--ckpt", action="append", default=[], metavar="NET_ID=PATH",
                    help="checkpoint for a network, overriding its spec (repeatable)")
    ap.add_argument("--networks", default=None, help="JSON file with a list of network specs replacing NETWORKS")
    ap.add_argument("--no_verify", action="store_true", help="skip verify_net_in_out and verify_metadata")
    ap.add_argument("--in_place", action="store_true", help="also write the TorchScript files into BUNDLE_ROOT/models")
    args = ap.parse_args(argv)
    root = Path(args.bundle_root).resolve()
    name = json.loads((root / "configs" / "metadata.json").read_text()).get("name", "bundle")
    output = Path(args.output) if args.output else root / "dist" / f"{name}_bundle.zip"
    ckpts = {}
    for item in args.ckpt:
        key, sep, path = item.partition("=")
        if not sep:
            ap.error(f"--ckpt expects NET_ID=PATH, got {item!r}")
        ckpts[key] = Path(path).resolve()
    networks = json.loads(Path(args.networks).read_text()) if args.networks else NETWORKS
    report = build(root, output.resolve(), ckpts, networks, verify=not args.no_verify, in_place=args.in_place)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
