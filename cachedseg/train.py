"""Stage two: train only the decoder, from cached features (or live, as the baseline), validating every epoch.

Several decoders ("heads") can train in one pass: every batch is read once and fed to each head, as DINOv2's
linear evaluation trains its grid of classifiers. Under torchrun each rank takes its part of every global batch;
gradients, batch-norm statistics and validation counts are summed over ranks, so W ranks train as one process
with the whole batch would. Each run folder (see `cachedseg.runs`) holds `last.pt` and `best.pt` (decoder weights
plus every config), `metrics.csv`, `metrics.json` and `curves.png`, written by rank 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from cachedseg import checkpoint, distributed, syncbn
from cachedseg.checkpoint import Checkpoint
from cachedseg.data import collate
from cachedseg.decoders import DecoderConfig, build_decoder, decoder_config
from cachedseg.errors import CachedsegError
from cachedseg.features import FeatureSource, cached_source, free_memory, worker_init
from cachedseg.losses import segmentation_loss
from cachedseg.metrics import confusion, scores
from cachedseg.paths import check_writable
from cachedseg.recipe import AUTO, LOSSES, auto_class_weights, check_class_weights, train_options, weights_text
from cachedseg.recipe import TrainConfig  # defined there for checkpoint.py; its home is here
from cachedseg.runs import EpochMetrics, RunFolder, is_best
from cachedseg.spec import StoreSpec
from cachedseg.trackers import check_loggers, open_trackers
from cachedseg.workers import default_workers


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

    def __init__(self, batches: list[list] | None = None):
        self.batches = batches or []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def loader(source: FeatureSource, batches: Batches, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """A DataLoader over `batches`; its workers persist across epochs instead of starting anew each time."""
    pin = device.type == "cuda" and not getattr(source.dataset, "on_device", False)
    return torch.utils.data.DataLoader(source.dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                       worker_init_fn=worker_init, persistent_workers=workers > 0, pin_memory=pin)


@dataclass
class Head:
    """One decoder being trained: its recipe, run folder, model, optimizer and history."""

    run: Path
    config: TrainConfig
    decoder_config: DecoderConfig
    decoder: torch.nn.Module  # wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    rows: list[EpochMetrics] = field(default_factory=list)
    loss: torch.Tensor | None = None  # this epoch's summed loss and labelled pixels, kept on the device
    pixels: torch.Tensor | None = None
    weight: torch.Tensor | None = None  # the class weights [K] on the device (None: unweighted)

    @property
    def module(self) -> torch.nn.Module:
        """The decoder itself (unwrapped)."""
        return getattr(self.decoder, "module", self.decoder)


def train(source: FeatureSource | str | Path, run: str | Path, config: TrainConfig = TrainConfig(), device: str = "cpu",
          resume: bool = False, progress: Callable[[int, int], None] | None = None,
          on_epoch: Callable[[EpochMetrics], None] | None = None,
          log: Callable[[str], None] | None = None, loggers: tuple[str, ...] = ()) -> list[EpochMetrics]:
    """Train a decoder on `source`'s trn images, validating on its val images after every epoch.

    Args:
        source: Cached or live features (see `cachedseg.features`), or a store's path or URL.
        run: The run folder for checkpoints and metrics.
        config: The training recipe; `batch_size` is the global batch (split over the ranks under torchrun).
        device: Where the decoder (and a live backbone) runs.
        resume: Continue from `run/last.pt` (decoder, optimizer, epoch and RNG state); with no `last.pt` yet (a
            kill in epoch 1), start from scratch and say so through `log`.
        progress: Called as `progress(done, total)` with the batches of the current epoch.
        on_epoch: Called with each epoch's metrics row.
        log: Called with notes worth telling the user.
        loggers: Experiment trackers to log to, `tensorboard` and/or `mlflow` (see `cachedseg.trackers`).

    Returns:
        One metrics row per epoch.

    Raises:
        CachedsegError: For an unusable run folder, an empty split, or a non-finite loss.
    """
    if not isinstance(source, FeatureSource):
        source = cached_source(source)
    return train_heads(source, [(Path(run), config)], device, resume, progress,
                       (lambda run_, row: on_epoch(row)) if on_epoch else None, log, loggers)[0]


def train_heads(source: FeatureSource, plans: list[tuple[Path, TrainConfig]], device: str = "cpu",
                resume: bool = False, progress: Callable[[int, int], None] | None = None,
                on_epoch: Callable[[Path, EpochMetrics], None] | None = None,
                log: Callable[[str], None] | None = None,
                loggers: tuple[str, ...] = ()) -> list[list[EpochMetrics]]:
    """Train several decoders in one pass over `source`: each batch is read once and fed to every head.

    Every head's run folder gets the config.toml that trains it again (`train --config`), and with `loggers` its
    metrics go to those trackers too.

    The heads share the batches, so they must share epochs, batch size, views and data seed (`data_seed`, else
    `seed` of the first); each keeps its own initialisation seed, learning rate, decoder and run folder. A head
    trained here ends with exactly the weights it gets trained alone with the same config (on one CPU).

    Returns:
        Each head's metrics rows, in the order of `plans`.

    Raises:
        CachedsegError: For unusable run folders, configs that cannot share a pass, an empty split, or a
            non-finite loss.
    """
    first = plans[0][1]
    trn, val = source.indices("trn"), source.indices("val")
    if not trn or not val:
        raise CachedsegError("training needs images in both the trn and the val split; the data has "
                             f"{len(trn)} trn and {len(val)} val images")
    for run, config in plans:
        if config.epochs < 1 or config.batch_size < 1 or not 0 < config.lr < math.inf:  # nan is refused too
            raise CachedsegError(f"--epochs {config.epochs}, --batch-size {config.batch_size}, --lr {config.lr}: the "
                                 "first two must be at least 1, the learning rate positive and finite")
        if config.workers is not None and config.workers < 0:
            raise CachedsegError(f"--workers {config.workers}: give 0 (load in this process) or more")
        if config.loss not in LOSSES:
            raise CachedsegError(f"--loss {config.loss!r}: use {' or '.join(LOSSES)}")
        check_class_weights(config.class_weights, source.spec.class_names)
        if (config.epochs, config.batch_size, _data_seed(config)) != (first.epochs, first.batch_size,
                                                                      _data_seed(first)):
            raise CachedsegError("heads trained in one pass share the batches: give them the same --epochs, "
                                 "--batch-size and data seed")
        if RunFolder(run).last.exists() and not resume:
            raise CachedsegError(f"{run} already holds a trained run; pass --resume to continue it, or another --run")
        check_writable(run, "the run folder", folder=True)
    ctx = distributed.context(str(device))
    device = torch.device(distributed.device_for(ctx, str(device)))
    if first.batch_size % ctx.world:
        raise CachedsegError(f"--batch-size {first.batch_size} is the global batch, split over {ctx.world} "
                             f"processes; give a multiple of {ctx.world}")
    log = log or (lambda message: None)
    plans = resolve_class_weights(source, plans, resume, ctx)
    generator = torch.Generator().manual_seed(_data_seed(first))
    check_memory([(run, decoder_config(c.decoder, source.spec, c.layers or source.spec.layers)) for run, c in plans],
                 source.spec, first.batch_size // ctx.world, device)
    heads = [_head(run, config, source.spec, device, ctx) for run, config in plans]
    if resume:
        _restore_all(heads, source.spec, generator, log)
    trackers: list[tuple[Head, object]] = []
    if ctx.main:
        loggers = check_loggers(loggers)
        for head, (_, config) in zip(heads, plans):
            head.run.mkdir(parents=True, exist_ok=True)
            RunFolder(head.run).write_config({**source_options(source), **train_options(config),
                                              "logger": ",".join(loggers) or None})
            trackers += [(head, t) for t in open_trackers(loggers, head.run, config, source.spec, resume)]
    try:
        _epochs(heads, source, first, generator, device, ctx, progress, on_epoch, trackers)
    except BaseException:
        for head, tracker in trackers:
            tracker.finish(RunFolder(head.run), failed=True)
        raise
    for head, tracker in trackers:
        tracker.finish(RunFolder(head.run))
    return [h.rows for h in heads]


def source_options(source: FeatureSource) -> dict[str, object]:
    """Where a run's features come from, as the `train` options that name it: the store, or the live backbone."""
    if source.backbone is None:
        return {"store": source.location}
    spec = source.spec
    return {"live": source.location.removeprefix("live:"), "backbone": spec.backbone,
            "image_size": f"{spec.input_size[1]}x{spec.input_size[0]}", "precision": spec.precision,
            "dtype": spec.dtype, "views": ",".join(spec.views[1:]), "weights": source.weights}


