"""Live inference: image -> shared preprocessing -> backbone -> cast to the cache dtype -> decoder -> labels.

`evaluate --data` and `predict` both go through `segment_batch`, batching images in the order given, so for the
same images in the same order and batch size their labels are the same by construction.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cachedseg import __version__, checkpoint, distributed
from cachedseg.backbone import Backbone, backbone_for, resolve_device
from cachedseg.data import preprocess_image
from cachedseg.dataset import MAX_PIXELS, load_image, own_pixel_limit, upright_size
from cachedseg.errors import CachedsegError
from cachedseg.map_outputs import PolygonOptions
from cachedseg.maps import WindowModel, predict_map, tiled_labels
from cachedseg.paths import check_images
from cachedseg.pictures import legend_strip, picture_rows, present_classes
from cachedseg.rasters import TIFF_SUFFIXES, is_map, map_size
from cachedseg.spec import StoreSpec
from cachedseg.store import DONE, FLAG_NAMES, FeatureStore
from cachedseg.tiles import Grid, check_overlap, default_overlap
from cachedseg.views import apply_view
from cachedseg.workers import default_workers

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
KINDS = ("label", "color", "overlay")  # the PNGs written per image, <stem>_<kind>.png
SOFTWARE = f"cachedseg {__version__}"  # the text chunk marking every PNG cachedseg writes


# Logits resized to a frame [K, H, W] of up to this many float32 bytes are made whole (a 1280x720 frame with 12
# classes: 44 MB); larger ones (a 96 MP frame's would be 4.6 GB) go a band of BAND_BYTES at a time.
WHOLE_BYTES = 64 * 2**20
BAND_BYTES = 8 * 2**20


def _taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Bilinear taps from n_in to n_out samples (align_corners=False), as PyTorch's kernels compute them (scale
    n_in/n_out in float32, source coordinate in float64, then float32): first and second source index, and their
    float32 weights, each [n_out]."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32), np.float32(0))
    first = src.astype(np.int64)  # floor, as src >= 0
    second = np.minimum(first + 1, n_in - 1)
    w_second = src - first.astype(np.float32)
    w_first = np.float32(1) - w_second
    return tuple(torch.from_numpy(a).to(device) for a in (first, second, w_first, w_second))


def _across(x: torch.Tensor, lo: int, hi: int, width: int) -> torch.Tensor:
    """Logit rows lo:hi of [K, Mh, Mw] resized along the width only [K, hi - lo, W]: PyTorch's own kernel, whose
    row weights are then exactly 1 and 0, so each row comes out the same whatever band it is part of."""
    return F.interpolate(x[None, :, lo:hi], size=(hi - lo, width), mode="bilinear", align_corners=False)[0]


def resized_rows(x: torch.Tensor, row_taps: tuple, width: int, y0: int, y1: int) -> torch.Tensor:
    """Rows y0:y1 [K, y1 - y0, W] of logits [K, Mh, Mw] resized bilinearly to `width` and the rows of `row_taps`
    (see `_taps`), from the logit rows under them only. Every output value is computed elementwise from the same
    two rows whatever the band, so the result does not depend on how a frame is cut into bands."""
    rows, rows2, row_w, row_w2 = row_taps
    lo, hi = int(rows[y0]), int(rows2[y1 - 1]) + 1  # the logit rows this band reads (indices rise with y)
    across = _across(x, lo, hi, width)  # [K, n, W]
    return across[:, rows[y0:y1] - lo] * row_w[y0:y1, None] + across[:, rows2[y0:y1] - lo] * row_w2[y0:y1, None]


def labels_from_logits(logits: torch.Tensor, size: tuple[int, int], whole_bytes: int = WHOLE_BYTES,
                       band_bytes: int = BAND_BYTES) -> np.ndarray:
    """Logits [1, K, Mh, Mw] -> class indices [H, W] uint8 at `size` (H, W): bilinear resize (align_corners=False),
    then argmax. Up to `whole_bytes` of resized logits the whole frame at once; above, a band of output rows at a
    time from the logit rows under it, so that no [K, H, W] tensor is made (peak memory: the labels and a few
    `band_bytes`). The banded values are PyTorch's resize up to float32 rounding (its kernels combine the two
    row taps in an order and rounding of their own, which differs by CPU), so labels agree with a whole-frame
    resize but at near-ties;
    they do not depend on the band size, and every command (predict, evaluate, cached or live) takes the same
    path for the same frame size."""
    x = logits[0].float()  # [K, Mh, Mw]
    k, height, width = x.shape[0], int(size[0]), int(size[1])
    if k == 1:
        return np.zeros((height, width), dtype=np.uint8)  # the argmax of one class
    if 4 * k * height * width <= whole_bytes:
        whole = F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False)  # [1, K, H, W]
        return whole.argmax(1)[0].to(torch.uint8).cpu().numpy()
    taps = _taps(x.shape[1], height, x.device)
    labels = np.empty((height, width), dtype=np.uint8)
    step = max(1, band_bytes // (4 * k * width))
    for y0 in range(0, height, step):
        y1 = min(height, y0 + step)
        labels[y0:y1] = resized_rows(x, taps, width, y0, y1).argmax(0).to(torch.uint8).cpu().numpy()
    return labels  # [H, W]


def mean_over_views(logits: list[torch.Tensor], views: tuple[str, ...]) -> torch.Tensor:
    """Logits [B, K, Mh, Mw] computed in each view -> their mean [B, K, Mh, Mw] in the original frame
    (test-time augmentation)."""
    total = apply_view(logits[0], views[0])
    for view_logits, view in zip(logits[1:], views[1:]):
        total = total + apply_view(view_logits, view)
    return total / len(views)  # [B, K, Mh, Mw]


def labels_over_views(logits: list[torch.Tensor], views: tuple[str, ...],
                      sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Logits [B, K, Mh, Mw] computed in each view -> class indices [H, W] per image at its size (H, W), from the
    views' mean in the original frame (test-time augmentation)."""
    mean = mean_over_views(logits, views)  # [B, K, Mh, Mw]
    return [labels_from_logits(mean[i:i + 1], size) for i, size in enumerate(sizes)]


