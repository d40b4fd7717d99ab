"""What identifies an MLflow run of the bundle (:func:`run_identity`, :func:`log_identity`).

Bundle version, git commit (and whether the work tree had local changes), SHA-256 of every weights
file, dataset name and case-list digest (plus MLflow dataset inputs), software versions and the
resolved configuration (every ``@``/``$`` replaced by the value the run used, ``config.json``)
beside the merged, unresolved one (``config_raw.json``).

:func:`case_list_digest` digests the case list relative to the folder all cases share, so the same
cases give the same digest wherever the data set lies. Re-exported by :mod:`bundle.tracking`; see
``docs/tracking.md``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "safe_key",
    "file_sha256",
    "git_state",
    "software_versions",
    "case_table",
    "case_list_digest",
    "find_live_parser",
    "resolved_config",
    "run_identity",
    "log_identity",
    "log_dataset_input",
]


# ----------------------------------------------------------------------------------------------
# identity
# ----------------------------------------------------------------------------------------------
def safe_key(name: str) -> str:
    """``name`` with every character MLflow refuses in a key (all but letters, digits, ``_-. :/``)
    replaced by ``_``.

    Args:
        name: a file or object name.
    """
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", str(name))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file.

    Args:
        path: the file.
        chunk: read size in bytes.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def git_state(root: str | os.PathLike) -> dict[str, str]:
    """``{"commit": sha, "dirty": "true"|"false"}`` of the git work tree at ``root``; ``{}`` when
    ``root`` is not in a git work tree or git is missing.

    Args:
        root: a folder inside the work tree.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": "true" if dirty else "false"}


def software_versions() -> dict[str, str]:
    """Versions of python, torch, monai, mlflow, numpy and pytorch-ignite."""
    import ignite
    import mlflow
    import monai

    return {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "mlflow": mlflow.__version__, "numpy": np.__version__, "ignite": ignite.__version__}


def _items_of(data: Any) -> list[Mapping[str, Any]]:
    items = getattr(data, "data", data)  # a MONAI Dataset or a plain list
    if items is None:
        return []
    return [d for d in items if isinstance(d, Mapping)]


def _common_dir(items: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("image", "label")) -> str:
    """The deepest folder holding every path of ``keys`` in ``items`` (``""`` when there is none)."""
    paths = [os.path.abspath(str(d[k])) for d in items for k in keys if isinstance(d.get(k), (str, os.PathLike))]
    if not paths:
        return ""
    common = os.path.commonpath(paths)
    return os.path.dirname(common) if len(set(paths)) == 1 or os.path.isfile(common) else common


def case_table(data: Any, keys: Sequence[str] = ("image", "label")) -> list[dict[str, str]]:
    """One row per case: ``case`` (image stem) and the ``keys`` paths, relative to the folder all
    cases share (so the table, and its digest, do not depend on where the data set lies).

    Args:
        data: datalist entries (dicts), or a MONAI dataset holding them in ``.data``.
        keys: path keys of an entry; missing or None values become ``""``.
    """
    items = _items_of(data)
    common = _common_dir(items, keys)
    rows = []
    for d in items:
        image = d.get("image")
        row = {"case": str(d.get("case") or (Path(str(image)).name.split(".")[0] if image else ""))}
        for k in keys:
            v = d.get(k)
            row[k] = os.path.relpath(os.path.abspath(str(v)), common) if isinstance(v, (str, os.PathLike)) else ""
        rows.append(row)
    return rows


def case_list_digest(data: Any, keys: Sequence[str] = ("image", "label")) -> str:
    """SHA-256 of the sorted case table (:func:`case_table`, one tab-separated line per case):
    the same cases give the same digest wherever the data set lies.

    Args:
        data: datalist entries, or a MONAI dataset.
        keys: path keys of an entry.
    """
    lines = sorted("\t".join(r[k] for k in ("case", *keys)) for r in case_table(data, keys))
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def find_live_parser() -> Any | None:
    """The ``monai.bundle.ConfigParser`` of the running ``python -m monai.bundle run``, found on the
    call stack (the parser that is resolving ``run`` or ``initialize``); None outside a bundle run."""
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, ConfigParser):
                return owner
            parser = getattr(owner, "parser", None)
            if isinstance(parser, ConfigParser):
                return parser
            frame = frame.f_back
    finally:
        del frame
    return None


