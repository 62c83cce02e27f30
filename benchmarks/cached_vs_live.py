#!/usr/bin/env python
"""Cached against live decoder training, side by side in one process, against the physical floors.

    benchmarks/cached_vs_live.py [--device cpu|cuda] [--images N] [--backbone NAME] [--image-size PX]
        [--decoder seed|linear] [--dtype float16|float32] [--epochs E] [--quick] [--json FILE]

All figures come from the same generated images, decoder and settings:
  backbone_floor_img_s   backbone forward on preprocessed tensors already in memory
  extract_img_s          the real `extract`, from JPEGs to a finished store
  decoder_floor_epoch_s  one training epoch of the decoder on feature tensors already in memory
  cached_epoch_s         one epoch streaming from the Zarr store on disk
  cached_inmem_epoch_s   one epoch with --in-memory
  live_epoch_s           one epoch of `train --live`
  agreement_differ       val pixels where the cached-trained and live-trained decoders predict differently
                         (of agreement_pixels)
Epoch figures are the training part of the last of --epochs epochs (validation excluded), so worker start-up
and first-call warm-up are not counted. Results: a table, --json, and with --results a Markdown row appended
to benchmarks/results/<device>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import zarr
from rich.console import Console
from rich.table import Table

from cachedseg.backbone import BackboneConfig, build_backbone, parse_size, resolve_device
from cachedseg.data import preprocess_image
from cachedseg.dataset import load_image, open_dataset
from cachedseg.decoders import DECODERS, build_decoder, decoder_config
from cachedseg.extract import extract
from cachedseg.features import cached_source, live_source
from cachedseg import checkpoint
from cachedseg.store import FeatureStore
from cachedseg.synth import synthesize
from cachedseg.train import TrainConfig, epoch_batches, targets, train
from results_md import machine

RESULTS = Path(__file__).parent / "results"


def parse() -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--images", type=int, default=None, help="generated images, a quarter or so val [default: 16]")
    p.add_argument("--backbone", default=None, help="timm DINOv2 model [default: vit_base_patch14_dinov2]")
    p.add_argument("--image-size", default=None, help="backbone input, 518 or WIDTHxHEIGHT [default: the model's, 518]")
    p.add_argument("--weights", default="random", help="random (default: the timing does not depend on them), auto or FILE")
    p.add_argument("--decoder", default="seed", choices=list(DECODERS))
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--epochs", type=int, default=2, help="epochs per training run; the last one is timed")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers [default: the tool's]")
    p.add_argument("--scales", default="1,2,4", help="dataset-size multiples for the epoch-scaling figures")
    p.add_argument("--image-width", type=int, default=None, help="generated frame width [default: 1280]")
    p.add_argument("--image-height", type=int, default=None, help="generated frame height [default: 720]")
    p.add_argument("--quick", action="store_true", help="small backbone at 224 px, 16 small images: under 2 minutes on 2 CPU cores")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--workdir", type=Path, default=None, help="keep data and stores here [default: a temp folder]")
    p.add_argument("--results", type=Path, nargs="?", const=RESULTS, default=None,
                   help=f"append a Markdown row to <device>.md in this folder [bare --results: {RESULTS}]; "
                        "nothing is appended without it")
    args = p.parse_args()
    # --quick changes only the defaults: options given explicitly still win.
    defaults = (dict(backbone="vit_small_patch14_dinov2", image_size="224", images=16, image_width=640, image_height=360)
                if args.quick else dict(backbone="vit_base_patch14_dinov2", images=16, image_width=1280, image_height=720))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def backbone_floor(backbone, data: Path, batch_size: int, device: torch.device) -> float:
    """Images/s of the backbone alone on preprocessed tensors already on the device."""
    samples = open_dataset(data).samples()
    x = torch.stack([preprocess_image(load_image(s.image), backbone.preprocess) for s in samples]).to(device)
    backbone(x[:batch_size])  # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        backbone(x[i:i + batch_size])
    sync(device)
    return len(x) / (time.perf_counter() - start)


def decoder_floor(store: Path, config: TrainConfig, device: torch.device) -> float:
    """Seconds of one training epoch of the decoder on features already in memory (no loader, no reads)."""
    cache = FeatureStore.open(store)
    spec = cache.spec
    trn = [i for i, s in enumerate(cache.splits) if s == "trn"]
    feats, masks = cache.read_all()
    feats = torch.from_numpy(feats[:, 0]).to(device)  # [N, L, C, h, w] (identity view), cache dtype
    masks = torch.from_numpy(masks).to(device)  # [N, Mh, Mw]
    torch.manual_seed(config.seed)
    decoder = build_decoder(decoder_config(config.decoder, spec, config.layers or spec.layers)).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    seconds = 0.0
    for _ in range(config.epochs):  # the last epoch is timed, like the real runs
        sync(device)
        start = time.perf_counter()
        for batch in epoch_batches(trn, config.batch_size, generator):
            index = [i for i, _ in batch]
            logits = decoder(feats[index].float())  # [B, K, Mh, Mw]
            loss = F.cross_entropy(logits, targets(masks[index], logits.shape[-2:]), ignore_index=spec.ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        seconds = time.perf_counter() - start
    return seconds


def replicate(store: Path, times: int, out: Path) -> Path:
    """A store holding `times` copies of `store`'s images (same bytes, new ids), for the epoch-scaling figures."""
    cache = FeatureStore.open(store)
    new = FeatureStore.create(out, cache.spec, [f"{i}~{k}" for k in range(times) for i in cache.ids],
                              cache.splits * times, dataset=cache.dataset, weights=cache.weights)
    feats, masks = cache.read_all()
    for k in range(times):
        for i in range(len(cache)):
            new.write(k * len(cache) + i, feats[i], masks[i])
    return out