def tta_views(spec: StoreSpec, tta: bool) -> tuple[str, ...]:
    """The views to average: all the features' views with `tta`, else the identity only."""
    if tta and len(spec.views) == 1:
        raise CachedsegError("--tta averages over the cached views, but these features have only the identity "
                             "view; extract with --views flip (and train on that store) to use it")
    return spec.views if tta else ("identity",)


@torch.no_grad()
def view_logits(x: torch.Tensor, backbone: Backbone, spec: StoreSpec, decoder: torch.nn.Module,
                views: tuple[str, ...] = ("identity",)) -> list[torch.Tensor]:
    """Decoder logits [B, K, Mh, Mw] in each of `views` for a batch of preprocessed images [B, 3, H', W'], each
    computed as extraction computes it (features cast to the cache dtype)."""
    device = next(backbone.parameters()).device
    return [decoder.to(device)(feats) for feats in view_features(x, backbone, spec, views)]  # [B, K, Mh, Mw] each


@torch.no_grad()
def view_features(x: torch.Tensor, backbone: Backbone, spec: StoreSpec,
                  views: tuple[str, ...] = ("identity",)) -> list[torch.Tensor]:
    """Features [B, L, C, h, w] in each of `views` for a batch of preprocessed images, as extraction computes and
    caches them (cast to the cache dtype), in float32."""
    x = x.to(next(backbone.parameters()).device, non_blocking=True)
    return [backbone(apply_view(x, view)).to(getattr(torch, spec.dtype)).float() for view in views]


def segment_batch(x: torch.Tensor, sizes: list[tuple[int, int]], backbone: Backbone, spec: StoreSpec,
                  decoder: torch.nn.Module, views: tuple[str, ...] = ("identity",)) -> list[np.ndarray]:
    """Class indices [H, W] at each size (H, W) for a batch of preprocessed images [B, 3, H', W'], averaging the
    logits of `views` (each computed as extraction computes it, then mapped back to the frame)."""
    return labels_over_views(view_logits(x, backbone, spec, decoder, views), views, sizes)


def window_model(backbone: Backbone, spec: StoreSpec, decoder: torch.nn.Module,
                 views: tuple[str, ...] = ("identity",)) -> WindowModel:
    """Sliding-window prediction (`cachedseg.maps`) with the same steps as `segment_batch`: each window, at the
    backbone's input size already, preprocessed by `preprocess_image` (no resize), the views' mean logits resized
    bilinearly to the window as `labels_from_logits` resizes a frame, then softmax: class probabilities to blend."""
    pp, device = backbone.preprocess, next(backbone.parameters()).device

    def prepare(pixels: np.ndarray) -> torch.Tensor:
        return preprocess_image(Image.fromarray(pixels), pp)  # [3, h, w]

    def run(x: torch.Tensor) -> torch.Tensor:
        return decoded_windows(view_features(x, backbone, spec, views), decoder.to(device), views, spec.input_size)

    return WindowModel(tuple(pp.image_size), len(spec.class_names), prepare, run, device)


