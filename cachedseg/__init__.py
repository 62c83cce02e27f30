"""cachedseg: drone-imagery segmentation on a frozen DINOv2 backbone with a resumable Zarr feature cache.

The Python API (imported on first use, so `import cachedseg` stays light):

    model = cachedseg.load("runs/conv")                       # a trained run: predict, logits, predict_map
    cachedseg.BackboneConfig, cachedseg.TrainConfig, cachedseg.DecoderConfig, cachedseg.Tiling   # the configs

and the library functions behind the CLI, each in the module of its stage (a module and a function of one name
cannot share the package's attribute): `cachedseg.extract.extract(data, store, BackboneConfig(...))` ->
ExtractResult, `cachedseg.train.train(store, run, TrainConfig(...))` -> one EpochMetrics row per epoch,
`cachedseg.evaluate.evaluate(run)` -> EvalResult, `cachedseg.predict.predict(images, run)`,
`cachedseg.export.export(run, "model.onnx")` -> ExportResult.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cachedseg")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# name -> the module that defines it (PEP 562: loaded when first asked for)
_API = {"load": "cachedseg.api", "Model": "cachedseg.api", "BackboneConfig": "cachedseg.backbone_config",
        "TrainConfig": "cachedseg.recipe", "DecoderConfig": "cachedseg.decoders", "Tiling": "cachedseg.tiles"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'cachedseg' has no attribute {name!r}")
