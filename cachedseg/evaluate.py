"""Score a trained run against the dataset's own label PNGs at their native resolution.

A run trained on windows (`extract --tile`) is scored per image on the stitched map: the windows blended as
`predict` blends them (at the run's GSD, then warped back), compared with the label raster (or the rasterised vector
labels) at its native resolution, strip by strip, so each pixel counts once whatever the overlap, and pixels
outside the map (nodata) not at all.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from cachedseg import checkpoint
from cachedseg.backbone import backbone_for, resolve_device
from cachedseg.classes import ClassSet
from cachedseg.data import preprocess_image
from cachedseg.dataset import SPLITS, Dataset, Sample, load_image, open_dataset
from cachedseg.errors import CachedsegError
from cachedseg.extract import stale_labels
from cachedseg.features import cached_source
from cachedseg.metrics import confusion, scores
from cachedseg.predict import batches, labels_over_views, raise_first_error, segment_batch, tta_views
from cachedseg.spec import check_spec
from cachedseg.store import FeatureStore


@dataclass(frozen=True)
class EvalResult:
    """Dataset-level scores of one run on one split.

    Attributes:
        confusion: Counts [K, K], rows true class, columns predicted.
        miou: Mean IoU over the classes that occur in the labels or the predictions (`averaged`).
        pixel_acc: Fraction of labelled pixels predicted right.
        iou: Per-class IoU (None where the class is absent from both labels and predictions).
        classes: The K classes (names, colours, ignore label): the run's.
        images: Number of images scored.
        differ: With `compare_live`: pixels whose cached and live predicted labels differ.
        pixels: With `compare_live`: pixels compared (every pixel of every label map).
        stale_labels: With a store: ids whose label file is not the one the store's mask was computed from
            (changed since `extract`; rerun it so training sees the new labels).
    """

    confusion: np.ndarray
    miou: float
    pixel_acc: float
    iou: list[float | None]
    classes: ClassSet
    images: int
    differ: int | None = None
    pixels: int | None = None
    stale_labels: tuple[str, ...] = ()

    @property
    def class_names(self) -> tuple[str, ...]:
        """The names of the K classes."""
        return self.classes.names

    @property
    def averaged(self) -> tuple[str, ...]:
        """The classes mIoU averages: those that occur in the labels or the predictions."""
        return tuple(name for name, iou in zip(self.class_names, self.iou) if iou is not None)

    def to_json(self) -> dict:
        """Everything, as plain JSON types."""
        out = {"miou": self.miou, "pixel_acc": self.pixel_acc, "images": self.images,
               "iou": dict(zip(self.class_names, self.iou)), "averaged": list(self.averaged),
               "class_names": list(self.class_names), "class_colors": [list(c) for c in self.classes.colors],
               "confusion": self.confusion.tolist(), "stale_labels": list(self.stale_labels)}
        if self.pixels is not None:
            out["agreement"] = {"differ": self.differ, "pixels": self.pixels,
                                "ratio": 1 - self.differ / self.pixels if self.pixels else 1.0}
        return out


def evaluate(run: str | Path, store: str | Path | None = None, data: str | Path | None = None, split: str = "val",
             weights: str | None = None, device: str = "auto", compare_live: bool = False, tta: bool = False,
             batch_size: int = 4, workers: int | None = None, progress: Callable[[int, int], None] | None = None,
             ckpt: checkpoint.Checkpoint | None = None) -> EvalResult:
    """Evaluate a run on cached features (`store`) or live from the images (`data`), at native label resolution.

    Args:
        run: The run folder (its best checkpoint) or a checkpoint file.
        store: A feature store; its recorded dataset gives the labels unless `data` is also given.
        data: An AeroScapes-layout folder; without `store`, features are computed live by the backbone.
        split: `trn` or `val`.
        weights: Backbone weights for live evaluation; by default those the run was trained with.
        device: `auto`, `cpu` or `cuda`.
        compare_live: With `store`: also run the backbone live on the same images and count the pixels whose
            predicted label differs between cached and live features (the identity check).
        tta: Average the logits of every view the features were cached in (cached: read; live: computed).
        batch_size: Images per forward pass.
        workers: DataLoader processes that decode labels and images (default: 0 on a CPU, min(4, CPUs) on a GPU).
        progress: Called as `progress(done, total)`.
        ckpt: The run's best checkpoint, if the caller has loaded it already (it is then not loaded again).

    Returns:
        The confusion matrix and the scores derived from it (and the agreement count with `compare_live`).

    Raises:
        CachedsegError: For a store that does not fit the run, a corrupt cached image, missing labels, or a
            mismatched backbone.
    """
    ckpt = ckpt or checkpoint.load_run(run)  # loaded once: a checkpoint can be large, or far away
    if store is None and data is None:  # the run's own features, resolved here so the stale-label check sees them
        store, data = trained_on(run, ckpt)
    if ckpt.spec.tiled:
        result = score_maps(run, store, data, split, weights, device, compare_live, tta, batch_size, progress, ckpt)
    else:
        result = score(predictions(run, store, data, split, weights, device, compare_live, tta, batch_size,
                                   workers, progress, ckpt=ckpt), ckpt.spec.classes, compare_live)
    return replace(result, stale_labels=tuple(stale_labels(store, split, data))) if store is not None else result


def score(predicted: Iterable[tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]],
          classes: ClassSet, compare_live: bool = False) -> EvalResult:
    """The scores of what `predictions` yields: the cached prediction where there is one, else the live one;
    with `compare_live`, also the pixels where the two differ."""
    k = len(classes)
    conf = torch.zeros(k, k, dtype=torch.long)
    differ = pixels = images = 0
    for _, labels, pred, live in predicted:
        if pred is not None and live is not None:
            differ, pixels = differ + int((pred != live).sum()), pixels + pred.size
        conf += confusion(torch.from_numpy(pred if pred is not None else live), torch.from_numpy(labels), k,
                          classes.ignore_index)
        images += 1
    s = scores(conf)
    return EvalResult(confusion=conf.numpy(), miou=s["miou"], pixel_acc=s["pixel_acc"], iou=s["iou"],
                      classes=classes, images=images,
                      differ=differ if compare_live else None, pixels=pixels if compare_live else None)


def score_maps(run: str | Path, store: str | Path | None = None, data: str | Path | None = None, split: str = "val",
               weights: str | None = None, device: str = "auto", compare_live: bool = False, tta: bool = False,
               batch_size: int = 4, progress: Callable[[int, int], None] | None = None,
               ckpt: checkpoint.Checkpoint | None = None) -> EvalResult:
    """Score a run trained on windows on the stitched maps of a split (see the module docstring): from the cached
    windows of a tiled `store`, or live from `data` (the backbone run on the windows), or both with
    `compare_live`. Arguments as for `evaluate`; `progress` counts windows."""
    from cachedseg.maps import map_labels
    from cachedseg.predict import cached_window_model, window_model
    from cachedseg.windows import open_image

    if split not in SPLITS:
        raise CachedsegError(f"--split {split!r}: use {' or '.join(SPLITS)}")
    if compare_live and store is None:
        raise CachedsegError("--compare-live compares cached with live predictions; give --store STORE too")
    ckpt = ckpt or checkpoint.load_run(run)
    spec, classes, nodata = ckpt.spec, ckpt.spec.classes, ckpt.spec.classes.ignore_index
    torch_device = resolve_device(device)
    decoder = ckpt.decoder().to(torch_device)
    views = tta_views(spec, tta)
    cache = None
    if store is not None:
        cache = FeatureStore.open(store)
        if not cache.spec.serves(spec) or not set(views) <= set(cache.spec.views):
            check_spec(store, cache.spec, spec, hint=f"the run {run} was trained on other features; evaluate it "
                       "with the store it was trained from, or with --data to run its backbone live")
        gone, tiles = cache.gone, cache.tiles()
        names = [g.image for g in cache.rasters]
        images = list(dict.fromkeys(names[int(k)] for (k, _, _), s, id_ in zip(tiles, cache.splits, cache.ids)
                                    if s == split and id_ not in gone))
        dataset = open_dataset(data or cache.dataset)
        if cache.attrs.split_blocks != dataset.block_rule():
            raise CachedsegError(f"the store {store} was split by blocks as {cache.attrs.split_blocks}, but "
                                 f"{dataset.reference} now says {dataset.block_rule()}; rerun `cachedseg extract` "
                                 "to follow it (only the masks are rewritten) and train again")
    else:
        dataset = open_dataset(data)
        images = [s.id for s in dataset.samples() if s.split == split or dataset.by_blocks]
    dataset.check_classes(classes, f"the run {run}")
    if not images:
        raise CachedsegError(f"the {split} split is empty")
    backbone = (backbone_for(spec, weights or ckpt.weights, torch_device, ckpt.decoder_config.layers)
                if store is None or compare_live else None)
    live = window_model(backbone, spec, decoder, views) if backbone is not None else None
    k = len(classes)
    conf = torch.zeros(k, k, dtype=torch.long)
    differ = pixels = 0
    windows_done = [0]

    def count(done: int, total: int) -> None:
        if progress:
            progress(windows_done[0] + done, windows_done[0] + total)
        if done == total:
            windows_done[0] += total
    for name in images:
        sample = Sample(name, split, dataset.image_path(name), dataset.mask_path(name))
        with contextlib.ExitStack() as opened:
            native = open_image(sample.image)
            opened.callback(native.close)
            truth = _label_rows(dataset, sample, native, opened)
            models = ([cached_window_model(cache, names.index(name), spec, decoder, views, torch_device)]
                      if cache is not None else []) + ([live] if live is not None else [])
            with tempfile.TemporaryDirectory(prefix="cachedseg-") as scratch:
                first = None
                if len(models) == 2:  # the cached labels, kept on disk (a byte a pixel) to compare with the live
                    first = np.lib.format.open_memmap(Path(scratch) / "cached.npy", mode="w+", dtype=np.uint8,
                                                      shape=(native.height, native.width))
                    map_labels(native, models[0], spec.tile_overlap, nodata, batch_size,
                               lambda y0, rows: first.__setitem__(slice(y0, y0 + len(rows)), rows), count,
                               spec.gsd, Path(scratch))

                def tally(y0: int, rows: np.ndarray) -> None:
                    nonlocal conf, differ, pixels
                    labels = truth(y0, len(rows))
                    labels[rows == nodata] = nodata  # outside the map: not scored
                    if dataset.by_blocks:  # only the split's own blocks
                        labels[~dataset.region(split, name, y0, 0, len(rows), native.width)] = nodata
                    pred = rows if first is None else first[y0:y0 + len(rows)]
                    conf += confusion(torch.from_numpy(np.where(pred == nodata, 0, pred)),
                                      torch.from_numpy(labels), k, nodata)
                    if first is not None:
                        inside = rows != nodata
                        differ, pixels = differ + int((pred[inside] != rows[inside]).sum()), pixels + int(inside.sum())
                map_labels(native, models[-1], spec.tile_overlap, nodata, batch_size, tally, count, spec.gsd,
                           Path(scratch))
    s = scores(conf)
    return EvalResult(confusion=conf.numpy(), miou=s["miou"], pixel_acc=s["pixel_acc"], iou=s["iou"],
                      classes=classes, images=len(images), differ=differ if compare_live else None,
                      pixels=pixels if compare_live else None)


def _label_rows(dataset: Dataset, sample: Sample, image,
                opened: contextlib.ExitStack) -> Callable[[int, int], np.ndarray]:
    """What gives rows y0:y0+n of an image's labels [n, W] at its native resolution: its label raster read by
    rows (closed with `opened`), its vector labels rasterised by rows, or its mask file decoded whole (frames)."""
    from affine import Affine

    from cachedseg.rasters import LabelReader, MapReader
    from cachedseg.windows import is_raster

    if dataset.vector_labels is not None:
        georef = getattr(image, "georeferenced", False)
        base = image.transform if georef else Affine.identity()
        return lambda y0, n: dataset.vector_labels.rasterize(base @ Affine.translation(0, y0), (n, image.width),
                                                             image.crs if georef else None)
    if not sample.mask.is_file():
        raise CachedsegError(f"{sample.mask} is missing; pass --data with the dataset the store was built from")
    if isinstance(image, MapReader) and is_raster(sample.mask):
        reader = LabelReader(sample.mask, image, lambda raw, known: dataset.decode_labels(raw, sample.mask, known),
                             3 if dataset.mask_encoding == "rgb" else 1)
        opened.callback(reader.close)
        every = np.ones((0, 0), dtype=bool)

        def rows(y0: int, n: int) -> np.ndarray:
            nonlocal every
            if every.shape != (n, image.width):
                every = np.ones((n, image.width), dtype=bool)
            return reader.window(y0, 0, n, image.width, every)
        return rows
    labels = dataset.read_labels(sample.mask)
    if labels.shape != (image.height, image.width):
        raise CachedsegError(f"{sample.mask} is {labels.shape[1]}x{labels.shape[0]} but its image is "
                             f"{image.width}x{image.height}; a mask must have its image's size")
    return lambda y0, n: labels[y0:y0 + n].copy()


def trained_on(run: str | Path, ckpt: checkpoint.Checkpoint | None = None) -> tuple[str | None, str | None]:
    """(store, data): the features a run was trained on, as its checkpoint (`ckpt`, if loaded already) records
    them (a store's path or URL, or `live:DATA`): what evaluate and report score when given neither --store nor
    --data."""
    from cachedseg.paths import exists

    source = (ckpt or checkpoint.load_run(run)).source
    if not source:
        raise CachedsegError(f"{run} does not record the features it was trained on; give --store STORE (cached "
                             "features) or --data DATA (live backbone)")
    if source.startswith("live:"):
        return None, source.removeprefix("live:")
    if not exists(source):
        raise CachedsegError(f"the store {source} that {run} was trained on is gone; pass --store with a copy, or "
                             "--data to run the backbone live")
    return source, None


def predictions(run: str | Path, store: str | Path | None = None, data: str | Path | None = None,
                split: str = "val", weights: str | None = None, device: str = "auto", compare_live: bool = False,
                tta: bool = False, batch_size: int = 4, workers: int | None = None,
                progress: Callable[[int, int], None] | None = None, ckpt: checkpoint.Checkpoint | None = None
                ) -> Iterator[tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """A run's predictions on a split, image by image: (id, labels, cached prediction, live prediction), each
    [H, W] at the labels' native size; the cached one with `store`, the live one without it or with
    `compare_live`. Arguments as for `evaluate`; `ckpt`: the run's best checkpoint, if loaded already."""
    if split not in SPLITS:
        raise CachedsegError(f"--split {split!r}: use {' or '.join(SPLITS)}")
    ckpt = ckpt or checkpoint.load_run(run)
    if store is None and data is None:
        store, data = trained_on(run, ckpt)
    if compare_live and store is None:
        raise CachedsegError("--compare-live compares cached with live predictions; give --store STORE too")
    torch_device = resolve_device(device)
    decoder = ckpt.decoder().to(torch_device)
    views = tta_views(ckpt.spec, tta)
    if store is not None:
        source = cached_source(store, data=data)
        if not source.spec.serves(ckpt.spec) or not set(views) <= set(source.spec.views):
            check_spec(store, source.spec, ckpt.spec, hint=f"the run {run} was trained on other features; evaluate "
                       "it with the store it was trained from, or with --data to run its backbone live")
        indices = source.indices(split)
        ids, dataset = [source.ids[i] for i in indices], open_dataset(source.data_root)
        cached = (str(store), indices, [source.spec.views.index(v) for v in views])
    else:
        dataset = open_dataset(data)
        ids, cached = [s.id for s in dataset.samples() if s.split == split], None
    dataset.check_classes(ckpt.spec.classes, f"the run {run}")
    if not ids:
        raise CachedsegError(f"the {split} split is empty")
    backbone = (backbone_for(ckpt.spec, weights or ckpt.weights, torch_device, ckpt.decoder_config.layers)
                if store is None or compare_live else None)
    items = _Scoring(ids, dataset, cached, backbone.preprocess if backbone else None)
    done = 0
    for batch in batches(items, batch_size, workers, torch_device):
        raise_first_error(batch)
        sizes = [item["labels"].shape for item in batch]
        preds = live = [None] * len(batch)
        if cached:
            preds = _cached_labels(decoder, torch.stack([item["features"] for item in batch]), views, sizes,
                                   torch_device)
        if backbone is not None:
            live = segment_batch(torch.stack([item["x"] for item in batch]), sizes, backbone, ckpt.spec, decoder,
                                 views)
        for item, pred, live_pred in zip(batch, preds, live):
            yield ids[item["n"]], item["labels"], pred, live_pred
        done += len(batch)
        if progress:
            progress(done, len(ids))


class _Scoring(torch.utils.data.Dataset):
    """What scoring one image needs, loaded in DataLoader workers: its native labels, and its cached features
    (the views asked for) or its preprocessed image, or both."""

    def __init__(self, ids: list[str], dataset: Dataset, cached: tuple | None, pp):
        self.ids, self.dataset, self.cached, self.pp = ids, dataset, cached, pp
        self._store = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, n: int) -> dict:
        try:
            labels = _labels(self.dataset, self.ids[n])  # [H, W] at native resolution
            item = {"n": n, "labels": labels}
            if self.cached:
                path, indices, views = self.cached
                self._store = self._store or FeatureStore.open(path)
                item["features"] = torch.stack([torch.from_numpy(self._store.read(indices[n], v)[0])
                                                for v in views])  # [V, L, C, h, w]
            if self.pp is not None:
                item["x"] = preprocess_image(_image(self.dataset, self.ids[n], labels.shape), self.pp)  # [3, H', W']
            return item
        except CachedsegError as exc:
            return {"n": n, "error": str(exc)}


