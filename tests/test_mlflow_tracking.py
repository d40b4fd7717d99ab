"""End-to-end MLflow tracking: a real ``mlflow server`` (sqlite backend) on loopback, MONAI's
``MLFlowHandler`` with ``MCMetricsHandler`` and ``MLflowArtifactsHandler`` on a tiny ignite engine,
then everything read back with ``MlflowClient``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from bundle.metrics import MCMetricsHandler, MLflowArtifactsHandler

pytestmark = pytest.mark.slow



def _engine() -> tuple[Engine, list[dict]]:
    """Two 8x8 fake cases, MONAI decollate=True style (list of dicts); see tests/test_metrics.py."""
    from monai.data import MetaTensor

    breast = torch.ones(1, 8, 8)
    breast[..., 7] = 0
    label_a = torch.zeros(1, 8, 8)
    label_a[0, 2, 2] = 1
    label_a[0, 5:7, 5:7] = 1
    prob_a = torch.zeros(1, 8, 8)
    prob_a[0, 2, 2] = 0.9
    prob_a[0, 0, 6] = 0.6
    label_b = torch.zeros(1, 8, 8)
    prob_b = torch.zeros(1, 8, 8)
    prob_b[0, 3, 3] = 0.7
    data = []
    for stem, label, prob in (("caseA", label_a, prob_a), ("caseB", label_b, prob_b)):
        meta = {"filename_or_obj": f"/data/{stem}.dcm", "stem": stem, "spacing": (0.1, 0.1)}
        image = MetaTensor(torch.rand(1, 8, 8), meta=meta)
        data.append({"image": image, "label": label, "breast": breast, "prob": prob})

    def step(engine, b):
        engine.state.batch = [{k: v for k, v in b.items() if k != "prob"}]
        return [{"pred": b["prob"], "image": b["image"], "label": b["label"]}]

    return Engine(step), data


def _download_text(url: str, run_id: str, artifact: str, dst: Path) -> str:
    import mlflow

    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifact, dst_path=str(dst), tracking_uri=url
    )
    return Path(local).read_text()


def test_metrics_and_artifacts_reach_the_server(mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from monai.handlers import MLFlowHandler

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    engine, data = _engine()
    csv_path = tmp_path / "out" / "per_case.csv"
    overlay_dir = tmp_path / "out" / "overlays"
    config = {"threshold": 0.5, "min_diameter_mm": 0.2, "network": {"_target_": "UNet", "channels": [16, 32]}}

    metrics = MCMetricsHandler(csv_path=csv_path, overlay_dir=overlay_dir, max_overlays=2)
    metrics.attach(engine)
    MLFlowHandler(
        tracking_uri=mlflow_server,
        experiment_name="mcref-test",
        run_name="val-run",
        iteration_log=False,
        close_on_complete=True,  # closes its run before our COMPLETED handler: the run id must be remembered
    ).attach(engine)
    artifacts = MLflowArtifactsHandler(artifacts=[csv_path, overlay_dir], config=config)
    artifacts.attach(engine)
    engine.run(data, max_epochs=1)

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("mcref-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "val-run"
    run = runs[0]
    assert artifacts.run_id == run.info.run_id
    expected = {"dice": 1 / 7, "sensitivity": 1 / 5, "ppv": 0.25, "activation_rate": 3 / 112,
                "true_activation_rate": 5 / 112, "object_detection_rate": 0.0, "fp_objects_per_image": 1.0}  # fmt: skip
    for key, value in expected.items():
        assert run.data.metrics[key] == pytest.approx(value, rel=1e-9), key

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_case.csv", "overlays", "config.json"} <= names
    assert {a.path for a in client.list_artifacts(run.info.run_id, "overlays")} == {
        "overlays/caseA_overlay.png",
        "overlays/caseB_overlay.png",
    }
    dst = tmp_path / "download"
    assert json.loads(_download_text(mlflow_server, run.info.run_id, "config.json", dst)) == config
    rows = list(csv.DictReader(_download_text(mlflow_server, run.info.run_id, "per_case.csv", dst).splitlines()))
    assert [r["case"] for r in rows] == ["caseA", "caseB"]
    assert float(rows[0]["dice"]) == pytest.approx(2 / 7)


def test_own_run_when_no_monai_handler(mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    engine, data = _engine()
    csv_path = tmp_path / "per_case.csv"
    cfg_file = tmp_path / "extra.json"
    cfg_file.write_text(json.dumps({"a": 1, "b": {"c": 2}}))
    MCMetricsHandler(csv_path=csv_path).attach(engine)
    handler = MLflowArtifactsHandler(
        tracking_uri=mlflow_server,
        experiment_name="mcref-own",
        run_name="own",
        artifacts=[csv_path, tmp_path / "missing.csv"],
        config=[cfg_file],
        artifact_path="eval",
    )
    handler.attach(engine)
    engine.run(data, max_epochs=1)

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(handler.run_id)
    assert run.info.run_name == "own" and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} == {"eval/per_case.csv", "eval/config.json"}
    cfg = json.loads(_download_text(mlflow_server, run.info.run_id, "eval/config.json", tmp_path / "dl"))
    assert cfg == {"a": 1, "b": {"c": 2}}


def test_nan_metric_is_logged(mlflow_server, monkeypatch):
    """An epoch without any truth MC gives NaN sensitivity; the server must accept it."""
    from mlflow.tracking import MlflowClient
    from monai.handlers import MLFlowHandler

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    engine, data = _engine()
    MCMetricsHandler().attach(engine)
    MLFlowHandler(tracking_uri=mlflow_server, experiment_name="mcref-nan", run_name="nan", iteration_log=False).attach(
        engine
    )
    engine.run(data[1:], max_epochs=1)
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("mcref-nan")
    run = client.search_runs([exp.experiment_id])[0]
    assert math.isnan(run.data.metrics["sensitivity"])
    assert run.data.metrics["dice"] == 0.0
