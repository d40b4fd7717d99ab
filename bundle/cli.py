"""Command-line checks for ``python -m monai.bundle run --config_file configs/inference.json``.

MONAI's bundle runner accepts any ``--key value`` pair as a config override and has no help of
its own: ``--help`` runs the bundle with its defaults and a misspelt option silently adds a new
config id. :class:`bundle.engine.MammogramInference` calls :func:`check_command_line` when it is
built inside that command (before any case is read or written): ``--help``/``-h`` prints the
config's options and exits 0, an option that names no config key exits 2 with the nearest valid
key. :func:`fail` prints one-line errors (``mcref: error: ...``) instead of tracebacks.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["MONAI_RUN_ARGS", "OPTION_HELP", "bundle_cli_argv", "parse_args", "check_command_line", "fail",
           "format_help", "unknown_options"]

MONAI_RUN_ARGS = ("run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file")
"""Arguments of ``monai.bundle.scripts.run`` itself (not config overrides)."""

OPTION_HELP: dict[str, str] = {
    "dataset_dir": "folder of mammograms (DICOM, PNG/TIFF, NIfTI, MHA), or one file; empty: demo phantoms",
    "output_dir": "where <case>/ folders, summary.csv and run.json go",
    "demo_dir": "where the demo phantoms are written when no dataset_dir is given",
    "pixel_spacing": "pixel spacing in mm (number or [row, col]); wins over the files'; needed for PNG/TIFF",
    "working_spacing": "spacing (mm) the networks work at",
    "threshold": "SegAI probability threshold of <case>_mask (the hole of the refinement)",
    "refined_threshold": "threshold of <case>_refined_mask (default: the chosen refiner's operating point)",
    "refiner_name": "refinement method, a name of bundle.refine.REFINERS (segai+genai, segai+classical, segai+sp1, ...)",
    "refiner_kwargs": "per-method arguments of the refiners",
    "hole_candidate_threshold": "SegAI probability of the marks the hole control considers",
    "refine": "run the generative refinement (False: SegAI alone)",
    "ckpt_path": "SegAI weights",
    "segai_backend": "\"torch\" (default) or \"openvino\": SegAI's network through OpenVINO (runs onnx_path; "
                     "needs pip install -e .[openvino])",
    "onnx_path": "SegAI's ONNX export used by segai_backend openvino (made from ckpt_path, docs/training.md)",
    "inpainter_ckpt_path": "inpainter weights of the refinement",
    "seed": "random seed",
    "device": "torch device (default: cuda when available, else cpu)",
    "hole_false_marks": "expected false marks per image that the refinement verifies",
    "hole_cluster_false_marks": "the same for marks in clusters",
    "grow_threshold": "marks of the refined mask grow into connected pixels with refined map >= this value "
                      "(their rims; no new marks); '$None' grows nothing",
    "segai_grow_threshold": "marks of the refined mask grow into connected pixels with SegAI probability >= this "
                            "value (SegAI's outline of a kept MC; no new marks); '$None' grows nothing",
    "max_mark_diameter_mm": "marks of the refined mask larger than a disk of this diameter (mm) are removed: not MCs; '$None' keeps all",
    "bundle_root": "the bundle folder",
}
"""One-line descriptions of the inference config's options (keys not listed show their default only)."""


