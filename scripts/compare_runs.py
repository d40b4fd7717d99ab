#!/usr/bin/env python
"""Print two MLflow runs side by side: metrics with B - A, a paired test per metric where both runs
logged per-case values, their identity (weights, data, commit) and the parameters that differ.

Usage::

    python scripts/compare_runs.py RUN_A RUN_B [--tracking-uri URI] [--experiment NAME] [--all-params]

``RUN_A``/``RUN_B`` are run ids, or run names (the newest run of that name; with ``--experiment``
only that experiment is searched). The store is the one every config of the bundle writes to:
``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<bundle root>/eval/mlruns.db``
(the bundle root is this script's parent folder, wherever the command is run from). A missing
local store is reported, never created.

Paired test: both runs' ``per_case.csv`` artifacts (evaluation runs, study child runs) are matched
on ``case``; for every numeric column both have, the two-sided Wilcoxon signed-rank test of the
paired values (``bundle.study.paired_wilcoxon``) is printed with the mean difference B - A.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``python scripts/compare_runs.py`` puts scripts/ first, not the bundle
    sys.path.insert(0, str(ROOT))

__all__ = ["default_tracking_uri", "open_store", "find_run", "per_case_values", "paired_table", "compare", "main"]

#: identity tags shown for both runs.
IDENTITY_TAGS = ("mcref.kind", "mcref.bundle_version", "mlflow.source.git.commit", "mcref.git_dirty",
                 "mcref.dataset.name")
#: per-case columns that are labels or counts of the case, not metrics to test.
NOT_METRICS = {"case", "filename", "height", "width", "spacing_row_mm", "spacing_col_mm", "status", "error", "method",
               # properties of the case, the same for every method: nothing to test
               "breast_px", "breast_area_cm2", "truth_px", "tn", "n_objects", "n_objects_all", "n_truth_clusters",
               "true_activation_rate"}


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the bundle's store ``sqlite:///<bundle root>/eval/mlruns.db``."""
    from bundle.tracking import default_store_dir, sqlite_uri

    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(default_store_dir(ROOT))


def open_store(uri: str) -> Any:
    """An ``mlflow.MlflowClient`` on ``uri``.

    Args:
        uri: tracking URI.

    Raises:
        LookupError: a local SQLite store that does not exist (it is not created), or a server that
            does not answer.
    """
    import mlflow

    from bundle.tracking import server_reachable

    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise LookupError(f"no MLflow store at {db}: run an evaluation first (python -m monai.bundle run "
                              f"--config_file configs/evaluate.json) or pass --tracking-uri")
    elif not server_reachable(uri):
        raise LookupError(f"MLflow server {uri} does not answer")
    return mlflow.MlflowClient(tracking_uri=uri)


