"""Distributed (DDP) training and evaluation with torchrun on CPU (gloo), two processes.

``configs/multi_gpu_train.json``: both ranks train SegAI for one tiny epoch, each on its own half
of the training cases; rank 0 alone writes the checkpoint, as a plain (unwrapped) state dict.
``configs/multi_gpu_evaluate.json``: the held-out cases are split between the ranks and rank 0
writes the merged per-case table.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def torchrun(configs: list[str], *overrides: str) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "monai.bundle", "run", "--config_file", repr(configs), *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def ddp_training(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("ddp")
    log = torchrun(
        ["configs/train_segai.json", "configs/multi_gpu_train.json"],
        "--dataset_dir", str(tmp / "data"),
        "--ckpt_dir", str(tmp / "models"),
        "--output_dir", str(tmp / "train_out"), "--tracking_store", str(tmp / "mlruns"),
        "--n_cases", "5", "--phantom_splits", "[4, 1, 0]", "--phantom_shape", "[256, 256]",
        "--max_epochs", "1", "--epoch_length", "2", "--val_interval", "1",
        "--num_samples", "2", "--patch_size", "[64, 64]",
    )
    return tmp, log


@pytest.mark.slow
def test_two_process_ddp_training_on_cpu(ddp_training):
    import torch

    tmp_path, log = ddp_training
    for rank in (0, 1):
        assert re.search(rf"mcref ddp: rank {rank} of 2 starts, backend gloo, device cpu", log), log[-4000:]
        m = re.search(rf"mcref ddp: rank {rank} finished (\d+) iterations on (\d+) of (\d+) training cases", log)
        assert m, log[-4000:]
        assert int(m.group(1)) == 2 and int(m.group(2)) == 2 and int(m.group(3)) == 4
    saved = list((tmp_path / "models").glob("*.pt"))
    assert [f.name for f in saved] == ["model.pt"], saved
    state = torch.load(saved[0], map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state), "checkpoint holds the DDP wrapper, not the network"
    from bundle.networks import SegAINet

    SegAINet(**_config_network_kwargs()).load_state_dict(state)  # loads into the plain network
    rows = list(csv.DictReader(open(tmp_path / "train_out" / "val_metrics.csv")))
    assert len(rows) == 1  # rank 0 alone wrote the validation table


@pytest.mark.slow
def test_two_process_evaluation_merges_the_shards(ddp_training):
    tmp, _ = ddp_training
    out = tmp / "eval_out"
    log = torchrun(
        ["configs/evaluate.json", "configs/multi_gpu_evaluate.json"],
        "--dataset_dir", str(tmp / "heldout"), "--output_dir", str(out), "--tracking_store", str(tmp / "mlruns"),
        "--ckpt_path", str(tmp / "models" / "model.pt"), "--n_cases", "3", "--phantom_shape", "[256, 256]",
    )
    counts = {int(r): int(n) for r, n in re.findall(r"mcref ddp evaluate: rank (\d) evaluated (\d+) of 3 cases", log)}
    assert counts == {0: 2, 1: 1}, log[-4000:]
    merged = list(csv.DictReader(open(out / "segai" / "per_case.csv")))
    assert len(merged) == 3 and len({r["case"] for r in merged}) == 3
    assert len(list(csv.DictReader(open(out / "segai" / "summary.csv")))) == 1


def _config_network_kwargs() -> dict:
    """SegAI's architecture as configs/inference.json defines it (the shipped weights fit it)."""
    import json

    spec = json.loads((Path(__file__).resolve().parents[1] / "configs" / "inference.json").read_text())["network_def"]
    return {k: v for k, v in spec.items() if k != "_target_"}