def _epochs(heads: list[Head], source: FeatureSource, first: TrainConfig, generator: torch.Generator,
            device: torch.device, ctx, progress, on_epoch, trackers: list) -> None:
    """The training loop of `train_heads`: each epoch trains every head still behind, validates, saves."""
    trn, val = source.indices("trn"), source.indices("val")
    workers = _workers(first, device, source)
    trn_batches = Batches()
    trn_loader = loader(source, trn_batches, workers, device)
    val_loader = loader(source, Batches(ctx.share([val[i:i + first.batch_size]
                                                   for i in range(0, len(val), first.batch_size)])), workers, device)

    for epoch in range(min(len(h.rows) for h in heads) + 1, first.epochs + 1):
        start = time.perf_counter()
        batches = epoch_batches(trn, first.batch_size, generator, len(source.spec.views))
        # each rank its part of every global batch; a last batch smaller than the job leaves no part to some rank
        trn_batches.batches = [ctx.share(b) for b in batches if len(b) >= ctx.world]
        active = [h for h in heads if len(h.rows) < epoch]  # after a kill between two heads' saves, some are ahead
        train_epoch(active, source, trn_loader, device, ctx, progress)
        train_seconds = time.perf_counter() - start
        confusions = validate(active, source, val_loader, device, ctx)
        for head, conf in zip(active, confusions):
            loss = float(head.loss / head.pixels.clamp(min=1))
            if not math.isfinite(loss):
                raise CachedsegError(f"the loss of {head.run} became {loss} in epoch {epoch}; the last good "
                                     f"checkpoint is kept there; check the features, or try a lower --lr")
            metrics = scores(conf)
            head.rows.append(EpochMetrics(epoch=epoch, train_loss=loss, val_miou=metrics["miou"],
                                          val_pixel_acc=metrics["pixel_acc"], train_seconds=train_seconds,
                                          seconds=time.perf_counter() - start))
        if ctx.main:
            for head in active:
                _save(head, source, generator)
                if on_epoch:
                    on_epoch(head.run, head.rows[-1])
                for tracked, tracker in trackers:
                    if tracked is head:
                        tracker.epoch(head.rows[-1])
        ctx.barrier()  # no rank reads a checkpoint rank 0 is still writing


