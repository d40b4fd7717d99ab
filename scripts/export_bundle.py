#!/usr/bin/env python
"""Export the bundle's networks to TorchScript and build a deployable bundle archive (zip).

For every network of ``NETWORKS`` (or of ``--networks FILE.json``) whose checkpoint exists:

1. ``python -m monai.bundle verify_net_in_out NET_ID`` (random weights, the input/output
   contract of ``configs/metadata.json``: ``network_data_format`` for SegAI, the matching entry
   of ``other_network_data_formats`` for the inpainter and the MC-GenRef segmentor),
2. ``python -m monai.bundle ckpt_export NET_ID --filepath models/<name>.ts --ckpt_file ...``
   (metadata and the config embedded; ``key_in_ckpt`` detected from the checkpoint).

The RF generator's ``forward(x, timesteps)`` takes two tensors, which these commands cannot
feed; it is checked against its metadata format and traced in Python instead
(:func:`export_multi_input`).

When ``--ckpt`` gives SegAI weights other than ``models/model.pt``, the archive's
``models/model.onnx`` (the OpenVINO runtime's network, ``segai_backend openvino``) is exported
again from them with the bundle's own command (``bundle.runtime.EXPORT_COMMAND``, docs/training.md
"SegAI's ONNX export"; needs ``pip install onnx onnxscript``, refused up front without them), and
checked against the weights through OpenVINO when it is installed. The bundle's own
``models/model.onnx`` is never rewritten (not even with ``--in_place``).

Then ``python -m monai.bundle verify_metadata`` against the schema copy in
``docs/monai_meta_schema_20240725.json`` (offline), and the archive: ``configs/``, ``models/``
(checkpoints and their TorchScript exports), ``docs/``, the ``bundle/`` Python package and
``LICENSE``, under one top folder; no tests, caches, evaluation outputs or training data. Entries
are sorted and time-stamped 1980-01-01 so that the same inputs give the same archive bytes.

usage::

    python scripts/export_bundle.py                                  # dist/mcref_bundle.zip
    python scripts/export_bundle.py --ckpt network_def=/tmp/model.pt --output /tmp/b.zip
    python scripts/export_bundle.py --ckpt mcgenref_seg=/tmp/seg.pt  # by network name
    python scripts/export_bundle.py --in_place                       # also write models/model.ts
    python -m deploy.mcref_app -i IN -o OUT --bundle dist/mcref_bundle.zip
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import hashlib
import importlib.util
import json
import os
import shlex
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
    {
        "name": "inpainter",
        "net_id": "inpainter_def",
        "config_file": "configs/inference.json",
        "ckpt_file": "models/inpainter.pt",
        "filepath": "models/inpainter.ts",
        # metadata.json#other_network_data_formats key of this network's format
        "format_key": "inpainter_def (configs/inference.json, models/inpainter.pt)",
        # shape-dependent window padding is Python control flow: trace on the inference tile
        "use_trace": True,
        "input_shape": [1, 2, 128, 128],
        "verify_n": 4,
        "required": True,
    },
    {
        "name": "mcgenref_seg",
        "net_id": "network_def",
        # the inference overlay sets its own norm and activation (instance norm, PReLU)
        "config_file": ["configs/inference.json", "configs/inference_mcgenref.json"],
        "ckpt_file": "models/mcgenref_seg.pt",
        "filepath": "models/mcgenref_seg.ts",
        "format_key": "network_def with models/mcgenref_seg.pt (configs/inference_mcgenref.json)",
        "use_trace": True,
        "input_shape": [1, 1, 128, 128],
        "verify_n": 8,
        "required": False,
    },
    {
        "name": "rflow",
        "net_id": "generator_def",
        "config_file": ["configs/inference.json", "configs/inference_mcgenref.json"],
        "ckpt_file": "models/rflow.pt",
        "filepath": "models/rflow.ts",
        "format_key": "generator_def (configs/inference_mcgenref.json, models/rflow.pt)",
        # forward(x, timesteps) has two inputs, which the ckpt_export CLI cannot trace: checked and
        # traced in Python against the same metadata format (export_multi_input)
        "multi_input": True,
        "input_shape": [1, 4, 64, 64],
        "verify_n": 8,
        "required": False,
    },
)

# SegAI's ONNX export (OpenVINO runtime) and the checkpoint it is made from: the archive's ONNX
# file must come from the archive's checkpoint (see export_onnx)
ONNX_FILE = "models/model.onnx"
ONNX_SOURCE = "models/model.pt"
ONNX_LOGIT_ATOL = 1e-2  # as tests/test_runtime.py: OpenVINO vs torch logits differ by rounding only

INCLUDE_DIRS = ("configs", "models", "docs", "bundle")
INCLUDE_FILES = ("LICENSE", "README.md")
EXCLUDE_PARTS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints", "eval", "work_data", "mlruns", "tests"}
EXCLUDE_SUFFIXES = (".pyc", ".pyo", ".tmp", ".lock", ".log")
SCHEMA = "docs/monai_meta_schema_20240725.json"


class ExportError(RuntimeError):
    """A request the export refuses (reported as one line by :func:`main`)."""


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
    config = config_arg(root, spec)
    if spec.get("multi_input"):
        return export_multi_input(spec, root, ckpt, out_file, verify)
    with tempfile.TemporaryDirectory(prefix="mcref_meta_") as td:
        meta = network_meta_file(root, spec, Path(td))
        return _export_cli(spec, root, ckpt, out_file, verify, timeout, meta, config)


def config_files(root: Path, spec: Mapping[str, Any]) -> list[str]:
    """Absolute paths of ``spec``'s config file(s) (one file or a list merged in order).

    Args:
        root: bundle root.
        spec: one entry of :data:`NETWORKS`.
    """
    cfg = spec["config_file"]
    return [str(root / f) for f in ([cfg] if isinstance(cfg, str) else cfg)]


def config_arg(root: Path, spec: Mapping[str, Any]) -> str:
    """``--config_file`` of the MONAI commands: the path, or a list of paths as MONAI's CLI reads it.

    Args:
        root: bundle root.
        spec: one entry of :data:`NETWORKS`.
    """
    files = config_files(root, spec)
    return files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"


def network_meta_file(root: Path, spec: Mapping[str, Any], folder: Path) -> str:
    """The metadata file that describes ``spec``'s network for the MONAI commands.

    ``verify_net_in_out`` and ``ckpt_export`` read ``network_data_format``; for a network other
    than the main one, a copy of ``configs/metadata.json`` is written to ``folder`` with
    ``network_data_format`` replaced by ``other_network_data_formats[spec["format_key"]]``.

    Args:
        root: bundle root.
        spec: one entry of :data:`NETWORKS`.
        folder: where to write the copy.
    """
    meta_path = root / "configs" / "metadata.json"
    key = spec.get("format_key")
    if not key:
        return str(meta_path)
    meta = json.loads(meta_path.read_text())
    formats = meta.get("other_network_data_formats", {})
    if key not in formats:
        raise KeyError(f"{meta_path}: other_network_data_formats has no entry {key!r} for {spec['name']}")
    meta["network_data_format"] = formats[key]
    out = folder / f"metadata_{spec['name']}.json"
    out.write_text(json.dumps(meta, indent=2))
    return str(out)


def _spatial(shape_spec: Sequence[Any], n: int) -> list[int]:
    """Spatial shape of a metadata entry at ``n``: ``"8*n"`` -> ``8 n``, ``64`` -> 64."""
    return [int(str(d).split("*")[0]) * n if "n" in str(d) else int(d) for d in shape_spec]


def export_multi_input(spec: Mapping[str, Any], root: Path, ckpt: Path, out_file: Path, verify: bool) -> dict:
    """Check and trace a network whose forward takes several tensors (the RF generator).

    The inputs are built from the network's metadata format (first input: image channels and
    spatial shape at ``verify_n``; further inputs: one value per sample in their value range);
    the output must have the declared channels, the input's spatial shape and dtype. The traced
    module is saved, reloaded and must reproduce the eager output.

    Args:
        spec: one entry of :data:`NETWORKS`.
        root: bundle root.
        ckpt: weights.
        out_file: TorchScript destination.
        verify: run the in/out check (tracing always compares with the eager output).
    """
    import torch
    from monai.bundle import ConfigParser

    sys.path.insert(0, str(root))
    from bundle.engine import load_checkpoint

    meta = json.loads((root / "configs" / "metadata.json").read_text())
    fmt = meta["other_network_data_formats"][spec["format_key"]]
    parser = ConfigParser()
    with contextlib.chdir(root):  # ``%configs/...`` imports are relative to the working directory
        parser.read_config(config_files(root, spec))
        parser["bundle_root"] = str(root)
        network_def = parser.get_parsed_content(spec["net_id"])
    net = load_checkpoint(network_def, ckpt, "cpu").eval()
    gen = torch.Generator().manual_seed(0)

    def inputs(n: int) -> list:
        xs = []
        for i, (name, f) in enumerate(fmt["inputs"].items()):
            if i == 0:
                xs.append(torch.randn(1, int(f["num_channels"]), *_spatial(f["spatial_shape"], n), generator=gen))
            else:
                lo, hi = f.get("value_range") or [0, 1]
                dtype = getattr(torch, f.get("dtype", "float32"))
                xs.append(torch.randint(int(lo), int(hi), (1,), generator=gen).to(dtype))
        return xs

    out_fmt = next(iter(fmt["outputs"].values()))
    with torch.no_grad():
        if verify:
            for n in (int(spec.get("verify_n", 1)), int(spec.get("verify_n", 1)) + 1):
                xs = inputs(n)
                y = net(*xs)
                want = (1, int(out_fmt["num_channels"]), *xs[0].shape[2:])
                if tuple(y.shape) != want or str(y.dtype) != f"torch.{out_fmt['dtype']}":
                    raise RuntimeError(f"{spec['name']}: output {tuple(y.shape)} {y.dtype}, metadata says {want} {out_fmt['dtype']}")
        example = [torch.randn(spec["input_shape"], generator=gen), *inputs(1)[1:]]
        traced = torch.jit.trace(net, tuple(example), check_trace=False)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(traced, str(out_file))
        again = torch.jit.load(str(out_file))
        err = float((again(*example) - net(*example)).abs().max())
    if not err < 1e-4:
        raise RuntimeError(f"{spec['name']}: TorchScript output differs from the eager network by {err}")
    return {"name": spec["name"], "net_id": spec["net_id"], "ckpt_file": str(ckpt), "filepath": spec["filepath"],
            "key_in_ckpt": key_in_checkpoint(ckpt), "verified": verify, "max_abs_diff": err}


def _export_cli(
    spec: Mapping[str, Any], root: Path, ckpt: Path, out_file: Path, verify: bool, timeout: int, meta: str, config: str
) -> dict:
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


def require_onnx_tools(ckpt: Path) -> None:
    """Raise :class:`ExportError` unless ``onnx`` and ``onnxscript`` (needed by the ONNX export) are installed.

    Args:
        ckpt: the SegAI weights to export (named in the message).
    """
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"the archive's SegAI weights ({ckpt}) are not the bundle's {ONNX_SOURCE}, so {ONNX_FILE} must be "
                          f"exported again from them, which needs {' and '.join(missing)}: pip install onnx onnxscript "
                          "(docs/training.md, SegAI's ONNX export)")


def export_onnx(root: Path, ckpt: Path, out_file: Path, verify: bool, timeout: int) -> dict:
    """Export SegAI's ONNX file from ``ckpt`` with the bundle's documented command.

    The command is ``bundle.runtime.EXPORT_COMMAND`` (docs/training.md) with ``--ckpt_file`` and
    ``--filepath`` replaced (and ``--key_in_ckpt`` for a ``{"network": ...}`` checkpoint), run from
    ``root``. With ``verify`` and OpenVINO installed, the file's logits are compared with the
    torch network's on two random tiles.

    Args:
        root: bundle root.
        ckpt: SegAI weights.
        out_file: ONNX destination.
        verify: compare the export with the weights (when OpenVINO is installed).
        timeout: seconds for the MONAI command.
    """
    require_onnx_tools(ckpt)
    sys.path.insert(0, str(root))
    from bundle.runtime import EXPORT_COMMAND

    cmd = shlex.split(EXPORT_COMMAND)
    if cmd[:3] != ["python", "-m", "monai.bundle"] or "--filepath" not in cmd or "--ckpt_file" not in cmd:
        raise ExportError(f"bundle.runtime.EXPORT_COMMAND is not a monai.bundle command with --filepath and --ckpt_file: "
                          f"{EXPORT_COMMAND}")
    args = cmd[3:]
    args[args.index("--filepath") + 1] = str(out_file)
    args[args.index("--ckpt_file") + 1] = str(ckpt)
    key = key_in_checkpoint(ckpt)
    if key:
        args += ["--key_in_ckpt", key]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    _bundle_cmd(args, root, timeout)
    if not out_file.is_file():
        raise RuntimeError(f"onnx_export wrote no {out_file}")
    err = None
    if verify and importlib.util.find_spec("openvino") is not None:
        import torch
        from monai.bundle import ConfigParser

        from bundle.engine import load_checkpoint
        from bundle.runtime import OpenVINONetwork

        parser = ConfigParser()  # the network the command exported: its net_id of its config
        with contextlib.chdir(root):
            parser.read_config(args[args.index("--config_file") + 1])
            parser["bundle_root"] = str(root)
            network_def = parser.get_parsed_content(args[1])
        net = load_checkpoint(network_def, ckpt, "cpu").eval()
        ov_net = OpenVINONetwork(out_file)
        g = torch.Generator().manual_seed(0)
        err = 0.0
        for shape in [(1, 1, 512, 512), (2, 1, 256, 384)]:  # the dynamic axes too
            x = torch.rand(shape, generator=g)
            with torch.no_grad():
                err = max(err, float((ov_net(x) - net(x)).abs().max()))
        if err > ONNX_LOGIT_ATOL:
            raise RuntimeError(f"{out_file}: OpenVINO logits differ from {ckpt}'s by {err:.3g} > {ONNX_LOGIT_ATOL}")
    return {"name": "segai_onnx", "filepath": ONNX_FILE, "ckpt_file": str(ckpt), "key_in_ckpt": key,
            "verified": err is not None, "max_abs_diff": err}


def _checkpoint(root: Path, networks: Sequence[Mapping[str, Any]], i: int, ckpts: Mapping[str, Path]) -> Path:
    """The checkpoint of ``networks[i]``: ``--ckpt NAME=PATH``, or ``NET_ID=PATH`` for the first
    network of that net_id only, else the spec's ``ckpt_file``."""
    spec = networks[i]
    shared = any(o["net_id"] == spec["net_id"] for o in networks[:i])
    return Path(ckpts.get(spec["name"], None if shared else ckpts.get(spec["net_id"])) or root / spec["ckpt_file"])


