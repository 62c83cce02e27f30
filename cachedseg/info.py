"""What `cachedseg info` shows: a feature store's settings and progress, what a run was trained on, or a dataset's
survey, as rows of (key, value) text that the CLI prints one per line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cachedseg import checkpoint, runs
from cachedseg.checkpoint import Checkpoint
from cachedseg.errors import CachedsegError
from cachedseg.store import FeatureStore, is_store, open_group

if TYPE_CHECKING:
    from cachedseg.survey import Survey

LISTED = 20  # problems, and missing files, shown by name (the JSON holds them all)


def describe(path: str | Path) -> list[tuple[str, str]]:
    """Describe a feature store (folder or URL), or a run folder or checkpoint file.

    Args:
        path: What to describe; it must exist (a URL can only be a store).

    Returns:
        (key, value) rows: for a store its settings, image counts and size on disk (see `store_rows`); for a run
        its decoder, features, recipe and best epoch (see `run_rows`).

    Raises:
        CachedsegError: For a path that is neither, or a store or checkpoint that does not read.
    """
    group = open_group(path)  # opened once and handed on: on a bucket each open is a round trip
    if is_store(path, group):
        rows = store_rows(FeatureStore.open(path, group=group).describe())
    else:
        p = Path(path)
        if p.is_file() and p.suffix != ".pt" or p.is_dir() and not runs.RunFolder(p).has_checkpoint():
            raise CachedsegError(f"{path} is neither a feature store (a Zarr folder from `cachedseg extract`) nor "
                                 "a run (a folder with best.pt/last.pt from `cachedseg train`, or a .pt file)")
        rows = run_rows(checkpoint.load_run(path, which="last"))  # the whole history; best.pt stops at its epoch
    return [(key, str(value)) for key, value in rows]  # attributes of older stores may be None or numbers


def store_rows(d: dict) -> list[tuple[str, object]]:
    """The rows of a store, from `FeatureStore.describe()`'s dict."""
    (h, w), (mh, mw) = d["input_size"], d["mask_size"]
    rows = [("backbone", f"{d['backbone']} @ {w}x{h} px, precision {d['precision']}"),
            ("features", f"[N, {len(d['views'])}, {d['layers']}, {d['channels']}, {d['grid'][0]}, {d['grid'][1]}] "
                         f"{d['dtype']} (views: {', '.join(d['views'])}; last {d['layers']} layer(s))"),
            ("masks", f"{mw}x{mh} uint8"),
            ("classes", f"{len(d['class_names'])}: {', '.join(d['class_names'])} (ignore label {d['ignore_index']})"),
            ("images", f"{d['images']} ({d['trn']} trn, {d['val']} val): {d['done']} done, {d['pending']} pending, "
                       f"{d['skipped_bad']} skipped as bad"
                       + (f", {d['gone']} gone from the dataset (left out)" if d["gone"] else "")),
            *_tiling_rows(d),
            ("size on disk", f"{d['bytes_on_disk'] / 1e6:.1f} MB "
                             f"({d['bytes_on_disk'] / 1e6 / max(d['images'], 1):.2f} MB/img)"),
            ("fingerprint", d["fingerprint"]), ("weights", d["weights"]), ("dataset", d["dataset"]),
            ("format", f"{d['format']} v{d['format_version']}, cachedseg {d['package_version']}")]
    return rows + [(f"bad: {k}", v) for k, v in d.get("bad", {}).items()]


def _tiling_rows(d: dict) -> list[tuple[str, object]]:
    """A tiled store's rows: how its windows are cut, and how many are empty or unlabelled."""
    if d.get("tile_overlap") is None:
        return []
    (h, w), gsd = d["input_size"], d.get("gsd")
    return [("windows", f"{w}x{h} px overlapping by {d['tile_overlap']} px, "
                        f"{'at ' + format(gsd, 'g') + ' m a pixel' if gsd else 'pixels as they are'}; "
                        f"{len(d.get('rasters') or ())} images, {d['empty']} windows outside the map (not stored), "
                        f"{d['unlabelled']} without labels (kept out of training)")] + (
        [("split", f"by blocks of {b['block']} px, val_fraction {b['val_fraction']}, seed {b['seed']}: each window "
                   "in its centre's block's split, with only that split's labels")]
        if (b := d.get("split_blocks")) else [])


def run_rows(ckpt: Checkpoint) -> list[tuple[str, object]]:
    """The rows of a run, from its last checkpoint (which holds the whole metrics history)."""
    best = runs.best_row(ckpt.metrics)
    params = sum(p.numel() for p in ckpt.decoder().parameters())
    spec = ckpt.spec
    return [("decoder", f"{ckpt.decoder_config.name} ({params:,} parameters)"),
            ("features", f"{spec.backbone} @ {spec.input_size[1]}x{spec.input_size[0]} px, {spec.dtype}, last "
                         f"{ckpt.decoder_config.layers} layer(s) of {spec.layers}, views {', '.join(spec.views)}, "
                         f"fingerprint {spec.fingerprint}"),
            ("classes", f"{len(spec.class_names)}: {', '.join(spec.class_names)}"),
            *([("windows", f"{spec.input_size[1]}x{spec.input_size[0]} px overlapping by {spec.tile_overlap} px, "
                           + (f"at {spec.gsd:g} m a pixel" if spec.gsd else "pixels as they are")
                           + " (predict and evaluate slide the same windows)")] if spec.tiled else []),
            ("recipe", ckpt.train_config.describe(spec.layers)),
            ("epochs trained", str(ckpt.epoch)),
            ("best val", f"mIoU {best.val_miou:.4f}, pixel accuracy {best.val_pixel_acc:.4f} (epoch {best.epoch})"),
            ("weights", ckpt.weights),
            ("trained on", (f"live features from {ckpt.source.removeprefix('live:')}"
                            if ckpt.source.startswith("live:") else ckpt.source) or "not recorded")]


def survey_rows(result: Survey) -> list[tuple[str, str]]:
    """The rows of a dataset's survey (`cachedseg.survey.survey`): what a user checks before extracting it."""
    sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in list(result.sizes.items())[:4])
    rows = [("layout", result.layout),
            ("images", f"{result.total} split by blocks ({result.images['trn']} with trn blocks, "
                       f"{result.images['val']} with val blocks)" if result.by_blocks else
                       f"{result.total} ({result.images['trn']} trn, {result.images['val']} val)"),
            ("sizes", sizes + (f", and {len(result.sizes) - 4} more sizes" if len(result.sizes) > 4 else "")),
            ("masks", f"{result.total - len(result.problems)} readable, "
                      f"{len(result.masks_missing)} images or masks missing, {len(result.problems)} with problems"),
            ("classes", f"{len(result.classes)}, share of labelled trn pixels:")]
    rows += [(f"  {name}", f"{share:7.2%}") for name, share in zip(result.classes, result.shares("trn"))]
    rows += [("problem", p) for p in result.problems[:LISTED]]
    rows += [("missing", e) for e in list(result.masks_missing.values())[:LISTED]]
    return [(key, str(value)) for key, value in rows]
