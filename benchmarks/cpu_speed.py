#!/usr/bin/env python
"""CPU speed of the backbone: PyTorch float32 and bfloat16, onnxruntime float32 and int8, on the same inputs, with the
label agreement of heads trained on each path's features against float32 (issue 18).

    benchmarks/cpu_speed.py [--backbone vit_base_patch14_dinov2] [--size 518] [--images 24] [--epochs 6]
        [--batch-size 2] [--quick] [--json FILE] [--results [DIR]] [--workdir DIR]

Generated scenes (`cachedseg synth`, SIZE x SIZE, a quarter val) are extracted by `cachedseg extract` at each
precision it offers: float32, bfloat16 (autocast) and onnxruntime (the float32 graph in onnxruntime); the same
preprocessed images also go through that graph dynamically quantised (int8 weights,
onnxruntime.quantization.quantize_dynamic), written into a store of the same layout. For each path:
  img_s          backbone images/s on the same in-memory inputs, batch --batch-size, after a warm-up batch
  gflop_s        img_s x the float32 forward's FLOPs per image (torch.utils.flop_counter; 2 per multiply-add)
  feature_rel    max |f - f32| / max |f32| over all features
  agreement      the share of val pixels (native resolution) where a conv head trained on this path's features
                 (same seed, --epochs) predicts the label the float32 head predicts
Weights are random (offline) unless --weights says otherwise: speed does not depend on them, agreement may.
Results: printed, --json, and with --results rows appended to benchmarks/results/cpu-speed.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cachedseg.backbone import BackboneConfig, build_backbone
from cachedseg.data import preprocess_image
from cachedseg.dataset import load_image, open_dataset
from cachedseg.evaluate import predictions
from cachedseg.extract import extract
from cachedseg.recipe import TrainConfig
from cachedseg.store import DONE, FeatureStore
from cachedseg.synth import synthesize
from cachedseg.train import train
from large_frame import commit
from results_md import append, machine

RESULTS = Path(__file__).parent / "results"


def parse() -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="vit_base_patch14_dinov2")
    p.add_argument("--size", type=int, default=518, help="square input side [default: 518]")
    p.add_argument("--images", type=int, default=24, help="generated scenes (a quarter val) [default: 24]")
    p.add_argument("--epochs", type=int, default=6, help="epochs of each head [default: 6]")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--weights", default="random")
    p.add_argument("--quick", action="store_true", help="ViT-S/14 at 112, 8 images, 2 epochs (a smoke test)")
    p.add_argument("--label", default=None, help="names the code measured [default: its git commit]")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--results", type=Path, nargs="?", const=RESULTS, default=None)
    args = p.parse_args()
    if args.quick:
        args.backbone, args.size, args.images, args.epochs = "vit_small_patch14_dinov2", 112, 8, 2
    return args


def timed(run, batches: list) -> float:
    """Images/s of `run` over `batches` after one warm-up batch."""
    run(batches[0])
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def flops_per_image(backbone, x: torch.Tensor) -> float:
    """FLOPs of one float32 forward per image."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(x[:1])
    return float(counter.get_total_flops())


def ort_session(path: Path):
    """An onnxruntime CPU session."""
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def copy_store(reference: Path, path: Path, features: np.ndarray, precision: str) -> Path:
    """A store like `reference` (same ids, masks, spec but the precision) holding `features` [N, 1, L, C, h, w]."""
    ref = FeatureStore.open(reference)
    spec = replace(ref.spec, precision=precision)
    cache = FeatureStore.create(path, spec, ref.ids, ref.splits, dataset=ref.dataset, weights=ref.weights)
    _, masks = ref.read_all()
    for i in range(len(ref.ids)):
        cache.write(i, features[i].astype(spec.dtype), masks[i])
    assert (cache.flags() == DONE).all()
    return path


