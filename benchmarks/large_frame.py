#!/usr/bin/env python
"""Peak memory and time of `predict` and `evaluate` on one large frame (default 12000x8000, 96 MP).

    benchmarks/large_frame.py [--width 12000] [--height 8000] [--device cpu] [--label TEXT] [--json FILE]
        [--results [DIR]] [--workdir DIR]

A small run is trained on generated 160x120 frames (vit_small_patch14_dinov2 at 112 px, random weights: memory
does not depend on them); the large frame is a generated scene scaled up (JPEG quality 90) with its label map,
in a dataset of its own (the frame in val, a copy in trn) extracted to a store. Each figure is one fresh
`cachedseg` process, measured from outside (resource.getrusage(RUSAGE_CHILDREN) of a wrapper that runs only it):
  predict_peak_mb, predict_s      `predict FRAME` (label, colour and overlay PNGs)
  evaluate_peak_mb, evaluate_s    `evaluate RUN --store STORE` (scored at the labels' native resolution)
  floor_peak_mb                   `predict` of a 160x120 frame: the interpreter, torch and the model alone
Results: printed, --json, and with --results a Markdown row appended to benchmarks/results/large_frame.md.
`--label` names the code measured (default: the git commit of the cachedseg imported), so that a row measured
on an older checkout (PYTHONPATH=that/checkout) sits next to the current one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

import cachedseg
from cachedseg.runs import RunFolder
from cachedseg.synth import synthesize
from results_md import append, machine

RESULTS = Path(__file__).parent / "results"
SMALL = ["--backbone", "vit_small_patch14_dinov2", "--image-size", "112", "--weights", "random"]
# Runs one command and prints its peak RSS (kB on Linux) and seconds: RUSAGE_CHILDREN of this wrapper is that
# command's alone, where the benchmark's own would hold the largest of all it ever ran.
WRAPPER = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); "
           "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, "
           "'peak_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def parse() -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=12000)
    p.add_argument("--height", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--label", default=None, help="names the code measured [default: its git commit]")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--workdir", type=Path, default=None, help="keep data, run and outputs here [default: a temp folder]")
    p.add_argument("--results", type=Path, nargs="?", const=RESULTS, default=None,
                   help=f"append a Markdown row to large_frame.md in this folder [bare --results: {RESULTS}]")
    return p.parse_args()


def cli(*args) -> list[str]:
    """The command line of `cachedseg ARGS` in this interpreter."""
    return [sys.executable, "-m", "cachedseg", *map(str, args)]


def measured(command: list[str]) -> dict:
    """Peak RSS (MB) and seconds of `command`, run in a fresh wrapper process; its output is shown on failure."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout}{proc.stderr}")
    return {"peak_mb": result["peak_kb"] / 1024, "seconds": result["seconds"]}


def large_dataset(root: Path, width: int, height: int) -> Path:
    """A dataset of one generated scene scaled up to width x height (val) and a copy of it (trn)."""
    small = root / "scene"
    synthesize(small, count=2, width=max(64, width // 10), height=max(64, height // 10), seed=1)
    image = next((small / "JPEGImages").glob("*.jpg"))
    mask = small / "SegmentationClass" / f"{image.stem}.png"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    frame = Image.open(image).resize((width, height), Image.Resampling.BILINEAR)
    labels = Image.open(mask).resize((width, height), Image.Resampling.NEAREST)
    for id_ in ("large-trn", "large-val"):
        frame.save(root / "JPEGImages" / f"{id_}.jpg", quality=90)
        labels.save(root / "SegmentationClass" / f"{id_}.png")
    (root / "ImageSets" / "trn.txt").write_text("large-trn\n")
    (root / "ImageSets" / "val.txt").write_text("large-val\n")
    shutil.rmtree(small)
    return root


def commit() -> str:
    """The git commit (short, + if modified) of the cachedseg source imported, or 'unknown'."""
    src = Path(cachedseg.__file__).parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    args = parse()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cachedseg-large-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = ["--device", args.device]
    small, run = work / "small", work / "run"
    if not RunFolder(run).best.exists():
        synthesize(small, count=8, width=160, height=120, seed=0)
        subprocess.run(cli("extract", small, "--store", work / "small.zarr", *SMALL, "--workers", "0", *device),
                       check=True, capture_output=True)
        subprocess.run(cli("train", work / "small.zarr", "--run", run, "--epochs", "1", "--workers", "0", *device),
                       check=True, capture_output=True)
    data = work / f"large-{args.width}x{args.height}"
    if not data.exists():
        large_dataset(data, args.width, args.height)
    store = work / f"large-{args.width}x{args.height}.zarr"
    if not store.exists():
        subprocess.run(cli("extract", data, "--store", store, *SMALL, "--workers", "0", *device), check=True,
                       capture_output=True)
    out = work / "predictions"
    shutil.rmtree(out, ignore_errors=True)
    floor = measured(cli("predict", next((small / "JPEGImages").glob("*.jpg")), "--run", run, "--out", out / "small",
                         "--workers", "0", *device))
    pred = measured(cli("predict", data / "JPEGImages" / "large-val.jpg", "--run", run, "--out", out, "--workers", "0",
                        *device))
    score = measured(cli("evaluate", run, "--store", store, "--workers", "0", *device))
    result = {"label": args.label or commit(), "frame": f"{args.width}x{args.height}", "device": machine(torch.device(args.device)),
        "date": dt.date.today().isoformat(),
        "predict_peak_mb": pred["peak_mb"], "predict_s": pred["seconds"], "evaluate_peak_mb": score["peak_mb"],
        "evaluate_s": score["seconds"], "floor_peak_mb": floor["peak_mb"],
        "image_mb": args.width * args.height * 3 / 2**20}
    for key, value in result.items():
        print(f"{key:>18}: {value:.1f}" if isinstance(value, float) else f"{key:>18}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.results:
        append(args.results / "large_frame.md",
               "# Large frames\n\nAppended by `benchmarks/large_frame.py`: peak RSS and seconds of one `cachedseg` "
               "process on one frame (vit_small_patch14_dinov2 @ 112, random weights); floor: `predict` of a "
               "160x120 frame. On a shared machine the seconds of one code vary 2-3x between runs (other jobs on "
               "its cores); the peaks do not.\n\n| date | code | device | frame | image MB (RGB) | predict peak MB | predict s | "
               "evaluate peak MB | evaluate s | floor peak MB |\n|---|---|---|---|---|---|---|---|---|---|",
               [f"| {result['date']} | {result['label']} | {result['device']} | {result['frame']} | "
                f"{result['image_mb']:.0f} | {result['predict_peak_mb']:.0f} | {result['predict_s']:.1f} | "
                f"{result['evaluate_peak_mb']:.0f} | {result['evaluate_s']:.1f} | {result['floor_peak_mb']:.0f} |"])
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
