"""Logging files, folders and a configuration as MLflow artifacts from an ignite engine.

- :class:`MLflowArtifactsHandler`: logs them to the MLflow run of a MONAI ``MLFlowHandler`` on the
  same engine, to the active run, or to a run of its own.
- :func:`resolve_tracking_uri`: the URI of such a run of its own (default store in the output
  folder; :func:`bundle.tracking_store.resolve_tracking_uri` does the resolution).

The run store itself (URIs, experiments) is :mod:`bundle.tracking_store`; the run a bundle config
owns is :class:`bundle.tracking.TrackingHandler`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from bundle.tracking_store import artifact_location_for, ended_run
from bundle.tracking_store import resolve_tracking_uri as _resolve

__all__ = ["resolve_tracking_uri", "artifact_paths", "log_paths", "MLflowArtifactsHandler"]

#: logger of the handler (the name it had when it lived in :mod:`bundle.metrics`).
LOGGER_NAME = "bundle.metrics"


# ----------------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------------
def resolve_tracking_uri(tracking_uri: str | None = None, output_dir: str | os.PathLike | None = None) -> str:
    """
    MLflow tracking URI: ``tracking_uri`` if given, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<output_dir>/mlruns.db`` (``output_dir`` defaults to the working directory). An
    ``http(s)`` server that does not answer within seconds is replaced by that local store, with one
    warning (see :func:`bundle.tracking.resolve_tracking_uri`, which the configs call with the
    bundle's single default store ``<bundle_root>/eval``).

    Args:
        tracking_uri: explicit URI.
        output_dir: folder of the default SQLite database.

    """
    return _resolve(tracking_uri, Path(output_dir if output_dir is not None else os.getcwd()))


def artifact_paths(artifacts: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    """The files and folders to log, as a list of paths (empty entries dropped).

    Args:
        artifacts: one path, several, or None.
    """
    if artifacts is None:
        return []
    if isinstance(artifacts, (str, os.PathLike)):
        return [os.fspath(artifacts)]
    return [os.fspath(a) for a in artifacts if a]


def log_paths(
    client: Any, run_id: str, paths: Sequence[str], artifact_path: str | None = None, log: logging.Logger | None = None
) -> None:
    """Log each file as an artifact and each folder as an artifact folder of its own name, under
    ``artifact_path``; a path that does not exist is skipped with a warning.

    Args:
        client: an ``mlflow.MlflowClient``.
        run_id: the run.
        paths: files and folders.
        artifact_path: folder inside the run's artifacts; None for the root.
        log: logger of the warning (default: this module's).
    """
    for path in paths:
        if os.path.isfile(path):
            client.log_artifact(run_id, path, artifact_path)
        elif os.path.isdir(path):
            sub = os.path.basename(os.path.normpath(path))
            client.log_artifacts(run_id, path, sub if not artifact_path else f"{artifact_path}/{sub}")
        else:
            (log or logging.getLogger(LOGGER_NAME)).warning("artifact %s does not exist, not logged", path)


def _mlflow_handler_on(engine: Engine, exclude: Any | None = None) -> Any | None:
    """A MONAI ``MLFlowHandler`` registered on ``engine`` (found through its bound methods) other
    than ``exclude``, or None."""
    try:
        from monai.handlers import MLFlowHandler
    except ImportError:  # pragma: no cover
        return None
    # ignite has no public listing of handlers; read its table defensively.
    table = getattr(engine, "_event_handlers", {}) or {}
    for handlers in list(table.values()):
        for entry in handlers:
            fn = entry[0] if isinstance(entry, tuple) else entry
            for _ in range(4):  # unwrap event filters / functools.wraps
                owner = getattr(fn, "__self__", None)
                if isinstance(owner, MLFlowHandler) and owner is not exclude:
                    return owner
                nxt = getattr(fn, "__wrapped__", None) or getattr(fn, "func", None)
                if nxt is None:
                    break
                fn = nxt
    return None


class MLflowArtifactsHandler:
    """
    Ignite handler that, when the engine completes, logs files, folders and a configuration (as
    ``config.json``) as MLflow artifacts.

    The run is, in this order: the run of ``mlflow_handler`` when given; the run of a MONAI
    ``MLFlowHandler`` attached to the same engine (its ``cur_run``/``client``, remembered at
    STARTED/EPOCH_COMPLETED in case it is closed first); the active run of the ``mlflow`` fluent API;
    else a new run of its own in ``experiment_name`` (tracking URI from :func:`resolve_tracking_uri`),
    which is ended after logging. Attach it after the handler that writes the files (e.g.
    :class:`MCMetricsHandler`, which writes at EPOCH_COMPLETED).

    Args:
        tracking_uri: tracking URI of a run of its own; None: ``$MLFLOW_TRACKING_URI``, else
            ``sqlite:///<output_dir>/mlruns.db``.
        experiment_name: experiment of a run of its own.
        run_name: name of a run of its own.
        artifacts: files and folders to log; missing ones are skipped with a warning. Folders are
            logged under their own name.
        config: a dict, or path(s) of JSON/YAML config files (merged like ``monai.bundle``), logged
            as ``config.json``.
        output_dir: folder of the default SQLite tracking database.
        artifact_path: folder inside the run's artifacts; None for the root.
        mlflow_handler: a MONAI ``MLFlowHandler`` whose run is used.
        name: logger name.

    Attributes:
        run_id: id of the run the artifacts went to, after COMPLETED.

    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "mcref",
        run_name: str | None = None,
        artifacts: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        config: Mapping[str, Any] | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        output_dir: str | os.PathLike | None = None,
        artifact_path: str | None = None,
        mlflow_handler: Any | None = None,
        name: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.artifacts = artifact_paths(artifacts)
        self.config = config
        self.output_dir = output_dir
        self.artifact_path = artifact_path
        self.mlflow_handler = mlflow_handler
        self.logger = logging.getLogger(name or LOGGER_NAME)
        self.run_id: str | None = None
        self._client: Any = None
        self._monai_run_id: str | None = None

    def attach(self, engine: Engine) -> None:
        """
        Register ``remember_run`` (STARTED, EPOCH_COMPLETED) and ``completed`` (COMPLETED) on ``engine``.

        Args:
            engine: an ignite engine.

        """
        for event in (Events.STARTED, Events.EPOCH_COMPLETED):
            if not engine.has_event_handler(self.remember_run, event):
                engine.add_event_handler(event, self.remember_run)
        if not engine.has_event_handler(self.completed, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def remember_run(self, engine: Engine) -> None:
        """
        Remember the run (and client) of the MONAI ``MLFlowHandler`` of ``engine``, if it has one.

        Args:
            engine: the engine the handler is attached to.

        """
        handler = self.mlflow_handler or _mlflow_handler_on(engine)
        run = getattr(handler, "cur_run", None) if handler is not None else None
        if run is not None:
            self._monai_run_id = run.info.run_id
            self._client = handler.client

    def _config_dict(self) -> dict[str, Any] | None:
        if self.config is None:
            return None
        if isinstance(self.config, Mapping):
            return dict(self.config)
        from monai.bundle import ConfigParser

        files = [self.config] if isinstance(self.config, (str, os.PathLike)) else list(self.config)
        return dict(ConfigParser.load_config_files([os.fspath(f) for f in files]))

    def _log_all(self, client: Any, run_id: str) -> None:
        log_paths(client, run_id, self.artifacts, self.artifact_path, self.logger)
        cfg = self._config_dict()
        if cfg is not None:
            with tempfile.TemporaryDirectory() as tmp:
                cfg_path = os.path.join(tmp, "config.json")
                with open(cfg_path, "w", encoding="utf-8") as f:
                    json.dump(cfg, f, indent=2, sort_keys=False, default=str)
                client.log_artifact(run_id, cfg_path, self.artifact_path)

    def completed(self, engine: Engine) -> None:
        """
        Log the artifacts into the chosen run.

        Args:
            engine: the engine the handler is attached to.

        """
        import mlflow

        self.remember_run(engine)
        if self._monai_run_id is not None:
            self.run_id = self._monai_run_id
            self._log_all(self._client, self.run_id)
            return
        active = mlflow.active_run()
        if active is not None:
            self.run_id = active.info.run_id
            self._log_all(mlflow.MlflowClient(), self.run_id)
            return

        uri = resolve_tracking_uri(self.tracking_uri, self.output_dir)
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            exp_id = client.create_experiment(self.experiment_name, artifact_location=artifact_location_for(uri))
        else:
            exp_id = exp.experiment_id
        run_name = self.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        run = client.create_run(exp_id, run_name=run_name)
        self.run_id = run.info.run_id
        with ended_run(client, self.run_id):
            self._log_all(client, self.run_id)