def bundle_cli_argv(argv: Sequence[str] | None = None) -> list[str] | None:
    """The argument list when this process is ``python -m monai.bundle run ...``, else None.

    Args:
        argv: defaults to ``sys.argv``.
    """
    args = list(sys.argv if argv is None else argv)
    if len(args) < 2 or args[1] != "run":
        return None
    parts = Path(args[0]).parts
    if len(parts) >= 3 and parts[-3:] == ("monai", "bundle", "__main__.py"):
        return args
    return None


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs of a command line, values read as Python literals where possible.

    A bare ``--flag`` (followed by another option or nothing) gets ``True``; ``-h`` counts as ``--help``.

    Args:
        argv: the argument list (the program and the ``run`` command are skipped).
    """
    args = list(argv)
    pairs: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-h":
            pairs["help"] = True
        elif a.startswith("--") and len(a) > 2:
            key, eq, val = a[2:].partition("=")
            value: Any = val
            if not eq:
                if i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value = args[i + 1]
                    i += 1
                else:
                    value = True
            if isinstance(value, str):
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    pass
            pairs[key] = value
        i += 1
    return pairs


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``mcref: error: <message>`` (one line) to stderr and exit with ``code``.

    Args:
        message: what is wrong, naming the file/folder/option.
        code: the exit status.
    """
    text = " ".join(str(message).split())
    print(f"mcref: error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _config_files(pairs: Mapping[str, Any]) -> list[str]:
    files = pairs.get("config_file")
    if not files:
        return []
    return [files] if isinstance(files, str) else [str(f) for f in files]


def _flat_ids(node: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(node, Mapping):
        items = [(str(k), v) for k, v in node.items()]
    elif isinstance(node, list):
        items = [(str(i), v) for i, v in enumerate(node)]
    else:
        return out
    for k, v in items:
        key = f"{prefix}#{k}" if prefix else k
        out.append(key)
        out.extend(_flat_ids(v, key))
    return out


def _target_signature(target: str) -> inspect.Signature | None:
    """The call signature of a ``_target_`` (a class's ``__init__``), or None when it cannot be found."""
    try:
        from monai.bundle.config_item import ComponentLocator

        modname = ComponentLocator().get_component_module_name(target)
        if isinstance(modname, list):
            modname = modname[0] if modname else None
        if modname:
            obj = getattr(__import__(modname, fromlist=[target.split(".")[-1]]), target.split(".")[-1])
        else:
            import pydoc

            obj = pydoc.locate(target)
        return None if obj is None else inspect.signature(obj)
    except Exception:  # cannot tell
        return None


def _target_accepts(target: str, name: str) -> bool:
    """Whether the ``_target_`` class/function accepts keyword ``name`` (True when unknown)."""
    sig = _target_signature(target)
    if sig is None:
        return True
    params = sig.parameters.values()
    return name in sig.parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _key_exists(config: Any, key: str) -> bool:
    node = config
    parts = key.split("#")
    for i, part in enumerate(parts):
        if isinstance(node, Mapping):
            if part in node:
                node = node[part]
                continue
            if "_target_" in node and i == len(parts) - 1:
                return _target_accepts(str(node["_target_"]), part)
            return False
        if isinstance(node, list):
            try:
                node = node[int(part)]
                continue
            except (ValueError, IndexError):
                return False
        return False
    return True


def unknown_options(config: Mapping[str, Any], overrides: Mapping[str, Any], extra: Sequence[str] = ()) -> list[tuple[str, str | None]]:
    """Overrides that name no key of ``config``, each with the nearest valid key (or None).

    ``a#b`` keys are followed into the config; the last part may also be a keyword argument of
    the ``_target_`` it lands on (e.g. ``--runner#resume False``).

    Args:
        config: the merged raw config.
        overrides: ``{key: value}`` from the command line.
        extra: further valid keys (e.g. the tracking settings' ids).
    """
    valid = _flat_ids(config) + list(extra)
    bad = []
    for key in overrides:
        if key in MONAI_RUN_ARGS or key in extra or key.startswith("_meta_") or _key_exists(config, key):
            continue
        pool = [v for v in valid if v.count("#") == key.count("#")] or valid
        parent = key.rsplit("#", 1)[0] if "#" in key else None
        node: Any = config
        for part in (parent.split("#") if parent else []):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and "_target_" in node:  # keyword arguments of the component
            sig = _target_signature(str(node["_target_"]))
            if sig is not None:
                pool = [f"{parent}#{p}" for p in sig.parameters if p not in ("self", "args", "kwargs")] + pool
        near = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        bad.append((key, near[0] if near else None))
    return bad


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value if value else '""'
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_help(config: Mapping[str, Any], files: Sequence[str]) -> str:
    """The options of a config as help text.

    Args:
        config: the merged raw config.
        files: the config files (shown in the usage line).
    """
    cfg = files[0] if len(files) == 1 else repr(list(files))
    lines = [
        f"usage: python -m monai.bundle run --config_file {cfg} [--OPTION VALUE ...]",
        "",
        "mcref: microcalcification maps for mammograms (research software, not a medical device).",
        "",
        "options (defaults from the config; '$...' values are Python expressions):",
    ]
    simple = [k for k, v in config.items() if not isinstance(v, (dict, list)) and not str(k).startswith("_")]
    width = max((len(k) for k in simple), default=10) + 4
    for k in simple:
        desc = OPTION_HELP.get(str(k), "")
        lines.append(f"  --{k:<{width}}{_show(config[k])}" + (f"\n  {'':<{width + 2}}{desc}" if desc else ""))
    nested = [k for k, v in config.items() if isinstance(v, dict) and not str(k).startswith("_")]
    lines += [
        "",
        "nested settings: --KEY#SUBKEY VALUE, e.g. --runner#resume False (recompute finished cases),",
        "  --runner#save_overlay False, --genai_kwargs#tile 256; components: " + ", ".join(nested),
        "MONAI options: --meta_file, --logging_file, --tracking mlflow, --args_file FILE",
        "",
        "outputs: <output_dir>/<case>/ (maps, overlay, clusters, case.json), summary.csv, run.json;",
        "exit status 0 when every case is ok, 1 when any case failed, 2 for a usage or folder problem.",
        "See README.md and docs/data.md.",
    ]
    return "\n".join(lines)


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """Handle ``--help`` and refuse unknown options of a ``python -m monai.bundle run`` command line.

    Does nothing outside that command.

    Args:
        argv: defaults to ``sys.argv``.

    Raises:
        SystemExit: 0 after printing the help, 2 (with one line on stderr) for an unknown option.
    """
    args = bundle_cli_argv(argv)
    if args is None:
        return
    pairs = parse_args(args[2:])
    files = _config_files(pairs)
    if not files:
        return
    from monai.bundle import ConfigParser

    overrides = {k: v for k, v in pairs.items() if k not in MONAI_RUN_ARGS}
    args_file = pairs.get("args_file")
    if args_file:
        try:
            for k, v in ConfigParser.load_config_file(str(args_file)).items():
                if k not in MONAI_RUN_ARGS:
                    overrides.setdefault(k, v)
        except Exception as e:
            fail(f"{args_file}: cannot read --args_file ({e})")
    parser = ConfigParser()
    parser.read_config(files)
    config = parser.get()
    help_asked = overrides.pop("help", None) is not None
    if help_asked:
        print(format_help(config, files), flush=True)
        raise SystemExit(0)
    extra: list[str] = []
    tracking = pairs.get("tracking")
    if tracking:
        try:
            from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

            settings = DEFAULT_EXP_MGMT_SETTINGS.get(tracking) if isinstance(tracking, str) else tracking
            if settings is None:
                settings = ConfigParser.load_config_files(tracking)
            extra = [str(k) for k in settings.get("configs", {})]
        except Exception:
            extra = list(overrides)  # unknown tracking settings: accept what they may define
    nones = [k for k, v in overrides.items() if v is None or (isinstance(v, str) and v.strip() in ("None", "null"))]
    if nones:  # fire reads None, and MONAI's run drops None-valued overrides without a word
        fail(f"--{nones[0]} None would be ignored by monai.bundle run (it drops None values); "
             f"write --{nones[0]} '$None' to set it to None")
    bad = unknown_options(config, overrides, extra)
    if bad:
        key, near = bad[0]
        hint = f"; did you mean --{near}?" if near else ""
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        fail(f"unknown option --{key}{more}: no such key in {', '.join(files)}{hint} "
             f"(python -m monai.bundle run --config_file {files[0]} --help lists the options)")