def resolve_class_weights(source: FeatureSource, plans: list[tuple[Path, TrainConfig]], resume: bool = False,
                          ctx: distributed.Context = distributed.Context()) -> list[tuple[Path, TrainConfig]]:
    """`plans` with every `class_weights="auto"` replaced by numbers: when resuming a run that recorded some, those
    (so a resumed run keeps its weights even if the store has changed since); else `auto_class_weights` of the
    source's trn pixels, counted once for all heads (by rank 0 under torchrun)."""
    pixels, resolved = None, []
    for run, config in plans:
        if config.class_weights == AUTO:
            last = RunFolder(run).last
            recorded = checkpoint.load(last).train_config.class_weights if resume and last.is_file() else None
            if not isinstance(recorded, tuple):
                pixels = pixels or ctx.once(lambda: source.class_pixels("trn").tolist())
                recorded = auto_class_weights(pixels)
            config = replace(config, class_weights=recorded)
        resolved.append((run, config))
    return resolved


def head_bytes(cfg: DecoderConfig, spec: StoreSpec, batch: int) -> int:
    """Bytes one head needs to train: weights, gradients and Adam's two moments (4 copies of the parameters), and
    one step's activations and their gradients (traced on the meta device: shapes only, no memory)."""
    with torch.device("meta"):
        decoder = build_decoder(cfg).train()
        sizes: list[int] = []
        hooks = [m.register_forward_hook(lambda m, i, out: sizes.append(out.numel()))
                 for m in decoder.modules() if not list(m.children())]
        decoder(torch.empty(batch, cfg.layers, spec.channels, *spec.grid))
        for hook in hooks:
            hook.remove()
    return 4 * (4 * sum(p.numel() for p in decoder.parameters()) + 2 * sum(sizes))


