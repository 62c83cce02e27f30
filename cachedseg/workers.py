"""How many DataLoader worker processes a stage starts when `--workers` is not given: the one rule for all."""

from __future__ import annotations

import os

import torch

# What the workers load, by stage: `extract` decodes and resizes every frame of the dataset, `predict` (also
# under `evaluate`) the images (and labels) it scores, `train` reads cached features.
PURPOSES = ("extract", "predict", "train")


def default_workers(device: torch.device, purpose: str) -> int:
    """DataLoader workers when none are asked for: min(4, CPUs), except 0 for `predict` and `train` on a CPU.

    On a GPU the workers keep it fed for every stage. On a CPU, `extract` still overlaps the decoding and
    resizing of full frames with the forward pass (so it runs at the backbone's own speed), while for `predict`
    the backbone dwarfs decoding and for `train` reads are cheap next to the decoder: there workers would only
    compete with the model for the cores.

    Args:
        device: Where the model runs.
        purpose: One of `PURPOSES`: the stage whose workers these are.

    Returns:
        The number of worker processes (0: load in the calling process).
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    if device.type == "cpu" and purpose != "extract":
        return 0
    return min(4, os.cpu_count() or 1)
