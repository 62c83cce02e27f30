#!/usr/bin/env python
"""Accuracy of each recipe the cache carries, on one generated train/val split with one backbone.

    benchmarks/quality.py [--images N] [--backbone NAME] [--short-side PX] [--epochs E] [--seeds 0,1]
        [--weights random|auto|FILE] [--device cpu|cuda] [--quick] [--json FILE] [--results [DIR]]

Recipes (each trained with every seed, scored on val at the labels' native resolution, dataset-level mIoU):
  seed            the seed design's decoder (center crop), square input
  upconv          the same blocks, aligned (no crop), square input
  linear          BN + 1x1 conv on the last layer, square input
  linear4         BN + 1x1 conv on the last 4 layers, square input
  conv            3x3 convs on the token grid, square input
  upconv-aspect   upconv on aspect-kept input (--short-side)
  conv-aspect     conv on aspect-kept input
  conv-aspect-flip          ... trained on the cached flipped view too
  conv-aspect-flip-tta      ... and evaluated with --tta (identity and flipped, averaged)
  conv4-aspect-flip-tta     ... reading the last 4 layers
It also reports what caching a view and more layers costs: extract seconds per image and MB per image.

With random backbone weights (the default, and all a machine without the Hugging Face hub can have) the numbers
show that the mechanics work and the effect of alignment and resolution, not DINOv2's accuracy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cachedseg.backbone import BackboneConfig, patch_size, resolve_device, size_for_short_side
from cachedseg.dataset import AEROSCAPES
from cachedseg.evaluate import evaluate
from cachedseg.extract import extract
from cachedseg.features import cached_source
from cachedseg.synth import synthesize
from cachedseg.train import TrainConfig, train
from results_md import append, machine

RESULTS = Path(__file__).parent / "results"
# name: (store, decoder, head layers, tta); stores are keyed (input shape, layers, views)
RECIPES = {
    "seed": (("square", 1, ()), "seed", 1, False),
    "upconv": (("square", 1, ()), "upconv", 1, False),
    "linear": (("square", 1, ()), "linear", 1, False),
    "linear4": (("square", 4, ()), "linear", 4, False),
    "conv": (("square", 1, ()), "conv", 1, False),
    "upconv-aspect": (("aspect", 1, ()), "upconv", 1, False),
    "conv-aspect": (("aspect", 1, ()), "conv", 1, False),
    "conv-aspect-flip": (("aspect", 4, ("flip",)), "conv", 1, False),
    "conv-aspect-flip-tta": (("aspect", 4, ("flip",)), "conv", 1, True),
    "conv4-aspect-flip-tta": (("aspect", 4, ("flip",)), "conv", 4, True),
}


def parse() -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--short-side", type=int, default=224, help="square side, and short side of aspect-kept input")
    p.add_argument("--frame", default="640x360", help="generated frame WIDTHxHEIGHT")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset")
    p.add_argument("--weights", default="random")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="8 tiny images, 2 epochs, one seed: a smoke run")
    p.add_argument("--costs-only", action="store_true", help="extract the stores and report their costs; no training")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results", type=Path, nargs="?", const=RESULTS, default=None,
                   help=f"append a Markdown section to quality.md in this folder [bare: {RESULTS}]")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.images, args.short_side, args.frame, args.epochs, args.seeds = 8, 56, "160x120", 2, "0"
    return args


def main() -> None:
    args = parse()
    device = resolve_device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cachedseg-quality-"))
    width, height = (int(v) for v in args.frame.split("x"))
    data = work / "data"
    if not (data / "ImageSets" / "val.txt").is_file():
        synthesize(data, count=args.images, width=width, height=height, seed=0)
    names = args.recipes.split(",")
    sizes = {"square": (args.short_side, args.short_side),
             "aspect": size_for_short_side(args.short_side, width, height, patch_size(args.backbone))}
    stores, costs = {}, {}
    for key in sorted({RECIPES[n][0] for n in names}):
        shape, layers, views = key
        path = work / f"{shape}-l{layers}-{'-'.join(views) or 'identity'}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        result = extract(data, path, BackboneConfig(args.backbone, sizes[shape], layers=layers), weights=args.weights,
                         dtype="float16", device=str(device), views=("identity", *views))
        stores[key] = path
        costs["/".join(map(str, (f"{sizes[shape][1]}x{sizes[shape][0]}", f"{layers} layers",
                                 "+".join(("identity", *views)))))] = {
            "extract_s_per_image": (time.perf_counter() - start) / result.images, "mb_per_image": result.mb_per_image}
        print(f"extracted {path.name}: {result.mb_per_image:.3f} MB/img")
    rows = {}
    for name in ([] if args.costs_only else names):
        key, decoder, layers, tta = RECIPES[name]
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            run = work / "runs" / f"{name}-{seed}"
            shutil.rmtree(run, ignore_errors=True)
            config = TrainConfig(epochs=args.epochs, lr=args.lr, decoder=decoder, layers=layers, seed=seed)
            train(cached_source(stores[key]), run, config, device)
            runs.append(evaluate(run, store=stores[key], tta=tta, device=str(device)))
        rows[name] = {
            "miou": [r.miou for r in runs], "pixel_acc": [r.pixel_acc for r in runs],
            "iou": {c: statistics.mean(r.iou[i] or 0.0 for r in runs) for i, c in enumerate(AEROSCAPES.names)},
            "input": "{1}x{0}".format(*sizes[key[0]]), "decoder": decoder, "layers": layers,
            "views": "+".join(("identity", *key[2])), "tta": tta}
        print(f"{name:>24}: mIoU {' '.join(f'{v:.4f}' for v in rows[name]['miou'])}, "
              f"pixel acc {' '.join(f'{v:.4f}' for v in rows[name]['pixel_acc'])}")
    result = {"date": dt.date.today().isoformat(), "torch": torch.__version__,
              "device": machine(device),
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "results", "workdir")},
              "recipes": rows, "costs": costs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.results:
        append_markdown(result, args.results / "quality.md")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def append_markdown(r: dict, path: Path) -> None:
    """A section per run: the recipe table, per-class IoU, and what views and layers cost."""
    s = r["settings"]
    lines = [f"\n## {r['date']}: {s['backbone']}, {s['weights']} weights, {s['images']} generated {s['frame']} "
             f"frames, {s['epochs']} epochs, lr {s['lr']}, seeds {s['seeds']}, {r['device']}\n",
             "| recipe | input | decoder | layers | views | tta | val mIoU (per seed) | mean | pixel acc (mean) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in r["recipes"].items():
        lines.append(f"| {name} | {row['input']} | {row['decoder']} | {row['layers']} | {row['views']} | "
                     f"{'yes' if row['tta'] else 'no'} | {' / '.join(f'{v:.4f}' for v in row['miou'])} | "
                     f"{statistics.mean(row['miou']):.4f} | {statistics.mean(row['pixel_acc']):.4f} |")
    lines += ["", "Per-class IoU (mean over seeds):", "",
              "| recipe | " + " | ".join(AEROSCAPES.names) + " |", "|---" * (len(AEROSCAPES) + 1) + "|"]
    for name, row in r["recipes"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row['iou'][c]:.3f}" for c in AEROSCAPES.names) + " |")
    lines += ["", "| store | extract s/img | MB/img |", "|---|---|---|"]
    for name, cost in r["costs"].items():
        lines.append(f"| {name} | {cost['extract_s_per_image']:.3f} | {cost['mb_per_image']:.3f} |")
    if not r["recipes"]:
        lines = [lines[0], *lines[-len(r["costs"]) - 2:]]
    append(path, "# Recipe quality\n\nAppended by `benchmarks/quality.py`. Random-weight backbones on generated scenes "
                 "show the mechanics and the effect of alignment and resolution, not DINOv2's accuracy.", lines)


if __name__ == "__main__":
    main()
