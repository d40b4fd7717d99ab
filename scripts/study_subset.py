#!/usr/bin/env python
"""Table of a study's per-image metrics on a subset of its cases (e.g. the cross-site images).

usage:
    python scripts/study_subset.py STUDY_OUTPUT_DIR --cases 'REGEX' [--title TEXT]

Reads ``STUDY_OUTPUT_DIR/<method>/per_case.csv`` (written by ``configs/evaluate_study.json``),
keeps the cases whose name matches ``REGEX`` (``re.search``) and prints a markdown table with the
mean over those images of Dice, Recall, FNR, Bal. Acc., G-Mean, PPV, activation rate and object
detection rate, plus paired Wilcoxon p-values of MC-GenRef TT-GPR vs its initializer and of
SegAI+R:GenAI vs SegAI (the pairs of ``bundle.study.TABLE4_PAIRS``). Images a method failed on
are left out of that method's means and listed. Exit code 0, or 1 when no case matches.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (
    ("dice", "Dice"), ("sensitivity", "Recall"), ("fnr", "FNR"), ("balanced_accuracy", "Bal. Acc."),
    ("g_mean", "G-Mean"), ("ppv", "PPV"), ("activation_rate", "Activation rate"), ("object_detection_rate", "MC objects hit"),
)


def _read(path: Path, pattern: re.Pattern) -> dict[str, dict[str, float]]:
    rows = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if pattern.search(r["case"]):
                rows[r["case"]] = {k: float(v) if v not in ("", "nan") else math.nan for k, v in r.items() if k != "case"}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study_dir", type=Path)
    ap.add_argument("--cases", required=True, help="regular expression on the case name")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bundle.study import TABLE4_PAIRS, method_label, method_needs, paired_wilcoxon

    method_needs("segai")  # registers every method (MC-GenRef included)
    from bundle.refine import REFINERS

    pattern = re.compile(args.cases)
    order = list(REFINERS)
    dirs = sorted((p for p in args.study_dir.iterdir() if (p / "per_case.csv").is_file()),
                  key=lambda p: order.index(p.name) if p.name in order else len(order))
    data = {p.name: _read(p / "per_case.csv", pattern) for p in dirs}
    cases = sorted(set().union(*[set(v) for v in data.values()])) if data else []
    if not cases:
        print(f"no case of {args.study_dir} matches {args.cases!r}")
        return 1
    base = dict(TABLE4_PAIRS)
    if args.title:
        print(f"{args.title}\n")
    print(f"{len(cases)} images: {', '.join(cases)}\n")
    head = ["method", "n"] + [h for _, h in COLUMNS] + ["p Dice", "p Recall", "vs"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for m, rows in data.items():
        cells = [method_label(m), str(len(rows))]
        for k, _ in COLUMNS:
            vals = [r[k] for r in rows.values() if not math.isnan(r.get(k, math.nan))]
            mean = sum(vals) / len(vals) if vals else math.nan
            scale, dig = (100.0, 3) if k == "activation_rate" else (100.0, 1)
            cells.append("n/a" if math.isnan(mean) else f"{scale * mean:.{dig}f}")
        b = base.get(m)
        if b in data:
            common = sorted(set(rows) & set(data[b]))
            for k in ("dice", "sensitivity"):
                p = paired_wilcoxon([rows[c][k] for c in common], [data[b][c][k] for c in common])["p_value"]
                cells.append("n/a" if math.isnan(p) else f"{p:.3f}")
            cells.append(method_label(b))
        else:
            cells += ["", "", ""]
        print("| " + " | ".join(cells) + " |")
        missing = [c for c in cases if c not in rows]
        if missing:
            print(f"<!-- {m} has no row for {missing} -->")
    print("\nPercent; activation rate in % of the breast. Command: `python scripts/study_subset.py "
          f"{args.study_dir} --cases '{args.cases}'`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
