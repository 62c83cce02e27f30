import os

import pytest
import torch

from cachedseg.workers import PURPOSES, default_workers


def test_the_default_worker_count_follows_the_device_and_the_stage():
    cap = min(4, os.cpu_count() or 1)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU
    # on a CPU only extract's workers pay off (they decode and resize full frames behind the forward pass)
    assert (default_workers(cpu, "extract"), default_workers(cpu, "predict"), default_workers(cpu, "train")) == (cap, 0, 0)
    assert [default_workers(gpu, p) for p in PURPOSES] == [cap] * 3
    with pytest.raises(ValueError):
        default_workers(cpu, "report")
