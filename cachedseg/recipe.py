"""The training recipe, `TrainConfig`: the configuration of `cachedseg.train`'s loop, imported from there
(`from cachedseg.train import TrainConfig`). It has this small module of its own only so that `checkpoint.py`, which
rebuilds it when a checkpoint loads, need not import the training loop (which imports `checkpoint.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe: the seed design's (Adam 1e-4, 11 epochs, batch 2), with the best measured decoder.

    Attributes:
        epochs: Passes over the trn images.
        lr: Adam learning rate.
        batch_size: Images per step.
        decoder: Decoder name (`seed`, `upconv`, `linear` or `conv`).
        layers: How many of the last cached layers the decoder reads (None: all the features hold).
        seed: Seeds the decoder's initialisation and (unless `data_seed` is given) the shuffling and view draws,
            identically for cached and live runs.
        data_seed: Seeds the shuffling and view draws on its own (heads trained in one pass share it).
        decoder_precision: `float32`, or `bfloat16` autocast for the decoder's forward pass (for GPUs).
        channels_last: Run the decoder in channels-last memory layout (faster convolutions on GPUs).
        compile: Compile the decoder with `torch.compile` (pays off on long GPU runs).
        workers: DataLoader worker processes (None: 0 on a CPU, where reads are cheap next to the decoder and
            workers only compete for cores; min(4, CPUs) on a GPU).
    """

    epochs: int = 11
    lr: float = 1e-4
    batch_size: int = 2
    decoder: str = "conv"
    layers: int | None = None
    seed: int = 0
    data_seed: int | None = None
    decoder_precision: str = "float32"
    channels_last: bool = False
    compile: bool = False
    workers: int | None = None

    def describe(self, cached_layers: int) -> str:
        """The recipe in words, with what each unset (None) setting meant for the run: `cached_layers` is how many
        layers its features held."""
        meant = {"layers": f"all ({cached_layers})" if self.layers is None else self.layers,
                 "data_seed": f"= seed ({self.seed})" if self.data_seed is None else self.data_seed,
                 "workers": "auto (0 on a CPU, min(4, CPUs) on a GPU)" if self.workers is None else self.workers}
        return ", ".join(f"{k} {meant.get(k, v)}" for k, v in asdict(self).items())
