"""The whole pipeline on generated data, as `cachedseg demo` runs it: synth -> extract -> train -> evaluate ->
predict -> report, all in one folder.

    demo/
        data/               the generated dataset (kept: a rerun reuses it)
        features.zarr       its features (rebuilt each time: the options, or the weights the hub gave, may differ)
        run/                the decoder trained on them (replaced each time)
        evaluation.json     its val scores at native label resolution
        predictions/        label, colour and overlay PNGs of the first val images

Light at import (the stages import what they run): the CLI reads `DEMO_SHORT_SIDE` for its help before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachedseg.backbone_config import DEFAULT_BACKBONE, BackboneConfig
from cachedseg.errors import CachedsegError

if TYPE_CHECKING:
    from cachedseg.evaluate import EvalResult
    from cachedseg.extract import ExtractResult
    from cachedseg.features import FeatureSource
    from cachedseg.predict import Predictions
    from cachedseg.runs import EpochMetrics
    from cachedseg.train import TrainConfig

DEMO_SHORT_SIDE = 224  # the demo's default input: a CPU runs the whole demo in minutes
STAGES = ("synth", "extract", "train", "evaluate (native label resolution)", "predict", "report")
FRAME = (1280, 720)  # generated frames (width, height), as AeroScapes'
PREDICTED = 4  # val images that predict segments


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings.

    Attributes:
        count: Generated images (a quarter go to val).
        backbone: The timm DINOv2 model.
        image_size: `--image-size` as typed (one side or WIDTH x HEIGHT), or None.
        short_side: The input's short side (None: `DEMO_SHORT_SIDE`, unless `image_size` is given).
        layers: How many of the last blocks' tokens the store caches.
        views: The cached views (see `cachedseg.views`).
        decoder: The decoder trained.
        epochs: Training epochs.
        weights: `auto` (pretrained, else random when they cannot be had), `random`, or a weights file.
        device: `auto`, `cpu` or `cuda`.
    """

    count: int = 32
    backbone: str = DEFAULT_BACKBONE
    image_size: str | None = None
    short_side: int | None = None
    layers: int = 1
    views: tuple[str, ...] = ("identity",)
    decoder: str = "conv"
    epochs: int = 11
    weights: str = "auto"
    device: str = "auto"


@dataclass(frozen=True)
class DemoResult:
    """What a demo made.

    Attributes:
        weights: The backbone weights used (`random` where `auto` found none).
        backbone: The backbone's config, its input size filled in.
        rows: The training's metrics, one row per epoch.
        evaluation: The val scores at native label resolution.
        predictions: The images predict segmented, with the files it wrote.
        run: The run folder.
        report: The report's HTML file.
    """

    weights: str
    backbone: BackboneConfig
    rows: list[EpochMetrics]
    evaluation: EvalResult
    predictions: Predictions
    run: Path
    report: Path


class DemoSteps:
    """How the demo runs its stages: these defaults call the library and show nothing; the CLI overrides them to
    show progress and each stage's summary. Each stage method takes the library function's arguments."""

    def stage(self, number: int, title: str) -> None:
        """Stage `number` (from 1, of len(STAGES)) begins."""

    def fallback(self, reason: str) -> None:
        """`weights='auto'` found no pretrained weights (`reason` says why): the demo goes on with random ones."""

    def reuse(self, data: Path) -> None:
        """The dataset of an earlier demo is there: it is reused, not generated again."""

    def synth(self, out: Path, count: int, width: int, height: int, seed: int) -> Any:
        """Generate the dataset (`cachedseg.synth.synthesize`)."""
        from cachedseg.synth import synthesize
        return synthesize(out, count=count, width=width, height=height, seed=seed)

    def extract(self, data: Path, store: Path, backbone: BackboneConfig, **options) -> ExtractResult:
        """Build the store (`cachedseg.extract.extract`)."""
        from cachedseg.extract import extract
        return extract(data, store, backbone, **options)

    def train(self, source: FeatureSource, run: Path, config: TrainConfig, device) -> list[EpochMetrics]:
        """Train the decoder (`cachedseg.train.train`)."""
        from cachedseg.train import train
        return train(source, run, config, device)

    def evaluate(self, run: Path, json_out: Path, **options) -> EvalResult:
        """Score the run (`cachedseg.evaluate.evaluate`) and write the scores to `json_out`."""
        import json

        from cachedseg.evaluate import evaluate
        result = evaluate(run, **options)
        json_out.write_text(json.dumps(result.to_json(), indent=2))
        return result

    def predict(self, images: list[Path], run: Path, out: Path, **options) -> Predictions:
        """Segment `images` (`cachedseg.predict.predict`)."""
        from cachedseg.predict import predict
        return predict(images, run, out, **options)

    def report(self, run: Path, device: str) -> Path:
        """Write the run's report (`cachedseg.report.report`)."""
        from cachedseg.report import report
        return report(run, device=device)


def demo(out: str | Path, config: DemoConfig = DemoConfig(), steps: DemoSteps = DemoSteps()) -> DemoResult:
    """Run the whole pipeline on generated data in the folder `out` (see the module docstring).

    Args:
        out: The demo's folder; a dataset an earlier demo generated there is reused.
        config: The settings.
        steps: How each stage runs and what it shows (the defaults: quietly).

    Returns:
        What the demo made.

    Raises:
        CachedsegError: As the stages do (a bad device, backbone, size or decoder, ...).
    """
    import shutil

    from cachedseg import backbone
    from cachedseg.dataset import Dataset, open_dataset
    from cachedseg.features import cached_source
    from cachedseg.store import is_store
    from cachedseg.train import TrainConfig

    out = Path(out)
    data, store, run, predictions = out / "data", out / "features.zarr", out / "run", out / "predictions"
    torch_device = backbone.resolve_device(config.device)
    weights = config.weights
    if weights == "auto":
        try:
            backbone.pretrained_file(config.backbone)  # probed before any work, without building the model
        except CachedsegError as exc:
            steps.fallback(str(exc))
            weights = "random"
    steps.stage(1, STAGES[0])
    if not Dataset(data).split_file("val").is_file():
        steps.synth(data, config.count, *FRAME, 0)
    else:
        steps.reuse(data)
    steps.stage(2, STAGES[1])
    short_side = config.short_side or (None if config.image_size else DEMO_SHORT_SIDE)
    bcfg = backbone.config_from_options(config.backbone, data, config.image_size, short_side, "float32",
                                        config.layers)
    # the demo's own store is rebuilt each time: its options (or the weights the hub gave) may have changed
    steps.extract(data, store, bcfg, weights=weights, dtype="float16", batch_size=4, device=config.device,
                  overwrite=is_store(store), views=config.views)
    steps.stage(3, STAGES[2])
    if run.exists():
        shutil.rmtree(run)  # the demo's own previous run
    rows = steps.train(cached_source(store), run, TrainConfig(epochs=config.epochs, decoder=config.decoder),
                       torch_device)
    steps.stage(4, STAGES[3])
    evaluation = steps.evaluate(run, json_out=out / "evaluation.json", store=store, split="val", device=config.device)
    steps.stage(5, STAGES[4])
    dataset = open_dataset(data)
    val_images = [dataset.image_path(i) for i in dataset.ids("val")[:PREDICTED]]
    written = steps.predict(val_images, run, predictions, device=config.device)
    steps.stage(6, STAGES[5])
    page = steps.report(run, config.device)
    return DemoResult(weights, bcfg, rows, evaluation, written, run, page)
