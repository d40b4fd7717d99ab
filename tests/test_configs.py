"""Layered configs: ``configs/inference.json`` defines preprocessing, networks and the tile
inferer once, ``configs/inference_mcgenref.json`` the generator and TT-GPR's parameters; the
evaluate, study and train configs import them with MONAI's ``%`` macro instead of restating them
(docs/training.md, "One definition")."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# class names that only the base configs may spell out
BASE_ONLY = {
    "bundle.data.LoadMammogramd": "inference.json",
    "bundle.data.OrientBreastd": "inference.json",
    "bundle.data.ResampleToSpacingd": "inference.json",
    "bundle.data.BreastMaskd": "inference.json",
    "bundle.data.NormalizeMammogramd": "inference.json",
    "bundle.networks.SegAINet": "inference.json",
    "bundle.inpainting.MaskAwareInpainter": "inference.json",
    "bundle.mcgenref.SeedRFGenerator": "inference_mcgenref.json",
    "euler_steps": "inference_mcgenref.json",  # a TT-GPR parameter
    "seed_threshold": "inference_mcgenref.json",
}
# config files (merged in order) -> (id of its chain, where inference's five transforms sit in
# it, the keys its geometry transforms move)
SHARED_CHAIN = {
    ("evaluate",): ("preprocessing#transforms", [0, 1, 2, 3, 4], ["image", "label"]),
    ("evaluate", "multi_gpu_evaluate"): ("preprocessing#transforms", [0, 1, 2, 3, 4], ["image", "label"]),
    ("evaluate_study",): ("preprocessing#transforms", [0, 2, 3, 4, 6], ["image", "label"]),
    ("train_segai",): ("preprocessing", [0, 1, 2, 3, 4], ["image", "label"]),
    ("train_segai", "train_segai_real"): ("preprocessing", [0, 1, 2, 3, 4], ["image", "label"]),
    ("train_inpainter",): ("preprocessing", [0, 1, 2, 3, 4], ["image"]),
    ("train_rflow",): ("preprocessing", [0, 1, 2, 3, 4], ["image"]),
    ("train_mcgenref_seg",): ("preprocessing", [0, 1, 2, 3, 4], ["image"]),
}


@pytest.fixture(autouse=True)
def _bundle_root_is_cwd(monkeypatch):
    """``%configs/...`` paths are relative to the working directory, the bundle root in every command."""
    monkeypatch.chdir(ROOT)


def parser_of(*names: str, **overrides):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(CONFIGS / f"{n}.json") for n in names])
    p["bundle_root"] = str(ROOT)
    p.update(overrides)
    return p


def substitute(p, value, depth=0):
    """``value`` with ``@`` references to plain values replaced by ``p``'s values (``$`` stays)."""
    if isinstance(value, str) and value.startswith("@"):
        assert depth < 20, value
        return substitute(p, copy.deepcopy(p[value[1:]]), depth + 1)
    if isinstance(value, dict):
        return {k: substitute(p, x, depth) for k, x in value.items()}
    if isinstance(value, list):
        return [substitute(p, x, depth) for x in value]
    return value


def resolved(p, id_: str):
    """The block ``id_`` of ``p`` with ``%`` imports expanded and plain ``@`` references replaced."""
    p.resolve_macro_and_relative_ids()
    return substitute(p, copy.deepcopy(p[id_]))


def as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def test_only_the_base_configs_spell_out_the_shared_blocks():
    for path in sorted(CONFIGS.glob("*.json")):
        text = path.read_text()
        for needle, home in BASE_ONLY.items():
            if path.name != home:
                assert f'"{needle}"' not in text, f"{path.name} restates {needle}; import it from configs/{home}"
    for name in ("evaluate", "evaluate_study", "train_segai", "train_inpainter", "train_rflow", "train_mcgenref_seg"):
        raw = json.loads((CONFIGS / f"{name}.json").read_text())
        assert raw["working_spacing"] == "%configs/inference.json#working_spacing", name
        assert isinstance(raw["network_def"], dict), name  # argument by argument: --network_def#channels works
        assert all(str(v).startswith(("%configs/inference", "@")) for v in raw["network_def"].values()), name


@pytest.mark.parametrize("names", list(SHARED_CHAIN), ids="+".join)
def test_preprocessing_is_the_inference_chain(names):
    """The shared transforms are inference.json's five, references resolved with the config's own
    ``preprocessing_keys`` and ``pixel_spacing`` and inference's working spacing."""
    id_, positions, geometry = SHARED_CHAIN[names]
    p = parser_of(*names)
    chain = resolved(p, id_)
    raw_base = json.loads((CONFIGS / "inference.json").read_text())["preprocessing"]["transforms"]
    assert [chain[i] for i in positions] == substitute(p, raw_base)
    assert p.get_parsed_content("working_spacing") == parser_of("inference").get_parsed_content("working_spacing") == 0.07
    keys = p.get_parsed_content("preprocessing_keys")
    assert as_list(keys["geometry"]) == geometry
    assert len(as_list(keys["geometry_modes"])) == len(geometry)
    # instantiated: the same classes in the same places, the intended keys and spacing
    pre = p.get_parsed_content(id_.split("#")[0])
    objs = pre.transforms if hasattr(pre, "transforms") else pre
    assert [type(objs[i]).__name__ for i in positions] == [t["_target_"].rsplit(".", 1)[-1] for t in raw_base]
    resample = objs[positions[2]]
    assert list(resample.keys) == geometry and resample.spacing == 0.07
    assert list(resample.mode) == ["bilinear", "nearest"][: len(geometry)]


