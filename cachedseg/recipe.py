"""The training recipe, `TrainConfig`: the configuration of `cachedseg.train`'s loop, imported from there
(`from cachedseg.train import TrainConfig`). It has this small module of its own only so that `checkpoint.py`, which
rebuilds it when a checkpoint loads, need not import the training loop (which imports `checkpoint.py`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from cachedseg.errors import CachedsegError

LOSSES = ("ce", "dice-ce")
AUTO = "auto"  # `class_weights` to compute from the trn masks (resolved to numbers before training starts)
# The `auto` rule's bounds: a class of a millionth of the pixels is not worth a million of another's.
MIN_WEIGHT, MAX_WEIGHT = 0.1, 10.0


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
        loss: `ce` (cross-entropy) or `dice-ce` (cross-entropy plus soft Dice over the classes present in the
            batch; see `cachedseg.losses`). Both leave the ignore label out.
        class_weights: One weight per class for the loss, None (unweighted), or `auto` (computed from the trn
            pixel shares by `auto_class_weights`; a run records the resulting numbers, never `auto`).
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
    loss: str = "ce"
    class_weights: tuple[float, ...] | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.class_weights, list):  # read back from a checkpoint or sweep.json
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))

    def describe(self, cached_layers: int) -> str:
        """The recipe in words, with what each unset (None) setting meant for the run: `cached_layers` is how many
        layers its features held."""
        meant = {"layers": f"all ({cached_layers})" if self.layers is None else self.layers,
                 "data_seed": f"= seed ({self.seed})" if self.data_seed is None else self.data_seed,
                 "workers": "auto (0 on a CPU, min(4, CPUs) on a GPU)" if self.workers is None else self.workers,
                 "class_weights": weights_text(self.class_weights)}
        return ", ".join(f"{k} {meant.get(k, v)}" for k, v in asdict(self).items())


def train_options(config: TrainConfig) -> dict[str, object]:
    """A recipe as the `train` options that set it (names as in `train --help`, without dashes), for config.toml:
    class weights as the numbers used, so the run is reproduced without counting pixels again."""
    weights = config.class_weights
    return {"epochs": config.epochs, "lr": repr(config.lr), "batch_size": config.batch_size,
            "decoder": config.decoder, "layers": None if config.layers is None else str(config.layers),
            "seed": str(config.seed), "data_seed": config.data_seed, "decoder_precision": config.decoder_precision,
            "channels_last": config.channels_last, "compile": config.compile, "workers": config.workers,
            "loss": config.loss, "class_weights": "none" if weights is None else weights if isinstance(weights, str)
            else ",".join(repr(float(w)) for w in weights)}


def weights_text(weights: tuple[float, ...] | str | None) -> str:
    """Class weights in words: `none`, `auto` or `(w0, w1, ...)`."""
    if weights is None or isinstance(weights, str):
        return weights or "none"
    return "(" + ", ".join(f"{w:g}" for w in weights) + ")"


def parse_class_weights(text: str) -> tuple[float, ...] | str | None:
    """`--class-weights` as typed: `none` -> None, `auto` -> `auto`, `w0,w1,...` -> the numbers (`check_class_weights`
    checks them)."""
    text = text.strip()
    if text.lower() in ("none", AUTO):
        return None if text.lower() == "none" else AUTO
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise CachedsegError(f"--class-weights {text!r}: give none, auto, or one number per class, comma-separated "
                             "(e.g. 1,4,4,1)") from None
    check_class_weights(weights)
    return weights


def check_class_weights(weights: tuple[float, ...] | str | None, class_names: Sequence[str] | None = None) -> None:
    """Refuse class weights that are negative, not finite or all zero, or (given the class names) not one per class."""
    if weights is None or weights == AUTO:
        return
    if isinstance(weights, str):
        raise CachedsegError(f"class weights {weights!r}: give none, auto, or one number per class")
    shown = ",".join(f"{w:g}" for w in weights)
    if not all(0 <= w < math.inf for w in weights) or not any(weights):  # nan fails both comparisons
        raise CachedsegError(f"--class-weights {shown}: every weight must be finite and at least 0, and one above 0")
    if class_names is not None and len(weights) != len(class_names):
        raise CachedsegError(f"--class-weights {shown}: {len(weights)} weights for {len(class_names)} classes "
                             f"({', '.join(class_names)}); give one per class, in that order, or auto")


def auto_class_weights(pixels: Sequence[int]) -> tuple[float, ...]:
    """Class weights from the trn pixel counts: inverse square-root frequency, normalised, clipped.

    A class with share s of the labelled trn pixels (the ignore label left out) gets s^-1/2, scaled so that the trn
    pixels' mean weight is 1 (sum_c s_c w_c = 1: a weighted loss summed over those pixels and divided by their
    count keeps the unweighted loss's scale, so --lr means what it did), then clipped to [MIN_WEIGHT, MAX_WEIGHT]
    and rounded to 4 significant digits (the numbers recorded are the numbers used). The square root is the milder
    of the usual inverse-frequency rules: a class 100 times rarer weighs 10 times more, not 100. A class with no trn
    pixels gets 1, the mean (it has no pixel to weigh in the cross-entropy, nor in the Dice term).

    Args:
        pixels: Labelled trn pixels of each class, in class order.

    Returns:
        One weight per class.

    Raises:
        CachedsegError: If no pixel is labelled.
    """
    total = sum(pixels)
    if total <= 0:
        raise CachedsegError("--class-weights auto: the trn masks hold no labelled pixel (all are the ignore label); "
                             "check the masks, or give the weights")
    norm = sum(math.sqrt(n / total) for n in pixels)  # the trn pixels' mean of s^-1/2
    return tuple(float(f"{min(max(1 / (math.sqrt(n / total) * norm), MIN_WEIGHT), MAX_WEIGHT):.4g}") if n else 1.0
                 for n in pixels)
