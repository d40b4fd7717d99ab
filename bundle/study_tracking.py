"""MLflow runs of a study: one parent run (role ``summary``) and one child run per method, with the
run identity of :mod:`bundle.tracking_identity`.

:class:`bundle.study.MCStudy` calls :func:`log_study_mlflow` after writing its files; it talks to
``mlflow.MlflowClient`` directly (batched metrics, ``log_table``) rather than through the fluent
API, so that it never depends on or changes a process-wide active run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bundle.mlflow_artifacts import resolve_tracking_uri
from bundle.study_settings import method_label
from bundle.tracking_identity import find_live_parser, log_identity
from bundle.tracking_store import ended_run, get_or_create_experiment, ui_hint

if TYPE_CHECKING:
    from bundle.study import MCStudy

__all__ = ["log_study_mlflow"]

logger = logging.getLogger("mcref.study")


def log_study_mlflow(study: MCStudy) -> dict[str, str]:
    """One parent run for the study (role ``summary``: tables via ``log_table``, curves, report,
    results.md, resolved config) and one child run per method (metrics, params, per-case table,
    per-case/object/FROC CSVs, panels), all with the run identity of :mod:`bundle.tracking`
    (weights hashes, bundle version, git commit, data set digest, versions) and tagged with a study id.

    Args:
        study: the study, after its files are written.

    Returns:
        run name (``summary`` or the method) -> run id.
    """
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    r = study.result
    s = study.settings
    uri = resolve_tracking_uri(study.tracking_uri, study.output_dir)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = get_or_create_experiment(client, study.experiment_name, uri)
    study_id = time.strftime("%Y%m%d-%H%M%S")
    now = int(time.time() * 1000)
    weights = {"segai": study.ckpt_path, "inpainter": study.inpainter_ckpt_path, **study.weights}
    items = study.load_items()
    datasets = {"evaluation": items}
    first = next((d for d in study.datalists if d), None)
    dataset_name = study.dataset_name or (Path(str(first)).absolute().parent.name if first else None)
    source = str(Path(str(first)).absolute()) if first else None
    bundle_root = Path(__file__).resolve().parents[1]
    parser = find_live_parser()
    common = {
        "n_cases": str(r["n_cases"]), "n_with_mcs": str(r["n_with_mcs"]),
        "datalists": ";".join(str(d) for d in study.datalists if d)[:5000],
        "ckpt_path": str(study.ckpt_path), "inpainter_ckpt_path": str(study.inpainter_ckpt_path),
        "reference_method": str(r["reference"]),
    }
    for k, v in dataclasses.asdict(s).items():
        common[f"study.{k}"] = json.dumps(v)[:5000]
    runs: dict[str, str] = {}
    base_tags = {"mcref.study_id": study_id, "mcref.command": study._command()[:5000]}

    def table(rows: Any) -> dict[str, list] | None:
        if not isinstance(rows, list) or not rows or not all(isinstance(x, Mapping) for x in rows):
            return None
        cols = list(dict.fromkeys(k for x in rows for k in x))
        return {c: [x.get(c) if isinstance(x.get(c), (int, float, str, bool)) or x.get(c) is None else str(x.get(c))
                    for x in rows] for c in cols}

    parent = client.create_run(exp_id, run_name="summary", tags={**base_tags, "mcref.role": "summary"})
    pid = parent.info.run_id
    runs["summary"] = pid
    with ended_run(client, pid):
        log_identity(client, pid, "study", bundle_root, weights, datasets, dataset_name, source,
                     config=study.config, parser=parser)
        for m in r["methods"]:
            rid = client.create_run(exp_id, run_name=m, tags={**base_tags, "mcref.role": "method",
                                                              MLFLOW_PARENT_RUN_ID: pid}).info.run_id
            runs[m] = rid
            with ended_run(client, rid):
                log_identity(client, rid, "study", bundle_root, weights, datasets, dataset_name, source,
                             parser=parser, log_config=False)
                metrics = [Metric(k.replace("@", "_at_"), float(v), now, 0) for k, v in r["metrics"][m].items()
                           if isinstance(v, (int, float))]
                for k, p in r["pvalues"][m].items():
                    metrics.append(Metric(f"p_vs_ref_{k}", float(p), now, 0))
                rk = json.dumps(study.refiner_kwargs.get(m, {}), default=str)[:5000]
                own = {"method": m, "threshold": str(s.threshold_for(m)), "refiner_kwargs": rk}
                params = [Param(k, v) for k, v in {**common, **own}.items()]
                for i in range(0, len(metrics), 900):
                    client.log_batch(rid, metrics=metrics[i:i + 900], params=params if i == 0 else [],
                                     tags=[RunTag("mcref.method_label", method_label(m))] if i == 0 else [])
                per_case = table(r["rows"][m])
                if per_case:
                    client.log_table(rid, per_case, "tables/per_case.json")
                mdir = study.output_dir / m
                for fn in ("per_case.csv", "objects.csv", "froc.csv"):
                    if (mdir / fn).is_file():
                        client.log_artifact(rid, str(mdir / fn))
                if (mdir / "panels").is_dir():
                    client.log_artifacts(rid, str(mdir / "panels"), "panels")
                client.log_artifact(rid, str(study.results_md))
        tags = [RunTag("mcref.skipped", json.dumps(r["skipped"])[:5000]),
                RunTag("mcref.method_runs", json.dumps({k: v for k, v in runs.items() if k != "summary"})[:5000])]
        params = [Param(k, v) for k, v in {**common, "methods": json.dumps(r["methods"]),
                                           "skipped": json.dumps(sorted(r["skipped"]))}.items()]
        client.log_batch(pid, metrics=[Metric("n_failed", float(len(r["failed"])), now, 0)], params=params, tags=tags)
        for name in ("table1", "table2", "table3", "table4", "detection_rows", "froc_rows", "curve_rows"):
            t = table(r.get(name))
            if t:
                client.log_table(pid, t, f"tables/{name}.json")
        metrics_table = table([{"method": m, **r["metrics"][m]} for m in r["methods"]])
        if metrics_table:
            client.log_table(pid, metrics_table, "tables/metrics.json")
        client.log_artifacts(pid, str(study.output_dir / "summary"), "summary")
        client.log_artifact(pid, str(study.results_md))
    logger.info("MLflow: experiment %s (%s), runs %s", study.experiment_name, uri, runs)
    print(ui_hint(uri, exp_id, pid) + f"\n  (parent run of the study; one child run per method: {', '.join(r['methods'])})",
          flush=True)
    return runs
