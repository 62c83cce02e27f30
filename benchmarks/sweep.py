#!/usr/bin/env python
"""K heads in one pass over the cache against K separate training runs.

    benchmarks/sweep.py [--heads 1,4,16] [--decoders linear,conv] [--images 48] [--epochs 2] [--device cpu|cuda]
        [--json FILE] [--results [DIR]]

For each decoder and K, trains K heads (K learning rates) from one store: once in a single pass
(`train.train_heads`: each batch read once, fed to every head), once as K separate runs one after another. Reports
the seconds of each and their ratio (separate / one pass). With the linear head a step is cheap next to reading a
batch, so one pass saves the reads; with a heavier head the compute dominates and the ratio nears 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cachedseg.backbone import BackboneConfig, patch_size, resolve_device, size_for_short_side
from cachedseg.extract import extract
from cachedseg.features import cached_source
from cachedseg.synth import synthesize
from cachedseg.train import TrainConfig, train, train_heads
from results_md import append, machine

RESULTS = Path(__file__).parent / "results"


def parse() -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", default="1,4,16")
    p.add_argument("--decoders", default="linear,conv")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--short-side", type=int, default=224)
    p.add_argument("--frame", default="640x360")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results", type=Path, nargs="?", const=RESULTS, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    return p.parse_args()


def main() -> None:
    args = parse()
    device = resolve_device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cachedseg-sweep-"))
    width, height = (int(v) for v in args.frame.split("x"))
    data, store = work / "data", work / "store.zarr"
    if not (data / "ImageSets" / "val.txt").is_file():
        synthesize(data, count=args.images, width=width, height=height, seed=0)
    if not (store / "zarr.json").exists():
        size = size_for_short_side(args.short_side, width, height, patch_size(args.backbone))
        extract(data, store, BackboneConfig(args.backbone, size), weights="random", device=str(device))
    train(cached_source(store), work / "warm-up", TrainConfig(epochs=1, decoder="linear"), str(device))  # untimed
    rows = []
    for decoder in args.decoders.split(","):
        for k in (int(v) for v in args.heads.split(",")):
            configs = [TrainConfig(epochs=args.epochs, decoder=decoder, lr=1e-4 * 1.5 ** i, data_seed=0)
                       for i in range(k)]
            runs = work / "runs"
            shutil.rmtree(runs, ignore_errors=True)
            start = time.perf_counter()
            train_heads(cached_source(store), [(runs / f"pass-{i}", c) for i, c in enumerate(configs)], str(device))
            one_pass = time.perf_counter() - start
            start = time.perf_counter()
            for i, config in enumerate(configs):
                train(cached_source(store), runs / f"alone-{i}", config, str(device))
            separate = time.perf_counter() - start
            rows.append({"decoder": decoder, "heads": k, "one_pass_s": one_pass, "separate_s": separate,
                         "ratio": separate / one_pass})
            print(f"{decoder:>8} K={k:>3}: one pass {one_pass:7.1f} s, separate {separate:7.1f} s, "
                  f"ratio {separate / one_pass:.2f}")
    result = {"date": dt.date.today().isoformat(), "torch": torch.__version__,
              "device": machine(device),
              "settings": {k: str(v) for k, v in vars(args).items() if k not in ("json", "results", "workdir")},
              "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.results:
        path = args.results / "sweep.md"
        lines = [f"\n## {result['date']}: {args.backbone}, {args.images} generated {args.frame} frames at short side "
                 f"{args.short_side}, {args.epochs} epochs (validation included), {result['device']}\n",
                 "| decoder | heads | one pass s | separate runs s | separate / one pass |", "|---|---|---|---|---|"]
        lines += [f"| {r['decoder']} | {r['heads']} | {r['one_pass_s']:.1f} | {r['separate_s']:.1f} | "
                  f"{r['ratio']:.2f} |" for r in rows]
        append(path, "# One pass, many heads\n\nAppended by `benchmarks/sweep.py`.", lines)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
