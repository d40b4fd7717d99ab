"""Where MLflow runs go: the tracking URI of a run, its experiment, how a run ends and how to open it.

:func:`resolve_tracking_uri` gives one URI per run: an explicit one, else ``$MLFLOW_TRACKING_URI``,
else the bundle's local store ``sqlite:///<bundle_root>/eval/mlruns.db`` (artifacts in
``<bundle_root>/eval/mlruns/``). An ``http(s)`` server that does not answer its ``/health`` endpoint
within ``probe_timeout`` seconds is replaced by the local store, with one warning naming it,
instead of MLflow's minutes of retries (the probe is a plain ``urllib`` request of ``/health``).

Re-exported by :mod:`bundle.tracking`; see ``docs/tracking.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_STORE_SUBDIR",
    "default_store_dir",
    "sqlite_uri",
    "server_reachable",
    "resolve_tracking_uri",
    "artifact_location_for",
    "get_or_create_experiment",
    "ended_run",
    "ui_hint",
]

# the name the store's warnings have always had (tests and users filter on it)
logger = logging.getLogger("bundle.tracking")

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


@contextlib.contextmanager
def ended_run(client: Any, run_id: str) -> Iterator[None]:
    """End the run when the block ends: FINISHED, or FAILED when the block raises (the exception
    propagates).

    Args:
        client: an ``mlflow.MlflowClient``.
        run_id: the run.
    """
    status = "FINISHED"
    try:
        yield
    except Exception:
        status = "FAILED"
        raise
    finally:
        client.set_terminated(run_id, status)


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
