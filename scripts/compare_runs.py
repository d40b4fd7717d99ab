#!/usr/bin/env python
"""Print the metrics of two MLflow runs side by side, and the parameters that differ.

Usage::

    python scripts/compare_runs.py RUN_A RUN_B [--tracking-uri URI] [--experiment NAME] [--all-params]

``RUN_A``/``RUN_B`` are run ids, or run names (the newest run of that name; with ``--experiment``
only that experiment is searched). The tracking URI defaults to ``$MLFLOW_TRACKING_URI``, else the
study's default database ``eval/study/mlruns.db`` when it exists, else ``./mlruns.db``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["default_tracking_uri", "find_run", "compare", "main"]


def default_tracking_uri(cwd: str | os.PathLike | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/eval/study/mlruns.db`` if it exists, else
    ``sqlite:///<cwd>/mlruns.db``.

    Args:
        cwd: folder to look in (default: the working directory).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    base = Path(cwd or os.getcwd()).absolute()
    study = base / "eval" / "study" / "mlruns.db"
    return f"sqlite:///{study if study.is_file() else base / 'mlruns.db'}"


def find_run(client: Any, ref: str, experiment: str | None = None) -> Any:
    """The run with id ``ref``, or the newest run named ``ref``.

    Args:
        client: an ``mlflow.MlflowClient``.
        ref: run id or run name.
        experiment: restrict name look-ups to this experiment.

    Raises:
        LookupError: no such run.
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
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    safe = ref.replace("'", "\\'")
    runs = client.search_runs(
        ids, filter_string=f"attributes.run_name = '{safe}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        raise LookupError(f"no run with id or name {ref!r}")
    return runs[0]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def compare(run_a: Any, run_b: Any, all_params: bool = False) -> str:
    """Side-by-side text of two runs' metrics (with B - A) and their differing parameters.

    Args:
        run_a: an ``mlflow.entities.Run``.
        run_b: another one.
        all_params: list every parameter, not only the differing ones.
    """
    ma, mb = dict(run_a.data.metrics), dict(run_b.data.metrics)
    pa, pb = dict(run_a.data.params), dict(run_b.data.params)
    na = run_a.info.run_name or run_a.info.run_id
    nb = run_b.info.run_name or run_b.info.run_id
    keys = sorted(set(ma) | set(mb))
    w = max([len(k) for k in keys] + [6])
    cw = max(12, len(na), len(nb))
    lines = [
        f"A: {run_a.info.run_id} ({na}, experiment {run_a.info.experiment_id}, {run_a.info.status})",
        f"B: {run_b.info.run_id} ({nb}, experiment {run_b.info.experiment_id}, {run_b.info.status})",
        "",
        f"{'metric':<{w}}  {'A':>{cw}}  {'B':>{cw}}  {'B - A':>12}",
        "-" * (w + 2 * cw + 18),
    ]
    for k in keys:
        a, b = ma.get(k), mb.get(k)
        d = b - a if isinstance(a, float) and isinstance(b, float) else None
        lines.append(f"{k:<{w}}  {_fmt(a):>{cw}}  {_fmt(b):>{cw}}  {_fmt(d):>12}")
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
    """Command line entry point; returns the exit status.

    Args:
        argv: arguments (default ``sys.argv[1:]``).
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a", help="run id or run name")
    ap.add_argument("run_b", help="run id or run name")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: see module docstring)")
    ap.add_argument("--experiment", default=None, help="experiment to search run names in")
    ap.add_argument("--all-params", action="store_true", help="list every parameter")
    args = ap.parse_args(argv)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=args.tracking_uri or default_tracking_uri())
    try:
        a = find_run(client, args.run_a, args.experiment)
        b = find_run(client, args.run_b, args.experiment)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(compare(a, b, args.all_params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