def _jsonable(v: Any, depth: int = 0) -> tuple[bool, Any]:
    """(True, JSON value) for plain data (paths, devices, dtypes and numpy scalars as text), else (False, None)."""
    if v is None or isinstance(v, (bool, int, str)):
        return True, v
    if isinstance(v, float):
        return True, v if math.isfinite(v) else str(v)
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return _jsonable(v.item(), depth)
    if isinstance(v, (os.PathLike, torch.device, torch.dtype)):
        return True, str(v)
    if depth > 6:
        return False, None
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            ok, y = _jsonable(x, depth + 1)
            if not ok:
                return False, None
            out.append(y)
        return True, out
    if isinstance(v, Mapping):
        outd = {}
        for k, x in v.items():
            ok, y = _jsonable(x, depth + 1)
            if not ok:
                return False, None
            outd[str(k)] = y
        return True, outd
    return False, None


def resolved_config(parser: Any) -> dict[str, Any]:
    """The configuration with every ``@``/``$`` replaced by the value the run used.

    Values come from the parser's resolved items: plain data is written as is, an object built by
    an expression as ``"<ClassName>"``, a component as its dict with resolved arguments. Items the
    run never needed stay as written and are listed under ``"_unresolved"``.

    Args:
        parser: a ``monai.bundle.ConfigParser`` that ran (see :func:`find_live_parser`).
    """
    from monai.bundle.utils import ID_REF_KEY, ID_SEP_KEY

    done = parser.ref_resolver.resolved_content
    normalize = parser.ref_resolver.normalize_id
    actions = {"imports", "initialize", "run", "finalize"}
    unresolved: list[str] = []

    def walk(raw: Any, id_: str) -> Any:
        if isinstance(raw, str) and raw.startswith(ID_REF_KEY):  # a reference: the value it points to
            ref = normalize(raw[len(ID_REF_KEY):])
            if ref in done:
                ok, v = _jsonable(done[ref])
                return v if ok else raw
        if id_ in done and not (isinstance(raw, Mapping) and "_target_" in raw):
            ok, v = _jsonable(done[id_])
            if ok:
                return v
            if not isinstance(raw, (Mapping, list)):
                return f"<{type(done[id_]).__name__}>"
        if isinstance(raw, Mapping):
            return {k: walk(v, f"{id_}{ID_SEP_KEY}{k}" if id_ else str(k)) for k, v in raw.items()}
        if isinstance(raw, list):
            return [walk(v, f"{id_}{ID_SEP_KEY}{i}" if id_ else str(i)) for i, v in enumerate(raw)]
        if isinstance(raw, str) and raw.startswith(("$", ID_REF_KEY, "%")) and id_.split(ID_SEP_KEY)[0] not in actions:
            unresolved.append(id_)
        return raw

    out = walk(parser.get(), "")
    out["_unresolved"] = unresolved
    return out


def run_identity(
    kind: str,
    bundle_root: str | os.PathLike = ".",
    weights: Mapping[str, str | os.PathLike | None] | None = None,
    datasets: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
) -> dict[str, str]:
    """The identity tags of a run.

    ``mcref.kind``, ``mcref.bundle_version``, ``mlflow.source.git.commit`` and ``mcref.git_dirty``
    (when in a git work tree), ``mcref.weights.<name>.sha256`` / ``.path`` per weights file,
    ``mcref.dataset.name``, ``mcref.dataset.<context>.digest`` / ``.n_cases`` per case list, and
    ``mcref.version.<package>``.

    Args:
        kind: ``train``, ``evaluate``, ``study``, ``inference``...
        bundle_root: the bundle root (version from ``configs/metadata.json``, git from its work tree).
        weights: name -> weights file (missing files are tagged ``missing``).
        datasets: context (``evaluation``, ``training``...) -> datalist entries or dataset.
        dataset_name: name of the data set (default: the folder of the first case list).
    """
    from bundle.utils import bundle_version

    tags = {"mcref.kind": kind, "mcref.bundle_version": bundle_version(bundle_root)}
    git = git_state(bundle_root)
    if git:
        tags["mlflow.source.git.commit"] = git["commit"]
        tags["mcref.git_commit"] = git["commit"]
        tags["mcref.git_dirty"] = git["dirty"]
    for name, path in (weights or {}).items():
        if not path:
            continue
        p = Path(path)
        tags[f"mcref.weights.{safe_key(name)}.path"] = str(p.absolute())
        tags[f"mcref.weights.{safe_key(name)}.sha256"] = file_sha256(p) if p.is_file() else "missing"
    first_dir = None
    for context, data in (datasets or {}).items():
        items = _items_of(data)
        tags[f"mcref.dataset.{context}.digest"] = case_list_digest(items)
        tags[f"mcref.dataset.{context}.n_cases"] = str(len(items))
        if first_dir is None and items and items[0].get("image"):
            first_dir = Path(str(items[0]["image"])).absolute().parent.name
    tags["mcref.dataset.name"] = dataset_name or first_dir or "unknown"
    for k, v in software_versions().items():
        tags[f"mcref.version.{k}"] = v
    return tags


