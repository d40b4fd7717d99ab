"""Every training config is tracked by default: a two-iteration run of each logs per-epoch losses (and
validation metrics for SegAI), learning rate, sample pictures, the checkpoint as an artifact with
its hash and the wall time to a real ``mlflow server`` on 127.0.0.1, and writes its checkpoint to
the output folder, never to ``models/``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bundle.tracking import file_sha256

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = ("--n_cases", "2", "--phantom_splits", "[2, 0, 0]", "--phantom_shape", "[256, 256]",
        "--max_epochs", "2", "--epoch_length", "1", "--num_samples", "2", "--patch_size", "[64, 64]")
CONFIGS = {
    "train_segai.json": ("model.pt", ("--n_cases", "3", "--phantom_splits", "[2, 1, 0]", "--val_interval", "1")),
    "train_inpainter.json": ("inpainter.pt", ()),
    "train_rflow.json": ("rflow.pt", ()),
    "train_mcgenref_seg.json": ("mcgenref_seg.pt", ()),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_iteration_training_is_logged(mlflow_server, tmp_path, config):
    from mlflow.tracking import MlflowClient

    ckpt_name, extra = CONFIGS[config]
    shipped = {p.name: p.stat().st_mtime_ns for p in (ROOT / "models").glob("*.pt")}
    args = list(TINY)
    for i in range(0, len(extra), 2):  # overrides of TINY win
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += [extra[i], extra[i + 1]]
    exp_name = f"mcref_test_{config.split('.')[0]}"
    # --tracking mlflow is accepted on every config and does not add a second run
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}",
           "--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
           "--experiment_name", exp_name, "--tracking", "mlflow", *args]
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]

    ckpt = tmp_path / "out" / ckpt_name
    assert ckpt.is_file(), sorted(os.listdir(tmp_path / "out"))
    assert {p.name: p.stat().st_mtime_ns for p in (ROOT / "models").glob("*.pt")} == shipped

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name(exp_name)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and rid in p.stdout
    assert [m.step for m in client.get_metric_history(rid, "train_loss_epoch")] == [1, 2]
    assert len(client.get_metric_history(rid, "train_loss")) == 2  # one per iteration, logged once
    assert [m.step for m in client.get_metric_history(rid, "lr")] == [1, 2]
    assert "wall_time_s" in run.data.metrics and run.data.metrics["wall_time_s"] > 0
    if config == "train_segai.json":
        assert [m.step for m in client.get_metric_history(rid, "val_dice")] == [1, 2]
        assert [m.step for m in client.get_metric_history(rid, "val_mean_dice")] == [1, 2]
    tags = run.data.tags
    assert tags["mcref.kind"] == "train" and tags["mcref.dataset.training.n_cases"] == "2"
    assert tags[f"mcref.checkpoint.{ckpt_name}.sha256"] == file_sha256(ckpt)
    assert run.data.params["max_epochs"] == "2" and "learning_rate" in run.data.params
    arts = {a.path for a in client.list_artifacts(rid)}
    assert {"config.json", "checkpoints", "samples"} <= arts, arts
    assert f"checkpoints/{ckpt_name}" in {a.path for a in client.list_artifacts(rid, "checkpoints")}
    assert "samples/train_epoch_0002.png" in {a.path for a in client.list_artifacts(rid, "samples")}
