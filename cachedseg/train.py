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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from cachedseg import __version__
from cachedseg.classes import IGNORE_INDEX
from cachedseg.data import collate
from cachedseg.decoders import DecoderConfig, build_decoder
from cachedseg.errors import CachedsegError
from cachedseg.features import FeatureSource, worker_init
from cachedseg.metrics import confusion, scores
from cachedseg.store import StoreSpec

CHECKPOINT_FORMAT = "cachedseg-checkpoint"


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; the defaults are the seed design's.

    Attributes:
        epochs: Passes over the trn images.
        lr: Adam learning rate.
        batch_size: Images per step.
        decoder: Decoder name (`seed` or `linear`).
        seed: Seeds the decoder's initialisation and the shuffling, identically for cached and live runs.
        workers: DataLoader worker processes (None: 0 on a CPU, where reads are cheap next to the decoder and
            workers only compete for cores; min(4, CPUs) on a GPU).
    """

    epochs: int = 11
    lr: float = 1e-4
    batch_size: int = 2
    decoder: str = "seed"
    seed: int = 0
    workers: int | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A trained decoder with everything needed to use it."""

    decoder: torch.nn.Module
    decoder_config: DecoderConfig
    train_config: TrainConfig
    spec: StoreSpec
    weights: str
    epoch: int
    metrics: list[dict]