def check_memory(heads: list[tuple[Path, DecoderConfig]], spec: StoreSpec, batch: int, device: torch.device) -> None:
    """Refuse, before any training, heads that would not fit next to each other in the device's free memory."""
    free, total = 0.9 * free_memory(device), 0
    for run, cfg in heads:
        need = head_bytes(cfg, spec, batch)
        total += need
        if total > free:
            raise CachedsegError(f"the head {run} ({cfg.name}) needs {need / 1e9:.2f} GB to train, {total / 1e9:.2f} "
                                 f"GB with the heads before it, but {free / 1e9:.2f} GB of {device} memory is free; "
                                 "train fewer heads per pass, or a smaller --batch-size")


def _data_seed(config: TrainConfig) -> int:
    """The seed of the shuffling (and view draws)."""
    return config.seed if config.data_seed is None else config.data_seed


def _head(run: Path, config: TrainConfig, spec: StoreSpec, device: torch.device, ctx: distributed.Context) -> Head:
    """A freshly initialised head (seeded as when trained alone), synchronised over ranks under torchrun."""
    dec_cfg = decoder_config(config.decoder, spec, config.layers or spec.layers)
    if config.decoder_precision not in AUTOCAST:
        raise CachedsegError(f"--decoder-precision {config.decoder_precision!r}: use {' or '.join(AUTOCAST)}")
    torch.manual_seed(config.seed)
    decoder = build_decoder(dec_cfg).to(device)
    if config.channels_last:
        decoder.channels_last()
    if config.compile:
        decoder.compile()  # in place: the state dict keeps its keys, so checkpoints load without compiling
    if ctx.world > 1:
        decoder = torch.nn.parallel.DistributedDataParallel(
            syncbn.sync_batchnorm(decoder), device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # batch-norm buffers stay equal: their statistics are already synchronised
    weight = (None if config.class_weights is None
              else torch.tensor(config.class_weights, dtype=torch.float32, device=device))
    return Head(run, config, dec_cfg, decoder, torch.optim.Adam(decoder.parameters(), lr=config.lr), weight=weight)


def train_epoch(heads: list[Head], source: FeatureSource, batches: torch.utils.data.DataLoader, device: torch.device,
                ctx: distributed.Context = distributed.Context(),
                progress: Callable[[int, int], None] | None = None) -> None:
    """One pass over the training batches, each batch read once and fed to every head."""
    for head in heads:
        head.decoder.train()
        # Sums stay on the device: no host sync per step, one check per epoch (before anything is saved).
        head.loss = torch.zeros((), device=device)
        head.pixels = torch.zeros((), device=device, dtype=torch.long)
    ignore = source.spec.ignore_index
    if progress:
        progress(0, len(batches))
    for step, batch in enumerate(batches, 1):
        source.check(batch)
        feats = source.features(batch, device)  # [b, L, C, h, w], this rank's part of the batch
        mask = batch["mask"].to(device)  # [b, Mh, Mw]
        for head in heads:
            with _autocast(head, device):
                logits = head.decoder(feats).float()  # [b, K, Mh, Mw]
            step_loss = segmentation_loss(logits, targets(mask, logits.shape[-2:]), ignore, head.config.loss,
                                          head.weight, ctx)
            head.optimizer.zero_grad(set_to_none=True)
            step_loss.loss.backward()
            head.optimizer.step()
            head.loss += step_loss.total
            head.pixels += step_loss.pixels
        if progress:
            progress(step, len(batches))
    for head in heads:
        ctx.sum(head.loss)
        ctx.sum(head.pixels)


@torch.no_grad()
def validate(heads: list[Head], source: FeatureSource, batches: torch.utils.data.DataLoader,
             device: torch.device, ctx: distributed.Context = distributed.Context()) -> list[torch.Tensor]:
    """Dataset-level confusion matrices [K, K] (one per head) over every rank's val images, at the output size."""
    k, ignore = len(source.spec.class_names), source.spec.ignore_index
    for head in heads:
        head.decoder.eval()
    confs = [torch.zeros(k, k, dtype=torch.long) for _ in heads]
    for batch in batches:
        source.check(batch)
        feats = source.features(batch, device)
        mask = batch["mask"].to(device)
        for conf, head in zip(confs, heads):
            with _autocast(head, device):
                logits = head.module(feats).float()  # [B, K, Mh, Mw]
            conf += confusion(logits.argmax(1), targets(mask, logits.shape[-2:]), k, ignore)
    return [ctx.sum(conf) for conf in confs]


AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16}


