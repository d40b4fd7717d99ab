"""Unit tests of ``bundle.tracking``: URI resolution and fail-over, digests, resolved config, and the
``TrackingHandler`` on a tiny ignite engine against a real ``mlflow server`` on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest
import torch
from ignite.engine import Engine, Events

from bundle.tracking import (
    TrackingHandler,
    case_list_digest,
    file_sha256,
    resolve_tracking_uri,
    resolved_config,
    server_reachable,
    sqlite_uri,
)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_resolution_order_and_file_stores_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/env.db")
    assert resolve_tracking_uri(None, tmp_path) == "sqlite:////x/env.db"
    assert resolve_tracking_uri("sqlite:////x/arg.db", tmp_path) == "sqlite:////x/arg.db"
    with pytest.raises(ValueError, match="file store"):
        resolve_tracking_uri(str(tmp_path / "mlruns"), tmp_path)


def test_unreachable_server_fails_over_within_seconds(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bundle.tracking"):
        uri = resolve_tracking_uri(None, tmp_path)
    assert time.monotonic() - t0 < 5
    assert uri == sqlite_uri(tmp_path)
    warnings = [r for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(warnings) == 1 and str(tmp_path / "mlruns.db") in warnings[0].getMessage()
    assert resolve_tracking_uri(None, tmp_path, fallback=False).startswith("http://")


def test_live_server_is_kept(mlflow_server, tmp_path):
    assert server_reachable(mlflow_server)
    assert resolve_tracking_uri(mlflow_server, tmp_path) == mlflow_server


def test_case_list_digest_ignores_where_the_data_lies_but_not_which_cases(tmp_path):
    a = [{"image": "/data/x/case_1.dcm", "label": "/data/x/case_1_label.nii.gz"},
         {"image": "/data/x/case_2.dcm", "label": None}]
    moved = [{k: v.replace("/data/x", "/mnt/y") if v else v for k, v in d.items()} for d in a]
    assert case_list_digest(a) == case_list_digest(moved) == case_list_digest(list(reversed(a)))
    assert case_list_digest(a) != case_list_digest(a[:1])
    f = tmp_path / "w.pt"
    f.write_bytes(b"abc")
    assert file_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_resolved_config_has_values_and_names_what_was_never_used():
    from monai.bundle import ConfigParser

    p = ConfigParser({"a": 2, "b": "$@a * 3", "net": {"_target_": "torch.nn.Identity"},
                      "d": {"x": "@b", "y": "@net", "z": "$@a + 1"}, "unused": "$1 + 1", "run": ["$print(@d)"]})
    p.get_parsed_content("d")
    cfg = resolved_config(p)
    assert cfg["b"] == 6 and cfg["d"] == {"x": 6, "y": "@net", "z": 3}
    assert cfg["net"] == {"_target_": "torch.nn.Identity"}
    assert cfg["_unresolved"] == ["unused"]


def _engine(n: int = 2) -> tuple[Engine, list]:
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        loss = net(batch).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return [{"loss": loss.detach(), "image": batch[:, :1].reshape(1, 1, 1), "pred": batch[:, 1:].reshape(1, 1, 1)}]

    eng = Engine(step)
    eng.optimizer = opt
    return eng, [torch.ones(1, 2)] * n


def test_tracking_handler_owns_one_run_and_detaches_an_extra_mlflow_handler(mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from monai.handlers import MLFlowHandler

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    old = ckpt_dir / "old.pt"
    old.write_bytes(b"old")
    engine, data = _engine()
    handler = TrackingHandler(tracking_uri=mlflow_server, experiment_name="mcref-units", run_name="unit", kind="train",
                              store_dir=tmp_path, checkpoint_dir=ckpt_dir, params={"lr0": 0.1},
                              datasets={"training": [{"image": "/d/a.png", "label": "/d/a_l.png"}]})
    handler.attach(engine)
    extra = MLFlowHandler(tracking_uri=mlflow_server, experiment_name="mcref-units", run_name="extra", close_on_complete=True)
    extra.attach(engine)
    t_old = time.time() - 3600
    os.utime(old, (t_old, t_old))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: (ckpt_dir / "net.pt").write_bytes(b"new"))
    # the checkpoint is written before the tracker's COMPLETED handler runs
    engine.run(data, max_epochs=2)

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("mcref-units")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == ["unit"]
    rid = runs[0].info.run_id
    assert handler.run_id == rid and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(rid, "train_loss_epoch")] == [1, 2]
    assert len(client.get_metric_history(rid, "train_loss")) == 4  # one per iteration, not two
    assert [m.value for m in client.get_metric_history(rid, "lr")] == [0.1, 0.1]
    run = client.get_run(rid)
    assert run.data.params["lr0"] == "0.1" and "wall_time_s" in run.data.metrics
    assert run.data.tags["mcref.checkpoint.net.pt.sha256"] == file_sha256(ckpt_dir / "net.pt")
    assert "mcref.checkpoint.old.pt.sha256" not in run.data.tags  # not written by this run
    assert {a.path for a in client.list_artifacts(rid, "checkpoints")} == {"checkpoints/net.pt"}
    assert {a.path for a in client.list_artifacts(rid, "samples")} >= {"samples/train_epoch_0002.png"}
    assert run.data.tags["mcref.dataset.training.n_cases"] == "1"


def test_failed_engine_ends_the_run_as_failed(mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def step(engine, batch):
        raise RuntimeError("boom")

    engine = Engine(step)
    handler = TrackingHandler(tracking_uri=mlflow_server, experiment_name="mcref-fail", run_name="f", store_dir=tmp_path,
                              print_run=False)
    handler.attach(engine)
    with pytest.raises(RuntimeError, match="boom"):
        engine.run([1], max_epochs=1)
    run = MlflowClient(tracking_uri=mlflow_server).get_run(handler.run_id)
    assert run.info.status == "FAILED"