def epoch_batches(indices: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch's shuffled batches of image indices; cached and live runs draw the very same ones."""
    order = torch.randperm(len(indices), generator=generator).tolist()
    shuffled = [indices[i] for i in order]
    return [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]


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


def _raise_errors(batch: dict, source: FeatureSource) -> None:
    """Turn a sample a worker could not read into an error naming its image."""
    if batch["errors"]:
        index, reason = batch["errors"][0]
        raise CachedsegError(f"image {source.ids[index]!r}: {reason}")


@torch.no_grad()
def validate(decoder: torch.nn.Module, source: FeatureSource, batches: torch.utils.data.DataLoader,
             device: torch.device) -> torch.Tensor:
    """Dataset-level confusion matrix [K, K] over all pixels the loader yields, at the mask size."""
    decoder.eval()
    k = len(source.spec.class_names)
    conf = torch.zeros(k, k, dtype=torch.long)
    for batch in batches:
        _raise_errors(batch, source)
        logits = decoder(source.features(batch, device))  # [B, K, M, M]
        conf += confusion(logits.argmax(1), batch["mask"].to(device), k)
    return conf


def train(source: FeatureSource, run: str | Path, config: TrainConfig = TrainConfig(), device: str = "cpu",
          resume: bool = False, progress: Callable[[int, int], None] | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train a decoder on `source`'s trn images, validating on its val images after every epoch.

    Args:
        source: Cached or live features (see `cachedseg.features`).
        run: The run folder for checkpoints and metrics.
        config: The training recipe.
        device: Where the decoder (and a live backbone) runs.
        resume: Continue from `run/last.pt`: decoder, optimizer, epoch and RNG state.
        progress: Called as `progress(done, total)` with the batches of the current epoch.
        on_epoch: Called with each epoch's metrics row.

    Returns:
        One metrics row per epoch: epoch, train_loss, val_miou, val_pixel_acc, seconds.

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
    workers = config.workers
    if workers is None:
        workers = 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)
    if getattr(source.dataset, "in_memory", False):
        workers = 0  # indexing a tensor in RAM: a worker would only add copies
    spec = source.spec
    dec_cfg = DecoderConfig(config.decoder, spec.channels, len(spec.class_names), spec.mask_size)

    torch.manual_seed(config.seed)
    decoder = build_decoder(dec_cfg).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    rows: list[dict] = []
    if resume:
        state = _load_state(run / "last.pt")
        if state["spec"] != asdict(spec) or state["decoder_config"] != asdict(dec_cfg):
            raise CachedsegError(f"{run}/last.pt was trained on other features or another decoder; "
                                 "resume it with the same store and --decoder, or start another --run")
        decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["rng"]["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        rows = state["metrics"]
    run.mkdir(parents=True, exist_ok=True)
    trn_batches = Batches()
    trn_loader = loader(source, trn_batches, workers, device)
    val_loader = loader(source, Batches([val[i:i + config.batch_size] for i in range(0, len(val), config.batch_size)]),
                        workers, device)

    for epoch in range(len(rows) + 1, config.epochs + 1):
        start = time.perf_counter()
        decoder.train()
        trn_batches.batches = epoch_batches(trn, config.batch_size, generator)
        # Sums stay on the device: no host sync per step, one check per epoch (before anything is saved).
        total_loss = torch.zeros((), device=device)
        total_pixels = torch.zeros((), device=device, dtype=torch.long)
        if progress:
            progress(0, len(trn_batches))
        for step, batch in enumerate(trn_loader, 1):
            _raise_errors(batch, source)
            feats = source.features(batch, device)  # [B, C, h, w]
            target = batch["mask"].to(device).long()  # [B, M, M]
            logits = decoder(feats)  # [B, K, M, M]
            valid = (target != IGNORE_INDEX).sum()
            # Summed then divided: an all-ignore batch contributes nothing instead of NaN.
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum") / valid.clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach() * valid
            total_pixels += valid
            if progress:
                progress(step, len(trn_batches))
        train_loss = float(total_loss / total_pixels.clamp(min=1))
        train_seconds = time.perf_counter() - start
        if not math.isfinite(train_loss):
            raise CachedsegError(f"the loss became {train_loss} in epoch {epoch}; the last good checkpoint is kept "
                                 f"in {run}; check the features, or try a lower --lr")
        metrics = scores(validate(decoder, source, val_loader, device))
        row = {"epoch": epoch, "train_loss": train_loss, "val_miou": metrics["miou"],
               "val_pixel_acc": metrics["pixel_acc"], "train_seconds": train_seconds,
               "seconds": time.perf_counter() - start}
        rows.append(row)
        state = {"format": CHECKPOINT_FORMAT, "package_version": __version__, "epoch": epoch,
                 "decoder_config": asdict(dec_cfg), "train_config": asdict(config), "spec": asdict(spec),
                 "class_names": list(spec.class_names), "weights": source.weights, "decoder": decoder.state_dict(),
                 "optimizer": optimizer.state_dict(), "metrics": rows,
                 "rng": {"sampler": generator.get_state(), "torch": torch.get_rng_state()}}
        if row["val_miou"] >= max(r["val_miou"] for r in rows):
            _save_atomic(state, run / "best.pt")
        _save_atomic(state, run / "last.pt")
        _write_metrics(rows, run)
        if on_epoch:
            on_epoch(row)
    return rows


def _save_atomic(state: dict, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a kill leaves the old file or the new, never half."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def _load_state(path: Path) -> dict:
    """Read a checkpoint file, with a clear error for a missing or foreign one."""
    if not path.is_file():
        raise CachedsegError(f"no checkpoint at {path}; train one with `cachedseg train STORE --run {path.parent}`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torn, truncated or foreign files all get one message
        raise CachedsegError(f"cannot read the checkpoint {path} ({str(exc).splitlines()[0]}); retrain or pick "
                             "another run") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CachedsegError(f"{path} is not a cachedseg checkpoint")
    return state


def load_checkpoint(run: str | Path, which: str = "best") -> Checkpoint:
    """Load a trained decoder from a run folder (or a checkpoint file), ready for inference.

    Args:
        run: A run folder, or the path of a `.pt` checkpoint.
        which: `best` (by val mIoU) or `last`, when `run` is a folder.

    Returns:
        The decoder in eval mode on the CPU, with its configs and the spec of the features it expects.

    Raises:
        CachedsegError: If the checkpoint is missing, unreadable or not a cachedseg checkpoint.
    """
    path = Path(run)
    if path.is_dir():
        path = path / f"{which}.pt"
    state = _load_state(path)
    dec_cfg = DecoderConfig(**state["decoder_config"])
    decoder = build_decoder(dec_cfg)
    decoder.load_state_dict(state["decoder"])
    spec = StoreSpec.from_attrs(state["spec"])
    return Checkpoint(decoder=decoder.eval(), decoder_config=dec_cfg, train_config=TrainConfig(**state["train_config"]),
                      spec=spec, weights=state["weights"], epoch=state["epoch"], metrics=state["metrics"])
