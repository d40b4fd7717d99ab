"""MLflow tracking of every run of the bundle: where runs go, what identifies them, and the ignite
handlers that log training and evaluation.

This is the reporting layer: it may import ``bundle.metrics``, ``bundle.study``, ``bundle.reports``;
low layers (``bundle.data``, ``bundle.phantom``, ``bundle.networks``) never import it.

Store
    :func:`resolve_tracking_uri` gives one URI per run: an explicit one, else ``$MLFLOW_TRACKING_URI``,
    else the bundle's local store ``sqlite:///<bundle_root>/eval/mlruns.db`` (artifacts in
    ``<bundle_root>/eval/mlruns/``). An ``http(s)`` server that does not answer its ``/health``
    endpoint within ``probe_timeout`` seconds is replaced by the local store, with one warning
    naming it, instead of MLflow's minutes of retries.

Identity (:func:`run_identity`, :func:`log_identity`)
    bundle version, git commit (and whether the work tree had local changes), SHA-256 of every
    weights file, dataset name and case-list digest (plus MLflow dataset inputs), software versions
    and the resolved configuration (every ``@``/``$`` replaced by the value the run used,
    ``config.json``) beside the merged, unresolved one (``config_raw.json``).

Handlers
    :class:`TrackingHandler` (a MONAI ``MLFlowHandler``) owns the run of a trainer or evaluator;
    :class:`EvaluationReportHandler` adds curves (``mlflow.log_figure``), the per-case table
    (``log_table``) and panels of the worst cases to an evaluation run.

See ``docs/tracking.md``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import platform
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

__all__ = [
    "DEFAULT_STORE_SUBDIR",
    "default_store_dir",
    "sqlite_uri",
    "server_reachable",
    "resolve_tracking_uri",
    "artifact_location_for",
    "get_or_create_experiment",
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
    "ui_hint",
    "loss_from_output",
    "TrackingHandler",
    "sample_figure",
    "EvaluationReportHandler",
    "TimestepAdapter",
]

logger = logging.getLogger(__name__)

#: the local store lives in ``<bundle_root>/<DEFAULT_STORE_SUBDIR>/mlruns.db`` (``eval/`` is gitignored).
DEFAULT_STORE_SUBDIR = "eval"


# ----------------------------------------------------------------------------------------------
# store
# ----------------------------------------------------------------------------------------------
def default_store_dir(bundle_root: str | os.PathLike | None = None) -> Path:
    """The folder of the bundle's default tracking store, ``<bundle_root>/eval``.

    Args:
        bundle_root: bundle root (default: this package's parent folder, i.e. the bundle itself).
    """
    root = Path(bundle_root) if bundle_root is not None else Path(__file__).resolve().parents[1]
    return (root / DEFAULT_STORE_SUBDIR).absolute()


def sqlite_uri(folder: str | os.PathLike) -> str:
    """``sqlite:///<folder>/mlruns.db`` with an absolute path.

    Args:
        folder: folder of the database.
    """
    from monai.utils import path_to_sqlite_uri

    return str(path_to_sqlite_uri(str(Path(folder).absolute() / "mlruns.db")))


def server_reachable(uri: str, timeout: float = 3.0) -> bool:
    """Whether an ``http(s)`` tracking server answers: ``GET <uri>/health`` succeeds (2xx/3xx), or is
    refused for lack of credentials (401/403: a server is there), within ``timeout`` seconds. No
    answer, a 404 (no MLflow server at that address) or a 5xx count as down. Other URI schemes are not
    probed (True).

    Args:
        uri: tracking URI.
        timeout: seconds to wait for the connection and the answer.
    """
    if not uri.lower().startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return int(r.status) < 400
    except urllib.error.HTTPError as e:
        return int(e.code) in (401, 403)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def resolve_tracking_uri(
    tracking_uri: str | None = None,
    store_dir: str | os.PathLike | None = None,
    probe_timeout: float = 3.0,
    fallback: bool = True,
) -> str:
    """The tracking URI of a run.

    ``tracking_uri`` if given, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<store_dir>/mlruns.db``.
    When the chosen URI is an ``http(s)`` server that does not answer (:func:`server_reachable`) and
    ``fallback`` is on, one warning names the local store that is used instead.

    Args:
        tracking_uri: explicit URI (wins over the environment).
        store_dir: folder of the local store (default :func:`default_store_dir`).
        probe_timeout: seconds the server may take to answer ``/health``.
        fallback: replace an unreachable server by the local store; False returns the URI unprobed.

    Raises:
        ValueError: a plain path or ``file:`` URI (MLflow no longer supports file stores).
    """
    store = Path(store_dir) if store_dir is not None else default_store_dir()
    uri = str(tracking_uri) if tracking_uri else os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return sqlite_uri(store)
    if uri.startswith("file:") or "://" not in uri and not uri.startswith("databricks"):
        raise ValueError(
            f"tracking URI {uri!r} is a file store, which MLflow no longer supports; use "
            f"sqlite:///<folder>/mlruns.db or an http(s) server"
        )
    if fallback and not server_reachable(uri, probe_timeout):
        local = sqlite_uri(store)
        logger.warning(
            "MLflow server %s does not answer (%s/health, %.3g s limit); logging to the local store %s "
            "instead (mlflow ui --backend-store-uri %s)", uri, uri.rstrip("/"), probe_timeout, local, local,
        )
        return local
    return uri


def artifact_location_for(uri: str) -> str | None:
    """Artifact root of new experiments: ``<db folder>/mlruns`` for a SQLite store, else None (the
    server decides).

    Args:
        uri: tracking URI.
    """
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlruns").absolute().as_uri()
    return None


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    """Id of the experiment ``name``, created (artifacts beside a SQLite store) when missing.

    Args:
        client: an ``mlflow.MlflowClient``.
        name: experiment name.
        uri: the client's tracking URI.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location_for(uri)))
    except MlflowException:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


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


def ui_hint(uri: str, experiment_id: str, run_id: str) -> str:
    """Two lines telling where a run is and how to open it in the MLflow UI.

    Args:
        uri: tracking URI.
        experiment_id: experiment of the run.
        run_id: the run.
    """
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.lower().startswith(("http://", "https://")):
        return f"MLflow run {run_id} in {uri}\n  open {uri.rstrip('/')}/{path}"
    return (f"MLflow run {run_id} in {uri}\n"
            f"  view: mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{path}")


def loss_from_output(output: Any) -> Any:
    """The ``loss`` of a MONAI engine output (list of dicts, or a dict), None when there is none.

    Args:
        output: ``engine.state.output``.
    """
    if isinstance(output, list) and output and isinstance(output[0], Mapping):
        return output[0].get("loss")
    if isinstance(output, Mapping):
        return output.get("loss")
    return None


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


def _to_2d(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    return a if a.ndim in (2, 3) else None


def sample_figure(items: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("image", "label", "pred"),
                  max_items: int = 4, title: str = "") -> Any:
    """A matplotlib figure: one row per item, one panel per channel of each of ``keys`` (grey, own
    range, shown with its min and max).

    Args:
        items: dicts of (C, H, W) or (H, W) tensors/arrays (e.g. a MONAI engine's decollated output).
        keys: keys to show; missing ones are skipped.
        max_items: rows.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = []
    for it in list(items)[:max_items]:
        panels = []
        for k in keys:
            a = _to_2d(it.get(k)) if isinstance(it, Mapping) else None
            if a is None:
                continue
            chans = [a] if a.ndim == 2 else [a[c] for c in range(min(a.shape[0], 4))]
            panels += [(f"{k}[{c}]" if a.ndim == 3 else k, ch) for c, ch in enumerate(chans)]
        if panels:
            rows.append(panels)
    ncol = max((len(r) for r in rows), default=1)
    fig = Figure(figsize=(2.2 * ncol, 2.2 * max(len(rows), 1) + 0.4))
    for i, panels in enumerate(rows):
        for j, (name, a) in enumerate(panels):
            ax = fig.add_subplot(len(rows), ncol, i * ncol + j + 1)
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            ax.imshow(a, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_title(f"{name} [{lo:.2g}, {hi:.2g}]", fontsize=7)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# the run of an engine
# ----------------------------------------------------------------------------------------------
class TrackingHandler(MLFlowHandler):
    """
    MONAI ``MLFlowHandler`` that owns one MLflow run of a trainer or evaluator and makes it
    identifiable and findable.

    On top of ``MLFlowHandler`` (params, ``engine.state.metrics`` per epoch, loss and learning rate
    per iteration):

    - the tracking URI goes through :func:`resolve_tracking_uri` (unreachable server -> local store)
      and wins over ``$MLFLOW_TRACKING_URI``; a new run is always created (never resumed by name),
      optionally as the child of ``parent_run_id``;
    - identity at STARTED (:func:`log_identity`): tags, dataset inputs, resolved config;
    - other ``MLFlowHandler`` objects on the engine or ``validator`` (e.g. those added by
      ``--tracking mlflow``) are detached at STARTED so that nothing is logged twice;
    - per epoch: mean loss (``<tag_name>_epoch``), learning rate (``lr``), ``epoch_time_s``; the
      validator's metrics at the trainer's epoch; a sample picture every ``sample_interval`` epochs;
    - at COMPLETED: ``wall_time_s``, the ``artifacts`` (folders keep their name), the checkpoints
      written into ``checkpoint_dir`` during the run (artifacts under ``checkpoints/``, SHA-256 tags),
      then the run is ended and its id and ``mlflow ui`` command are printed. An exception ends
      the run as FAILED.
    - only rank 0 of a distributed run logs.

    Args:
        tracking_uri: tracking URI (see :func:`resolve_tracking_uri`).
        experiment_name: experiment.
        run_name: run name.
        kind: ``train`` or ``evaluate`` (the ``mcref.kind`` tag).
        bundle_root: bundle root (version, git, default store).
        store_dir: folder of the local store (default ``<bundle_root>/eval``).
        weights: name -> weights file used by the run (hashed).
        datasets: context -> datalist entries (or MONAI dataset) of the run.
        dataset_name: data set name.
        dataset_source: where the case lists come from.
        params: extra parameters.
        tags: extra tags.
        parent_run_id: make the run a child of this run.
        validator: an evaluator run by the trainer; its epoch metrics are logged at the trainer's epoch.
        checkpoint_dir: folder the trainer's checkpoints go to.
        checkpoint_glob: checkpoint file pattern.
        artifacts: files or folders logged at COMPLETED.
        sample_keys: keys of ``engine.state.output`` items drawn in the sample pictures; empty for none.
        sample_interval: draw every this many epochs (and at the last one).
        iteration_log: log the loss (and learning rate) every iteration (bool or event filter).
        output_transform: loss from ``engine.state.output`` (default :func:`loss_from_output`).
        tag_name: name of the loss metric.
        close_on_complete: end the run at COMPLETED (else call :meth:`close`).
        print_run: print the run id and ``mlflow ui`` command when the run ends.
        probe_timeout: seconds for the server probe.

    Attributes:
        run_id: the run's id after STARTED.
        tracking_uri: the URI used.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "mcref",
        run_name: str | None = None,
        kind: str = "train",
        bundle_root: str | os.PathLike = ".",
        store_dir: str | os.PathLike | None = None,
        weights: Mapping[str, str | os.PathLike | None] | None = None,
        datasets: Mapping[str, Any] | None = None,
        dataset_name: str | None = None,
        dataset_source: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        validator: Engine | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_glob: str = "*.pt",
        artifacts: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        sample_keys: Sequence[str] = ("image", "label", "pred"),
        sample_interval: int = 1,
        iteration_log: bool | Callable[[Engine, int], bool] = True,
        output_transform: Callable[[Any], Any] | None = None,
        tag_name: str = "train_loss",
        close_on_complete: bool = True,
        print_run: bool = True,
        probe_timeout: float = 3.0,
    ) -> None:
        import mlflow

        self.enabled = _rank() == 0
        self.run_id: str | None = None
        self.cur_run = None
        if not self.enabled:  # other ranks of a distributed run log nothing and open no store
            return
        store = Path(store_dir) if store_dir is not None else default_store_dir(bundle_root)
        uri = resolve_tracking_uri(tracking_uri, store, probe_timeout)
        super().__init__(
            tracking_uri=uri, iteration_log=iteration_log, epoch_log=True,
            output_transform=output_transform or loss_from_output,
            tag_name=tag_name, experiment_name=experiment_name, run_name=run_name,
            experiment_param=dict(params) if params else None, close_on_complete=close_on_complete,
        )
        # MLFlowHandler lets $MLFLOW_TRACKING_URI win over its argument: the resolved URI must win
        # (it may be the local fallback of an unreachable server).
        self.tracking_uri = uri
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.artifact_location = artifact_location_for(uri)
        self.kind = kind
        self.bundle_root = Path(bundle_root)
        self.weights = dict(weights or {})
        self.datasets = dict(datasets or {})
        self.dataset_name = dataset_name
        self.dataset_source = dataset_source
        self.extra_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.parent_run_id = parent_run_id
        self.validator = validator
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_glob = checkpoint_glob
        if artifacts is None:
            self.extra_artifacts: list[str] = []
        elif isinstance(artifacts, (str, os.PathLike)):
            self.extra_artifacts = [os.fspath(artifacts)]
        else:
            self.extra_artifacts = [os.fspath(a) for a in artifacts if a]
        self.sample_keys = tuple(sample_keys)
        self.sample_interval = max(1, int(sample_interval))
        self.print_run = print_run
        self.experiment_id: str | None = None
        self.identity: dict[str, str] = {}
        self._engine: Engine | None = None
        self._t0 = 0.0
        self._t_epoch = 0.0
        self._loss_sum = 0.0
        self._loss_n = 0

    # ------------------------------------------------------------------ wiring
    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (and on ``validator`` when given); a no-op on ranks other than 0.

        Args:
            engine: the trainer or evaluator whose run this is.
        """
        if not self.enabled:
            return
        self._engine = engine
        events: list[tuple[Any, Callable]] = [(Events.STARTED, self.start), (Events.EPOCH_STARTED, self._epoch_started),
                                              (Events.ITERATION_COMPLETED, self._accumulate),
                                              (Events.EPOCH_COMPLETED, self.epoch_completed),
                                              (Events.EXCEPTION_RAISED, self.failed)]
        if self.iteration_log:
            flt = self.iteration_log if callable(self.iteration_log) else None
            events.append((Events.ITERATION_COMPLETED(event_filter=flt) if flt else Events.ITERATION_COMPLETED,
                           self.iteration_completed))
        for event, fn in events:
            if not engine.has_event_handler(fn, event):
                engine.add_event_handler(event, fn)
        # COMPLETED is registered at STARTED, after every other handler: checkpoints saved at
        # COMPLETED (CheckpointSaver save_final) exist when they are logged
        if self.validator is not None and not self.validator.has_event_handler(self.validation_completed,
                                                                                 Events.EPOCH_COMPLETED):
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self.validation_completed)

    def _detach_others(self) -> None:
        """Detach every other ``MLFlowHandler`` of the engine and the validator (``--tracking mlflow``)."""
        from bundle.metrics import _mlflow_handler_on

        for eng in (self._engine, self.validator):
            if eng is None:
                continue
            while True:
                other = _mlflow_handler_on(eng, exclude=self)
                if other is None:
                    break
                # it may still be called once in this STARTED firing: let it see our run, log nothing
                other.cur_run, other.client, other.experiment = self.cur_run, self.client, self.experiment
                other.dataset_dict, other.experiment_param, other.artifacts = None, None, ()
                other.epoch_logger = other.iteration_logger = lambda *a, **k: None
                for event, handlers in list(eng._event_handlers.items()):
                    for entry in list(handlers):
                        fn = entry[0]
                        if getattr(fn, "__self__", None) is other:
                            eng.remove_event_handler(fn, event)
                logger.info("tracking is built into this config: the extra MLFlowHandler (--tracking) is not used")

    # ------------------------------------------------------------------ events
    def start(self, engine: Engine) -> None:
        """Create the run (child of ``parent_run_id``), log identity, params and dataset inputs.

        Args:
            engine: the engine.
        """
        if self.cur_run is None:
            from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

            self.experiment_id = get_or_create_experiment(self.client, self.experiment_name, self.tracking_uri)
            self.experiment = self.client.get_experiment(self.experiment_id)
            tags = {**self.extra_tags}
            if self.parent_run_id:
                tags[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
            name = self.run_name or f"{self.kind}_{time.strftime('%Y%m%d_%H%M%S')}"
            self.cur_run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            self.run_id = self.cur_run.info.run_id
            self._t0 = time.perf_counter()
            self._detach_others()
            self.identity = log_identity(
                self.client, self.run_id, self.kind, self.bundle_root, self.weights, self.datasets,
                self.dataset_name, self.dataset_source,
            )
            logger.info("MLflow run %s (%s) in %s", self.run_id, name, self.tracking_uri)
            if not engine.has_event_handler(self.completed, Events.COMPLETED):
                engine.add_event_handler(Events.COMPLETED, self.completed)
        super().start(engine)

    def completed(self, engine: Engine) -> None:
        """Log the end-of-run items (:meth:`complete`) and end the run when ``close_on_complete``.

        Args:
            engine: the engine.
        """
        self.complete()
        if self.close_on_complete:
            self.close()

    def _epoch_started(self, engine: Engine) -> None:
        self._t_epoch = time.perf_counter()
        self._loss_sum, self._loss_n = 0.0, 0

    def _accumulate(self, engine: Engine) -> None:
        try:
            v = self.output_transform(engine.state.output)
        except (KeyError, IndexError, TypeError):
            return
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            self._loss_sum += float(v)
            self._loss_n += 1

    def epoch_completed(self, engine: Engine) -> None:
        """Log ``engine.state.metrics`` (MLFlowHandler), the mean loss, learning rate, epoch time and
        the sample picture.

        Args:
            engine: the engine.
        """
        super().epoch_completed(engine)
        if self.cur_run is None:
            return
        epoch = int(engine.state.epoch)
        extra = {"epoch_time_s": time.perf_counter() - self._t_epoch}
        if self._loss_n:
            extra[f"{self.tag_name}_epoch"] = self._loss_sum / self._loss_n
        opt = getattr(engine, "optimizer", None)
        if opt is not None and opt.param_groups:
            extra["lr"] = float(opt.param_groups[0]["lr"])
        self._log_metrics(extra, step=epoch)
        last = epoch == int(engine.state.max_epochs or epoch)
        if self.sample_keys and (epoch % self.sample_interval == 0 or last):
            self._log_samples(engine, f"samples/{self.kind}_epoch_{epoch:04d}.png", f"{self.kind} epoch {epoch}")

    def validation_completed(self, validator: Engine) -> None:
        """Log the validator's metrics at the trainer's epoch, and a validation picture.

        Args:
            validator: the validation engine.
        """
        if self.cur_run is None:
            return
        epoch = int(self._engine.state.epoch) if self._engine is not None else int(validator.state.epoch)
        metrics = {k: v for k, v in validator.state.metrics.items() if isinstance(v, (int, float))}
        if metrics:
            self._log_metrics(metrics, step=epoch)
        if self.sample_keys:
            self._log_samples(validator, f"samples/validation_epoch_{epoch:04d}.png", f"validation, epoch {epoch}")

    def _log_samples(self, engine: Engine, path: str, title: str) -> None:
        out = engine.state.output
        items = out if isinstance(out, list) else [out] if isinstance(out, Mapping) else []
        items = [i for i in items if isinstance(i, Mapping)]
        if not items:
            return
        try:
            fig = sample_figure(items, self.sample_keys, title=title)
            self.client.log_figure(self.run_id, fig, path)
        except Exception as e:  # a picture must not stop training
            logger.warning("sample picture %s not logged: %s", path, e)

    def complete(self) -> None:
        """Log wall time, artifacts and checkpoints (with SHA-256 tags)."""
        if self.cur_run is None:
            return
        from mlflow.entities import RunTag

        self._log_metrics({"wall_time_s": time.perf_counter() - self._t0})
        for path in self.extra_artifacts:
            if os.path.isfile(path):
                self.client.log_artifact(self.run_id, path)
            elif os.path.isdir(path):
                self.client.log_artifacts(self.run_id, path, os.path.basename(os.path.normpath(path)))
            else:
                logger.warning("artifact %s does not exist, not logged", path)
        if self.checkpoint_dir is not None and self.checkpoint_dir.is_dir():
            tags = []
            for p in sorted(self.checkpoint_dir.glob(self.checkpoint_glob)):
                if p.is_file() and p.stat().st_mtime >= self.cur_run.info.start_time / 1000.0 - 1:
                    self.client.log_artifact(self.run_id, str(p), "checkpoints")
                    tags += [RunTag(f"mcref.checkpoint.{safe_key(p.name)}.sha256", file_sha256(p)),
                             RunTag(f"mcref.checkpoint.{safe_key(p.name)}.path", str(p.absolute()))]
            if tags:
                self.client.log_batch(self.run_id, tags=tags)

    def close(self) -> None:
        """End the run (FINISHED) and print where it is."""
        run_id = self.run_id if self.cur_run is not None else None
        super().close()
        if run_id and self.print_run:
            print(ui_hint(self.tracking_uri, str(self.experiment_id), run_id), flush=True)

    def failed(self, engine: Engine, e: Exception) -> None:
        """End the run as FAILED and re-raise.

        Args:
            engine: the engine.
            e: the exception.
        """
        if self.cur_run is not None:
            try:
                self.client.set_terminated(self.cur_run.info.run_id, "FAILED")
            finally:
                self.cur_run = None
        raise e


# ----------------------------------------------------------------------------------------------
# evaluation report: curves, table, worst cases
# ----------------------------------------------------------------------------------------------
class EvaluationReportHandler:
    """
    Ignite handler adding pictures and tables to an evaluation run, from the same images
    :class:`bundle.metrics.MCMetricsHandler` scores (attach it after that handler and after the
    :class:`TrackingHandler`).

    Logged at EPOCH_COMPLETED into the tracker's run (``mlflow.log_figure`` / ``log_table``):

    - ``curves/sensitivity_vs_activation.png``: pixel sensitivity and activation rate (means over
      images, as in the paper) at each sweep threshold, operating threshold marked;
    - ``curves/cluster_froc.png`` and ``curves/object_tpr_vs_fp_per_cm2.png`` from the metrics
      handler's pooled sweep (when it sweeps);
    - ``curves/detection_vs_size.png`` (truth MCs with diameter <= x detected at the operating
      threshold) and ``curves/detection_vs_density.png`` (by interior - exterior mean intensity of
      the normalised image, in quantile bins);
    - ``tables/per_case.json`` (the per-case table), ``tables/threshold_sweep.json``;
    - ``worst/by_false_marks.png`` and ``worst/by_missed_mcs.png``: the ``n_worst`` cases with the
      most false marks / missed MCs, each view with false marks (red), missed MCs (yellow) and
      detected MCs (green) circled.

    Args:
        tracker: the :class:`TrackingHandler` owning the run.
        metrics_handler: the :class:`bundle.metrics.MCMetricsHandler` on the same engine.
        thresholds: pixel sweep thresholds (default: the metrics handler's grid).
        n_worst: cases per worst-case panel.
        thumb_side: longest side of a view in the panels.
        density_bins: quantile bins of the density curve.
    """

    def __init__(self, tracker: TrackingHandler, metrics_handler: Any, thresholds: Sequence[float] | None = None,
                 n_worst: int = 4, thumb_side: int = 384, density_bins: int = 5) -> None:
        self.tracker = tracker
        self.metrics = metrics_handler
        grid = thresholds if thresholds is not None else getattr(metrics_handler, "grid", [metrics_handler.threshold])
        self.thresholds = np.unique(np.asarray(list(grid) + [metrics_handler.threshold], dtype=float))
        self.n_worst = int(n_worst)
        self.thumb_side = int(thumb_side)
        self.density_bins = int(density_bins)
        self.reset()

    def reset(self) -> None:
        """Forget the previous epoch."""
        self.sweep_rows: list[dict[str, Any]] = []
        self.objects: list[dict[str, Any]] = []
        self.views: dict[str, dict[str, Any]] = {}

    def attach(self, engine: Engine) -> None:
        """Register EPOCH_STARTED, ITERATION_COMPLETED and EPOCH_COMPLETED handlers.

        Args:
            engine: the evaluator.
        """
        for event, fn in ((Events.EPOCH_STARTED, lambda e: self.reset()), (Events.ITERATION_COMPLETED, self.iteration_completed),
                          (Events.EPOCH_COMPLETED, self.epoch_completed)):
            engine.add_event_handler(event, fn)

    def iteration_completed(self, engine: Engine) -> None:
        """Sweep and describe the images of this iteration (rows already added by the metrics handler).

        Args:
            engine: the evaluator.
        """
        from bundle.metrics import _decollate, _get

        outputs = _decollate(engine.state.output) or []
        batch = _decollate(getattr(engine.state, "batch", None)) or []
        rows = self.metrics.rows[-len(outputs):] if outputs else []
        m = self.metrics
        for i, out in enumerate(outputs):
            b = batch[i] if i < len(batch) else None

            def pick(key: str | None) -> Any:
                if key is None:
                    return None
                v = _get(out, key)
                return _get(b, key) if v is None and b is not None else v

            if i >= len(rows):
                break
            row = rows[i]
            prob = m._prob_2d(pick(m.pred_key))
            truth = np.asarray(_to_2d(pick(m.label_key)) > 0.5) if pick(m.label_key) is not None else np.zeros(prob.shape, bool)
            br = pick(m.breast_key)
            breast = np.asarray(_to_2d(br) > 0.5) if br is not None else np.ones(prob.shape, bool)
            image = _to_2d(pick(m.image_key))
            self._add(row, prob, truth, breast, image)

    def _add(self, row: Mapping[str, Any], prob: np.ndarray, truth: np.ndarray, breast: np.ndarray,
             image: np.ndarray | None) -> None:
        from scipy import ndimage

        from bundle.study import truth_objects

        case = str(row["case"])
        spacing = (float(row["spacing_row_mm"]), float(row["spacing_col_mm"]))
        p_b = prob[breast]
        p_t = prob[truth & breast]
        n_b, n_t = max(int(breast.sum()), 1), int((truth & breast).sum())
        for t in self.thresholds:
            pos_b = int((p_b >= t).sum())
            tp = int((p_t >= t).sum())
            self.sweep_rows.append({"case": case, "threshold": float(t), "activation_rate": pos_b / n_b,
                                    "sensitivity": tp / n_t if n_t else float("nan")})
        img = image if image is not None and image.ndim == 2 and image.shape == prob.shape else None
        labels, objs = truth_objects(truth, spacing, image_raw=img, ring_px=3)
        mask = (prob >= self.metrics.threshold) & breast
        hit = np.zeros(len(objs) + 1, bool)
        if objs:
            hit[np.unique(labels[mask & (labels > 0)])] = True
        for o in objs:
            self.objects.append({"case": case, "diameter_mm": o["diameter_mm"], "detected": bool(hit[o["object_id"]]),
                                 "contrast": o["interior_density"] - o["exterior_density"]})
        # worst-case candidates: keep the view only while it may be among the worst
        fp = int(row.get("n_fp_objects", 0))
        missed = int(row.get("n_objects", 0)) - int(row.get("n_detected", 0))
        keep = any(self._rank_ok(key, val) for key, val in (("fp", fp), ("missed", missed)))
        if not keep:
            return
        plab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        fp_c, det_c, miss_c = [], [], []
        if n:
            idx = np.arange(1, n + 1)
            touches = ndimage.maximum(truth, plab, idx) > 0
            cents = ndimage.center_of_mass(mask, plab, idx)
            fp_c = [c for c, t in zip(cents, touches) if not t]
        for o in objs:
            (det_c if hit[o["object_id"]] else miss_c).append((o["centroid_row"], o["centroid_col"]))
        f = max(1, int(math.ceil(max(prob.shape) / self.thumb_side)))
        base = img if img is not None else prob
        thumb = base[::f, ::f].astype(np.float32)
        self.views[case] = {"fp": fp, "missed": missed, "thumb": thumb, "f": f, "fp_c": fp_c, "det_c": det_c,
                            "miss_c": miss_c}
        self._prune()

    def _rank_ok(self, key: str, value: int) -> bool:
        if value <= 0:
            return False
        vals = sorted((v[key] for v in self.views.values()), reverse=True)
        return len(vals) < self.n_worst or value > vals[self.n_worst - 1]

    def _prune(self) -> None:
        keep: set[str] = set()
        for key in ("fp", "missed"):
            ranked = sorted(self.views, key=lambda c: -self.views[c][key])
            keep |= {c for c in ranked[: self.n_worst] if self.views[c][key] > 0}
        self.views = {c: v for c, v in self.views.items() if c in keep}

    # ------------------------------------------------------------------ figures
    def _sweep_table(self) -> list[dict[str, float]]:
        out = []
        for t in self.thresholds:
            rs = [r for r in self.sweep_rows if r["threshold"] == t]
            sens = [r["sensitivity"] for r in rs if not math.isnan(r["sensitivity"])]
            out.append({"threshold": float(t), "sensitivity": float(np.mean(sens)) if sens else float("nan"),
                        "activation_rate": float(np.mean([r["activation_rate"] for r in rs])) if rs else float("nan")})
        return out

    def _worst_panel(self, key: str, title: str) -> Any | None:
        from matplotlib.figure import Figure

        cases = sorted((c for c in self.views if self.views[c][key] > 0), key=lambda c: -self.views[c][key])[: self.n_worst]
        if not cases:
            return None
        fig = Figure(figsize=(3.2 * len(cases), 4.0))
        for j, c in enumerate(cases):
            v = self.views[c]
            ax = fig.add_subplot(1, len(cases), j + 1)
            ax.imshow(v["thumb"], cmap="gray")
            for pts, colour in ((v["fp_c"], "red"), (v["miss_c"], "yellow"), (v["det_c"], "lime")):
                if pts:
                    arr = np.asarray(pts, float) / v["f"]
                    ax.scatter(arr[:, 1], arr[:, 0], s=60, facecolors="none", edgecolors=colour, linewidths=1.0)
            ax.set_title(f"{c}\nfalse marks {v['fp']}, missed MCs {v['missed']}", fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{title} (red: false mark, yellow: missed MC, green: detected MC)", fontsize=9)
        fig.tight_layout()
        return fig

    def epoch_completed(self, engine: Engine) -> None:
        """Log the curves, tables and worst-case panels into the tracker's run.

        Args:
            engine: the evaluator.
        """
        from matplotlib.figure import Figure

        client, run_id = self.tracker.client, self.tracker.run_id
        if run_id is None or self.tracker.cur_run is None:
            return
        op = self.metrics.threshold
        sweep = self._sweep_table()
        fig = Figure(figsize=(6, 4.2))
        ax = fig.add_subplot(1, 1, 1)
        x = np.asarray([r["activation_rate"] for r in sweep]) * 100
        y = np.asarray([r["sensitivity"] for r in sweep]) * 100
        ax.plot(x, y, marker="o", ms=3)
        for r, xi, yi in zip(sweep, x, y):
            ax.annotate(f"{r['threshold']:g}", (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if r["threshold"] == op:
                ax.plot([xi], [yi], marker="*", ms=12, color="C3")
        if np.all(x > 0):
            ax.set_xscale("log")
        ax.set_xlabel("activation rate (% of breast)")
        ax.set_ylabel("pixel sensitivity (%)")
        ax.set_title(f"sensitivity vs activation over thresholds (star: operating threshold {op:g})", fontsize=9)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        client.log_figure(run_id, fig, "curves/sensitivity_vs_activation.png")
        client.log_table(run_id, {k: [r[k] for r in sweep] for k in ("threshold", "sensitivity", "activation_rate")},
                         "tables/threshold_sweep.json")

        curve = getattr(self.metrics, "curve", None) or {}
        if len(curve.get("threshold", [])):
            from bundle.study import plot_froc

            with tempfile.TemporaryDirectory() as tmp:
                fpi = np.asarray(curve["fp_clusters_per_image"], float)
                sens = np.asarray(curve["cluster_sensitivity"], float)
                opi = int(np.argmin(np.abs(np.asarray(curve["threshold"]) - op)))
                png = os.path.join(tmp, "cluster_froc.png")
                plot_froc({"evaluation": (fpi, sens, opi)}, png, list(self.metrics.froc_fp_rates))
                client.log_artifact(run_id, png, "curves")
            fig = Figure(figsize=(6, 4.2))
            ax = fig.add_subplot(1, 1, 1)
            xr = np.maximum(np.asarray(curve["fp_marks_per_cm2"], float), 1e-3)
            ax.plot(xr, np.asarray(curve["object_tpr"], float), marker="o", ms=3)
            ax.set_xscale("log")
            ax.set_xlabel("false marks per cm^2 of breast")
            ax.set_ylabel("MC detection rate (TPR)")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(True, alpha=0.3)
            ax.set_title("object TPR vs false marks per cm^2 over thresholds", fontsize=9)
            fig.tight_layout()
            client.log_figure(run_id, fig, "curves/object_tpr_vs_fp_per_cm2.png")

        if self.objects:
            d = np.asarray([o["diameter_mm"] for o in self.objects], float)
            det = np.asarray([o["detected"] for o in self.objects], bool)
            sizes = np.unique(np.quantile(d, np.linspace(0.1, 1.0, 10)))
            rate = [float(det[d <= s].mean()) for s in sizes]
            fig = _rate_figure(sizes, rate, "MC diameter at most (mm)", f"MCs detected at threshold {op:g}",
                               f"detection vs MC size ({len(d)} MCs)")
            client.log_figure(run_id, fig, "curves/detection_vs_size.png")
            contrast = np.asarray([o["contrast"] for o in self.objects], float)
            ok = np.isfinite(contrast)
            if ok.sum() >= 2:
                edges = np.unique(np.quantile(contrast[ok], np.linspace(0, 1, self.density_bins + 1)))
                centres, rates = [], []
                for lo, hi in zip(edges[:-1], edges[1:]):
                    sel = ok & (contrast >= lo) & (contrast <= hi)
                    if sel.any():
                        centres.append(float(np.median(contrast[sel])))
                        rates.append(float(det[sel].mean()))
                fig = _rate_figure(centres, rates, "MC contrast: interior - exterior mean (normalised image), bin median",
                                   f"MCs detected at threshold {op:g}", "detection vs MC density contrast (quantile bins)")
                client.log_figure(run_id, fig, "curves/detection_vs_density.png")

        rows = list(self.metrics.rows)
        if rows:
            cols = list(rows[0].keys())
            client.log_table(run_id, {c: [r.get(c) for r in rows] for c in cols}, "tables/per_case.json")
        for key, name, title in (("fp", "by_false_marks", "cases with the most false marks"),
                                 ("missed", "by_missed_mcs", "cases with the most missed MCs")):
            fig = self._worst_panel(key, title)
            if fig is not None:
                client.log_figure(run_id, fig, f"worst/{name}.png")


# ----------------------------------------------------------------------------------------------
# registered models
# ----------------------------------------------------------------------------------------------
class TimestepAdapter(torch.nn.Module):
    """A network called ``net(x, timesteps)`` as a one-tensor model ``adapter(x, timestep=t)`` (MLflow's
    PyTorch flavour passes one tensor; ``timestep`` arrives as an inference parameter).

    Args:
        network: e.g. :class:`bundle.mcgenref.SeedRFGenerator`.
        default_timestep: timestep used when none is given.
    """

    def __init__(self, network: torch.nn.Module, default_timestep: float = 500.0) -> None:
        super().__init__()
        self.network = network
        self.default_timestep = float(default_timestep)

    def forward(self, x: torch.Tensor, timestep: float | None = None) -> torch.Tensor:
        """``network(x, full((N,), timestep))``.

        Args:
            x: the network's first input, ``(N, C, H, W)``.
            timestep: one timestep for the whole batch.
        """
        t = self.default_timestep if timestep is None else float(timestep)
        return self.network(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))


def _rate_figure(x: Any, y: Any, xlabel: str, ylabel: str, title: str) -> Any:
    """A detection-rate curve (rate in [0, 1] against ``x``) as a matplotlib Figure.

    Args:
        x: abscissae.
        y: rates.
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: figure title.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, y, marker="o", ms=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
