"""Ship a trained run as one ONNX graph: backbone and head, from the normalised image to class probabilities, with
the metadata a consumer needs without this package (onnxruntime in an app, QGIS's Deepness plugin).

    input   "image"          [N, 3, H, W] float32: RGB / 255, minus `standardization_mean`, over `..._std`
    output  "probabilities"  [N, K, H, W] float32: softmax over the K classes at the input's size

H and W are the run's input size (the position embedding is resized for it when the backbone is built, so they are
fixed); N is dynamic. The graph is the steps of `cachedseg.predict`'s window model: backbone, cast to the cache
dtype, decoder, logits resized bilinearly to the input, softmax. Metadata (string values, JSON where structured):
Deepness's keys (`model_type` "Segmentor", `class_names` {"0": name, ...}, `standardization_mean`/`_std`,
`tiles_size`/`tile_size` and `tiles_overlap` in percent for a square input, `resolution` in cm a pixel for a run
with a GSD) and ours, prefixed `cachedseg_` (version, fingerprint, backbone, input size, overlap in pixels, GSD,
class colours, ignore label, interpolation).

`export` checks the graph before writing it: onnxruntime on the CPU against PyTorch on generated scenes, the
probabilities within `BOUND` and the labels agreeing on at least `MIN_AGREEMENT` of the pixels; a graph that fails
is not written. `OnnxModel` predicts with such a file (`cachedseg predict --model`).

onnx, onnxscript and onnxruntime (the `onnx` extra) are imported when a model is exported or run, never before.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cachedseg import __version__, checkpoint
from cachedseg.classes import ClassSet
from cachedseg.errors import CachedsegError, first_line

EXTRA = "pip install 'cachedseg[onnx]'"
INPUT, OUTPUT = "image", "probabilities"
# The check: the largest difference of a class probability between onnxruntime and PyTorch (measured on ViT-S/14 at
# 112 and ViT-B/14 at 518 with random weights: at most 2e-5; see the README's Export), and the share of pixels whose
# label must agree.
BOUND = 1e-3
MIN_AGREEMENT = 0.9999
CHECK_IMAGES = 4


def _module(name: str):
    """Import a dependency of the onnx extra, or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise CachedsegError(f"ONNX export and inference need {name}, which is not installed; {EXTRA}") from None


class Segmenter(torch.nn.Module):
    """Backbone and head as one module: normalised images [N, 3, H, W] -> class probabilities [N, K, H, W]."""

    def __init__(self, backbone: torch.nn.Module, decoder: torch.nn.Module, dtype: str):
        super().__init__()
        self.backbone, self.decoder, self.dtype = backbone, decoder.eval(), getattr(torch, dtype)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(image).to(self.dtype).float()  # [N, L, C, h, w], as the cache holds them
        logits = self.decoder(feats)  # [N, K, Mh, Mw]
        size = image.shape[-2:]
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(1)


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote and measured.

    Attributes:
        path: The ONNX file.
        input_size: (H, W) of the input.
        max_difference: The largest |probability| difference between onnxruntime and PyTorch on the check images.
        agreement: The share of check pixels whose label is the same.
        pixels: Pixels compared.
        seconds: Export and check, in all.
        metadata: The metadata written into the file.
        megabytes: The file's size.
    """

    path: Path
    input_size: tuple[int, int]
    max_difference: float
    agreement: float
    pixels: int
    seconds: float
    metadata: dict[str, str]
    megabytes: float


def metadata(ckpt: checkpoint.Checkpoint, overlap: int) -> dict[str, str]:
    """The metadata of a run's ONNX graph (see the module docstring)."""
    spec = ckpt.spec
    (h, w), dump = spec.input_size, json.dumps
    meta = {"model_type": "Segmentor",
            "class_names": dump({str(i): name for i, name in enumerate(spec.class_names)}),
            "standardization_mean": dump(list(spec.mean)), "standardization_std": dump(list(spec.std)),
            "cachedseg_version": __version__, "cachedseg_fingerprint": spec.fingerprint,
            "cachedseg_backbone": spec.backbone, "cachedseg_input_size": dump([h, w]),
            "cachedseg_tile_overlap": str(overlap), "cachedseg_gsd": dump(spec.gsd),
            "cachedseg_class_colors": dump([list(c) for c in spec.class_colors]),
            "cachedseg_ignore_index": str(spec.ignore_index), "cachedseg_interpolation": spec.interpolation,
            "cachedseg_decoder": ckpt.decoder_config.name, "cachedseg_tiled": dump(spec.tiled)}
    if h == w:  # Deepness takes square tiles only
        meta.update(tiles_size=str(h), tile_size=str(h), tiles_overlap=str(round(100 * overlap / h)))
    if spec.gsd is not None:
        meta["resolution"] = f"{spec.gsd * 100:g}"
    return meta


