"""The checkpoint: the one owner of its format. A dict `torch.load(path, weights_only=True)` reads, holding the
decoder weights and every config, so loading needs no flags.

    format, package_version, epoch, weights, metrics
    decoder_config   DecoderConfig fields         decoder    its state dict
    train_config     TrainConfig fields           optimizer  Adam state (for --resume)
    spec             StoreSpec fields             rng        sampler and torch RNG states (for --resume)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from cachedseg import __version__
from cachedseg.decoders import DecoderConfig, build_decoder
from cachedseg.errors import CachedsegError, first_line, load_failure
from cachedseg.paths import checkpoint_path
from cachedseg.recipe import TrainConfig
from cachedseg.runs import EpochMetrics
from cachedseg.spec import StoreSpec

FORMAT = "cachedseg-checkpoint"


@dataclass(frozen=True)
class Checkpoint:
    """A trained decoder with everything needed to use it, or to continue training it.

    Attributes:
        decoder_config: Rebuilds the decoder.
        train_config: The recipe it was trained with.
        spec: The features it was trained on; a store or backbone must match it.
        weights: Where the backbone's weights came from (`auto`, `random` or a file).
        epoch: Epochs trained.
        metrics: One row per epoch.
        decoder_state: The decoder's weights.
        optimizer_state: Adam's state, for `--resume`.
        rng: The sampler's and torch's RNG states, for `--resume`.
        source: Where the features came from: the store's path or URL, or `live:DATA`.
        versions: Package versions at training time (cachedseg, torch, timm, zarr, python).
    """

    decoder_config: DecoderConfig
    train_config: TrainConfig
    spec: StoreSpec
    weights: str
    epoch: int
    metrics: list[EpochMetrics]
    decoder_state: dict[str, torch.Tensor]
    optimizer_state: dict | None = None
    rng: dict | None = field(default=None, repr=False)
    source: str = ""
    versions: dict = field(default_factory=dict)

    def decoder(self) -> nn.Module:
        """The trained decoder, in eval mode on the CPU."""
        decoder = build_decoder(self.decoder_config)
        decoder.load_state_dict(self.decoder_state)
        return decoder.eval()


def versions() -> dict:
    """The versions that decide the numbers: cachedseg, torch, timm, zarr, python."""
    import platform

    import timm
    import zarr
    return {"cachedseg": __version__, "torch": str(torch.__version__), "timm": timm.__version__, "zarr": zarr.__version__,
            "python": platform.python_version()}


def save(ckpt: Checkpoint, path: str | Path) -> None:
    """Write a checkpoint through a temporary file, fsync, then rename: a kill leaves the old file or the new."""
    path = Path(path)
    state = {"format": FORMAT, "package_version": __version__, "epoch": ckpt.epoch,
             "decoder_config": asdict(ckpt.decoder_config), "train_config": asdict(ckpt.train_config),
             "spec": asdict(ckpt.spec), "weights": ckpt.weights,
             "metrics": [r.to_dict() for r in ckpt.metrics],
             "decoder": ckpt.decoder_state, "optimizer": ckpt.optimizer_state, "rng": ckpt.rng,
             "source": ckpt.source, "versions": ckpt.versions or versions()}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint file.

    Args:
        path: A `.pt` file written by `save`.

    Returns:
        The checkpoint (tensors on the CPU).

    Raises:
        CachedsegError: For a file that is torn, foreign, or from an incompatible cachedseg.
    """
    path = Path(path)
    redo = "give the run folder or .pt file that `cachedseg train` wrote"
    if path.is_dir():
        raise CachedsegError(f"{path} is a folder, not a checkpoint file; {redo}")
    size = path.stat().st_size
    if size == 0:
        raise CachedsegError(f"{path} is empty (0 bytes): it was never fully written or copied; copy it again, or "
                             f"{redo}")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format: a zip archive
    if not zipped:
        raise CachedsegError(f"{path} is not a PyTorch file ({size} bytes, not the zip archive torch.save writes); "
                             f"{redo}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torn, truncated or foreign files all get one message
        raise CachedsegError(f"{path} is a damaged or foreign PyTorch file ({size} bytes; {load_failure(exc)}); "
                             f"copy it again, or {redo}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CachedsegError(f"{path} is a PyTorch file but not a cachedseg checkpoint; {redo}")
    try:
        known = {f.name for f in fields(TrainConfig)}
        ckpt = Checkpoint(decoder_config=DecoderConfig(**state["decoder_config"]),
                          train_config=TrainConfig(**{k: v for k, v in state["train_config"].items() if k in known}),
                          spec=StoreSpec.from_attrs(state["spec"]), weights=state["weights"], epoch=state["epoch"],
                          metrics=[EpochMetrics.from_dict(r) for r in state["metrics"]], decoder_state=state["decoder"],
                          optimizer_state=state.get("optimizer"), rng=state.get("rng"),
                          source=state.get("source", ""), versions=state.get("versions", {}))
    except (KeyError, TypeError) as exc:
        raise CachedsegError(f"{path} was written by cachedseg {state.get('package_version')} and lacks {exc}; "
                             f"use that version, or retrain with this one ({__version__})") from None
    try:  # cheap next to reading the file; every command that loads a checkpoint builds this decoder anyway
        ckpt.decoder()
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise CachedsegError(f"{path}: its decoder weights do not fit its {ckpt.decoder_config.name} decoder "
                             f"({first_line(exc)}); the file was changed after `cachedseg train` wrote it: {redo}"
                             ) from None
    return ckpt


def load_run(run: str | Path, which: str = "best") -> Checkpoint:
    """Load a run's checkpoint: `run` is a run folder (then `which` is `best` or `last`) or a `.pt` file.

    Raises:
        CachedsegError: If there is no such run or checkpoint, naming what is there instead.
    """
    return load(checkpoint_path(run, which))
