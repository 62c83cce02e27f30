"""The Python API: a trained run as an object, for one's own code, an app or a notebook.

    import cachedseg
    model = cachedseg.load("runs/conv")          # a run folder (its best.pt) or a checkpoint file
    labels = model.predict("frame.jpg")          # H x W uint8 class ids: the label PNG `cachedseg predict` writes
    scores = model.logits(image)                 # K x H x W float32 per-class scores at the image's size
    model.classes.names, model.classes.colors    # what the ids mean, and their colours
    model.predict_map("ortho.tif", "out")        # a map: out/ortho_label.tif, a COG, as `cachedseg predict` writes

The steps are those of `cachedseg predict` (`cachedseg.predict`): the same preprocessing, backbone, cast to the
cache dtype, decoder and resize; a run trained on windows slides its windows. `cachedseg.extract`,
`cachedseg.train` and `cachedseg.evaluate` are the library functions behind the CLI: they take typed configs and
return results.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cachedseg import checkpoint
from cachedseg.classes import ClassSet
from cachedseg.dataset import load_image
from cachedseg.errors import CachedsegError
from cachedseg.map_outputs import PolygonOptions
from cachedseg.maps import MapPrediction, padded, predict_map, tiled_labels
from cachedseg.predict import (cached_models, mean_over_views, segment, tta_views, view_logits, window_model,
                               window_probabilities)
from cachedseg.spec import StoreSpec
from cachedseg.tiles import Grid, default_overlap


class Model:
    """A trained run, ready to predict: its decoder, and its backbone built on first use.

    Attributes:
        checkpoint: The run's checkpoint (configs, spec, weights, metrics).
        device: Where the backbone and decoder run.
    """

    def __init__(self, ckpt: checkpoint.Checkpoint, weights: str | None = None, device: str = "auto",
                 tta: bool = False, batch_size: int = 4):
        from cachedseg.backbone import resolve_device
        self.checkpoint, self.device = ckpt, resolve_device(device)
        self._weights, self.views, self.batch_size = weights or ckpt.weights, tta_views(ckpt.spec, tta), batch_size
        self.decoder = ckpt.decoder().to(self.device)

    @property
    def classes(self) -> ClassSet:
        """The classes the ids index: names, colours (RGB) and the ignore label."""
        return self.checkpoint.spec.classes

    @property
    def spec(self) -> StoreSpec:
        """The features the run was trained on: backbone, fingerprint, input size, tiling."""
        return self.checkpoint.spec

    @property
    def overlap(self) -> int:
        """Pixels neighbouring windows share when the model slides windows: the run's tiling, or an eighth of the
        input in whole patches."""
        size = tuple(self.spec.input_size)
        return self.spec.tile_overlap if self.spec.tiled else default_overlap(size, size[0] // self.spec.grid[0])

    @cached_property
    def backbone(self):
        """The frozen backbone, built on first use with the weights the run was trained with; its fingerprint
        must be the run's."""
        from cachedseg.backbone import backbone_for
        return backbone_for(self.spec, self._weights, self.device, self.checkpoint.decoder_config.layers)

    def predict(self, image, tile: bool | None = None) -> np.ndarray:
        """Class ids of one image.

        Args:
            image: A file path, a PIL image, or an H x W x 3 uint8 array (RGB).
            tile: Slide windows of the input size over the image instead of resizing it whole (default: as the
                run was trained, windows for a run from `extract --tile`).

        Returns:
            [H, W] uint8 class ids at the image's size: for a file, the label PNG `cachedseg predict` writes for it
            (with `--batch-size 1`, bit for bit; other batch sizes differ at float32 rounding only).

        Raises:
            CachedsegError: For an unreadable image or an array that is not H x W x 3 uint8.
        """
        img = self._image(image, tiled := self.spec.tiled if tile is None else tile)
        if tiled:
            return tiled_labels(img, window_model(self.backbone, self.spec, self.decoder, self.views), self.overlap,
                                self.batch_size, self.classes.ignore_index)
        return segment(img, self.backbone, self.spec, self.decoder, views=self.views)

    @torch.no_grad()
    def logits(self, image, tile: bool | None = None) -> np.ndarray:
        """Per-class scores of one image at its size: [K, H, W] float32, whose argmax is `predict` (up to ties).

        For a whole image, the decoder's logits resized bilinearly to the image; with windows (`tile`, or a run
        trained on windows), the windows' class probabilities blended as a map blends them (weights summing to 1).
        """
        img = self._image(image, tiled := self.spec.tiled if tile is None else tile)
        if not tiled:
            from cachedseg.data import preprocess_image
            x = preprocess_image(img, self.backbone.preprocess)[None]  # [1, 3, H', W']
            mean = mean_over_views(view_logits(x, self.backbone, self.spec, self.decoder, self.views), self.views)
            return F.interpolate(mean.float(), size=(img.height, img.width), mode="bilinear",
                                 align_corners=False)[0].cpu().numpy()
        model = window_model(self.backbone, self.spec, self.decoder, self.views)
        grid = Grid(img.height, img.width, model.size, self.overlap)
        pixels = np.asarray(img)
        total = np.zeros((len(self.classes), img.height, img.width), dtype=np.float32)
        weights = np.zeros((img.height, img.width), dtype=np.float32)
        for r, y in enumerate(grid.rows):
            for c, x in enumerate(grid.cols):
                h, w = min(model.size[0], img.height - y), min(model.size[1], img.width - x)
                window = model.prepare(padded(pixels[y:y + h, x:x + w], model.size))[None].to(self.device)
                probs = window_probabilities(view_logits(window, self.backbone, self.spec, self.decoder, self.views),
                                             self.views, model.size)[0, :, :h, :w].cpu().numpy()
                weight = grid.weight(r, c)[:h, :w]
                total[:, y:y + h, x:x + w] += probs * weight
                weights[y:y + h, x:x + w] += weight
        return total / weights

    def predict_map(self, path: str | Path, out: str | Path, polygons: PolygonOptions | None = None,
                    store: str | Path | None = None) -> MapPrediction:
        """Predict a map (a GeoTIFF of any size) by sliding windows into `out/<name>_label.tif`, a COG on the map's
        grid (and with `polygons` `out/<name>.gpkg`), as `cachedseg predict` does; with `store`, from a tiled
        store's cached windows, without the backbone.

        Returns:
            The files written.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = Path(path)
        model = (cached_models(store, [path], self.checkpoint, str(store), self.overlap, self.views, self.decoder,
                                self.device)[path] if store is not None
                 else window_model(self.backbone, self.spec, self.decoder, self.views))
        provenance = {"BACKBONE": self.spec.backbone, "FINGERPRINT": self.spec.fingerprint}
        return predict_map(path, out, model, self.classes, self.overlap, self.batch_size, polygons, provenance,
                           gsd=self.spec.gsd)

    def _image(self, image, any_size: bool) -> Image.Image:
        """An RGB PIL image from a path, a PIL image or an H x W x 3 uint8 array."""
        if isinstance(image, (str, Path)):
            return load_image(image, any_size=any_size)
        if isinstance(image, Image.Image):
            return image if image.mode == "RGB" else image.convert("RGB")
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise CachedsegError(f"an image array must be H x W x 3 uint8 (RGB), not {array.shape} {array.dtype}; "
                                 "convert it (e.g. np.asarray(pil_image.convert('RGB')))")
        return Image.fromarray(array)


def load(run: str | Path, weights: str | None = None, device: str = "auto", tta: bool = False,
         batch_size: int = 4) -> Model:
    """Load a trained run for prediction.

    Args:
        run: A run folder (its best.pt) or a checkpoint file.
        weights: Backbone weights (`auto`, a file, or `random`); by default those the run was trained with.
        device: `auto`, `cpu` or `cuda`.
        tta: Average the logits of every view the run's features were cached in.
        batch_size: Windows per forward pass when the model slides windows.

    Returns:
        The model.

    Raises:
        CachedsegError: For a missing, damaged or foreign checkpoint.
    """
    return Model(checkpoint.load_run(run), weights, device, tta, batch_size)