@torch.no_grad()
def decoded_windows(features: list[torch.Tensor], decoder: torch.nn.Module, views: tuple[str, ...],
                    size: tuple[int, int]) -> torch.Tensor:
    """Windows' features [B, L, C, h, w] in each view -> class probabilities [B, K, H, W] (`window_probabilities`),
    the decoder run one window at a time: its activations at the output resolution (the largest buffers of a map's
    prediction) then do not grow with the batch, and a window's result does not depend on its batch."""
    return torch.cat([window_probabilities([decoder(f[i:i + 1]) for f in features], views, size)
                      for i in range(len(features[0]))])


def window_probabilities(logits: list[torch.Tensor], views: tuple[str, ...], size: tuple[int, int]) -> torch.Tensor:
    """A batch of windows' logits [B, K, Mh, Mw] in each view -> class probabilities [B, K, h, w] at the window's
    `size`: the views' mean in the window's frame, resized bilinearly as `labels_from_logits` resizes a frame, then
    softmax."""
    mean = mean_over_views(logits, views).float()  # [B, K, Mh, Mw]
    probs = F.interpolate(mean, size=tuple(size), mode="bilinear", align_corners=False)  # [B, K, h, w]
    # softmax in place: this is the largest buffer of a batch (4 x 12 x 518 x 518 float32: 51 MB)
    probs -= probs.amax(1, keepdim=True)
    return probs.exp_().div_(probs.sum(1, keepdim=True))


def cached_window_model(cache: FeatureStore, raster: int, spec: StoreSpec, decoder: torch.nn.Module,
                        views: tuple[str, ...], device: torch.device) -> WindowModel:
    """Sliding-window prediction of the image `cache.rasters[raster]` from its windows' cached features: no
    backbone, only the decoder; otherwise the steps of `window_model` (the identity guarantee holds window by
    window). Windows are looked up by their position in the image's grid."""
    tiles, flags = cache.tiles(), cache.flags()
    where = {(int(y), int(x)): i for i, (k, y, x) in enumerate(tiles) if k == raster}
    view_index = [cache.spec.views.index(v) for v in views]
    decoder = decoder.to(device)
    name = cache.rasters[raster].image

    def load(y: int, x: int) -> torch.Tensor:
        i = where.get((y, x))
        if i is None or flags[i] != DONE:
            raise CachedsegError(f"the store {cache.path} holds no features for the window at row {y}, column {x} "
                                 f"of {name!r} ({'none' if i is None else FLAG_NAMES[flags[i]]}); rerun the "
                                 "`cachedseg extract` that built it")
        return torch.stack([torch.from_numpy(cache.read(i, v)[0]) for v in view_index])  # [V, L, C, h, w]

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device).float()  # [B, V, L, C, h, w], as training reads the cache
        return decoded_windows([x[:, v] for v in range(len(views))], decoder, views, spec.input_size)

    return WindowModel(tuple(spec.input_size), len(spec.class_names), None, run, device, load)


def segment(image: Image.Image, backbone: Backbone, spec: StoreSpec, decoder: torch.nn.Module,
            size: tuple[int, int] | None = None, views: tuple[str, ...] = ("identity",)) -> np.ndarray:
    """Class indices [H, W] for one RGB image, at its own size unless `size` (H, W) is given."""
    x = preprocess_image(image, backbone.preprocess)[None]  # [1, 3, H', W']
    return segment_batch(x, [size or (image.height, image.width)], backbone, spec, decoder, views)[0]


class ImageFiles(torch.utils.data.Dataset):
    """Images decoded and preprocessed in DataLoader workers: the backbone's input and the image itself."""

    def __init__(self, paths: list[Path], pp):
        self.paths, self.pp = paths, pp

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, n: int) -> dict:
        try:
            image = load_image(self.paths[n])
        except CachedsegError as exc:
            return {"n": n, "error": str(exc)}
        return {"n": n, "x": preprocess_image(image, self.pp), "image": image}


