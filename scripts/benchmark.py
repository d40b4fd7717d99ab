#!/usr/bin/env python
"""Benchmark whole-mammogram inference: seconds per image, megapixels per second, peak RSS.

Each method runs in its own subprocess so that peak RSS belongs to that method alone.
The input is a seeded 3328 x 4084 (columns x rows) phantom at 0.07 mm written as a DICOM.

usage:
    python scripts/benchmark.py                       # anchor, SegAI alone, the two-stage default
    python scripts/benchmark.py --methods anchor segai genai grid
    python scripts/benchmark.py --rows 2048 --cols 1664 --repeats 2
    python scripts/benchmark.py --methods genai --profile 40   # + where one call spends its time

Methods name config variants: ``anchor`` (MONAI's ``SlidingWindowInferer``, roi 512, overlap
0.125, with SegAI's network over the whole preprocessed image: the network pass alone, a
reference for noisy machines; it also prints the network's GFLOP per image counted by
``torch.utils.flop_counter``, the achieved GFLOP/s and their share of the machine's fp32 peak,
estimated as the best of five 3072 x 3072 ``torch.mm`` products), ``segai`` (configs/inference.json with the refiner off), ``segai_cl`` / ``segai_bf16`` (the same
in channels-last layout / under bfloat16 autocast), ``segai_ov`` (SegAI's ONNX export run by
OpenVINO, ``segai_backend`` "openvino"),
``genai`` (SegAI+R:GenAI, the default two-stage pipeline), ``genai_ov`` (the same with SegAI
through OpenVINO), ``genai_tiles`` (the same with
the 128 px tile grid instead of hole-centred crops), ``genai_seg0.1`` (the same at the
stricter SegAI operating point 0.1), ``grid`` (grid-mask generative
baseline with the same inpainter, no SegAI mask), ``mcgenref_init`` (MC-GenRef's
synthetic-only initializer alone) and ``ttgpr`` (initializer + TT-GPR). Every run is also
printed as a multiple of ``anchor`` and of ``segai``, ``ttgpr`` as a multiple of
``mcgenref_init`` and ``genai_ov`` as a multiple of ``segai_ov``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# method -> (config files, overrides)
METHODS: dict[str, tuple[list[str], dict]] = {
    # anchor: MONAI's SlidingWindowInferer (roi 512, overlap 0.125) with SegAI's network over the
    # whole preprocessed image (network pass only), so figures from noisy machines stay comparable
    "anchor": (["configs/inference.json"], {"refine": False}),
    "segai": (["configs/inference.json"], {"refine": False}),
    # issue 15 levers on SegAI alone: channels-last layout, bfloat16 autocast
    "segai_cl": (["configs/inference.json"], {"refine": False, "inferer#channels_last": True}),
    "segai_bf16": (["configs/inference.json"], {"refine": False, "inferer#autocast_dtype": "bfloat16"}),
    # SegAI's network through OpenVINO (models/model.onnx; pip install -e .[openvino])
    "segai_ov": (["configs/inference.json"], {"refine": False, "segai_backend": "openvino"}),
    "genai": (["configs/inference.json"], {}),
    "genai_ov": (["configs/inference.json"], {"segai_backend": "openvino"}),
    # the same pipeline with the fixed 128 px tile grid instead of hole-centred crops
    "genai_tiles": (["configs/inference.json"], {"genai_kwargs#mode": "tiles", "genai_kwargs#batch_size": 8}),
    # the earlier, stricter SegAI operating point (fewer holes, lower sensitivity)
    "genai_seg0.1": (["configs/inference.json"], {"threshold": 0.1, "refined_threshold": 0.8}),
    "grid": (["configs/inference.json"], {"refiner_name": "grid_genai"}),
    "mcgenref_init": (["configs/inference.json", "configs/inference_mcgenref.json"], {"refine": False}),
    "ttgpr": (["configs/inference.json", "configs/inference_mcgenref.json"], {}),
}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _one(method: str, image: str, repeats: int, threads: int, profile: int = 0) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from monai.bundle import ConfigParser

    files, overrides = METHODS[method]
    parser = ConfigParser()
    with contextlib.chdir(ROOT):  # ``%configs/...`` imports are relative to the working directory
        parser.read_config([str(ROOT / f) for f in files])
        parser["bundle_root"] = str(ROOT)
        parser["output_dir"] = tempfile.mkdtemp(prefix="mcref_bench_")
        for k, v in overrides.items():
            parser[k] = v
        parser.resolve_macro_and_relative_ids()
    times = []
    extra: dict = {}
    if method == "anchor":
        from monai.inferers import SlidingWindowInferer

        net = parser.get_parsed_content("network")
        x = parser.get_parsed_content("preprocessing")({"image": image})["image"][None]
        swi = SlidingWindowInferer(roi_size=512, overlap=0.125, sw_batch_size=2, mode="constant")
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad():
            with FlopCounterMode(display=False) as fc:
                swi(x, net)
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.sigmoid(swi(x, net))
                times.append(time.perf_counter() - t0)
            a = torch.rand(3072, 3072)
            torch.mm(a, a)
            mm = min(_timed(lambda: torch.mm(a, a)) for _ in range(5))
        extra = {"network_gflop": round(fc.get_total_flops() / 1e9, 1),
                 "network_gflops_per_s": round(fc.get_total_flops() / 1e9 / min(times), 1),
                 "matmul_gflops_per_s": round(2 * 3072**3 / mm / 1e9, 1)}
        extra["fraction_of_matmul_peak"] = round(extra["network_gflops_per_s"] / extra["matmul_gflops_per_s"], 3)
        h, w = x.shape[-2:]
    else:
        runner = parser.get_parsed_content("runner")
        runner.progress = False
        for _ in range(repeats):
            t0 = time.perf_counter()
            d = runner.predict(image)
            times.append(time.perf_counter() - t0)
        h, w = d["image"].shape[-2:]
        if profile:
            _profile(lambda: runner.predict(image), profile)
    best = min(times)
    return {
        "method": method,
        "rows": int(h),
        "cols": int(w),
        "seconds_per_image": round(best, 2),
        "seconds_all": [round(t, 2) for t in times],
        "megapixels_per_second": round(h * w / 1e6 / best, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        "threads": threads,
        **extra,
    }


def _profile(fn, top: int) -> None:
    """One more call of ``fn`` under cProfile; the ``top`` entries by cumulative time go to stderr.

    The figures are the profiler's (slower than the timed runs): read the shares, not the seconds.
    """
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    print(buf.getvalue(), file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["anchor", "segai", "genai"], choices=sorted(METHODS))
    ap.add_argument("--rows", type=int, default=4084)
    ap.add_argument("--cols", type=int, default=3328)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=str, default="", help="also write the figures to this JSON file")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed runs, profile one more call of each method (cProfile) and print its N "
                         "most expensive calls by cumulative time (not for the anchor)")
    ap.add_argument("--_one", nargs=2, metavar=("METHOD", "IMAGE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps(_one(args._one[0], args._one[1], args.repeats, args.threads, args.profile)))
        return 0

    sys.path.insert(0, str(ROOT))
    from bundle.phantom import make_phantom, write_mg_dicom

    tmp = Path(tempfile.mkdtemp(prefix="mcref_bench_in_"))
    t0 = time.perf_counter()
    ph = make_phantom(shape=(args.rows, args.cols), spacing=0.07, view="MLO", laterality="L", seed=args.seed)
    image = tmp / "bench.dcm"
    write_mg_dicom(image, ph["image"], spacing=0.07, laterality="L", view="MLO", seed=args.seed)
    print(f"phantom {args.rows} x {args.cols} made in {time.perf_counter() - t0:.1f} s", flush=True)
    results = []
    for m in args.methods:
        cmd = [sys.executable, __file__, "--_one", m, str(image), "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--profile", str(args.profile)]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if args.profile and p.returncode == 0 and m != "anchor":
            print(f"--- profile of {m} ---\n" + p.stderr[p.stderr.find("   Ordered by"):], flush=True)
        if p.returncode != 0:
            print(f"{m}: FAILED\n{p.stderr[-2000:]}")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{m:>13}: {r['seconds_per_image']:7.2f} s/image  {r['megapixels_per_second']:6.3f} Mpx/s  peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        if "network_gflops_per_s" in r:
            print(f"{'':>13}  SegAI network: {r['network_gflop']} GFLOP per image, {r['network_gflops_per_s']} GFLOP/s = "
                  f"{100 * r['fraction_of_matmul_peak']:.0f} % of this machine's fp32 peak (estimated as the best "
                  f"of 5 torch.mm 3072^2 products: {r['matmul_gflops_per_s']} GFLOP/s)", flush=True)
    by = {r["method"]: r for r in results}
    for r in results:
        for ref, label in (("anchor", "the SlidingWindowInferer anchor"), ("segai", "SegAI alone"),
                           ("segai_ov", "SegAI alone through OpenVINO"),
                           ("mcgenref_init", "the MC-GenRef initializer alone")):
            own = {"mcgenref_init": "ttgpr", "segai_ov": "genai_ov"}.get(ref)
            if ref in by and r["method"] not in (ref, "anchor") and (ref in ("segai", "anchor") or r["method"] == own):
                r[f"x_{ref}"] = round(r["seconds_per_image"] / by[ref]["seconds_per_image"], 2)
                print(f"{r['method']:>13}: {r[f'x_{ref}']:.2f} x {label}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if len(results) == len(args.methods) else 1


if __name__ == "__main__":
    sys.exit(main())
