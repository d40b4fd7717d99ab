"""Bookkeeping of the batch runner (:class:`bundle.engine.MammogramInference`) around its cases.

Application layer (``docs/architecture.md``): the checks of the runner's arguments, the warnings
of one case (which go to its summary row), whether a case folder is finished for the current
settings, the run record ``run.json`` and the merged config of the running command line (what
MLflow records). The per-file primitives (atomic JSON, markers, hashes) are in
:mod:`bundle.runstate`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "QUIET_WARNINGS",
    "warning_texts",
    "case_finished",
    "write_run_record",
    "check_arguments",
    "input_problem",
    "invocation_config",
]


QUIET_WARNINGS: tuple[type[Warning], ...] = (
    DeprecationWarning, PendingDeprecationWarning, FutureWarning, ResourceWarning, ImportWarning,
)
"""Library warning kinds that say nothing about a case (left out of its row)."""


def warning_texts(caught: Sequence[warnings.WarningMessage], source: Path) -> list[str]:
    """The distinct messages of the warnings caught during one case, each naming the file.

    Args:
        caught: the warnings recorded while the case ran.
        source: the case's input file.
    """
    texts: list[str] = []
    for w in caught:
        if issubclass(w.category, QUIET_WARNINGS):
            continue
        msg = " ".join(str(w.message).split())
        if str(source) not in msg:
            msg = f"{source}: {msg}"
        if msg not in texts:
            texts.append(msg)
    return texts


def case_finished(marker: Mapping[str, Any] | None, name: str, settings_sha: str, input_sha: str, folder: Path) -> bool:
    """Whether a case folder's marker says it is complete for these settings and this input.

    Args:
        marker: the folder's completion marker (``case.json``), or None.
        name: the case folder name.
        settings_sha: fingerprint of the runner's settings.
        input_sha: SHA-256 of the input file.
        folder: the case folder (every output the marker lists must be there).
    """
    if not marker or not isinstance(marker.get("row"), Mapping):
        return False
    if marker.get("case") != name or marker.get("settings_sha256") != settings_sha:
        return False
    if marker.get("input_sha256") != input_sha or marker["row"].get("status") != "ok":
        return False
    outputs = marker.get("outputs")
    return isinstance(outputs, list) and all((folder / str(n)).is_file() for n in outputs)


def write_run_record(out: Path, run: Mapping[str, Any], umask: int) -> None:
    """Write ``out/run.json``; an earlier run's record is first moved to ``out/runs/<run id>.json``
    (marked ``interrupted`` when it never finished).

    Args:
        out: the output folder.
        run: the run record.
        umask: the process umask (output permissions).
    """
    import json

    from bundle.runstate import write_json_atomic

    path = out / "run.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("run_id") and old.get("run_id") != run["run_id"]:
        if old.get("status") == "running":
            old["status"] = "interrupted"
        runs = out / "runs"
        runs.mkdir(exist_ok=True)
        write_json_atomic(old, runs / f"{old['run_id']}.json", umask)
    write_json_atomic(dict(run), path, umask)


def check_arguments(threshold: float, refined_threshold: float, output_dir: Any,
                    virtual_normal_range: Sequence[float]) -> None:
    """Refuse runner arguments that cannot work, with a message naming the option.

    Args:
        threshold: threshold of the SegAI mask.
        refined_threshold: threshold of the refined mask.
        output_dir: the output folder.
        virtual_normal_range: ``(lo, hi)`` of the virtual normal DICOM.

    Raises:
        ValueError: one line naming the option and the value.
    """
    for key, value in (("threshold", threshold), ("refined_threshold", refined_threshold)):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--{key} must be a number in [0, 1], got {value!r}") from None
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"--{key} must be in [0, 1], got {value!r}")
    if output_dir is None or str(output_dir).strip() == "":
        raise ValueError("--output_dir is empty; give a folder for the outputs")
    lo, hi = (float(v) for v in virtual_normal_range)
    if not hi > lo:
        raise ValueError(f"virtual_normal_range must be (lo, hi) with hi > lo, got {tuple(virtual_normal_range)}")


def input_problem(exc: BaseException, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in the cause/context chain of ``exc`` (MONAI's
    Compose wraps transform errors in ``RuntimeError: applying transform ...``).

    Args:
        exc: the exception raised.
        kind: the exception type looked for.
    """
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None

def invocation_config(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Rebuild the merged config of the running ``python -m monai.bundle run`` from its arguments.

    The config files named by ``--config_file`` are merged and every other ``--key value`` pair
    is applied as an override, as ``monai.bundle`` does, and the ``%`` imports are expanded; the
    result is what MLflow records as the run's configuration. Returns ``{}`` when no
    ``--config_file`` is found.

    Args:
        argv: the argument list; defaults to ``sys.argv``.
    """
    import ast
    import sys

    from monai.bundle import ConfigParser

    args = list(sys.argv if argv is None else argv)
    pairs: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            key, _, val = a[2:].partition("=")
            if not _ and i + 1 < len(args) and not args[i + 1].startswith("--"):
                val = args[i + 1]
                i += 1
            try:
                pairs[key] = ast.literal_eval(val)
            except (ValueError, SyntaxError):
                pairs[key] = val
        i += 1
    files = pairs.pop("config_file", None)
    if not files:
        return {}
    files = [files] if isinstance(files, str) else list(files)
    parser = ConfigParser()
    parser.read_config(files)
    for k in ("meta_file", "logging_file", "args_file", "tracking", "run_id", "init_id", "final_id"):
        pairs.pop(k, None)
    for k, v in pairs.items():
        parser[k] = v
    # ``%file#id`` imports expanded (relative to the working directory, as the run itself resolved
    # them), so the record shows the configuration that ran, as its MLflow copy does
    parser.resolve_macro_and_relative_ids()
    merged = parser.get()
    merged["_config_files"] = files
    return merged