def batches(dataset: torch.utils.data.Dataset, batch_size: int, workers: int | None,
            device: torch.device) -> torch.utils.data.DataLoader:
    """Batches (lists of items) of `dataset` in order, loaded by `workers` processes (default: `default_workers`,
    none on a CPU, where the backbone dwarfs decoding, min(4, CPUs) on a GPU)."""
    if batch_size < 1:
        raise CachedsegError("--batch-size must be at least 1")
    if workers is not None and workers < 0:
        raise CachedsegError(f"--workers {workers}: give 0 (decode in this process) or more")
    if workers is None:
        workers = default_workers(device, "predict")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list)


def raise_first_error(items: list[dict]) -> None:
    """Raise the first error a worker reported."""
    for item in items:
        if "error" in item:
            raise CachedsegError(item["error"])


def _save_png_rows(bands: Iterable[np.ndarray], width: int, height: int, path: Path) -> None:
    """Write an 8-bit RGB PNG from bands of rows [r, width, 3] (`height` rows in all), streaming: as `_save_png`,
    but without the whole picture in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"tEXt", b"Software\0" + SOFTWARE.encode("latin-1")))
        packer, previous, rows = zlib.compressobj(6), np.zeros((1, width * 3), np.uint8), 0
        for band in bands:
            band = np.ascontiguousarray(band, dtype=np.uint8).reshape(len(band), width * 3)
            # filter 2 ("up"): each row minus the one above it, modulo 256, which compresses flat areas well
            up = band - np.concatenate([previous, band[:-1]])
            f.write(chunk(b"IDAT", packer.compress(np.hstack([np.full((len(band), 1), 2, np.uint8), up]).tobytes())))
            previous, rows = band[-1:], rows + len(band)
        f.write(chunk(b"IDAT", packer.flush()) + chunk(b"IEND", b""))
    if rows != height:
        tmp.unlink()
        raise AssertionError(f"{rows} rows written for a {height}-row PNG")
    os.replace(tmp, path)


def find_images(inputs: list[str | Path]) -> tuple[list[Path], list[Path]]:
    """The images to predict among `inputs` (files and folders), sorted within each folder, and the files left out
    as cachedseg's own outputs (see `own_outputs`)."""
    check_images(inputs)
    found: list[Path] = []
    for item in map(Path, inputs):
        found += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if item.is_dir() else [item]
    outputs = own_outputs(found)
    images = [p for p in found if p not in outputs]
    if not images:
        raise CachedsegError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, inputs))}"
                             + (f": the {len(outputs)} PNG file(s) there are predictions cachedseg wrote, which are "
                                "never inputs; give the original images" if outputs else ""))
    return images, [p for p in found if p in outputs]


def own_outputs(paths: list[Path]) -> set[Path]:
    """The files among `paths` that cachedseg wrote: PNGs whose text chunk says so (`_save_png` marks every PNG it
    writes), label rasters `<stem>_label.tif` whose Software tag says so, and, for PNGs written before the mark,
    `<stem>_label/_color/_overlay.png` next to an image `<stem>.*` or with all three of them there."""
    outputs: set[Path] = set()
    listed: dict[Path, set[str]] = {}  # folder -> its file names, lower case
    for path in paths:
        if path.suffix.lower() in TIFF_SUFFIXES:
            if path.stem.lower().endswith("_label") and _written_tiff(path):
                outputs.add(path)
            continue
        if path.suffix.lower() != ".png":
            continue
        stem, _, kind = path.stem.lower().rpartition("_")
        if path.parent not in listed:
            listed[path.parent] = {n.lower() for n in os.listdir(path.parent)}
        names = listed[path.parent]
        if kind in KINDS and stem and (any(stem + suffix in names for suffix in IMAGE_SUFFIXES)
                                       or all(f"{stem}_{k}.png" in names for k in KINDS)):
            outputs.add(path)
            continue
        try:
            with own_pixel_limit(), Image.open(path) as png:  # the header only: PIL's bomb warning has no say
                if str(png.info.get("Software", "")).startswith(SOFTWARE.split()[0]):
                    outputs.add(path)
        except (OSError, ValueError, SyntaxError):
            pass  # not readable: loading it says so
    return outputs


