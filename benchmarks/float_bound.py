#!/usr/bin/env python
"""How far apart float32 features of the same image can be: the bound behind the identity guarantee.

    benchmarks/float_bound.py [--backbone NAME] [--image-size PX] [--batch N] [--device cpu|cuda] [--json FILE]

For a random-initialised backbone and N random images it reports, relative to the largest feature magnitude:
  f32_vs_f64       max |float32 forward - float64 forward|: the float32 rounding error of this machine's kernels
  batch_vs_single  max |features in a batch of N - the same image alone|: what batch composition changes here
and, as counts, how many values differ at all between batched and single-image features. Run it under other
kernels to see them move, e.g. ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE, or on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from cachedseg.backbone import BackboneConfig, build_backbone, resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    device = resolve_device(args.device)
    model = build_backbone(BackboneConfig(args.backbone, args.image_size), "random", device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    batched = model(x)  # [N, C, h, w]
    single = torch.cat([model(x[i:i + 1].clone()) for i in range(args.batch)])
    vit = model.model.double()
    with torch.no_grad():
        exact = vit.forward_features(x.double())[:, vit.num_prefix_tokens:].transpose(1, 2).reshape(batched.shape)
    scale = exact.abs().max().item()
    result = {
        "backbone": args.backbone, "image_size": args.image_size, "batch": args.batch, "device": str(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
        "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR") if k in os.environ},
        "max_abs_feature": scale,
        "f32_vs_f64_rel": (batched.double() - exact).abs().max().item() / scale,
        "batch_vs_single_rel": (batched - single).abs().max().item() / scale,
        "values_differing": int((batched != single).sum()), "values": batched.numel(),
    }
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
