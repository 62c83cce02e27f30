#!/usr/bin/env python
"""Maps: peak memory, windows/s and time against area of `predict` on generated orthomosaics (issue 17).

    benchmarks/ortho.py [--sizes 2000,5000] [--image-size 518] [--device cpu] [--batch-size 4]
        [--polygons-size N] [--store-sizes N,...] [--height H] [--floor-windows N] [--label TEXT] [--json FILE] [--results [DIR]] [--workdir DIR]

A run is trained for one epoch on generated 160x120 frames (vit_small_patch14_dinov2 at --image-size, random
weights: speed and memory do not depend on them). For each size N, a georeferenced N x N mosaic of
`cachedseg.synth` scenes with a nodata border (`cachedseg.synth_maps.synth_map`, RGBA, EPSG:32633 at 5 cm) is predicted
by `cachedseg.maps.predict_map` in a fresh process (windows of the run's input size, the default overlap):
  windows, map_s, map_win_s      windows predicted (all-nodata ones skipped), seconds of predict_map (read,
                                 forward, blend, write, COG), windows/s
  peak_mb                        peak RSS of that process (interpreter, torch and model included)
  floor_win_s, floor_peak_mb     the backbone alone on as many in-memory tiles (--floor-windows: at most that
                                 many), same batches, fresh process
  model_win_s                    backbone + decoder + resize + softmax on those tiles (the window model)
  ratio                          map_win_s / floor_win_s (goal >= 0.9: I/O and blending hidden)
  s_per_mp                       map_s per megapixel (time linear in area: flat across sizes)
With --polygons-size N, `predict --polygons` of the N x N mosaic is timed too (polygons_s, features).

With --store-sizes, each N x N mosaic (with its label raster, in a dataset file) is also extracted with `extract
--tile` (the window size, default overlap) into a tiled store, a conv head is trained on it for one epoch, and the
map is predicted by that run live and from the store (`predict --store`: the decoder on the cached windows, no
backbone), each in a fresh process:
  extract_s, extract_peak_mb     `cachedseg extract --tile` of the mosaic
  live_s, store_s, speedup       predict_map live and from the store, and live_s / store_s (goal >= 20)
  store_peak_mb, agreement       the store path's peak RSS, and the share of pixels where the two maps agree
Results: printed, --json, and with --results Markdown rows appended to benchmarks/results/ortho.md (the store rows
to ortho-store.md).
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

from cachedseg.synth_maps import synth_map
from cachedseg.runs import RunFolder
from cachedseg.synth import synthesize
from large_frame import commit, cli
from results_md import append, machine

RESULTS = Path(__file__).parent / "results"
# Runs one Python snippet (argv: code, then its arguments) and adds its peak RSS (kB on Linux) to the JSON the
# snippet wrote: RUSAGE_CHILDREN of this wrapper is that process's alone.
WRAPPER = ("import json, resource, subprocess, sys; rc = subprocess.call([sys.executable, '-c', *sys.argv[1:]]); "
           "print(json.dumps({'rc': rc, 'peak_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
MAP = """
import json, sys, time
from pathlib import Path
import torch
from cachedseg import checkpoint
from cachedseg.backbone import backbone_for
from cachedseg.map_outputs import PolygonOptions
from cachedseg.maps import predict_map
from cachedseg.predict import window_model
from cachedseg.tiles import default_overlap
run, ortho, out, device, batch, polygons, result = sys.argv[1:]
ckpt = checkpoint.load_run(run)
backbone = backbone_for(ckpt.spec, ckpt.weights, device, ckpt.decoder_config.layers)
model = window_model(backbone, ckpt.spec, ckpt.decoder(), ("identity",))
overlap = default_overlap(model.size, model.size[0] // ckpt.spec.grid[0])
start = time.perf_counter()
written = predict_map(ortho, out, model, ckpt.spec.classes, overlap, int(batch),
                      PolygonOptions() if polygons == "1" else None)
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
Path(result).write_text(json.dumps({"windows": written.windows, "seconds": seconds, "features": written.features,
                                    "overlap": overlap, "cog_mb": Path(written.label).stat().st_size / 2**20}))
"""
STORE_MAP = """
import json, sys, time
from pathlib import Path
import torch
from cachedseg import checkpoint
from cachedseg.backbone import backbone_for
from cachedseg.maps import predict_map
from cachedseg.predict import cached_models, window_model
from cachedseg.store import FeatureStore
run, ortho, out, device, batch, store, result = sys.argv[1:]
ckpt = checkpoint.load_run(run)
decoder, overlap = ckpt.decoder(), ckpt.spec.tile_overlap
start = time.perf_counter()
if store == "-":
    backbone = backbone_for(ckpt.spec, ckpt.weights, device, ckpt.decoder_config.layers)
    model = window_model(backbone, ckpt.spec, decoder, ("identity",))
else:
    model = cached_models(store, [Path(ortho)], ckpt, run, overlap, ("identity",), decoder, torch.device(device))[Path(ortho)]
loaded = time.perf_counter() - start
start = time.perf_counter()
written = predict_map(ortho, out, model, ckpt.spec.classes, overlap, int(batch))
if device.startswith("cuda"):
    torch.cuda.synchronize()
Path(result).write_text(json.dumps({"windows": written.windows, "seconds": time.perf_counter() - start,
                                    "load_s": loaded}))
"""
EXTRACT = """
import json, sys, time
from pathlib import Path
from cachedseg.backbone import BackboneConfig, tiling_from_options
from cachedseg.extract import extract
store, data, size, device, batch, backbone, result = sys.argv[1:]
start = time.perf_counter()
extract(data, store, BackboneConfig(backbone, (int(size), int(size))), weights="random",
        batch_size=int(batch), device=device, overwrite=True, tiling=tiling_from_options(backbone, size))
Path(result).write_text(json.dumps({"seconds": time.perf_counter() - start}))
"""
FLOOR = """
import json, sys, time
from pathlib import Path
import numpy as np, torch
from cachedseg import checkpoint
from cachedseg.backbone import backbone_for
from cachedseg.predict import window_model
run, count, device, batch, result = sys.argv[1:]
ckpt = checkpoint.load_run(run)
backbone = backbone_for(ckpt.spec, ckpt.weights, device, ckpt.decoder_config.layers)
model = window_model(backbone, ckpt.spec, ckpt.decoder(), ("identity",))
rng = np.random.default_rng(0)
tiles = [model.prepare(rng.integers(0, 256, (*model.size, 3), dtype=np.uint8)) for _ in range(int(batch))]
x = torch.stack(tiles).to(device)  # one batch, in memory: no reading, no preprocessing
batches = [x[: min(int(batch), int(count) - i)] for i in range(0, int(count), int(batch))]
def timed(f):
    f(batches[0])  # warm
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches:
        f(b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return int(count) / (time.perf_counter() - start)
with torch.no_grad():
    floor = timed(backbone)
    full = timed(model.run)
Path(result).write_text(json.dumps({"floor_win_s": floor, "model_win_s": full}))
"""


def parse() -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="2000,5000", help="mosaic sides in pixels, comma-separated")
    p.add_argument("--image-size", type=int, default=518, help="the run's input (the window) [default: 518]")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--height", type=int, default=None, help="mosaics of this height, SIZES wide (memory follows the "
                   "width: a strip of windows is held) [default: square]")
    p.add_argument("--polygons-size", type=int, default=None, help="also time --polygons on this mosaic size")
    p.add_argument("--store-backbone", default="vit_small_patch14_dinov2",
                   help="the backbone of the --store-sizes runs [default: vit_small_patch14_dinov2]")
    p.add_argument("--store-sizes", default="", help="mosaic sides to extract into a tiled store and predict live "
                   "and from the store (comma-separated; may differ from --sizes)")
    p.add_argument("--floor-windows", type=int, default=None, help="time the floor on at most this many windows (a "
                   "rate: saves the floor's two passes over every window of a huge map) [default: as many as the map]")
    p.add_argument("--label", default=None, help="names the code measured [default: its git commit]")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--workdir", type=Path, default=None, help="keep data, run and outputs here [default: a temp folder]")
    p.add_argument("--results", type=Path, nargs="?", const=RESULTS, default=None,
                   help=f"append Markdown rows to ortho.md in this folder [bare --results: {RESULTS}]")
    return p.parse_args()


def measured(code: str, *args) -> dict:
    """What the snippet `code` wrote to its last argument, with its process's peak RSS (MB)."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, code, *map(str, args)], capture_output=True, text=True)
    wrapper = json.loads(proc.stdout.strip().splitlines()[-1])
    if wrapper["rc"] != 0:
        raise SystemExit(f"the measured process failed:\n{proc.stdout}{proc.stderr}")
    return {**json.loads(Path(args[-1]).read_text()), "peak_mb": wrapper["peak_kb"] / 1024}


def main() -> None:
    args = parse()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cachedseg-ortho-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = ["--device", args.device]
    small, run = work / "small", work / f"run{args.image_size}"
    if not RunFolder(run).best.exists():
        if not small.exists():
            synthesize(small, count=8, width=160, height=120, seed=0)
        store = work / f"small{args.image_size}.zarr"
        subprocess.run(cli("extract", small, "--store", store, "--backbone", "vit_small_patch14_dinov2",
                           "--image-size", args.image_size, "--weights", "random", "--workers", "0", "--overwrite",
                           *device), check=True, capture_output=True)
        subprocess.run(cli("train", store, "--run", run, "--epochs", "1", "--workers", "0", *device), check=True,
                       capture_output=True)
    rows = []
    for side in (int(s) for s in args.sizes.split(",") if s):
        height = args.height or side
        ortho = work / f"ortho-{side}x{height}.tif"
        if not ortho.exists():
            synth_map(ortho, side, height, seed=side)
        out = work / f"out-{side}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        pred = measured(MAP, run, ortho, out, args.device, args.batch_size, 0, work / "map.json")
        floor = measured(FLOOR, run, min(pred["windows"], args.floor_windows or pred["windows"]), args.device,
                         args.batch_size, work / "floor.json")
        row = {"side": side, "height": height, "mp": side * height / 1e6, "windows": pred["windows"], "overlap": pred["overlap"],
               "map_s": pred["seconds"], "map_win_s": pred["windows"] / pred["seconds"], "peak_mb": pred["peak_mb"],
               "floor_win_s": floor["floor_win_s"], "model_win_s": floor["model_win_s"],
               "floor_peak_mb": floor["peak_mb"], "cog_mb": pred["cog_mb"]}
        row["ratio"] = row["map_win_s"] / row["floor_win_s"]
        row["s_per_mp"] = row["map_s"] / row["mp"]
        if args.polygons_size == side:
            shutil.rmtree(out)
            out.mkdir()
            poly = measured(MAP, run, ortho, out, args.device, args.batch_size, 1, work / "map.json")
            row.update(polygons_s=poly["seconds"], features=poly["features"], polygons_peak_mb=poly["peak_mb"])
        rows.append(row)
        print(json.dumps(row))
    result = {"label": args.label or commit(), "device": machine(torch.device(args.device)),
              "date": dt.date.today().isoformat(), "image_size": args.image_size, "batch_size": args.batch_size,
              "rows": rows}
    if args.results and rows:
        append(args.results / "ortho.md",
               "# Maps\n\nAppended by `benchmarks/ortho.py`: `predict_map` of generated N x N orthomosaics (RGBA, "
               "nodata border, EPSG:32633 at 5 cm), vit_small_patch14_dinov2 at the window size, random weights, "
               "each in a fresh process. map s: reading, forward passes, blending, writing and the COG copy; "
               "floor: the backbone alone on as many in-memory windows, same batches; model: backbone + decoder "
               "+ resize + softmax on them; peak: the process's peak RSS (interpreter, torch and model included). "
               "On a shared machine the seconds vary 2-3x between runs; the peaks do not.\n\n"
               "| date | code | device | window | mosaic | windows | map s | s/MP | map win/s | floor win/s | "
               "model win/s | ratio | peak MB | floor peak MB | COG MB | polygons s (features) |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
               [f"| {result['date']} | {result['label']} | {result['device']} | {args.image_size} "
                f"(overlap {r['overlap']}) | {r['side']}x{r['height']} | {r['windows']} | {r['map_s']:.1f} | {r['s_per_mp']:.1f} | "
                f"{r['map_win_s']:.2f} | {r['floor_win_s']:.2f} | {r['model_win_s']:.2f} | {r['ratio']:.2f} | "
                f"{r['peak_mb']:.0f} | {r['floor_peak_mb']:.0f} | {r['cog_mb']:.1f} | "
                + (f"{r['polygons_s']:.1f} ({r['features']}) |" if "polygons_s" in r else "- |") for r in rows])
    store_rows = [store_row(work, side, args) for side in (int(s) for s in args.store_sizes.split(",") if s)]
    result["store_rows"] = store_rows
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.results and store_rows:
        append(args.results / "ortho-store.md",
               "# Maps from the cache\n\nAppended by `benchmarks/ortho.py --store-sizes`: a generated N x N "
               "orthomosaic with its label raster, `extract --tile` (the backbone at the window size, "
               "random weights, default overlap) into a tiled store, a conv head trained on it for one epoch, then "
               "`predict_map` by that run live (backbone + head) and from the store (`predict --store`: the head "
               "on the cached windows), each in a fresh process. live s and store s exclude loading; agreement: "
               "the share of map pixels where the two label rasters agree.\n\n"
               "| date | code | device | backbone | window | mosaic | windows | extract s | extract peak MB | live s "
               "| store s | speedup | store peak MB | agreement |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
               [f"| {result['date']} | {result['label']} | {result['device']} | {args.store_backbone} | "
                f"{args.image_size} | {r['side']}² | "
                f"{r['windows']} | {r['extract_s']:.1f} | {r['extract_peak_mb']:.0f} | {r['live_s']:.1f} | "
                f"{r['store_s']:.2f} | {r['speedup']:.1f} | {r['store_peak_mb']:.0f} | {r['agreement']:.6f} |"
                for r in store_rows])
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def store_row(work: Path, side: int, args) -> dict:
    """Extract an N x N mosaic into a tiled store, train a head on it, and time its map live and from the store."""
    import numpy as np
    import rasterio

    from cachedseg.dataset import AEROSCAPES
    data = work / f"mapdata-{side}"
    if not (data / "dataset.toml").exists():
        (data / "maps").mkdir(parents=True, exist_ok=True)
        (data / "labels").mkdir(exist_ok=True)
        synth_map(data / "maps" / "ortho.tif", side, side, seed=side, labels=data / "labels" / "ortho.tif")
        classes = "".join(f'[[classes]]\nname = "{n}"\ncolor = {list(c)}\n' for n, c in zip(AEROSCAPES.names,
                                                                                            AEROSCAPES.colors))
        # a store needs a val image too: a small second map (the benchmark times the first, it does not score)
        synth_map(data / "maps" / "val.tif", 600, 600, seed=1, labels=data / "labels" / "val.tif")
        (data / "dataset.toml").write_text('images = "maps/*.tif"\nmasks = "labels/{stem}.tif"\n[splits]\n'
                                           'trn = "ortho*"\nval = "val*"\n' + classes)
    name = f"{side}-{args.store_backbone}-{args.image_size}"
    store, run, device = work / f"map-{name}.zarr", work / f"maprun-{name}", ["--device", args.device]
    extract = measured(EXTRACT, store, data, args.image_size, args.device, args.batch_size, args.store_backbone,
                       work / "extract.json")
    if not RunFolder(run).best.exists():
        subprocess.run(cli("train", store, "--run", run, "--epochs", "1", "--workers", "0", *device), check=True,
                       capture_output=True)
    outs = {}
    for kind, source in (("live", "-"), ("store", store)):
        out = work / f"out-{kind}-{side}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        outs[kind] = (measured(STORE_MAP, run, data / "maps" / "ortho.tif", out, args.device, args.batch_size,
                               source, work / f"{kind}.json"), out / "ortho_label.tif")
    with rasterio.open(outs["live"][1]) as a, rasterio.open(outs["store"][1]) as b:
        agreement = float(np.mean(a.read(1) == b.read(1)))
    live, cached = outs["live"][0], outs["store"][0]
    row = {"side": side, "windows": live["windows"], "extract_s": extract["seconds"],
           "extract_peak_mb": extract["peak_mb"], "live_s": live["seconds"], "store_s": cached["seconds"],
           "speedup": live["seconds"] / cached["seconds"], "store_peak_mb": cached["peak_mb"],
           "live_peak_mb": live["peak_mb"], "agreement": agreement}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