def log_dataset_input(client: Any, run_id: str, data: Any, name: str, context: str,
                      source: str | None = None) -> str:
    """Log a case list as an MLflow dataset input (``mlflow.data.from_pandas`` of :func:`case_table`).

    Args:
        client: an ``mlflow.MlflowClient``.
        run_id: the run.
        data: datalist entries or dataset.
        name: dataset name shown in the UI.
        context: ``training``, ``validation``, ``evaluation``...
        source: where the list comes from (e.g. the datalist file).

    Returns:
        the dataset digest MLflow computed.
    """
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    df = pd.DataFrame(case_table(data), columns=["case", "image", "label"])
    src = source or _common_dir(_items_of(data)) or os.getcwd()
    ds = mlflow.data.from_pandas(df, source=os.path.abspath(str(src)), name=name)
    tag = InputTag(key="mlflow.data.context", value=context)
    client.log_inputs(run_id, datasets=[DatasetInput(dataset=ds._to_mlflow_entity(), tags=[tag])])
    return str(ds.digest)


def log_identity(
    client: Any,
    run_id: str,
    kind: str,
    bundle_root: str | os.PathLike = ".",
    weights: Mapping[str, str | os.PathLike | None] | None = None,
    datasets: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
    dataset_source: str | None = None,
    config: Mapping[str, Any] | None = None,
    parser: Any | None = None,
    log_config: bool = True,
) -> dict[str, str]:
    """Tag a run with :func:`run_identity`, log its case lists as dataset inputs and its
    configuration (``config.json`` resolved, ``config_raw.json`` as merged).

    Args:
        client: an ``mlflow.MlflowClient``.
        run_id: the run.
        kind: see :func:`run_identity`.
        bundle_root: the bundle root.
        weights: name -> weights file.
        datasets: context -> datalist entries.
        dataset_name: data set name.
        dataset_source: where the case lists come from (e.g. the datalist path).
        config: configuration to log when there is no parser (logged as ``config.json``).
        parser: the running ``ConfigParser`` (default: :func:`find_live_parser`).
        log_config: log the configuration files (False: tags and dataset inputs only).

    Returns:
        the tags set.
    """
    from mlflow.entities import RunTag

    tags = run_identity(kind, bundle_root, weights, datasets, dataset_name)
    parser = parser if parser is not None else find_live_parser()
    tags["mcref.config_resolved"] = "true" if parser is not None else "false"
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
    for context, data in (datasets or {}).items():
        if _items_of(data):
            log_dataset_input(client, run_id, data, f"{tags['mcref.dataset.name']}:{context}", context, dataset_source)
    if not log_config:
        return tags
    if parser is not None:
        raw = parser.get()
        client.log_dict(run_id, resolved_config(parser), "config.json")
        ok, raw_json = _jsonable(raw)
        client.log_dict(run_id, raw_json if ok else json.loads(json.dumps(raw, default=str)), "config_raw.json")
    elif config is not None:
        client.log_dict(run_id, json.loads(json.dumps(dict(config), default=str)), "config.json")
    return tags