def _written_tiff(path: Path) -> bool:
    """Whether a TIFF is a label raster cachedseg wrote (its Software tag says so; the header only is read)."""
    try:
        with own_pixel_limit(), Image.open(path) as tiff:
            return str(getattr(tiff, "tag_v2", {}).get(305, "")).startswith(SOFTWARE.split()[0])
    except (OSError, ValueError, SyntaxError):
        return False  # not readable: loading it says so


def _check_names(paths: list[Path]) -> None:
    """Refuse inputs whose outputs would overwrite each other (same file name in different folders)."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        by_stem[path.stem].append(path)
    clashes = [group for group in by_stem.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(" and ".join(map(str, group)) for group in clashes[:3])
        raise CachedsegError(f"{sum(map(len, clashes))} inputs share a file name, so their outputs would overwrite "
                             f"each other ({shown}); predict them in separate calls with different --out folders")


def _save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG marked as cachedseg's (so that it is never taken for an input) through a temporary file, so a
    kill never leaves a half-written one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    info = PngInfo()
    info.add_text("Software", SOFTWARE)
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Prediction:
    """The files written for one input image, and whether they replaced files already there."""

    image: Path
    label: Path
    color: Path
    overlay: Path
    replaced: bool = False


class Predictions(list):
    """The `Prediction`s of a `predict` call in input order (a list), and `left_out`: the input files left out as
    cachedseg's own outputs (see `own_outputs`)."""

    def __init__(self, written: list[Prediction], left_out: list[Path]):
        super().__init__(written)
        self.left_out = left_out


def _write_pngs(path: Path, image: Image.Image, labels: np.ndarray, out: Path, classes) -> Prediction:
    """Write a frame's label, colour and overlay PNGs (the pictures a band of rows at a time)."""
    files = [out / f"{path.stem}_{kind}.png" for kind in KINDS]
    pred = Prediction(path, *files, replaced=any(f.exists() for f in files))
    _save_png(Image.fromarray(labels, mode="L"), pred.label)
    strip = legend_strip(labels.shape[1], present_classes(labels), classes)
    size = labels.shape[1], labels.shape[0] + strip.height
    _save_png_rows(picture_rows(labels, classes, strip), *size, pred.color)
    _save_png_rows(picture_rows(labels, classes, strip, image), *size, pred.overlay)
    return pred