def onnx_source(root: Path, networks: Sequence[Mapping[str, Any]], ckpts: Mapping[str, Path]) -> Path | None:
    """The checkpoint ``models/model.onnx`` must be exported from again, or None when the
    bundle's own export fits the archive (no ONNX file, or the archive's ``models/model.pt`` is
    the bundle's, byte for byte).

    Args:
        root: bundle root.
        networks: network specs.
        ckpts: the ``--ckpt`` overrides.
    """
    own = root / ONNX_SOURCE
    if not (root / ONNX_FILE).is_file():
        return None
    for i, spec in enumerate(networks):
        if spec["ckpt_file"] != ONNX_SOURCE:
            continue
        ckpt = _checkpoint(root, networks, i, ckpts)
        if ckpt.is_file() and not (own.is_file() and filecmp.cmp(ckpt, own, shallow=False)):
            return ckpt
    return None


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
    onnx_ckpt = onnx_source(root, networks, ckpts)
    if onnx_ckpt is not None:  # refuse before any export rather than after
        require_onnx_tools(onnx_ckpt)
    if verify:
        schema = root / SCHEMA
        if not schema.is_file():
            raise FileNotFoundError(f"{schema}: schema copy needed for an offline verify_metadata")
        _bundle_cmd(["verify_metadata", "--meta_file", str(root / "configs" / "metadata.json"),
                     "--filepath", str(schema)], root, timeout)
        report["metadata_verified"] = True
    with tempfile.TemporaryDirectory(prefix="mcref_export_") as stage_dir:
        stage = Path(stage_dir)
        for i, spec in enumerate(networks):
            ckpt = _checkpoint(root, networks, i, ckpts)
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
        if onnx_ckpt is not None:
            onnx_file = stage / ONNX_FILE
            report["onnx"] = export_onnx(root, onnx_ckpt, onnx_file, verify, timeout)
            files[ONNX_FILE] = onnx_file
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
    try:
        report = build(root, output.resolve(), ckpts, networks, verify=not args.no_verify, in_place=args.in_place)
    except ExportError as e:
        print(f"export_bundle: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
