"""MLflow tracking of every run of the bundle: where runs go, what identifies them, and the ignite
handlers that log training and evaluation.

This module holds :class:`TrackingHandler` and re-exports the rest (``bundle.tracking.X`` is the
name configs and scripts use). It is evaluation layer: low layers (``bundle.data``,
``bundle.phantom``, ``bundle.networks``) never import it.

Store (:mod:`bundle.tracking_store`)
    :func:`resolve_tracking_uri` gives one URI per run: an explicit one, else ``$MLFLOW_TRACKING_URI``,
    else the bundle's local store ``sqlite:///<bundle_root>/eval/mlruns.db`` (artifacts in
    ``<bundle_root>/eval/mlruns/``). An ``http(s)`` server that does not answer its ``/health``
    endpoint within ``probe_timeout`` seconds is replaced by the local store, with one warning
    naming it, instead of MLflow's minutes of retries.

Identity (:func:`run_identity`, :func:`log_identity`; :mod:`bundle.tracking_identity`)
    bundle version, git commit (and whether the work tree had local changes), SHA-256 of every
    weights file, dataset name and case-list digest (plus MLflow dataset inputs), software versions
    and the resolved configuration (every ``@``/``$`` replaced by the value the run used,
    ``config.json``) beside the merged, unresolved one (``config_raw.json``).

Handlers
    :class:`TrackingHandler` (a MONAI ``MLFlowHandler``) owns the run of a trainer or evaluator;
    :class:`EvaluationReportHandler` (:mod:`bundle.evaluation_report`) adds curves
    (``mlflow.log_figure``), the per-case table (``log_table``) and panels of the worst cases to an
    evaluation run.

See ``docs/tracking.md``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from bundle.evaluation_report import EvaluationReportHandler
from bundle.figures import sample_figure
from bundle.mlflow_artifacts import _mlflow_handler_on, artifact_paths, log_paths
from bundle.tracking_identity import (
    case_list_digest,
    case_table,
    file_sha256,
    find_live_parser,
    git_state,
    log_dataset_input,
    log_identity,
    resolved_config,
    run_identity,
    safe_key,
    software_versions,
)
from bundle.tracking_store import (
    DEFAULT_STORE_SUBDIR,
    artifact_location_for,
    default_store_dir,
    get_or_create_experiment,
    resolve_tracking_uri,
    server_reachable,
    sqlite_uri,
    ui_hint,
)

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
        self.extra_artifacts = artifact_paths(artifacts)
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
        log_paths(self.client, self.run_id, self.extra_artifacts, log=logger)
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
