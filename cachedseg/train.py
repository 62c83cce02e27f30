"""Stage two: train only the decoder, from cached features (or live, as the baseline), validating every epoch.

The run folder holds `last.pt` and `best.pt` (decoder weights plus every config, so loading needs no flags),
`metrics.csv`, `metrics.json` and `curves.png`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from cachedseg import checkpoint
from cachedseg.checkpoint import Checkpoint, TrainConfig
from cachedseg.classes import IGNORE_INDEX
from cachedseg.data import collate
from cachedseg.decoders import DecoderConfig, build_decoder, decoder_config
from cachedseg.errors import CachedsegError
from cachedseg.features import FeatureSource, worker_init
from cachedseg.metrics import confusion, scores
from cachedseg.store import StoreSpec


def epoch_batches(indices: list[int], batch_size: int, generator: torch.Generator,
                  views: int = 1) -> list[list[tuple[int, int]]]:
    """One epoch's shuffled batches of (image index, view): each image once, in one of `views` views drawn at
    random. Cached and live runs draw the very same ones."""
    order = torch.randperm(len(indices), generator=generator).tolist()
    drawn = torch.randint(views, (len(indices),), generator=generator).tolist() if views > 1 else [0] * len(indices)
    shuffled = [(indices[i], v) for i, v in zip(order, drawn)]
    return [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]


def targets(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels [B, Mh, Mw] as int64 at the decoder's output `size` (nearest; only the seed decoder's crop differs)."""
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
    return mask.long()