@torch.no_grad()
def _cached_labels(decoder: torch.nn.Module, features: torch.Tensor, views: tuple[str, ...],
                   sizes: list[tuple[int, int]], device: torch.device) -> list[np.ndarray]:
    """Class indices [H, W] per image from cached features [B, V, L, C, h, w], averaging the views' logits mapped
    back to the frame."""
    features = features.to(device).float()
    return labels_over_views([decoder(features[:, v]) for v in range(len(views))], views, sizes)


def _labels(dataset: Dataset, id_: str) -> np.ndarray:
    """An image's label map [H, W] uint8 (class indices and the ignore label), checked."""
    path = dataset.mask_path(id_)
    if not path.is_file():
        raise CachedsegError(f"{path} is missing; pass --data with the dataset the store was built from")
    return dataset.sample_labels(Sample(id_, "", dataset.image_path(id_), path))


def _image(dataset: Dataset, id_: str, size: tuple[int, int]):
    """An image, checked to have its label map's size (H, W)."""
    path = dataset.image_path(id_)
    image = load_image(path)
    if (image.height, image.width) != tuple(size):
        raise CachedsegError(f"the label map of {id_} is {size[1]}x{size[0]} but {path} is "
                             f"{image.width}x{image.height}; a mask must have its image's size")
    return image
