#!/usr/bin/env python
"""What `train --class-weights auto` and `--loss dice-ce` do for the rare classes, on generated scenes.

    benchmarks/imbalance.py [--images N] [--frame WxH] [--short-side PX] [--epochs E] [--seeds 0,1]
        [--decoder conv] [--weights random|auto|FILE] [--device cpu|cuda] [--quick] [--json FILE] [--results [DIR]]

One generated dataset (`cachedseg.synth.synthesize`) is extracted once; then, for each seed, four heads train in one
pass over the cache (the same batches, the same initialisation): cross-entropy, cross-entropy with the `auto` class
weights, Dice + cross-entropy, and Dice + cross-entropy with the weights. Each head's last checkpoint is scored on
val at the labels' native resolution: per-class IoU (the rare classes person, bike, drone and animal singled out),
mIoU and pixel accuracy. The trn pixel shares and the weights `auto` gave are reported too.

Offline, `--weights random` (the default) is the only backbone there is: a random-initialised ViT-S/14 whose features
carry colour and texture but no learned semantics, so the numbers show what the loss changes, not DINOv2's accuracy.
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
from cachedseg.evaluate import evaluate
from cachedseg.extract import extract
from cachedseg.features import cached_source
from cachedseg.recipe import auto_class_weights
from cachedseg.synth import synthesize
from cachedseg.train import TrainConfig, train_heads
from results_md import append, machine

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"ce": ("ce", None), "ce + auto weights": ("ce", "auto"), "dice-ce": ("dice-ce", None),
            "dice-ce + auto weights": ("dice-ce", "auto")}
RARE = ("person", "bike", "drone", "animal")


def parse() -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--frame", default="640x360", help="generated frame WIDTHxHEIGHT")
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--short-side", type=int, default=224)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--decoder", default="conv")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--weights", default="random")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="8 tiny images, 2 epochs, one seed: a smoke run")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results", type=Path, nargs="?", const=RESULTS, default=None,
                   help=f"append a Markdown section to imbalance.md in this folder [bare: {RESULTS}]")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.images, args.short_side, args.frame, args.epochs, args.seeds = 8, 56, "160x120", 2, "0"
    return args


def main() -> None:
    args = parse()
    device = resolve_device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cachedseg-imbalance-"))
    width, height = (int(v) for v in args.frame.split("x"))
    data, store = work / "data", work / "store.zarr"
    if not (data / "ImageSets" / "val.txt").is_file():
        synthesize(data, count=args.images, width=width, height=height, seed=0)
    shutil.rmtree(store, ignore_errors=True)
    size = size_for_short_side(args.short_side, width, height, patch_size(args.backbone))
    start = time.perf_counter()
    extract(data, store, BackboneConfig(args.backbone, size), weights=args.weights, dtype="float16",
            device=str(device))
    extract_s = time.perf_counter() - start
    source = cached_source(store)
    names = source.spec.class_names
    pixels = source.class_pixels("trn").tolist()
    weights = auto_class_weights(pixels)
    print("auto weights: " + ", ".join(f"{n} {w:g}" for n, w in zip(names, weights)))
    scores: dict[str, list] = {name: [] for name in VARIANTS}
    train_s = []
    for seed in (int(s) for s in args.seeds.split(",")):
        plans = []
        for name, (loss, class_weights) in VARIANTS.items():
            run = work / "runs" / f"{name.replace(' + ', '+').replace(' ', '-')}-s{seed}"
            shutil.rmtree(run, ignore_errors=True)
            plans.append((run, TrainConfig(epochs=args.epochs, lr=args.lr, decoder=args.decoder, seed=seed,
                                           data_seed=seed, loss=loss, class_weights=class_weights)))
        start = time.perf_counter()
        train_heads(source, plans, str(device))  # the heads share every batch: a like-for-like comparison
        train_s.append(time.perf_counter() - start)
        for name, (run, _) in zip(VARIANTS, plans):
            scores[name].append(evaluate(run / "last.pt", store=store, device=str(device)))
            r = scores[name][-1]
            print(f"{name:>24} seed {seed}: mIoU {r.miou:.4f}, pixel acc {r.pixel_acc:.4f}, "
                  + ", ".join(f"{c} {r.iou[names.index(c)] or 0:.3f}" for c in RARE))
    rows = {}
    for name, results in scores.items():
        iou = {c: statistics.mean(r.iou[i] or 0.0 for r in results) for i, c in enumerate(names)}
        rows[name] = {"loss": VARIANTS[name][0], "class_weights": VARIANTS[name][1] or "none",
                      "miou": [r.miou for r in results], "pixel_acc": [r.pixel_acc for r in results], "iou": iou,
                      "rare_miou": statistics.mean(iou[c] for c in RARE)}
    total = sum(pixels)
    result = {"date": dt.date.today().isoformat(), "torch": torch.__version__, "device": machine(device),
              "settings": {**{k: v for k, v in vars(args).items() if k not in ("json", "results", "workdir")},
                           "input": f"{size[1]}x{size[0]}", "trn_images": len(source.indices("trn")),
                           "val_images": len(source.indices("val"))},
              "trn_pixel_share": {n: p / total for n, p in zip(names, pixels)},
              "auto_weights": dict(zip(names, weights)), "variants": rows,
              "seconds": {"extract": extract_s, "train_4_heads_per_seed": train_s}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.results:
        append_markdown(result, args.results / "imbalance.md")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def append_markdown(r: dict, path: Path) -> None:
    """A section per run: the shares and weights, then per variant mIoU, pixel accuracy and per-class IoU."""
    s, names = r["settings"], list(r["auto_weights"])
    lines = [f"\n## {r['date']}: {s['backbone']} ({s['weights']} weights) at {s['input']}, {s['decoder']} decoder, "
             f"{s['images']} generated {s['frame']} frames ({s['trn_images']} trn, {s['val_images']} val), "
             f"{s['epochs']} epochs, lr {s['lr']}, seeds {s['seeds']}, {r['device']}\n",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             "| trn pixel share | " + " | ".join(f"{r['trn_pixel_share'][n]:.4f}" for n in names) + " |",
             "| auto weight | " + " | ".join(f"{r['auto_weights'][n]:g}" for n in names) + " |",
             "", "| loss | class weights | val mIoU (per seed) | mean | rare-class mIoU (" + ", ".join(RARE)
             + ") | pixel acc (mean) |", "|---|---|---|---|---|---|"]
    for row in r["variants"].values():
        lines.append(f"| {row['loss']} | {row['class_weights']} | {' / '.join(f'{v:.4f}' for v in row['miou'])} | "
                     f"{statistics.mean(row['miou']):.4f} | {row['rare_miou']:.4f} | "
                     f"{statistics.mean(row['pixel_acc']):.4f} |")
    lines += ["", "Per-class val IoU (mean over seeds):", "", "| variant | " + " | ".join(names) + " |",
              "|---" * (len(names) + 1) + "|"]
    for name, row in r["variants"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row['iou'][c]:.3f}" for c in names) + " |")
    t = r["seconds"]
    lines += ["", f"Extraction {t['extract']:.0f} s; training the four heads in one pass "
                  f"{' / '.join(f'{v:.0f}' for v in t['train_4_heads_per_seed'])} s per seed."]
    append(path, "# Class imbalance\n\nAppended by `benchmarks/imbalance.py`: cross-entropy against `--class-weights "
                 "auto` and `--loss dice-ce` on generated scenes, the four heads trained in one pass (the same "
                 "batches). Random-weight backbones show what the loss changes, not DINOv2's accuracy.", lines)


if __name__ == "__main__":
    main()