class Batches:
    """A batch sampler whose batches are replaced every epoch, so one DataLoader (and its workers) lasts the run."""

    def __init__(self, batches: list[list[int]] | None = None):
        self.batches = batches or []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def loader(source: FeatureSource, batches: Batches, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """A DataLoader over `batches`; its workers persist across epochs instead of starting anew each time."""
    return torch.utils.data.DataLoader(source.dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                       worker_init_fn=worker_init, persistent_workers=workers > 0,
                                       pin_memory=device.type == "cuda")


@torch.no_grad()
def validate(decoder: torch.nn.Module, source: FeatureSource, batches: torch.utils.data.DataLoader,
             device: torch.device) -> torch.Tensor:
    """Dataset-level confusion matrix [K, K] over all pixels the loader yields, at the mask size."""
    decoder.eval()
    k = len(source.spec.class_names)
    conf = torch.zeros(k, k, dtype=torch.long)
    for batch in batches:
        source.check(batch)
        logits = decoder(source.features(batch, device))  # [B, K, Mh, Mw]
        conf += confusion(logits.argmax(1), targets(batch["mask"].to(device), logits.shape[-2:]), k)
    return conf


def train(source: FeatureSource, run: str | Path, config: TrainConfig = TrainConfig(), device: str = "cpu",
          resume: bool = False, progress: Callable[[int, int], None] | None = None,
          on_epoch: Callable[[dict], None] | None = None, log: Callable[[str], None] | None = None) -> list[dict]:
    """Train a decoder on `source`'s trn images, validating on its val images after every epoch.

    Args:
        source: Cached or live features (see `cachedseg.features`).
        run: The run folder for checkpoints and metrics.
        config: The training recipe.
        device: Where the decoder (and a live backbone) runs.
        resume: Continue from `run/last.pt` (decoder, optimizer, epoch and RNG state); with no `last.pt` yet (a
            kill in epoch 1), start from scratch and say so through `log`.
        progress: Called as `progress(done, total)` with the batches of the current epoch.
        on_epoch: Called with each epoch's metrics row.
        log: Called with notes worth telling the user.

    Returns:
        One metrics row per epoch: epoch, train_loss, val_miou, val_pixel_acc, train_seconds, seconds.

    Raises:
        CachedsegError: For an unusable run folder, an empty split, or a non-finite loss.
    """
    run = Path(run)
    trn, val = source.indices("trn"), source.indices("val")
    if not trn or not val:
        raise CachedsegError("training needs images in both the trn and the val split; the data has "
                             f"{len(trn)} trn and {len(val)} val images")
    if config.epochs < 1 or config.batch_size < 1 or config.lr <= 0:
        raise CachedsegError("--epochs and --batch-size must be at least 1 and --lr positive")
    if (run / "last.pt").exists() and not resume:
        raise CachedsegError(f"{run} already holds a trained run; pass --resume to continue it, or another --run")
    device = torch.device(device)
    spec = source.spec
    dec_cfg = decoder_config(config.decoder, spec, config.layers or spec.layers)
    torch.manual_seed(config.seed)
    decoder = build_decoder(dec_cfg).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    rows: list[dict] = []
    if resume:
        rows = _restore(run, spec, dec_cfg, decoder, optimizer, generator, log or (lambda message: None))
    run.mkdir(parents=True, exist_ok=True)
    workers = _workers(config, device, source)
    trn_batches = Batches()
    trn_loader = loader(source, trn_batches, workers, device)
    val_loader = loader(source, Batches([val[i:i + config.batch_size] for i in range(0, len(val), config.batch_size)]),
                        workers, device)

    for epoch in range(len(rows) + 1, config.epochs + 1):
        start = time.perf_counter()
        trn_batches.batches = epoch_batches(trn, config.batch_size, generator, len(spec.views))
        train_loss = train_epoch(decoder, optimizer, source, trn_loader, device, progress)
        train_seconds = time.perf_counter() - start
        if not math.isfinite(train_loss):
            raise CachedsegError(f"the loss became {train_loss} in epoch {epoch}; the last good checkpoint is kept "
                                 f"in {run}; check the features, or try a lower --lr")
        metrics = scores(validate(decoder, source, val_loader, device))
        rows.append({"epoch": epoch, "train_loss": train_loss, "val_miou": metrics["miou"],
                     "val_pixel_acc": metrics["pixel_acc"], "train_seconds": train_seconds,
                     "seconds": time.perf_counter() - start})
        ckpt = Checkpoint(decoder_config=dec_cfg, train_config=config, spec=spec, weights=source.weights, epoch=epoch,
                          metrics=rows, decoder_state=decoder.state_dict(), optimizer_state=optimizer.state_dict(),
                          rng={"sampler": generator.get_state(), "torch": torch.get_rng_state()})
        # last.pt first: a kill between the two leaves a resumable run, never a best.pt without a last.pt
        checkpoint.save(ckpt, run / "last.pt")
        if rows[-1]["val_miou"] >= max(r["val_miou"] for r in rows):
            checkpoint.save(ckpt, run / "best.pt")
        _write_metrics(rows, run)
        if on_epoch:
            on_epoch(rows[-1])
    return rows


def train_epoch(decoder: torch.nn.Module, optimizer: torch.optim.Optimizer, source: FeatureSource,
                batches: torch.utils.data.DataLoader, device: torch.device,
                progress: Callable[[int, int], None] | None = None) -> float:
    """One pass over the training batches; returns the mean loss per labelled pixel."""
    decoder.train()
    # Sums stay on the device: no host sync per step, one check per epoch (before anything is saved).
    total_loss = torch.zeros((), device=device)
    total_pixels = torch.zeros((), device=device, dtype=torch.long)
    if progress:
        progress(0, len(batches))
    for step, batch in enumerate(batches, 1):
        source.check(batch)
        feats = source.features(batch, device)  # [B, L, C, h, w]
        logits = decoder(feats)  # [B, K, Mh, Mw]
        target = targets(batch["mask"].to(device), logits.shape[-2:])  # [B, Mh, Mw]
        valid = (target != IGNORE_INDEX).sum()
        # Summed then divided: an all-ignore batch contributes nothing instead of NaN.
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum") / valid.clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * valid
        total_pixels += valid
        if progress:
            progress(step, len(batches))
    return float(total_loss / total_pixels.clamp(min=1))


def _restore(run: Path, spec: StoreSpec, dec_cfg: DecoderConfig, decoder: torch.nn.Module,
             optimizer: torch.optim.Optimizer, generator: torch.Generator, log: Callable[[str], None]) -> list[dict]:
    """Load `run/last.pt` into the decoder, optimizer and RNGs; returns its metrics (none if there is nothing yet)."""
    if not (run / "last.pt").is_file():
        log(f"nothing to resume in {run} (no last.pt yet): starting from scratch")
        return []
    ckpt = checkpoint.load(run / "last.pt")
    if ckpt.spec != spec or ckpt.decoder_config != dec_cfg:
        raise CachedsegError(f"{run}/last.pt was trained on other features or another decoder; "
                             "resume it with the same store and --decoder, or start another --run")
    decoder.load_state_dict(ckpt.decoder_state)
    optimizer.load_state_dict(ckpt.optimizer_state)
    generator.set_state(ckpt.rng["sampler"])
    torch.set_rng_state(ckpt.rng["torch"])
    return list(ckpt.metrics)


def _workers(config: TrainConfig, device: torch.device, source: FeatureSource) -> int:
    """DataLoader workers: as asked, else 0 on a CPU (they only compete for cores) and min(4, CPUs) on a GPU."""
    if getattr(source.dataset, "in_memory", False):
        return 0  # indexing a tensor in RAM: a worker would only add copies
    if config.workers is not None:
        return config.workers
    return 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)


def _write_metrics(rows: list[dict], run: Path) -> None:
    """metrics.csv, metrics.json and curves.png."""
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (run / "metrics.json").write_text(json.dumps(rows, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in rows], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    ax2.plot(epochs, [r["val_miou"] for r in rows], marker="o", label="val mIoU")
    ax2.plot(epochs, [r["val_pixel_acc"] for r in rows], marker="s", label="val pixel acc")
    ax2.set(xlabel="epoch", ylim=(0, 1), title="Validation")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(run / "curves.png", dpi=100)
    plt.close(fig)