def _autocast(head: Head, device: torch.device):
    """The head's decoder precision: bfloat16 autocast, or none."""
    dtype = AUTOCAST[head.config.decoder_precision]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _save(head: Head, source: FeatureSource, generator: torch.Generator) -> None:
    """Write a head's checkpoints (last.pt first: a kill between the two leaves a resumable run, never a best.pt
    without a last.pt) and its metrics."""
    ckpt = Checkpoint(decoder_config=head.decoder_config, train_config=head.config, spec=source.spec,
                      weights=source.weights, epoch=len(head.rows), metrics=list(head.rows),
                      decoder_state=head.module.state_dict(), optimizer_state=head.optimizer.state_dict(),
                      rng={"sampler": generator.get_state(), "torch": torch.get_rng_state()},
                      source=source.location)
    folder = RunFolder(head.run)
    checkpoint.save(ckpt, folder.last)
    if is_best(head.rows):
        checkpoint.save(ckpt, folder.best)
    folder.write_metrics(head.rows)


def _restore_all(heads: list[Head], spec: StoreSpec, generator: torch.Generator, log: Callable[[str], None]) -> None:
    """Load each head's `last.pt`; the shared batches continue from the head that is furthest behind."""
    rng = {}
    for head in heads:
        last = RunFolder(head.run).last
        if not last.exists():  # a folder named last.pt is refused by load
            log(f"nothing to resume in {head.run} (no last.pt yet): starting it from scratch")
            continue
        ckpt = checkpoint.load(last)
        if ckpt.spec != spec or ckpt.decoder_config != head.decoder_config:
            raise CachedsegError(f"{head.run}/last.pt was trained on other features or another decoder; "
                                 "resume it with the same store and --decoder, or start another --run")
        was, now = ckpt.train_config, head.config
        if (was.loss, was.class_weights) != (now.loss, now.class_weights):
            raise CachedsegError(f"{head.run}/last.pt was trained with --loss {was.loss} and class weights "
                                 f"{weights_text(was.class_weights)}, not --loss {now.loss} and "
                                 f"{weights_text(now.class_weights)}; resume it with the same --loss and "
                                 "--class-weights (auto keeps the weights it recorded), or start another --run")
        head.module.load_state_dict(ckpt.decoder_state)
        head.optimizer.load_state_dict(ckpt.optimizer_state)
        head.rows = list(ckpt.metrics)
        rng[ckpt.epoch] = ckpt.rng
    lowest = min(len(h.rows) for h in heads)
    if lowest:  # else epoch 1 starts from the freshly seeded generator
        generator.set_state(rng[lowest]["sampler"])
        torch.set_rng_state(rng[lowest]["torch"])


def _workers(config: TrainConfig, device: torch.device, source: FeatureSource) -> int:
    """DataLoader workers: as asked, else `default_workers` (0 on a CPU, where they only compete for cores, and
    min(4, CPUs) on a GPU)."""
    if getattr(source.dataset, "in_memory", False):
        return 0  # indexing a tensor in RAM: a worker would only add copies
    if config.workers is not None:
        return config.workers
    return default_workers(device, "train")