def test_inference_chain_reads_the_image_only():
    p = parser_of("inference")
    assert p.get_parsed_content("preprocessing_keys") == {"load": "image", "geometry": "image", "geometry_modes": "bilinear"}
    for names in (("train_inpainter",), ("train_rflow",), ("train_mcgenref_seg",)):
        assert parser_of(*names).get_parsed_content("preprocessing_keys") == p.get_parsed_content("preprocessing_keys")
    for names in (("evaluate",), ("train_segai",), ("evaluate_study",)):
        keys = parser_of(*names).get_parsed_content("preprocessing_keys")
        assert keys["geometry"] == ["image", "label"] and keys["geometry_modes"] == ["bilinear", "nearest"], names


@pytest.mark.parametrize("names,key,base_names,base_key", [
    (("evaluate",), "network_def", ("inference",), "network_def"),
    (("evaluate", "multi_gpu_evaluate"), "network_def", ("inference",), "network_def"),
    (("evaluate_study",), "network_def", ("inference",), "network_def"),
    (("evaluate_study",), "inpainter_def", ("inference",), "inpainter_def"),
    (("train_segai",), "network_def", ("inference",), "network_def"),
    (("train_segai", "train_segai_real"), "network_def", ("inference",), "network_def"),
    (("train_mcgenref_seg",), "network_def", ("inference", "inference_mcgenref"), "network_def"),
    (("train_inpainter",), "network_def", ("inference",), "inpainter_def"),
    (("train_inpainter", "train_inpainter_real"), "network_def", ("inference",), "inpainter_def"),
    (("train_rflow",), "network_def", ("inference", "inference_mcgenref"), "generator_def"),
], ids=lambda x: "+".join(x) if isinstance(x, tuple) else x)
def test_networks_are_the_inference_networks(names, key, base_names, base_key):
    """Every argument, no more and no fewer: a new argument in inference.json must be imported too."""
    assert resolved(parser_of(*names), key) == resolved(parser_of(*base_names), base_key)