def _frame_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of a frame upright (EXIF orientation applied), from its header; None if unreadable (loading
    it then says so)."""
    try:
        width, height = upright_size(path)
    except CachedsegError:
        return None
    return height, width


def _refuse_whole(frames: list[Path]) -> None:
    """Refuse frames too large to predict whole (over MAX_PIXELS, from their headers), pointing to --tile."""
    for path in frames:
        size = _frame_size(path)
        if size and size[0] * size[1] > MAX_PIXELS:
            raise CachedsegError(f"{path} is {size[1]}x{size[0]}, over {MAX_PIXELS // 10**6} megapixels, too large "
                                 "to predict whole; pass --tile to predict it by sliding windows")


def predict(images: list[str | Path], run: str | Path | None, out: str | Path = "predictions", weights: str | None = None,
            device: str = "auto", tta: bool = False, batch_size: int = 4, workers: int | None = None,
            progress: Callable[[int, int], None] | None = None, tile: bool = False, tile_overlap: int | None = None,
            polygons: PolygonOptions | None = None,
            window_progress: Callable[[int, int], None] | None = None, store: str | Path | None = None,
            model: str | Path | None = None) -> Predictions:
    """Segment images with a trained run: a frame gets a label, a colour and an overlay PNG; a map (a GeoTIFF with a
    CRS, or over MAX_PIXELS, or any TIFF with `tile`) is predicted by sliding windows into a label COG
    `<stem>_label.tif` (`cachedseg.maps`). Files that cachedseg wrote (earlier predictions, say in the output folder
    itself) are left out of the inputs.

    A run trained on windows (`extract --tile`) predicts every input by sliding windows of its tiling: its input
    size, overlap and GSD. With `store`, the images are predicted from the windows' cached features in that tiled
    store, without the backbone: the same labels as live, as the identity guarantee says.

    Under torchrun the frames are shared out among the ranks, and each map's windows are split over all of them;
    rank 0 writes each map's files (`out` must be a folder every rank sees).

    Args:
        images: Image files and folders of images.
        run: The run folder (its best checkpoint) or a checkpoint file.
        out: Output folder.
        weights: Backbone weights (`auto`, a file, or `random`); by default those the run was trained with.
            They must give the fingerprint the run was trained on.
        device: `auto`, `cpu` or `cuda`.
        tta: Average the logits of every view the run's features were cached in (e.g. flipped).
        batch_size: Images (or windows) per backbone forward pass.
        workers: DataLoader processes that decode whole frames (default: 0 on a CPU, min(4, CPUs) on a GPU).
        progress: Called as `progress(done, total)` in images.
        tile: Predict frames by sliding windows too (pixels as they are, no resize; their PNGs as ever), and take
            every TIFF as a map. Without it a frame is resized whole to the backbone's input (unless the run is
            tiled).
        tile_overlap: Pixels shared by neighbouring windows (default: the run's tiling, else an eighth of the
            window, in whole patches).
        polygons: Also write `<stem>.gpkg` for each map, with these options.
        window_progress: Called as `window_progress(done, total)` in windows, for each map or tiled frame.
        store: A tiled feature store holding every input image: predict from its cached windows.
        model: Instead of `run`, an ONNX graph `cachedseg export` wrote: predict with onnxruntime (frames resized
            whole go through the graph at its input size and its probabilities are resized back to the frame).

    Returns:
        The files written, per image in input order (a `Prediction` per frame, a `cachedseg.maps.MapPrediction` per
        map; `replaced` tells which overwrote an earlier prediction's files), and in `left_out` the inputs left
        out as cachedseg's own outputs.

    Raises:
        CachedsegError: For missing inputs, inputs whose outputs would collide, an unreadable image or raster, a
            frame over MAX_PIXELS without `tile`, a bad overlap, a backbone that does not match the run, or a store
            that does not hold the inputs or was built from other features.
    """
    paths, left_out = find_images(images)
    _check_names(paths)
    if (run is None) == (model is None):
        raise CachedsegError("give a run (--run-dir) or an exported model (--model), not both")
    if model is not None and (store is not None or tta or weights is not None):
        raise CachedsegError("--model runs the exported graph as it is: leave out --store, --tta and --weights")
    graph = None
    if model is not None:
        from cachedseg.export import OnnxModel
        graph = OnnxModel(model, device)
        ckpt, views, classes = None, ("identity",), graph.classes
        tile, gsd, size = tile or graph.tiled, graph.gsd, graph.size
        default = graph.overlap
    else:
        ckpt = checkpoint.load_run(run)
        views, classes, spec = tta_views(ckpt.spec, tta), ckpt.spec.classes, ckpt.spec
        tile, gsd, size = tile or spec.tiled or store is not None, spec.gsd, tuple(spec.input_size)
        default = spec.tile_overlap if spec.tiled else default_overlap(size, size[0] // spec.grid[0])
    maps = [p for p in paths if is_map(p, tile)]
    frames = [p for p in paths if p not in maps]
    if polygons is not None and not maps:
        raise CachedsegError("--polygons vectorises maps (GeoTIFFs), but none of the inputs is one; leave it out")
    if not tile:
        _refuse_whole(frames)
    if gsd is not None and frames and tile:
        raise CachedsegError(f"the run {run or model} was trained at --gsd {gsd:g} m, but {frames[0]} has no "
                             "coordinate system to resample it by; give GeoTIFFs")
    tiled = {p: map_size(p, gsd) for p in maps}  # checked before the model loads: bands, alpha, 8-bit
    tiled.update({p: _frame_size(p) or (1, 1) for p in (frames if tile else [])})
    overlap = tile_overlap if tile_overlap is not None else default
    if tiled:
        check_overlap(overlap, size)
    ctx = distributed.context(device)
    torch_device = resolve_device(distributed.device_for(ctx, device))
    frames = ctx.share(frames)
    decoder = ckpt.decoder() if ckpt is not None else None
    cached = cached_models(store, paths, ckpt, run, overlap, views, decoder, torch_device) if store else {}
    grids = {p: Grid(*hw, size, overlap) for p, hw in tiled.items() if p in maps or p in frames}
    total_windows, windows_before = sum(map(len, grids.values())), [0]

    def windows_of(path: Path) -> Callable[[int, int], None] | None:
        """`window_progress` over all maps and tiled frames, from this one's windows."""
        def report(done: int, total: int) -> None:
            window_progress(windows_before[0] + done, total_windows)
            if done == total:
                windows_before[0] += total
        return report if window_progress else None
    backbone = None if store or graph else backbone_for(spec, weights or ckpt.weights, torch_device,
                                                        ckpt.decoder_config.layers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[Path, object] = {}

    def done() -> None:
        if progress:
            progress(len(written), len(paths))

    for path in frames if graph is not None and not tile else []:
        image = load_image(path)
        written[path] = _write_pngs(path, image, graph.labels(image), out, classes)
        done()
    if frames and not tile and graph is None:
        for items in batches(ImageFiles(frames, backbone.preprocess), batch_size, workers, torch_device):
            raise_first_error(items)
            x = torch.stack([item["x"] for item in items])  # [B, 3, H', W']
            sizes = [(item["image"].height, item["image"].width) for item in items]
            for item, labels in zip(items, segment_batch(x, sizes, backbone, spec, decoder, views)):  # [H, W]
                path = frames[item["n"]]
                written[path] = _write_pngs(path, item.pop("image"), labels, out, classes)  # image dropped here
            done()
    live = (window_model(backbone, spec, decoder, views) if backbone is not None
            else graph.window_model() if graph is not None else None)
    for path in frames if tile else []:
        image = load_image(path, any_size=True)  # never resized whole: memory is the limit (about 7 bytes a pixel)
        labels = tiled_labels(image, cached.get(path, live), overlap, batch_size, classes.ignore_index,
                              windows_of(path))
        written[path] = _write_pngs(path, image, labels, out, classes)
        done()
    provenance = ({"MODEL": str(model), "FINGERPRINT": graph.metadata["cachedseg_fingerprint"]} if graph else
                  {"BACKBONE": spec.backbone, "FINGERPRINT": spec.fingerprint, "RUN": str(run),
                   **({"STORE": str(store)} if store else {})})
    for path in maps:
        written[path] = predict_map(path, out, cached.get(path, live), classes, overlap, batch_size, polygons,
                                    provenance, windows_of(path), gsd, ctx)
        done()
    return Predictions([written[p] for p in paths if p in written], left_out)  # a rank: its frames and the maps


def cached_models(store: str | Path, paths: list[Path], ckpt, run, overlap: int, views: tuple[str, ...],
                   decoder: torch.nn.Module, device: torch.device) -> dict[Path, WindowModel]:
    """For `predict --store`: the window model of each input from the store's cached windows, refusing a store of
    other features, of whole frames or another overlap, an input the store does not hold, or one changed since."""
    from cachedseg.dataset import open_dataset
    from cachedseg.extract import file_hashes, file_stats
    from cachedseg.spec import check_spec

    cache = FeatureStore.open(store)
    if not cache.spec.serves(ckpt.spec) or not set(views) <= set(cache.spec.views):
        check_spec(store, cache.spec, ckpt.spec, hint=f"the run {run} was trained on other features; predict from "
                   "the store it was trained on, or live without --store")
    if not cache.tiled:
        raise CachedsegError(f"the store {store} holds whole frames, not windows; --store predicts images extracted "
                             "with --tile (predict live without --store)")
    if overlap != cache.spec.tile_overlap:
        raise CachedsegError(f"--tile-overlap {overlap}: the store {store} holds windows overlapping by "
                             f"{cache.spec.tile_overlap}; leave --tile-overlap out")
    dataset = open_dataset(cache.dataset)
    number = {dataset.image_path(g.image).resolve(): k for k, g in enumerate(cache.rasters)}
    first = {}  # raster -> its first window: the record of the image file
    for i, (k, _, _) in enumerate(cache.tiles()):
        first.setdefault(int(k), i)
    stats, hashes = cache.records()
    models = {}
    for path in paths:
        k = number.get(path.resolve())
        if k is None:
            shown = ", ".join(str(dataset.image_path(g.image)) for g in cache.rasters[:3])
            raise CachedsegError(f"{path} is not an image of the store {store} (it holds {len(number)}: {shown}"
                                 f"{', ...' if len(number) > 3 else ''}); extract it there with --tile, or predict "
                                 "it live without --store")
        i = first[k]
        if not np.array_equal(file_stats((path,))[0], stats[i, 0]) and \
                not np.array_equal(file_hashes((path,))[0], hashes[i, 0]):
            raise CachedsegError(f"{path} changed since the store {store} was extracted; rerun `cachedseg extract` "
                                 "to update the store, or predict live without --store")
        models[path] = cached_window_model(cache, k, ckpt.spec, decoder, views, device)
    return models
