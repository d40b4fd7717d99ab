"""``scripts/register_models.py`` against a real ``mlflow server`` on 127.0.0.1: every shipped network
is registered with its weights hash and the bundle version, and loads back to give the bundle
network's output on one tile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.tracking import file_sha256

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_registered_models_load_back_and_match_the_bundle_networks(mlflow_server, monkeypatch):
    import mlflow
    from monai.bundle import ConfigParser

    from bundle.engine import load_checkpoint
    from scripts.register_models import SHIPPED, _example, register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # models:/ URIs resolve through it
    monkeypatch.chdir(ROOT)  # the train configs import blocks of configs/inference.json by relative path (``%``)
    out = register(SHIPPED, mlflow_server)
    assert {k: v["status"] for k, v in out.items()} == {m.key: "registered" for m in SHIPPED}
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    version = json.loads((ROOT / "configs" / "metadata.json").read_text())["version"]
    alias = "bundle_" + "".join(c if c.isalnum() else "_" for c in version)
    for m in SHIPPED:
        r = out[m.key]
        mv = client.get_model_version(r["name"], r["version"])
        assert mv.tags["mcref.weights.sha256"] == file_sha256(ROOT / m.weights) == r["sha256"]
        assert mv.tags["mcref.bundle_version"] == version
        assert client.get_model_version_by_alias(r["name"], alias).version == mv.version
        # the bundle's own network, built as the configs build it
        parser = ConfigParser()
        parser.read_config(str(ROOT / m.config))
        net = load_checkpoint(parser.get_parsed_content("network_def"), ROOT / m.weights)
        x = torch.from_numpy(_example(m))
        loaded = mlflow.pytorch.load_model(r["model_uri"]).eval()
        with torch.no_grad():
            if m.timestep is not None:
                t = torch.full((1,), m.timestep)
                ref, got = net(x, t), loaded(x)
            else:
                ref, got = net(x), loaded(x)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # the pyfunc flavour (what `mlflow models serve` uses) gives the same SegAI logits
    seg = out["segai"]
    pred = mlflow.pyfunc.load_model(seg["model_uri"]).predict(_example(SHIPPED[0]))
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train_segai.json"))
    net = load_checkpoint(parser.get_parsed_content("network_def"), ROOT / "models" / "model.pt")
    with torch.no_grad():
        np.testing.assert_allclose(pred, net(torch.from_numpy(_example(SHIPPED[0]))).numpy(), rtol=0, atol=1e-6)
    # registering the same weights again adds no version
    again = register(SHIPPED[:1], mlflow_server)
    assert again["segai"]["status"] == "already registered" and again["segai"]["version"] == seg["version"]