def test_networks_and_inferers_instantiate_equal():
    base = parser_of("inference")
    net = base.get_parsed_content("network_def")
    for names in (("evaluate",), ("evaluate_study",), ("train_segai",)):
        other = parser_of(*names).get_parsed_content("network_def")
        assert type(other) is type(net) and str(other) == str(net), names
        assert {k: v.shape for k, v in other.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    # MC-GenRef's segmentor keeps its own norm and activation (its shipped weights have instance
    # norm); the inference overlay and its train config agree, and the weights load
    seg = parser_of("inference", "inference_mcgenref").get_parsed_content("network_def")
    trained = parser_of("train_mcgenref_seg").get_parsed_content("network_def")
    assert str(trained) == str(seg) and str(seg) != str(net)
    from bundle.networks import load_checkpoint

    load_checkpoint(trained, ROOT / "models" / "mcgenref_seg.pt")
    ref = base.get_parsed_content("inferer")
    for names in (("evaluate",), ("evaluate_study",)):
        inf = parser_of(*names).get_parsed_content("inferer")
        assert type(inf) is type(ref), names
        assert (inf.roi_size, inf.overlap, inf.sw_batch_size) == (ref.roi_size, ref.overlap, ref.sw_batch_size), names
    gen = parser_of("inference", "inference_mcgenref").get_parsed_content("generator_def")
    rf = parser_of("train_rflow")
    assert str(rf.get_parsed_content("network_def")) == str(gen)
    for k in ("residual_scale", "seed_sigma", "context_sigma"):  # the training pairs match the generator's conditioning
        assert rf.get_parsed_content(f"pair#{k}") == rf.get_parsed_content(f"network_def#{k}") == \
            parser_of("inference", "inference_mcgenref").get_parsed_content(f"generator_def#{k}")
    assert rf.get_parsed_content("num_train_timesteps") == 1000


def test_inferer_arguments_are_inference_arguments():
    base = resolved(parser_of("inference"), "inferer")
    for names in (("evaluate",), ("evaluate_study",)):
        inf = resolved(parser_of(*names), "inferer")
        assert {"_target_", "roi_size", "overlap", "sw_batch_size"} <= set(inf), names
        assert inf == {k: base[k] for k in inf}, names


def test_nested_overrides_still_reach_imported_arguments():
    """What tests/test_study.py and users do: --network_def#channels, --inferer#roi_size."""
    p = parser_of("evaluate_study", **{"network_def#channels": [8, 16], "network_def#strides": [2],
                                       "network_def#num_res_units": 0, "inferer#roi_size": 128,
                                       "inpainter_def#embed_dim": 16})
    net = p.get_parsed_content("network_def")
    assert sum(x.numel() for x in net.parameters()) < sum(x.numel() for x in parser_of("inference").get_parsed_content(
        "network_def").parameters())
    assert p.get_parsed_content("inferer").roi_size == (128, 128)
    assert p.get_parsed_content("inpainter_def#embed_dim") == 16
    p = parser_of("train_segai", **{"network_def#channels": [8, 16], "network_def#strides": [2]})
    assert p.get_parsed_content("network_def#channels") == [8, 16]


def test_ttgpr_parameters_live_under_one_key():
    mc = parser_of("inference", "inference_mcgenref")
    params = mc.get_parsed_content("ttgpr_params")
    # the inference overlay passes every parameter from that key, and nothing else sets one
    raw_ttgpr = json.loads((CONFIGS / "inference_mcgenref.json").read_text())["ttgpr"]
    assert {k for k, v in raw_ttgpr.items() if v == f"@ttgpr_params#{k}"} == set(params)
    # the study imports the same key and hands it to its TT-GPR row
    raw = json.loads((CONFIGS / "evaluate_study.json").read_text())
    assert raw["ttgpr_params"] == "%configs/inference_mcgenref.json#ttgpr_params"
    assert raw["refiner_kwargs"]["mcgenref_ttgpr"]["ttgpr_kwargs"] == "@ttgpr_params"
    assert "mcgenref_ttgpr" not in raw  # the former second copy
    study = parser_of("evaluate_study")
    assert study.get_parsed_content("refiner_kwargs")["mcgenref_ttgpr"]["ttgpr_kwargs"] == params
    # both build the same TT-GPR
    from bundle.mcgenref import TTGPRInferer

    a = TTGPRInferer(**study.get_parsed_content("refiner_kwargs")["mcgenref_ttgpr"]["ttgpr_kwargs"])
    b = mc.get_parsed_content("ttgpr")
    simple = (int, float, str, bool, type(None))
    va = {k: v for k, v in vars(a).items() if isinstance(v, simple) and k != "generator"}
    vb = {k: v for k, v in vars(b).items() if isinstance(v, simple) and k != "generator"}
    assert va == vb
    # a study-only setting replaces the whole key (documented in docs/mcgenref.md)
    quick = parser_of("evaluate_study", ttgpr_params={"iterations": 1, "inner_steps": 2})
    assert quick.get_parsed_content("refiner_kwargs")["mcgenref_ttgpr"]["ttgpr_kwargs"] == {"iterations": 1, "inner_steps": 2}


def test_study_command_line_options_that_were_documented_still_resolve():
    """The study's options as docs/study.md lists them, and the other top-level keys the configs had."""
    p = parser_of("evaluate_study")
    for key in ("network_def", "inpainter_def", "inferer", "preprocessing", "refiner_kwargs", "settings", "working_spacing"):
        assert key in p, key
    pre = p.get_parsed_content("preprocessing")
    assert [type(t).__name__ for t in pre.transforms] == [
        "LoadMammogramd", "LoadINbreastLabeld", "OrientBreastd", "ResampleToSpacingd", "BreastMaskd", "CopyItemsd",
        "NormalizeMammogramd"]
    assert pre.transforms[0].keys == ("image",) and pre.transforms[3].mode == ("bilinear", "nearest")


def test_mcgenref_overlay_honours_refine_false():
    """``--refine False`` runs MC-GenRef's initializer alone, not TT-GPR (minutes per view)."""
    on = parser_of("inference", "inference_mcgenref")
    assert type(on.get_parsed_content("pipeline").refiner).__name__ == "TTGPRRefiner"
    off = parser_of("inference", "inference_mcgenref")
    off["refine"] = False
    assert off.get_parsed_content("pipeline").refiner is None


def test_finetune_overlay_starts_from_the_given_weights(tmp_path):
    """``train_segai_finetune.json`` warm-starts from ``init_ckpt`` (default the shipped SegAI) and
    keeps the real-domain recipe's network and data; a missing checkpoint is named."""
    import torch

    names = ("train_segai", "train_segai_real", "train_segai_finetune")
    p = parser_of(*names)
    net = p.get_parsed_content("network")
    shipped = torch.load(ROOT / "models" / "model.pt", map_location="cpu", weights_only=True)
    shipped = shipped.get("network", shipped)
    got = net.state_dict()
    assert set(got) == set(shipped)
    assert all(torch.equal(got[k].cpu(), shipped[k]) for k in got)
    assert resolved(p, "network_def") == resolved(parser_of("inference"), "network_def")
    assert p.get_parsed_content("output_dir").endswith("eval/train_segai_finetune")
    missing = parser_of(*names, init_ckpt=str(tmp_path / "none.pt"))
    with pytest.raises(RuntimeError) as err:
        missing.get_parsed_content("network")
    assert isinstance(err.value.__cause__, FileNotFoundError) and "none.pt" in str(err.value.__cause__)
