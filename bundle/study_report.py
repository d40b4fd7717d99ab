"""The study's documents: the results markdown, the self-contained HTML report, the CSV tables and
curve PNGs of :class:`bundle.study.MCStudy` (:func:`write_study_outputs`), and the helpers that
put a results section into a markdown file and name the command that produced it.

The tables are plain markdown/HTML strings (:func:`bundle.reports.markdown_table`) rather than a
templating library's output, so that a report is one file without dependencies; :mod:`bundle.study`
re-exports :func:`replace_marked_section` and :func:`invocation_command`.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bundle.figures import _png_data_uri, plot_curves, plot_froc
from bundle.reports import atomic_path, markdown_table, write_csv_atomic
from bundle.study_settings import (
    FILTERS,
    SECTION_MARK,
    TABLE1_METRICS,
    TABLE4_HEADERS,
    TABLE4_METRICS,
    TESTED_METRICS,
    _detection_columns,
    _registry,
)

if TYPE_CHECKING:
    from bundle.study import MCStudy

__all__ = ["replace_marked_section", "invocation_command", "write_study_outputs", "study_markdown", "study_html"]

logger = logging.getLogger("mcref.study")

NAN = float("nan")


def replace_marked_section(path: str | os.PathLike, section: str, text: str, title: str = "# Results") -> None:
    """Write ``text`` between ``<!-- mcref-study:begin SECTION -->`` and ``<!-- mcref-study:end
    SECTION -->`` in ``path`` (replacing what was there, or appending the section; the file is
    created with ``title`` when missing). Atomic.

    Args:
        path: markdown file, e.g. ``docs/results.md``.
        section: section name.
        text: markdown to put in the section.
        title: first line of a new file.
    """
    p = Path(path)
    begin = f"<!-- {SECTION_MARK}:begin {section} -->"
    end = f"<!-- {SECTION_MARK}:end {section} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = p.read_text(encoding="utf-8") if p.exists() else f"{title}\n"
    i, j = old.find(begin), old.find(end)
    if i >= 0 and j > i:
        new = old[:i] + block + old[j + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with atomic_path(p, suffix=".md") as tmp:
        Path(tmp).write_text(new, encoding="utf-8")


def invocation_command(argv: Sequence[str] | None = None) -> str:
    """The shell command that started this process (``python -m monai.bundle run ...`` when run
    through MONAI's bundle runner).

    Args:
        argv: argument list; defaults to ``sys.argv``.
    """
    args = list(sys.argv if argv is None else argv)
    if not args:
        return ""
    head = args[0].replace("\\", "/")
    if head.endswith("monai/bundle/__main__.py"):
        return "python -m monai.bundle " + _shell_join(args[1:])
    return "python " + _shell_join(args)


def _shell_join(args: Sequence[str]) -> str:
    """Like ``shlex.join`` but readable for python literals: ``"['a','b']"`` instead of nested quotes."""
    out = []
    for a in args:
        q = shlex.quote(a)
        if q != a and re.fullmatch(r"[\w@%+=:,./#-]+", a) and not a.startswith("#"):
            q = a  # e.g. --settings#seed: '#' inside a word is not a comment
        elif q != a and "'" in a and not any(ch in a for ch in '"$`\\!'):
            q = f'"{a}"'
        out.append(q)
    return " ".join(out)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path, suffix=path.suffix) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# documents of a study
# ----------------------------------------------------------------------------------------------
def write_study_outputs(study: MCStudy) -> None:
    """Write everything of a finished study (``study.result``): per-method CSVs, the summary CSVs,
    the Fig. 6 and FROC PNGs, the results markdown (and the marked section of ``results_doc``), the
    HTML report, then the MLflow runs (a tracking failure is logged into the result, not raised).
    Adds ``files``, ``markdown`` and ``mlflow_runs`` (and ``mlflow_error``) to ``study.result``.

    Args:
        study: the study after its cases ran.
    """
    r = study.result
    s = study.settings
    out = study.output_dir
    summ = out / "summary"
    files: dict[str, str] = {}
    for m in r["methods"]:
        write_csv_atomic(r["rows"][m], out / m / "per_case.csv")
        write_csv_atomic(r["object_rows"][m], out / m / "objects.csv")
        write_csv_atomic([p for p in r["froc_points"] if p["method"] == m], out / m / "froc.csv")
    write_csv_atomic(r["cases"], summ / "cases.csv")
    write_csv_atomic(r["failed"], summ / "failed_cases.csv", columns=["case", "method", "error"])
    write_csv_atomic(r["curve_rows"], summ / "fig6_curves.csv")
    write_csv_atomic(r["froc_points"], summ / "froc.csv")
    write_csv_atomic(
        [{"method": m, **r["metrics"][m]} for m in r["methods"]], summ / "metrics.csv"
    )
    if study.config is not None:
        _write_text(summ / "config.json", json.dumps(study.config, indent=2, default=str))
    pv = []
    for m in r["methods"]:
        for k, p in r["pvalues"][m].items():
            pv.append({"method": m, "reference": r["reference"], "metric": k, "p_value": p})
    write_csv_atomic(pv, summ / "pvalues.csv", columns=["method", "reference", "metric", "p_value"])

    xs = [float(x) if x is not None else float(max([v for v in s.size_thresholds_px if v is not None] or [1]) * 2)
          for x in s.size_thresholds_px]
    xt = ["all" if x is None else str(x) for x in s.size_thresholds_px]
    ext_thr, int_thr = r["density_thresholds"]["exterior_min"], r["density_thresholds"]["interior_max"]
    titles = {
        "a": "Fig. 6a: image-level detection, objects <= x px",
        "b": f"Fig. 6b: ... and exterior density >= {ext_thr:.4g}",
        "c": f"Fig. 6c: ... and interior density <= {int_thr:.4g}",
    }
    for f in FILTERS:
        cv = r["curves"][f]
        p = summ / f"fig6{f}.png"
        plot_curves(
            {m: (xs, cv[m]["y"]) for m in r["methods"]}, p, titles[f], "object size threshold x (pixels)",
            "image-level detection rate", bands={m: (cv[m]["lo"], cv[m]["hi"]) for m in r["methods"]},
            xticklabels=xt,
        )
        files[f"fig6{f}"] = str(p)
    p = summ / "froc.png"
    plot_froc(r["froc_plot"], p, s.froc_fp_rates)
    files["froc"] = str(p)
    r["files"] = files
    md = study.markdown()
    r["markdown"] = md
    _write_text(study.results_md, md)
    html_path = summ / "report.html"
    _write_text(html_path, study.html(html_path))
    files["results_md"] = str(study.results_md)
    files["report_html"] = str(html_path)
    if study.results_doc is not None:
        replace_marked_section(study.results_doc, study.results_section, md)
        files["results_doc"] = str(study.results_doc)
    r["mlflow_runs"] = {}
    if study.log_mlflow:
        try:
            r["mlflow_runs"] = study._log_mlflow()
        except Exception as e:  # tracking problems must not lose the computed study
            logger.exception("MLflow logging failed: %s", e)
            r["mlflow_error"] = f"{type(e).__name__}: {e}"
    logger.info("study written to %s (%s)", out, study.results_md)


def study_markdown(study: MCStudy) -> str:
    """The results as markdown (the tables, the curves as linked PNGs, failures, the command).

    Args:
        study: the study, with ``files`` in its result.
    """
    r = study.result
    s = study.settings
    lab = {n: spec.label for n, spec in _registry().REFINERS.items()}
    lines = [f"## Study results: {study.experiment_name}", ""]
    lines += ["Produced by:", "", "```bash", study._command(), "```", ""]
    lines.append(
        f"{r['n_cases']} images ({r['n_with_mcs']} with MCs, {r['n_cases'] - r['n_with_mcs']} without), "
        f"{r['n_objects']} truth MC objects, {r['n_truth_clusters']} truth clusters; "
        f"run on {time.strftime('%Y-%m-%d %H:%M')} in {r.get('seconds', 0):.0f} s. {study.dataset_note}".rstrip()
    )
    lines.append("")
    lines.append(
        f"Operating threshold {s.threshold:g}"
        + (f" (per method: {s.method_thresholds})" if s.method_thresholds else "")
        + f"; {100 * s.confidence:g} % bootstrap CIs over images ({s.bootstrap_resamples} resamples, seed {s.seed}); "
        "p-values: two-sided paired Wilcoxon signed-rank tests over images."
    )
    lines.append("")
    if r["skipped"]:
        lines.append("Skipped methods:")
        lines += [f"- `{m}`: {why}" for m, why in r["skipped"].items()]
        lines.append("")
    ref = r["reference"]
    lines.append(
        "### Table 1: pixel-level metrics (percent, mean over images [95 % CI])"
        + (f", p vs {lab.get(ref, ref)}" if ref else " (reference method not run: no p-values)")
    )
    lines.append("")
    cols = ["method", "n"]
    heads = ["method", "n"]
    for k in TABLE1_METRICS:
        cols.append(k)
        heads.append({"sensitivity": "Sensitivity", "ppv": "PPV", "dice": "Dice", "activation_rate": "Activation rate",
                      "true_activation_rate": "True activation rate"}[k])
        if k in TESTED_METRICS:
            cols.append(f"p_{k}")
            heads.append("p")
    lines.append(markdown_table(r["table1"], cols, headers=heads) if r["table1"] else "(no method ran)\n")
    lines.append("### Table 2: with vs without the SegAI mask")
    lines.append("")
    if len(r["table2_methods"]) == 2:
        lines.append(f"p-values: {lab.get(r['table2_methods'][1])} vs {lab.get(r['table2_methods'][0])}.")
        lines.append("")
        lines.append(markdown_table(r["table2"], cols, headers=heads))
    else:
        lines.append(f"Not available: needs both {study.table2_methods} (ran: {r['table2_methods']}).\n")
    ext_thr, int_thr = r["density_thresholds"]["exterior_min"], r["density_thresholds"]["interior_max"]
    lines.append("### Table 3: image-level (patient) detection rate by object size and density (percent [95 % CI])")
    lines.append("")
    lines.append(
        "An image with MCs counts as detected when a predicted-positive pixel falls in at least one of its "
        "included objects; images without included objects are left out of that cell (n_images). "
        + (f"p: paired Wilcoxon test of the per-image 0/1 detections vs {lab.get(ref, ref)}. " if ref else "")
        + 
        f"Density thresholds on the raw scale: exterior >= {ext_thr:.5g} ({_spec_text(s.exterior_density_min)}), "
        f"interior <= {int_thr:.5g} ({_spec_text(s.interior_density_max)}); ring width {s.ring_px} px."
    )
    lines.append("")
    mcols = [lab.get(m, m) for m in r["methods"]]
    for f, desc in FILTERS.items():
        lines.append(f"({f}) {desc}")
        lines.append("")
        rows3 = list(r["table3"][f]) + ([r["specificity_row"]] if f == "a" else [])
        lines.append(markdown_table(rows3, ["objects", "n_images"] + mcols) if r["methods"] else "(no method ran)\n")
    links = [f"[fig6{f}]({_rel(r['files'][f'fig6{f}'], study.results_md)})" for f in FILTERS]
    lines.append("Curves (Fig. 6): " + ", ".join(links))
    lines.append("")
    lines.append("### Table 4: class-balanced pixel metrics (MC-GenRef's columns; percent, mean over images [95 % CI])")
    lines.append("")
    lines.append(
        "Recall = sensitivity, FNR = 1 - recall, specificity counted inside the breast, "
        "Bal. Acc. = (recall + specificity) / 2, G-Mean = sqrt(recall x specificity); recall-based "
        "columns average over images with MCs. p: paired Wilcoxon test against the method named in `vs`."
    )
    lines.append("")
    cols4, heads4 = ["method", "n"], ["method", "n"]
    for k in TABLE4_METRICS:
        cols4 += [k, f"p_{k}"]
        heads4 += [TABLE4_HEADERS[k], "p"]
    cols4.append("vs")
    heads4.append("vs")
    lines.append(markdown_table(r["table4"], cols4, headers=heads4) if r.get("table4") else "(no method ran)\n")
    lines.append("")
    lines.append(
        f"### Cluster FROC (clusters: >= {s.cluster_min_count} MCs, single linkage {s.cluster_link_mm:g} mm; "
        f"a truth cluster is detected when one predicted cluster hits >= {s.cluster_min_hit_mcs} of its MCs)"
    )
    lines.append("")
    lines.append(
        "FROC score = mean cluster sensitivity at "
        + ", ".join(f"{f:g}" for f in s.froc_fp_rates)
        + " false-positive clusters per image (best sensitivity at or below each rate). "
        f"[FROC plot]({_rel(r['files']['froc'], study.results_md)})"
    )
    lines.append("")
    fcols = ["method", "froc_score"] + [f"sens@{f:g}" for f in s.froc_fp_rates] + ["op_sensitivity", "op_fp_per_image"]
    lines.append(markdown_table(r["froc_rows"], fcols) if r["froc_rows"] else "(no method ran)\n")
    lines.append("### Detection metrics (reader view, at the operating threshold)")
    lines.append("")
    lines.append(
        "False marks: predicted components touching no truth MC (in the breast), per image and per image "
        "without MCs (n_normal images); FP clusters: predicted clusters hitting no truth MC; cluster "
        "sensitivity: detected / all truth clusters; object IoU: IoU of each truth MC with the predicted "
        "components overlapping it, mean over all truth MCs (missed = 0) and over the detected ones; object "
        f"TPR: truth MCs of >= {s.tpr_min_diameter_mm:g} mm detected; TPR at r FP/cm^2: the object TPR of the "
        "threshold sweep against false marks per cm^2 of breast, interpolated linearly (HDoGReg's operating "
        "points). See docs/metrics.md."
    )
    lines.append("")
    dcols = ["method", "n_normal"] + _detection_columns(s)
    lines.append(markdown_table(r.get("detection_rows", []), dcols) if r.get("detection_rows") else "(no method ran)\n")
    lines.append("### Failed cases")
    lines.append("")
    if r["failed"]:
        lines.append(markdown_table(r["failed"], ["case", "method", "error"]))
    else:
        lines.append("None.\n")
    runs = r.get("mlflow_runs") or {}
    if runs:
        lines.append(f"MLflow experiment `{study.experiment_name}`: " + ", ".join(f"{k}=`{v}`" for k, v in runs.items()))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def study_html(study: MCStudy, html_path: Path) -> str:
    """A self-contained HTML report: tables, embedded curve PNGs, links to the per-case panels.

    Args:
        study: the study, with ``files`` in its result.
        html_path: where the report will be written (panel links are relative to it).
    """
    r = study.result
    s = study.settings
    lab = {n: spec.label for n, spec in _registry().REFINERS.items()}
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>mcref study {esc(study.experiment_name)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;"
        "margin:0.5em 0 1.5em}td,th{border:1px solid #bbb;padding:3px 7px;font-size:13px;text-align:right}"
        "th{background:#eee}td:first-child{text-align:left}img.curve{width:560px;margin:4px}"
        "code{background:#f4f4f4;padding:2px 4px}</style></head><body>",
        f"<h1>mcref study: {esc(study.experiment_name)}</h1>",
        f"<p>Command: <code>{esc(study._command())}</code></p>",
        f"<p>{r['n_cases']} images ({r['n_with_mcs']} with MCs), {r['n_objects']} truth objects, "
        f"{r['n_truth_clusters']} truth clusters. {esc(study.dataset_note)}</p>",
    ]
    if r["skipped"]:
        parts.append("<p>Skipped methods:</p><ul>" + "".join(
            f"<li><code>{esc(m)}</code>: {esc(why)}</li>" for m, why in r["skipped"].items()) + "</ul>")
    cols = ["method", "n"]
    for k in TABLE1_METRICS:
        cols.append(k)
        if k in TESTED_METRICS:
            cols.append(f"p_{k}")
    ref = r["reference"]
    parts.append(f"<h2>Table 1: pixel-level metrics (percent [95 % CI]); p vs {esc(lab.get(ref, str(ref)))}</h2>")
    parts.append(_html_table(r["table1"], cols))
    parts.append("<h2>Table 2: with vs without the SegAI mask</h2>")
    parts.append(_html_table(r["table2"], cols) if r["table2"] else "<p>not available</p>")
    cols4 = ["method", "n"] + [c for k in TABLE4_METRICS for c in (k, f"p_{k}")] + ["vs"]
    parts.append("<h2>Table 4: class-balanced pixel metrics (percent [95 % CI])</h2>")
    parts.append(_html_table(r.get("table4", []), cols4))
    mcols = [lab.get(m, m) for m in r["methods"]]
    parts.append("<h2>Table 3: image-level detection by object size and density (percent [95 % CI])</h2>")
    for f, desc in FILTERS.items():
        rows3 = list(r["table3"][f]) + ([r["specificity_row"]] if f == "a" else [])
        parts.append(f"<h3>({f}) {esc(desc)}</h3>" + _html_table(rows3, ["objects", "n_images"] + mcols))
    parts.append("<h2>Figure 6 curves and cluster FROC</h2><div>")
    for key in ("fig6a", "fig6b", "fig6c", "froc"):
        parts.append(f"<img class='curve' alt='{key}' src='{_png_data_uri(r['files'][key])}'>")
    parts.append("</div>")
    fcols = ["method", "froc_score"] + [f"sens@{f:g}" for f in s.froc_fp_rates] + ["op_sensitivity", "op_fp_per_image"]
    parts.append("<h3>FROC summary</h3>" + _html_table(r["froc_rows"], fcols))
    parts.append("<h3>Detection metrics (reader view, at the operating threshold)</h3>"
                 + _html_table(r.get("detection_rows", []), ["method", "n_normal"] + _detection_columns(s)))
    parts.append("<h2>Per-case panels</h2>")
    case_names = [c["case"] for c in r["cases"]]
    prow = []
    for name in case_names:
        row = {"case": name}
        for m in r["methods"]:
            pth = r["panels"].get(m, {}).get(name)
            row[lab.get(m, m)] = f"<a href='{esc(_rel(pth, html_path))}'>panel</a>" if pth else ""
        prow.append(row)
    parts.append(_html_table(prow, ["case"] + mcols, raw=True))
    parts.append("<h2>Failed cases</h2>")
    parts.append(_html_table(r["failed"], ["case", "method", "error"]) if r["failed"] else "<p>None.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], raw: bool = False) -> str:
    """HTML table of ``rows`` (values escaped unless ``raw``; floats with 4 significant digits)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = "n/a" if math.isnan(v) else f"{v:.4g}"
        text = "" if v is None else str(v)
        return text if raw else html.escape(text)

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _spec_text(spec: Mapping[str, Any] | float | None) -> str:
    if spec is None:
        return "off"
    if isinstance(spec, (int, float)):
        return "raw value"
    if spec.get("raw") is not None:
        return "raw value"
    return f"{float(spec.get('percentile', NAN)):g}th percentile of all truth objects"


def _rel(path: str | os.PathLike, start_file: str | os.PathLike) -> str:
    try:
        return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(start_file))).replace(os.sep, "/")
    except ValueError:
        return str(path)
