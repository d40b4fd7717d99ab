"""Killed runs and reruns of the inference command (issue 13).

``python -m monai.bundle run`` is killed with SIGKILL while it works through a folder; the output
folder must then hold only complete case folders (each with its ``case.json`` marker), the rows so
far in ``summary.csv`` and a ``run.json`` that says the run never finished. A rerun with the same
settings skips the finished cases and removes the leftovers; a rerun with other settings
(``--refine False``) replaces every case folder as a whole, so the old refined maps do not linger.
The book-keeping helpers of :mod:`bundle.runstate` are tested directly as well.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bundle.runstate import case_names, clean_stale, commit_case, honour_umask, staging_dir

ROOT = Path(__file__).resolve().parents[1]


def _cmd(inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
            "--dataset_dir", str(inp), "--output_dir", str(out), *extra]


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def _marker(out: Path, case: str) -> dict:
    return json.loads((out / case / "case.json").read_text(encoding="utf-8"))


def _complete_cases(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "runs")


@pytest.mark.slow
def test_kill_then_rerun_then_rerun_with_other_settings(tmp_path):
    from bundle.phantom import make_dataset

    inp = tmp_path / "in"
    make_dataset(inp, n_cases=4, seed=11, shape=(512, 384), splits=(0, 0, 4), progress=False)
    out = tmp_path / "out"

    # 1. kill the run once the first case is in place
    proc = subprocess.Popen(_cmd(inp, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "case_000" / "case.json").is_file():
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the process group created for this run only
    finally:
        if proc.poll() is None:
            proc.wait(timeout=60)
        proc.stderr.close()
    done = _complete_cases(out)
    assert "case_000" in done and len(done) < 4, done
    for case in done:  # whatever is visible is complete
        marker = _marker(out, case)
        assert all((out / case / name).is_file() for name in marker["outputs"]), case
        assert any(name.endswith("_refined_prob.nii.gz") for name in marker["outputs"])
    first = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert first["status"] == "running"  # the record says the run never finished
    assert set(_rows(out)) >= set(done)  # the summary holds the rows so far
    # a truncated hidden temp file as older versions left them, inside a finished case
    stale = out / "case_000" / ".case_000_prob.nii.gz.0123456789ab.tmp.nii.gz"
    stale.write_bytes(b"\x1f\x8b truncated")
    first_markers = {c: _marker(out, c) for c in done}

    # 2. rerun, same settings: finished cases skipped, the rest done, leftovers removed
    p = subprocess.run(_cmd(inp, out), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(out)
    assert sorted(rows) == ["case_000", "case_001", "case_002", "case_003"]
    for case, row in rows.items():
        assert row["status"] == "ok"
        assert row["reused"] == ("True" if case in done else "False"), (case, row["reused"])
    for case in done:
        assert _marker(out, case) == first_markers[case]  # untouched, still the first run's
    assert not stale.exists()
    assert [p.name for p in out.rglob(".*") if p.name != ".mcref.lock"] == []
    second = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert second["status"] == "finished" and second["reused"] == len(done) and second["failed"] == 0
    archived = json.loads((out / "runs" / f"{first['run_id']}.json").read_text(encoding="utf-8"))
    assert archived["status"] == "interrupted"

    # 3. other settings: every case recomputed, each folder replaced as a whole
    p = subprocess.run(_cmd(inp, out, "--refine", "False"), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    third = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert third["settings_sha256"] != second["settings_sha256"]
    for case, row in _rows(out).items():
        assert row["reused"] == "False"
        names = {q.name for q in (out / case).iterdir()}
        assert f"{case}_prob.nii.gz" in names and "case.json" in names
        assert not any("refined" in n or "virtual_normal" in n for n in names), names  # no stale maps of run 2
        marker = _marker(out, case)
        assert marker["run_id"] == third["run_id"] and set(marker["outputs"]) == names - {"case.json"}

    # 4. the same other settings again: nothing to do
    p = subprocess.run(_cmd(inp, out, "--refine", "False"), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {r["reused"] for r in _rows(out).values()} == {"True"}


# ----------------------------------------------------------------------------------------------
# the helpers
# ----------------------------------------------------------------------------------------------


def test_case_names_never_collide(tmp_path):
    (tmp_path / "IM1").write_text("a file where a case folder would go")
    files = ["in/dup.dcm", "in/dup.png", "in/x.nii", "in/x.nii.gz", "in/summary.csv.dcm", "in/run.json",
             "in/A.dcm", "in/a.dcm", "in/IM1", "in/plain.dcm", "in/demo_inputs"]
    names = case_names(files, tmp_path)
    assert names["in/dup.dcm"] == "dup_dcm" and names["in/dup.png"] == "dup_png"
    assert names["in/x.nii"] == "x_nii" and names["in/x.nii.gz"] == "x_nii_gz"
    assert names["in/summary.csv.dcm"] == "summary.csv_dcm"
    assert names["in/plain.dcm"] == "plain"
    assert names["in/run.json"] not in ("run.json", "run")
    assert names["in/IM1"] != "IM1" and names["in/demo_inputs"] != "demo_inputs"
    folded = [n.casefold() for n in names.values()]
    assert len(set(folded)) == len(folded)  # distinct even on case-insensitive file systems
    assert case_names(files, tmp_path) == names  # stable from run to run


def test_interrupted_replacement_is_restored_and_leftovers_removed(tmp_path):
    old = tmp_path / "c1"
    old.mkdir()
    (old / "c1_prob.nii.gz").write_bytes(b"old")
    new = staging_dir(tmp_path, "c1", "r2")
    (new / "c1_prob.nii.gz").write_bytes(b"new")
    commit_case(new, old, "r2")
    assert (old / "c1_prob.nii.gz").read_bytes() == b"new" and not new.exists()
    # a run killed between the two renames: the folder is only under its .old name
    os.replace(old, tmp_path / ".c1.old-r3")
    partial = staging_dir(tmp_path, "c2", "r3")
    (tmp_path / ".summary.csv.abc123.csv.tmp").write_text("half")
    (tmp_path / ".keep_me").write_text("a user's hidden file")
    done = clean_stale(tmp_path, ["c1"])
    assert (old / "c1_prob.nii.gz").read_bytes() == b"new"  # restored, nothing lost
    assert not partial.exists() and not (tmp_path / ".summary.csv.abc123.csv.tmp").exists()
    assert (tmp_path / ".keep_me").exists() and len(done) == 3


def test_honour_umask_opens_mkstemp_files(tmp_path):
    import tempfile

    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    assert os.stat(name).st_mode & 0o777 == 0o600
    honour_umask([tmp_path], 0o022)
    assert os.stat(name).st_mode & 0o777 == 0o644
