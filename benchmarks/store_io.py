#!/usr/bin/env python
"""Store layouts and where they live: files and bytes per image, and how fast training reads them.

    benchmarks/store_io.py [--images 1000] [--shards 1,16,64,256] [--backbone NAME] [--image-size PX]
        [--s3] [--json FILE] [--results [DIR]]

Extracts one store from generated frames, rewrites it with shards of N images (same bytes per image, fewer files),
and measures for each layout:
  files_per_image       files and folders under the store per image (each costs an inode)
  bytes_per_image       bytes on disk per image
  read_img_s            images per second read in a shuffled order, one image and its mask at a time, as a training
                        epoch reads them (FeatureStore.read; second pass, so the OS page cache is warm)
With --s3 the same layouts are copied into a moto S3 server on 127.0.0.1 and read from there (read_s3_img_s):
a local stand-in for object storage, with HTTP and request overhead but no network latency.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cachedseg.backbone import BackboneConfig
from cachedseg.extract import extract
from cachedseg.store import FeatureStore, disk_bytes, file_count
from cachedseg.synth import synthesize
from results_md import append, machine

RESULTS = Path(__file__).parent / "results"


def parse() -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--shards", default="1,16,64,256", help="images per shard; 1 = no shards")
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--frame", default="320x180")
    p.add_argument("--reads", type=int, default=None, help="images read per timing [default: all]")
    p.add_argument("--s3", action="store_true", help="also read from a local moto S3 server")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results", type=Path, nargs="?", const=RESULTS, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    return p.parse_args()


def copy_store(src: FeatureStore, dst: str, per: int) -> FeatureStore:
    """`src`'s images rewritten into a store at `dst` with `per` images per shard."""
    out = FeatureStore.create(dst, src.spec, src.ids, src.splits, dataset=src.dataset, weights=src.weights,
                              images_per_shard=per)
    features, masks = src.read_all()
    flags = src.flags()
    for start in range(0, len(src), per):
        end = min(start + per, len(src))
        out.write_block(start, features[start:end], masks[start:end], flags[start:end])
    return out


def read_speed(store: FeatureStore, order: list[int]) -> float:
    """Images per second over `order`, the second of two passes."""
    for _ in range(2):
        start = time.perf_counter()
        for i in order:
            store.read(i)
        seconds = time.perf_counter() - start
    return len(order) / seconds


def moto_server() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free local port, the environment pointing at it, and a bucket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3
    for _ in range(300):
        try:
            boto3.client("s3").create_bucket(Bucket="cachedseg-bench")
            return server, "s3://cachedseg-bench"
        except Exception:  # noqa: BLE001 - still starting
            time.sleep(0.2)
    raise RuntimeError("the moto server did not start")


def main() -> None:
    args = parse()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cachedseg-io-"))
    width, height = (int(v) for v in args.frame.split("x"))
    data = work / "data"
    if not (data / "ImageSets" / "val.txt").is_file():
        synthesize(data, count=args.images, width=width, height=height, seed=0)
    base = work / "x1.zarr"
    if not (base / "zarr.json").exists():
        extract(data, base, BackboneConfig(args.backbone, args.image_size), weights="random", device="cpu")
    source = FeatureStore.open(base)
    order = np.random.default_rng(0).permutation(len(source))[:args.reads or len(source)].tolist()
    server, bucket = moto_server() if args.s3 else (None, None)
    rows = {}
    try:
        for per in (int(v) for v in args.shards.split(",")):
            path = base if per == 1 else work / f"x{per}.zarr"
            if per != 1:
                shutil.rmtree(path, ignore_errors=True)
                copy_store(source, str(path), per)
            store = FeatureStore.open(path)
            row = {"files_per_image": file_count(path) / len(store), "bytes_per_image": disk_bytes(path) / len(store),
                   "read_img_s": read_speed(store, order)}
            if bucket:
                url = f"{bucket}/x{per}.zarr"
                copy_store(source, url, per)
                row["read_s3_img_s"] = read_speed(FeatureStore.open(url), order)
                row["s3_objects_per_image"] = file_count(url) / len(store)
            rows[str(per)] = row
            print(f"images per shard {per:>4}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    finally:
        if server:
            server.terminate()
    spec = source.spec
    result = {"date": dt.date.today().isoformat(), "machine": machine(),
              "images": len(source), "features": f"[{len(spec.views)}, {spec.layers}, {spec.channels}, "
                                                 f"{spec.grid[0]}, {spec.grid[1]}] {spec.dtype}",
              "mask": "x".join(map(str, spec.mask_size)), "layouts": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.results:
        path = args.results / "store_io.md"
        lines = [f"\n## {result['date']}: {result['images']} generated {args.frame} frames, {args.backbone} @ "
                 f"{args.image_size}, features {result['features']}, masks {result['mask']}, {result['machine']}\n",
                 "| images per shard | files per image | bytes per image | read img/s (local) | read img/s (moto S3) "
                 "| S3 objects per image |", "|---|---|---|---|---|---|"]
        for per, row in rows.items():
            lines.append(f"| {per} | {row['files_per_image']:.3f} | {row['bytes_per_image']:.0f} | "
                         f"{row['read_img_s']:.0f} | {row.get('read_s3_img_s', float('nan')):.0f} | "
                         f"{row.get('s3_objects_per_image', float('nan')):.3f} |")
        append(path, "# Store layouts\n\nAppended by `benchmarks/store_io.py`.", lines)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