def check_images(size: tuple[int, int], count: int = CHECK_IMAGES) -> list:
    """Generated drone scenes at the input size (PIL images): what the check runs both graphs on."""
    from cachedseg.synth import render_scene
    rng = np.random.default_rng(0)
    return [render_scene(rng, size[1], size[0], oblique=bool(i % 2))[0] for i in range(count)]


def export(run: str | Path, out: str | Path, weights: str | None = None, device: str = "cpu",
           opset: int | None = None, overlap: int | None = None) -> ExportResult:
    """Export a run's backbone and head as one ONNX graph, check it against PyTorch, and write it.

    Args:
        run: The run folder (its best checkpoint) or a checkpoint file.
        out: The `.onnx` file to write.
        weights: Backbone weights; by default those the run was trained with (they must give its fingerprint).
        device: Where PyTorch runs for the export and the check.
        opset: The ONNX opset (default: the exporter's).
        overlap: The tile overlap to record, in pixels (default: the run's tiling, else an eighth of the input).

    Returns:
        The file and what the check measured.

    Raises:
        CachedsegError: For a run whose backbone runs at another precision than float32, a missing onnx extra,
            a failed export, or a graph that fails the check (then nothing is written).
    """
    from cachedseg.backbone import backbone_for
    from cachedseg.data import preprocess_image
    from cachedseg.tiles import default_overlap

    onnx, ort = _module("onnx"), _module("onnxruntime")
    _module("onnxscript")
    start = time.perf_counter()
    out = Path(out)
    ckpt = checkpoint.load_run(run)
    spec = ckpt.spec
    if spec.precision != "float32":
        raise CachedsegError(f"the run {run} was trained on {spec.precision} features; ONNX export takes float32 "
                             "runs (the graph computes in float32)")
    size = tuple(spec.input_size)
    if overlap is None:
        overlap = spec.tile_overlap if spec.tiled else default_overlap(size, size[0] // spec.grid[0])
    backbone = backbone_for(spec, weights or ckpt.weights, device, ckpt.decoder_config.layers)
    model = Segmenter(backbone, ckpt.decoder(), spec.dtype).to(device).eval()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.zeros(2, 3, *size, device=device)  # a batch of 2: the exporter refuses a dynamic dim seen as 1
    try:
        with torch.no_grad():
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes={"image": {0: batch}}, opset_version=opset, verbose=False)
        program.save(str(tmp))
        graph = onnx.load(str(tmp))
        meta = metadata(ckpt, overlap)
        for key, value in meta.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(graph, str(tmp))
        x = torch.stack([preprocess_image(img, backbone.preprocess) for img in check_images(size)])
        with torch.no_grad():
            want = model(x.to(device)).cpu().numpy()
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
        difference = float(np.abs(got - want).max())
        agreement = float((got.argmax(1) == want.argmax(1)).mean())
        if not difference <= BOUND or agreement < MIN_AGREEMENT:
            raise CachedsegError(f"the exported graph disagrees with PyTorch on the check images (largest probability "
                                 f"difference {difference:.3g}, bound {BOUND}; labels agree on {agreement:.6f}, need "
                                 f"{MIN_AGREEMENT}); nothing was written: report it with your torch and onnxruntime "
                                 "versions")
        os.replace(tmp, out)
    except CachedsegError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter's and onnxruntime's own errors
        raise CachedsegError(f"exporting {run} to ONNX failed ({first_line(exc)}); nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.data").unlink(missing_ok=True)
    return ExportResult(out, size, difference, agreement, int(want[:, 0].size), time.perf_counter() - start, meta,
                        out.stat().st_size / 2**20)