def find_run(client: Any, ref: str, experiment: str | None = None) -> Any:
    """The run with id ``ref``, or the newest run named ``ref``.

    Args:
        client: an ``mlflow.MlflowClient``.
        ref: run id or run name.
        experiment: restrict name look-ups to this experiment.

    Raises:
        LookupError: no such run (the message lists the experiments searched).
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise LookupError(f"no experiment named {experiment!r}")
        exps = [exp]
    else:
        exps = list(client.search_experiments())
    safe = ref.replace("'", "\\'")
    runs = client.search_runs(
        [e.experiment_id for e in exps], filter_string=f"attributes.run_name = '{safe}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        names = ", ".join(e.name for e in exps) or "none"
        raise LookupError(f"no run with id or name {ref!r} in {client.tracking_uri} (experiments: {names})")
    return runs[0]


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f


def per_case_values(client: Any, run: Any) -> dict[str, dict[str, float]] | None:
    """``{case: {column: value}}`` from the run's ``per_case.csv`` artifact, None when it has none.

    Args:
        client: an ``mlflow.MlflowClient``.
        run: an ``mlflow.entities.Run``.
    """
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    if "per_case.csv" not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, "per_case.csv", tmp)
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        case = r.get("case")
        if not case:
            continue
        vals = {k: _float(v) for k, v in r.items() if k not in NOT_METRICS}
        out[case] = {k: v for k, v in vals.items() if v is not None}
    return out


def paired_table(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Per-case columns of both runs, paired on the cases both have: ``metric``, ``n_pairs``,
    ``mean_a``, ``mean_b``, ``mean_diff`` (B - A) and the Wilcoxon ``p_value``.

    Args:
        a: :func:`per_case_values` of run A.
        b: :func:`per_case_values` of run B.
    """
    from bundle.study import paired_wilcoxon

    cases = sorted(set(a) & set(b))
    cols = sorted({k for c in cases for k in a[c]} & {k for c in cases for k in b[c]})
    out = []
    for col in cols:
        xa = [a[c].get(col, math.nan) for c in cases]
        xb = [b[c].get(col, math.nan) for c in cases]
        res = paired_wilcoxon(xb, xa)  # differences B - A
        ok = [(x, y) for x, y in zip(xa, xb) if math.isfinite(x) and math.isfinite(y)]
        if not ok:
            continue
        out.append({"metric": col, "n_pairs": len(ok), "mean_a": sum(x for x, _ in ok) / len(ok),
                    "mean_b": sum(y for _, y in ok) / len(ok), "mean_diff": res["mean_difference"],
                    "p_value": res["p_value"]})
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def compare(run_a: Any, run_b: Any, all_params: bool = False, client: Any | None = None) -> str:
    """Side-by-side text of two runs: identity, metrics (with B - A), the paired per-case tests when
    ``client`` is given and both runs have ``per_case.csv``, and the differing parameters.

    Args:
        run_a: an ``mlflow.entities.Run``.
        run_b: another one.
        all_params: list every parameter, not only the differing ones.
        client: the client the runs come from (needed for the paired tests).
    """
    ma, mb = dict(run_a.data.metrics), dict(run_b.data.metrics)
    pa, pb = dict(run_a.data.params), dict(run_b.data.params)
    ta, tb = dict(run_a.data.tags), dict(run_b.data.tags)
    na = run_a.info.run_name or run_a.info.run_id
    nb = run_b.info.run_name or run_b.info.run_id
    keys = sorted(set(ma) | set(mb))
    w = max([len(k) for k in keys] + [6])
    cw = max(12, len(na), len(nb))
    lines = [
        f"A: {run_a.info.run_id} ({na}, experiment {run_a.info.experiment_id}, {run_a.info.status})",
        f"B: {run_b.info.run_id} ({nb}, experiment {run_b.info.experiment_id}, {run_b.info.status})",
        "",
    ]
    ident = [k for k in IDENTITY_TAGS if k in ta or k in tb]
    ident += sorted(k for k in set(ta) | set(tb) if k.startswith(("mcref.weights.", "mcref.dataset.")) and
                    k.endswith((".sha256", ".digest")))
    if ident:
        iw = max(len(k) for k in ident)
        lines.append("identity:")
        for k in ident:
            flag = " " if ta.get(k) == tb.get(k) else "*"
            lines.append(f"{flag} {k:<{iw}}  A: {_fmt(ta.get(k))}")
            if ta.get(k) != tb.get(k):
                lines.append(f"  {'':<{iw}}  B: {_fmt(tb.get(k))}")
        lines.append("")
    lines += [f"{'metric':<{w}}  {'A':>{cw}}  {'B':>{cw}}  {'B - A':>12}", "-" * (w + 2 * cw + 18)]
    for k in keys:
        a, b = ma.get(k), mb.get(k)
        d = b - a if isinstance(a, float) and isinstance(b, float) else None
        lines.append(f"{k:<{w}}  {_fmt(a):>{cw}}  {_fmt(b):>{cw}}  {_fmt(d):>12}")
    if client is not None:
        va, vb = per_case_values(client, run_a), per_case_values(client, run_b)
        lines.append("")
        if va is None or vb is None:
            lines.append("paired test: not available (per_case.csv missing in "
                         + " and ".join(n for n, v in (("A", va), ("B", vb)) if v is None) + ")")
        else:
            rows = paired_table(va, vb)
            n_common = len(set(va) & set(vb))
            lines.append(f"paired per-case comparison ({n_common} common cases; Wilcoxon signed-rank, two-sided):")
            if rows:
                pw = max(len(r["metric"]) for r in rows)
                lines.append(f"{'metric':<{pw}}  {'n':>4}  {'mean A':>12}  {'mean B':>12}  {'B - A':>12}  {'p':>8}")
                for r in rows:
                    lines.append(f"{r['metric']:<{pw}}  {r['n_pairs']:>4}  {_fmt(r['mean_a']):>12}  {_fmt(r['mean_b']):>12}"
                                 f"  {_fmt(r['mean_diff']):>12}  {_fmt(r['p_value']):>8}")
            else:
                lines.append("  (no common case with values in both runs)")
    pkeys = sorted(set(pa) | set(pb))
    shown = [k for k in pkeys if all_params or pa.get(k) != pb.get(k)]
    lines.append("")
    lines.append(("parameters" if all_params else "parameters that differ") + f" ({len(shown)} of {len(pkeys)}):")
    if shown:
        pw = max(len(k) for k in shown)
        for k in shown:
            flag = " " if pa.get(k) == pb.get(k) else "*"
            lines.append(f"{flag} {k:<{pw}}  A: {_fmt(pa.get(k))}")
            lines.append(f"  {'':<{pw}}  B: {_fmt(pb.get(k))}")
    else:
        lines.append("  (none)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 when a run or the store is missing).

    Args:
        argv: arguments (default ``sys.argv[1:]``).
    """
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("run_a", help="run id or run name")
    ap.add_argument("run_b", help="run id or run name")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else <bundle>/eval/mlruns.db)")
    ap.add_argument("--experiment", default=None, help="experiment to search run names in")
    ap.add_argument("--all-params", action="store_true", help="list every parameter")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the table readable
    uri = args.tracking_uri or default_tracking_uri()
    try:
        client = open_store(uri)
        a = find_run(client, args.run_a, args.experiment)
        b = find_run(client, args.run_b, args.experiment)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(compare(a, b, args.all_params, client=client))
    return 0


if __name__ == "__main__":
    sys.exit(main())
