"""Tracking of ``configs/evaluate.json`` against a real ``mlflow server`` on 127.0.0.1: identity of the
run (weights hash, bundle version, git commit, data set digest, versions, resolved config, dataset
input), curves/tables/worst-case panels, ``--tracking mlflow`` without a second handler, the printed
run id, and the fail-over to the local store when the server is down."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bundle.tracking import case_list_digest, file_sha256

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _evaluate(tmp: Path, env: dict, *extra: str, n_cases: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/evaluate.json",
           "--dataset_dir", str(tmp / "heldout"), "--n_cases", str(n_cases), "--phantom_shape", "[512, 416]",
           "--output_dir", str(tmp / "eval"), "--tracking_store", str(tmp / "store")]
    for i in range(0, len(extra), 2):  # later values of the same key win
        if extra[i] in cmd:
            cmd[cmd.index(extra[i]) + 1] = extra[i + 1]
        else:
            cmd += list(extra[i:i + 2])
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the with block ends: nothing listens


@pytest.fixture(scope="module")
def two_evaluations(mlflow_server, tmp_path_factory):
    """Two evaluate.json runs on the same two phantoms, thresholds 0.05 and 0.5; the first with
    ``--tracking mlflow`` (MONAI's own handler, which must not make a second run)."""
    tmp = tmp_path_factory.mktemp("two_evals")
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    p1 = _evaluate(tmp, env, "--experiment_name", "mcref_test_eval2", "--run_name", "t005", "--tracking", "mlflow")
    p2 = _evaluate(tmp, env, "--experiment_name", "mcref_test_eval2", "--run_name", "t050", "--threshold", "0.5",
                   "--output_dir", str(tmp / "eval_t050"))
    return tmp, p1, p2


def test_evaluation_run_is_identified_and_illustrated(mlflow_server, two_evaluations):
    from mlflow.tracking import MlflowClient

    tmp_path, p, _ = two_evaluations
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("mcref_test_eval2")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["t005", "t050"]
    run = next(r for r in runs if r.info.run_name == "t005")
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(rid, "dice")) == 1
    # the run id and where to see it are printed
    assert rid in p.stdout and f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{rid}" in p.stdout

    tags = run.data.tags
    assert tags["mcref.weights.segai.sha256"] == file_sha256(ROOT / "models" / "model.pt")
    assert tags["mcref.bundle_version"] == json.loads((ROOT / "configs" / "metadata.json").read_text())["version"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # the commit of the run: HEAD then, an ancestor of HEAD now (others may commit)
        commit = tags["mlflow.source.git.commit"]
        assert len(commit) == 40 and tags["mcref.git_commit"] == commit
        anc = subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", commit, "HEAD"])
        assert anc.returncode == 0
    datalist = json.loads((tmp_path / "heldout" / "datalist.json").read_text())["test"]
    items = [{k: str(tmp_path / "heldout" / v) if v else v for k, v in d.items()} for d in datalist]
    assert tags["mcref.dataset.evaluation.digest"] == case_list_digest(items)
    assert tags["mcref.dataset.evaluation.n_cases"] == "2" and tags["mcref.dataset.name"] == "heldout"
    import mlflow
    import monai
    import torch

    assert (tags["mcref.version.torch"], tags["mcref.version.monai"], tags["mcref.version.mlflow"]) == (
        torch.__version__, monai.__version__, mlflow.__version__)
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "heldout:evaluation"
    assert [t.value for t in inputs[0].tags if t.key == "mlflow.data.context"] == ["evaluation"]

    cfg = json.loads(Path(client.download_artifacts(rid, "config.json", str(tmp_path / "dl"))).read_text())
    assert cfg["ckpt_path"] == "./models/model.pt" and cfg["n_cases"] == 2
    assert cfg["output_dir"] == str(tmp_path / "eval") and cfg["tracking_uri"] == mlflow_server
    assert cfg["run_name"] == "t005" and cfg["mlflow_handler"]["run_name"] == "t005"
    assert cfg["metrics_handler"]["threshold"] == 0.05 and cfg["_unresolved"] == []
    raw = json.loads(Path(client.download_artifacts(rid, "config_raw.json", str(tmp_path / "dl2"))).read_text())
    assert raw["ckpt_path"].startswith("$")

    def walk(path=None):
        out = set()
        for a in client.list_artifacts(rid, path):
            out |= walk(a.path) if a.is_dir else {a.path}
        return out

    arts = walk()
    assert {"per_case.csv", "objects.csv", "detection_curve.csv", "config.json",
            "curves/sensitivity_vs_activation.png", "curves/cluster_froc.png", "curves/detection_vs_size.png",
            "curves/object_tpr_vs_fp_per_cm2.png", "tables/per_case.json", "tables/threshold_sweep.json"} <= arts, arts
    assert {"overlays/case_000_overlay.png", "overlays/case_001_overlay.png"} <= arts
    table = json.loads(Path(client.download_artifacts(rid, "tables/per_case.json", str(tmp_path / "dl3"))).read_text())
    assert len(table["data"]) == 2
    rows_fp = [int(r[table["columns"].index("n_fp_objects")]) for r in table["data"]]
    rows_missed = [int(r[table["columns"].index("n_objects")]) - int(r[table["columns"].index("n_detected")])
                   for r in table["data"]]
    assert ("worst/by_false_marks.png" in arts) == (max(rows_fp) > 0)
    assert ("worst/by_missed_mcs.png" in arts) == (max(rows_missed) > 0)


def test_unreachable_server_falls_back_to_the_local_store(tmp_path):
    from mlflow.tracking import MlflowClient

    url = f"http://127.0.0.1:{_closed_port()}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=url)
    t0 = time.monotonic()
    p = _evaluate(tmp_path, env, "--experiment_name", "mcref_fallback", n_cases=1)
    elapsed = time.monotonic() - t0
    text = p.stdout + p.stderr
    assert text.count("does not answer") == 1, text[-3000:]
    local = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    assert local in text and url in text
    assert elapsed < 300  # MLflow's own retries took 320 s before the evaluation failed
    assert (tmp_path / "eval" / "segai" / "per_case.csv").is_file()
    client = MlflowClient(tracking_uri=local)
    runs = client.search_runs([client.get_experiment_by_name("mcref_fallback").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "dice" in runs[0].data.metrics


def test_compare_runs_prints_the_table_and_the_paired_test(mlflow_server, two_evaluations, tmp_path):
    """As the README writes it, from another folder: run names, the server from the environment."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_runs.py"), "t005", "t050", "--experiment", "mcref_test_eval2"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "B - A" in out and "mcref.weights.segai.sha256" in out
    dice = next(line for line in out.splitlines() if line.startswith("dice "))
    assert len(dice.split()) == 4  # metric, A, B, B - A
    assert "paired per-case comparison (2 common cases" in out
    line = next(x for x in out.splitlines() if x.startswith("activation_rate ") and len(x.split()) == 6)
    assert float(line.split()[1]) == 2.0  # pairs
    assert float(line.split()[4]) <= 0  # a higher threshold never activates more pixels
    assert "* threshold" in out  # the differing parameter
    assert not list(tmp_path.glob("*.db"))


def test_compare_runs_reports_a_missing_store_and_does_not_create_it(tmp_path):
    db = tmp_path / "none" / "mlruns.db"
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_runs.py"), "a", "b", "--tracking-uri", f"sqlite:///{db}"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no MLflow store at" in p.stderr
    assert not db.exists() and not list(tmp_path.glob("*.db"))


def test_every_config_writes_to_the_one_default_store(monkeypatch):
    """evaluate, study and the four training configs all log to <bundle>/eval/mlruns.db, which is
    where compare_runs looks by default."""
    from monai.bundle import ConfigParser

    from scripts.compare_runs import default_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(ROOT)
    expected = default_tracking_uri()
    assert expected == f"sqlite:///{ROOT / 'eval' / 'mlruns.db'}"
    for name in ("evaluate", "evaluate_study", "train_segai", "train_inpainter", "train_rflow", "train_mcgenref_seg"):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "configs" / f"{name}.json"))
        assert parser.get_parsed_content("tracking_uri") == expected, name