def timed_epoch(source, run: Path, config: TrainConfig, device: torch.device) -> tuple[float, Path]:
    """Training seconds of the last epoch of a real `train` run."""
    rows = train(source, run, config, device)
    return rows[-1].train_seconds, run


def agreement(cached_run: Path, live_run: Path, store: Path, device: torch.device) -> tuple[int, int]:
    """(pixels that differ, pixels): val predictions (mask size) of the cached-trained and live-trained decoders."""
    source = cached_source(store)
    a = checkpoint.load_run(cached_run, "last").decoder().to(device)
    b = checkpoint.load_run(live_run, "last").decoder().to(device)
    differ = total = 0
    with torch.no_grad():
        for i in source.indices("val"):
            x = source.item(i)["features"][None].to(device).float()
            pa, pb = a(x).argmax(1), b(x).argmax(1)
            differ += int((pa != pb).sum())
            total += pa.numel()
    return differ, total


def main() -> None:
    args = parse()
    console = Console()
    device = resolve_device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cachedseg-bench-"))
    if work.exists() and args.workdir is None:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "ImageSets" / "val.txt").is_file():
        synthesize(data, count=args.images, width=args.image_width, height=args.image_height, seed=0)
    workers = args.workers
    config = TrainConfig(epochs=args.epochs, lr=1e-4, batch_size=args.batch_size, decoder=args.decoder, seed=0,
                         workers=workers)
    bcfg = BackboneConfig(args.backbone, parse_size(args.image_size) if args.image_size else None)
    console.print(f"[bold]cached vs live[/] on {device}: {args.backbone}, {args.images} images, decoder {args.decoder}, "
                  f"{args.dtype} cache, work dir {work}")

    backbone = build_backbone(bcfg, args.weights, device)
    r = {}
    r["backbone_floor_img_s"] = backbone_floor(backbone, data, 4, device)
    console.print(f"backbone floor: {r['backbone_floor_img_s']:.2f} img/s")

    store = work / "features.zarr"
    shutil.rmtree(store, ignore_errors=True)
    ex = extract(data, store, bcfg, weights=args.weights, dtype=args.dtype, batch_size=4, device=str(device))
    r["extract_img_s"] = ex.images_per_s
    r["cache_mb_per_image"] = ex.mb_per_image
    console.print(f"extract: {r['extract_img_s']:.2f} img/s, {ex.mb_per_image:.2f} MB/img")

    r["decoder_floor_epoch_s"] = decoder_floor(store, config, device)
    console.print(f"decoder floor epoch: {r['decoder_floor_epoch_s']:.2f} s")
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    r["cached_epoch_s"], cached_run = timed_epoch(cached_source(store), runs / "cached", config, device)
    console.print(f"cached epoch: {r['cached_epoch_s']:.2f} s")
    r["cached_inmem_epoch_s"], _ = timed_epoch(cached_source(store, in_memory=True), runs / "inmem", config, device)
    console.print(f"cached in-memory epoch: {r['cached_inmem_epoch_s']:.2f} s")
    r["live_epoch_s"], live_run = timed_epoch(live_source(data, backbone, args.dtype, args.weights), runs / "live",
                                              config, device)
    console.print(f"live epoch: {r['live_epoch_s']:.2f} s")

    n_trn = len(cached_source(store).indices("trn"))
    live_backbone_s = n_trn / r["backbone_floor_img_s"]  # the backbone's share of a live epoch, at its floor
    r["speedup"] = r["live_epoch_s"] / r["cached_epoch_s"]
    r["ideal_speedup"] = (live_backbone_s + r["decoder_floor_epoch_s"]) / r["decoder_floor_epoch_s"]
    r["cache_overhead"] = r["cached_epoch_s"] / r["decoder_floor_epoch_s"]
    r["extract_efficiency"] = r["extract_img_s"] / r["backbone_floor_img_s"]
    extract_s = ex.images / r["extract_img_s"]
    saved = r["live_epoch_s"] - r["cached_epoch_s"]
    r["break_even_epochs"] = math.floor(extract_s / saved) + 1 if saved > 0 else None
    r["agreement_differ"], r["agreement_pixels"] = agreement(cached_run, live_run, store, device)
    r["agreement"] = 1 - r["agreement_differ"] / r["agreement_pixels"]

    scaling = {}
    for k in [int(s) for s in args.scales.split(",")]:
        path = store if k == 1 else replicate(store, k, work / f"features_x{k}.zarr")
        seconds, _ = timed_epoch(cached_source(path), runs / f"scale{k}", TrainConfig(**{**config.__dict__, "epochs": 1}),
                                 device)
        scaling[str(k * n_trn)] = seconds
    r["epoch_s_by_trn_images"] = scaling
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        r["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result = {"device": machine(device), "date": dt.date.today().isoformat(), "torch": torch.__version__, "timm": timm.__version__,
              "zarr": zarr.__version__, "python": sys.version.split()[0],
              "settings": {"backbone": args.backbone, "images": ex.images,
                           "image_size": "{1}x{0}".format(*backbone.preprocess.image_size),
                           "trn_images": n_trn, "decoder": args.decoder, "dtype": args.dtype, "epochs": args.epochs,
                           "batch_size": args.batch_size, "weights": args.weights, "quick": args.quick,
                           "image_wh": [args.image_width, args.image_height], "precision": backbone.config.precision},
              **r}
    report(result, console, args.results)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {args.json}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def report(r: dict, console: Console, results: Path | None) -> None:
    """Print the Rich table and, with `results`, append a Markdown row to <results>/<device>.md."""
    s = r["settings"]
    table = Table(title=f"{s['backbone']} @ {s['image_size']}, {s['decoder']} decoder, {s['dtype']}, "
                        f"{s['images']} images ({s['trn_images']} trn), {r['device']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in ("backbone_floor_img_s", "extract_img_s", "decoder_floor_epoch_s", "cached_epoch_s",
                "cached_inmem_epoch_s", "live_epoch_s", "speedup", "ideal_speedup", "cache_overhead",
                "extract_efficiency", "break_even_epochs", "agreement", "cache_mb_per_image", "peak_rss_mb", "peak_gpu_mb"):
        if key in r and r[key] is not None:
            v = r[key]
            table.add_row(key, f"{r['agreement_differ']} of {r['agreement_pixels']} pixels differ ({v:.6f})"
                          if key == "agreement" else f"{v:.2f}" if isinstance(v, float) else str(v))
    table.add_row("epoch_s_by_trn_images", ", ".join(f"{n}: {v:.2f}" for n, v in r["epoch_s_by_trn_images"].items()))
    console.print(table)
    if results is None:
        return
    results.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in r["device"].split(" (")[0].lower()).strip("-")
    path = results / f"{slug}.md"
    header = ("| date | backbone @ px | decoder | dtype | images (trn) | backbone floor img/s | extract img/s | "
              "decoder floor s | cached s | in-mem s | live s | speedup | ideal | cache overhead | extract eff. | "
              "break-even epochs | agreement | MB/img | peak RSS MB | epoch s by trn images |\n" + "|---" * 20 + "|\n")
    if not path.exists():
        path.write_text(f"# {r['device']}\n\nAppended by `benchmarks/cached_vs_live.py`; epoch figures are training seconds "
                        "of the last timed epoch.\n\n" + header)
    row = [r["date"], f"{s['backbone']} @ {s['image_size']}", s["decoder"], s["dtype"], f"{s['images']} ({s['trn_images']})",
           f"{r['backbone_floor_img_s']:.2f}", f"{r['extract_img_s']:.2f}", f"{r['decoder_floor_epoch_s']:.2f}",
           f"{r['cached_epoch_s']:.2f}", f"{r['cached_inmem_epoch_s']:.2f}", f"{r['live_epoch_s']:.2f}",
           f"{r['speedup']:.2f}", f"{r['ideal_speedup']:.2f}", f"{r['cache_overhead']:.2f}",
           f"{r['extract_efficiency']:.2f}", str(r["break_even_epochs"]), f"{r['agreement_differ']}/{r['agreement_pixels']} px differ",
           f"{r['cache_mb_per_image']:.2f}", f"{r['peak_rss_mb']:.0f}",
           ", ".join(f"{n}: {v:.2f}" for n, v in r["epoch_s_by_trn_images"].items())]
    with open(path, "a") as f:
        f.write("| " + " | ".join(row) + " |\n")
    console.print(f"appended to {path}")


if __name__ == "__main__":
    main()