def backbone_session(backbone):
    """An onnxruntime session of the backbone's own forward pass exported to ONNX (images [N, 3, H, W] -> tokens
    [N, L, C, h, w], float32), for `--precision onnxruntime`. The graph is exported once per backbone fingerprint
    into CACHEDSEG_ONNX_CACHE (default ~/.cache/cachedseg/onnx) and reused."""
    _module("onnxscript")
    ort = _module("onnxruntime")
    folder = Path(os.environ.get("CACHEDSEG_ONNX_CACHE", Path.home() / ".cache" / "cachedseg" / "onnx"))
    (h, w), cfg = backbone.preprocess.image_size, backbone.config
    path = folder / f"{cfg.name}-{w}x{h}-l{cfg.layers}-{backbone.fingerprint}-torch{torch.__version__}.onnx"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            example = torch.zeros(2, 3, h, w)  # a batch of 2: the exporter refuses a dynamic dim seen as 1
            program = torch.onnx.export(backbone, (example,), dynamo=True, input_names=["image"],
                                        output_names=["tokens"], verbose=False,
                                        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}})
            program.save(str(tmp))
            os.replace(tmp, path)
        except Exception as exc:  # noqa: BLE001 - the exporter's own errors
            raise CachedsegError(f"exporting the backbone to ONNX for --precision onnxruntime failed "
                                 f"({first_line(exc)}); use --precision float32") from None
        finally:
            tmp.unlink(missing_ok=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class OnnxModel:
    """An exported ONNX graph run by onnxruntime, with what its metadata says (`cachedseg predict --model`).

    Attributes:
        path: The ONNX file.
        classes: Names, colours and ignore label, from the metadata.
        size: The input (H, W).
        overlap: Pixels windows share (the run's tiling).
        gsd: The ground sample distance the run was trained at, or None.
        tiled: Whether the run was trained on windows (then every input is predicted by windows).
    """

    def __init__(self, path: str | Path, device: str = "cpu"):
        ort = _module("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise CachedsegError(f"--model {path}: no such file; give a .onnx file that `cachedseg export` wrote")
        providers = (["CUDAExecutionProvider"] if device.startswith("cuda") else []) + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors
            raise CachedsegError(f"--model {path} is not a readable ONNX model ({first_line(exc)}); export it again "
                                 "with `cachedseg export`") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "cachedseg_input_size" not in meta:
            raise CachedsegError(f"--model {path} is an ONNX model, but not one `cachedseg export` wrote (no "
                                 "cachedseg_ metadata); export the run with `cachedseg export`")
        names = json.loads(meta["class_names"])
        self.classes = ClassSet(tuple(names[str(i)] for i in range(len(names))),
                                tuple(tuple(c) for c in json.loads(meta["cachedseg_class_colors"])),
                                int(meta["cachedseg_ignore_index"]))
        self.size = tuple(json.loads(meta["cachedseg_input_size"]))
        self.overlap = int(meta["cachedseg_tile_overlap"])
        self.gsd = json.loads(meta["cachedseg_gsd"])
        self.tiled = json.loads(meta.get("cachedseg_tiled", "false"))
        self.metadata = dict(meta)
        from cachedseg.data import Preprocess
        self.preprocess = Preprocess(self.size, tuple(json.loads(meta["standardization_mean"])),
                                     tuple(json.loads(meta["standardization_std"])), meta["cachedseg_interpolation"],
                                     self.size)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [N, 3, H, W] -> class probabilities [N, K, H, W]."""
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: x.float().numpy()})[0])

    def labels(self, image) -> np.ndarray:
        """Class ids [H, W] uint8 of a PIL image resized whole to the input: the probabilities resized back
        bilinearly to the image, then argmax."""
        from cachedseg.data import preprocess_image
        probs = self.probabilities(preprocess_image(image, self.preprocess)[None])
        back = F.interpolate(probs, size=(image.height, image.width), mode="bilinear", align_corners=False)
        return back[0].argmax(0).to(torch.uint8).numpy()

    def window_model(self):
        """Sliding-window prediction (`cachedseg.maps`) through the graph."""
        from PIL import Image

        from cachedseg.data import preprocess_image
        from cachedseg.maps import WindowModel
        return WindowModel(self.size, len(self.classes), lambda pixels: preprocess_image(Image.fromarray(pixels),
                                                                                         self.preprocess),
                           self.probabilities, torch.device("cpu"))
