#!/usr/bin/env python
"""How fast the CPU feeds extraction: JPEG decoding and preprocessing per DataLoader worker.

    benchmarks/decode.py [--images 64] [--frame 1280x720] [--size 924x518] [--workers 0,1,2] [--json FILE]

At GPU speed a backbone takes hundreds of images per second, and decoding 1280x720 JPEGs on the CPU becomes the
bound. For each worker count this reports images per second of what `extract` runs in its workers (decode, EXIF
transpose, resize, normalise, and the mask), and alone: PIL's decode, and torchvision's `decode_jpeg` on the CPU
(the same call decodes on a GPU with `device="cuda"`), to say how many workers a GPU needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from cachedseg.backbone import DEFAULT_BACKBONE, parse_size, patch_size
from cachedseg.data import Preprocess, SegmentationDataset, collate
from cachedseg.dataset import open_dataset
from cachedseg.decoders import mask_size_for
from cachedseg.synth import synthesize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--frame", default="1280x720")
    p.add_argument("--size", default="924x518", help="backbone input WIDTHxHEIGHT")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cachedseg-decode-"))
    width, height = (int(v) for v in args.frame.split("x"))
    synthesize(work, count=args.images, width=width, height=height, seed=0)
    data = open_dataset(work)
    samples = data.samples()
    size = parse_size(args.size)
    patch = patch_size(DEFAULT_BACKBONE)  # the tool's default backbone, whose input --size defaults to
    pp = Preprocess(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic",
                    mask_size_for((size[0] // patch, size[1] // patch)))
    result = {"cpus": os.cpu_count(), "frame": args.frame, "size": args.size, "images": len(samples)}
    start = time.perf_counter()
    for s in samples:
        Image.open(s.image).convert("RGB")
    result["pil_decode_img_s"] = len(samples) / (time.perf_counter() - start)
    try:
        from torchvision.io import decode_jpeg, read_file
        start = time.perf_counter()
        for s in samples:
            decode_jpeg(read_file(str(s.image)))
        result["torchvision_decode_img_s"] = len(samples) / (time.perf_counter() - start)
    except ImportError:
        pass
    dataset = SegmentationDataset(samples, pp, data.sample_labels)
    for workers in (int(v) for v in args.workers.split(",")):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collate)
        next(iter(loader))  # start the workers before timing
        start = time.perf_counter()
        for _ in loader:
            pass
        result[f"extract_inputs_img_s_{workers}_workers"] = len(samples) / (time.perf_counter() - start)
    for key, value in result.items():
        print(f"{key:>34}: {value:.1f}" if isinstance(value, float) else f"{key:>34}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