def main() -> None:
    args = parse()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cachedseg-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"data{args.size}"
    if not data.exists():
        synthesize(data, count=args.images, width=args.size, height=args.size, seed=0)
    dataset = open_dataset(data)
    samples = dataset.samples()
    size = (args.size, args.size)
    stores, speeds, rows = {}, {}, []
    os.environ["CACHEDSEG_ONNX_CACHE"] = str(work / "onnx")
    backbones = {p: build_backbone(BackboneConfig(args.backbone, size, p), args.weights)
                 for p in ("float32", "bfloat16", "onnxruntime")}
    pp = backbones["float32"].preprocess
    x = torch.stack([preprocess_image(load_image(s.image), pp) for s in samples])  # the same inputs for every path
    batches = [x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size)]
    flops = flops_per_image(backbones["float32"], x)
    for precision, backbone in backbones.items():
        stores[precision] = work / f"{precision}.zarr"
        extract(data, stores[precision], backbone.config, weights=args.weights, dtype="float32",
                batch_size=args.batch_size, workers=0, overwrite=True)
        with torch.no_grad():
            speeds[precision] = timed(backbone, batches)
    (onnx32,) = (work / "onnx").glob("*.onnx")  # the graph --precision onnxruntime exported
    from onnxruntime.quantization import QuantType, quantize_dynamic
    int8 = work / "backbone-int8.onnx"
    quantize_dynamic(str(onnx32), str(int8), weight_type=QuantType.QInt8)
    session = ort_session(int8)
    run = lambda b: session.run(None, {"image": b.numpy()})[0]  # noqa: E731
    speeds["onnxruntime-int8"] = timed(run, batches)
    features = np.concatenate([run(b) for b in batches])[:, None]  # [N, 1, L, C, h, w]
    stores["onnxruntime-int8"] = copy_store(stores["float32"], work / "int8.zarr", features, "onnxruntime-int8")
    reference = FeatureStore.open(stores["float32"]).read_all()[0]
    labels = {}
    for name, store in stores.items():
        run_dir = work / f"run-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        train(store, run_dir, TrainConfig(epochs=args.epochs))
        labels[name] = [pred for _, _, pred, _ in predictions(run_dir, store=store, device="cpu")]
        feats = FeatureStore.open(store).read_all()[0].astype(np.float32)
        rel = float(np.abs(feats - reference).max() / np.abs(reference).max())
        agree = float(np.mean(np.concatenate([(a == b).ravel() for a, b in zip(labels[name], labels["float32"])])))
        rows.append({"path": name, "img_s": speeds[name], "gflop_s": speeds[name] * flops / 1e9,
                     "feature_rel": rel, "agreement": agree, "speedup": speeds[name] / speeds["float32"]})
        print(json.dumps(rows[-1]))
    best = max((r for r in rows if r["agreement"] >= 0.999), key=lambda r: r["img_s"])
    cpu_flags = set(open("/proc/cpuinfo").read().split()) if Path("/proc/cpuinfo").exists() else set()
    result = {"label": args.label or commit(), "device": machine(torch.device("cpu")),
              "date": dt.date.today().isoformat(), "backbone": args.backbone, "size": args.size,
              "batch_size": args.batch_size, "images": args.images, "epochs": args.epochs,
              "gflop_per_image": flops / 1e9, "torch": torch.__version__,
              "cpu_flags": sorted(cpu_flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
              "threads": torch.get_num_threads(), "rows": rows, "fastest_agreeing": best["path"]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.results:
        append(args.results / "cpu-speed.md",
               "# CPU speed of the backbone\n\nAppended by `benchmarks/cpu_speed.py`: the backbone on the same "
               "preprocessed generated scenes through each path (`--precision float32`, `bfloat16` (autocast) and "
               "`onnxruntime` (the float32 graph in onnxruntime), and that graph dynamically quantised to int8 "
               "weights), random weights; GFLOP/s from the float32 forward's FLOPs; agreement: the share of "
               "val pixels where a conv head trained on that path's features predicts the float32 head's label.\n\n"
               "| date | code | device | CPU flags | backbone | input | path | img/s | GFLOP/s | x float32 | "
               "max feature diff (rel.) | label agreement |\n|---|---|---|---|---|---|---|---|---|---|---|---|",
               [f"| {result['date']} | {result['label']} | {result['device']} | {' '.join(result['cpu_flags'])} | "
                f"{args.backbone} | {args.size}² | {r['path']} | {r['img_s']:.3f} | {r['gflop_s']:.0f} | "
                f"{r['speedup']:.2f} | {r['feature_rel']:.2g} | {r['agreement']:.5f} |" for r in rows])
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
