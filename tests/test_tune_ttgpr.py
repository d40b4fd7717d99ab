"""``scripts/tune_ttgpr.py``: its windows hold the MCs and its counts are the ones it prints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("tune_ttgpr", ROOT / "scripts" / "tune_ttgpr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_window_per_group_of_mcs_inside_the_image(tool):
    label = np.zeros((600, 500), bool)
    label[100:103, 100:103] = label[110:112, 130:132] = True  # one group
    label[550:553, 480:483] = True  # another, near the corner
    breast = np.ones_like(label)
    wins = tool._windows(label, breast, 128)
    assert len(wins) == 2
    for rs, cs in wins:
        assert rs.stop - rs.start == 128 and cs.stop - cs.start == 128
        assert 0 <= rs.start and rs.stop <= 600 and 0 <= cs.start and cs.stop <= 500
    assert sum(label[w].sum() for w in wins) == label.sum()
    assert tool._windows(label, np.zeros_like(label), 128) == []  # no breast, no window


def test_score_counts_detections_false_marks_and_pixels(tool):
    truth = np.zeros((64, 64), bool)
    truth[10:14, 10:14] = True  # 16 px at 0.07 mm: 0.32 mm, counted
    truth[40, 40] = True  # 1 px: 0.08 mm, below 0.2 mm
    mask = np.zeros_like(truth)
    mask[12:16, 12:16] = True  # hits the first MC
    mask[30, 5] = True  # a false mark
    s = tool._score(mask, truth, 0.07)
    assert (s["obj"], s["det"], s["fp"]) == (1, 1, 1)
    assert s["tp"] == 4 and s["pred"] == 17 and s["truth"] == 17


def test_variants_parse_and_refuse_bad_pairs(tool):
    v = tool._parse_variants([["fast", "iterations=1", "euler_steps=2"]])
    assert v == {"config": {}, "fast": {"iterations": 1, "euler_steps": 2}}
    with pytest.raises(SystemExit):
        tool._parse_variants([["bad", "iterations"]])
