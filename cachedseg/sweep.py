"""Sweeps: many training configs in one pass over the cache.

Lists of learning rates, decoders, layer counts and seeds expand into every combination. All of them train in the
same pass (`train.train_heads`): each batch is read once and fed to every head. Each config gets its own sub-run
folder (checkpoints, metrics, `--resume`), and the sweep folder gets `sweep.json`, the configs sorted by their best
val mIoU, naming the best.

    runs/sweep/
        sweep.json              {"best": name, "runs": [{name, run, config, best_val_miou, ...}, ...]}
        conv-l1-lr0.0001-s0/    a run folder, as `cachedseg train` writes
        ...
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from cachedseg import distributed
from cachedseg.errors import CachedsegError
from cachedseg.features import FeatureSource
from cachedseg.runs import EpochMetrics, RunFolder, SweepRow
from cachedseg.train import TrainConfig, resolve_class_weights, train_heads


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep.

    Attributes:
        run: The sweep folder.
        runs: One summary row per config, best val mIoU first.
    """

    run: Path
    runs: list[SweepRow]

    @property
    def best(self) -> SweepRow:
        """The row of the config with the best val mIoU."""
        return self.runs[0]


def grid(base: TrainConfig, lrs: list[float], decoders: list[str], layers: list[int | None],
         seeds: list[int]) -> list[TrainConfig]:
    """Every combination of the lists, on top of `base`; the shuffling follows the first seed in all of them, so
    that they can share batches (a config trained alone with the same `data_seed` sees the same ones)."""
    data_seed = base.data_seed if base.data_seed is not None else seeds[0]
    configs = [replace(base, lr=lr, decoder=decoder, layers=layer, seed=seed, data_seed=data_seed)
               for decoder, layer, lr, seed in itertools.product(decoders, layers, lrs, seeds)]
    if len({name(c) for c in configs}) != len(configs):
        raise CachedsegError("the sweep lists repeat a value; give each learning rate, decoder, layer count and "
                             "seed once")
    return configs


def name(config: TrainConfig) -> str:
    """A sub-run's folder name, e.g. conv-l4-lr0.0003-s1 (l0: all the layers the store holds)."""
    return f"{config.decoder}-l{config.layers or 0}-lr{config.lr:g}-s{config.seed}"


def sweep(source: FeatureSource, run: str | Path, configs: list[TrainConfig], device: str = "cpu",
          resume: bool = False, progress: Callable[[int, int], None] | None = None,
          on_epoch: Callable[[Path, EpochMetrics], None] | None = None,
          log: Callable[[str], None] | None = None) -> SweepResult:
    """Train `configs` in one pass over `source`, each into `run/<name>`, and summarise them in `run/sweep.json`.

    Args:
        source: Cached (or live) features.
        run: The sweep folder.
        configs: The configs (see `grid`); they must share epochs, batch size and data seed.
        device, resume, progress, on_epoch, log: As for `train.train_heads`.

    Returns:
        The summary, best first.

    Raises:
        CachedsegError: As `train.train_heads` does.
    """
    run = Path(run)
    # `--class-weights auto` resolved here already, so that sweep.json records the numbers the heads train with
    plans = resolve_class_weights(source, [(run / name(c), c) for c in configs], resume,
                                  distributed.context(str(device)))
    histories = train_heads(source, plans, device, resume, progress, on_epoch, log)
    rows = sorted((SweepRow.of(path, config, history) for (path, config), history in zip(plans, histories)),
                  key=lambda r: -r.best_val_miou)
    if distributed.context(str(device)).main:
        RunFolder(run).write_sweep_summary(rows)
    return SweepResult(run, rows)
