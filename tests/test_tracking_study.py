"""``configs/evaluate_study.json`` against a real ``mlflow server`` on 127.0.0.1: one parent run with
the summary tables and one child run per method, each identified (weights hashes, data set digest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle.tracking import file_sha256

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_study_is_a_parent_run_with_one_child_per_method(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from bundle.networks import SegAINet

    torch.manual_seed(0)
    seg = SegAINet(channels=(8, 16), strides=(2,), num_res_units=0, norm="batch", act="relu")  # as configs/inference.json
    sd = seg.state_dict()
    last_bias = [k for k in sd if k.endswith("bias")][-1]
    sd[last_bias] = sd[last_bias] - 1.5
    torch.save(sd, tmp_path / "segai.pt")
    methods = ["segai", "segai+sp1"]
    args = {
        "output_dir": str(tmp_path / "out"), "ckpt_path": str(tmp_path / "segai.pt"),
        "dataset_dir": str(tmp_path / "pos"), "n_cases": "2", "n_normal_cases": "0",
        "phantom_shape": "[256, 208]", "network_def#channels": "[8, 16]", "network_def#strides": "[2]",
        "network_def#num_res_units": "0", "inferer#roi_size": "128", "settings#bootstrap_resamples": "50",
        "settings#max_panels": "1", "progress": "False", "methods": repr(methods), "reference_method": "segai",
        "table2_methods": "['segai', 'segai+sp1']", "experiment_name": "mcref_test_study",
        "tracking_store": str(tmp_path / "store"),
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/evaluate_study.json"]
    for k, v in args.items():
        cmd += [f"--{k}", v]
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("mcref_test_study")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    pid = parent.info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
    assert sorted(r.info.run_name for r in children) == sorted(methods) and len(runs) == len(methods) + 1
    assert pid in p.stdout
    sha = file_sha256(tmp_path / "segai.pt")
    for r in [parent, *children]:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mcref.weights.segai.sha256"] == sha
        assert r.data.tags["mcref.kind"] == "study" and r.data.tags["mcref.dataset.evaluation.n_cases"] == "2"
    for c in children:
        assert "sensitivity" in c.data.metrics and c.data.params["method"] == c.info.run_name
        assert "tables/per_case.json" in {a.path for a in client.list_artifacts(c.info.run_id, "tables")}
    tables = {a.path for a in client.list_artifacts(pid, "tables")}
    assert {"tables/table1.json", "tables/metrics.json"} <= tables, tables
    top = {a.path for a in client.list_artifacts(pid)}
    assert {"config.json", "summary", "results.md"} <= top, top
