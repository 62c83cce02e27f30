"""`cachedseg report`: one self-contained HTML page per run (and one per sweep) that a person would rather look at
than CSV files: curves, per-class IoU, the confusion matrix, val images with prediction and label side by side,
and where every number came from. Images and charts are embedded, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from cachedseg import checkpoint
from cachedseg.checkpoint import versions
from cachedseg.dataset import Dataset, load_image, open_dataset
from cachedseg.errors import CachedsegError
from cachedseg.evaluate import EvalResult, predictions, score, score_maps, trained_on
from cachedseg.paths import check_writable
from cachedseg.classes import ClassSet
from cachedseg.pictures import close, colorize, curves_figure, pyplot
from cachedseg.runs import REPORT, EpochMetrics, RunFolder, SweepRow, best_row

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #1d2329; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #dde; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f4f6f8; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #667; } .row { display: flex; gap: 8px; margin-bottom: 10px; } .row figure { margin: 0; }
.row img { width: 100%; } figcaption { font-size: 12px; color: #667; } #status { color: #b00; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #333; vertical-align: middle; }
.legend { font-size: 13px; line-height: 1.6; margin: 2px 0; } .legend .key { margin-right: 10px; white-space: nowrap; }
"""
# Marks images that did not load, on the page itself (and for the browser test).
CHECK = """<script>
window.addEventListener("load", () => {
  const all = [...document.images], bad = all.filter(i => !(i.complete && i.naturalWidth > 0));
  document.body.dataset.images = `${all.length - bad.length}/${all.length}`;
  if (bad.length) document.getElementById("status").textContent = `${bad.length} image(s) failed to load`;
});
</script>"""


def report(path: str | Path, out: str | Path | None = None, store: str | None = None, data: str | Path | None = None,
           samples: int = 4, device: str = "auto") -> Path:
    """Write the HTML report of a run folder, or of a sweep folder (with one report per sub-run, linked).

    Args:
        path: A run folder (from `cachedseg train`) or a sweep folder (with `sweep.json`).
        out: The HTML file (default: `report.html` in that folder).
        store: The feature store to score and draw predictions from (default: the one the run was trained on).
        data: The dataset, to run the backbone live instead (when the store is gone), or to find the images.
        samples: Val images to show with their prediction and label.
        device: `auto`, `cpu` or `cuda`.

    Returns:
        The HTML file written.

    Raises:
        CachedsegError: If `path` is neither a run nor a sweep, or its features cannot be found.
    """
    path = Path(path)
    if samples < 0:
        raise CachedsegError(f"--samples {samples}: give 0 (no images) or more")
    summary = RunFolder(path).read_sweep_summary()
    out = Path(out) if out else RunFolder(path).report
    check_writable(out, "the report")  # before the scoring pass, not after it
    if summary is not None:
        for row in summary:
            report(Path(row.run), None, store, data, samples, device)
        page = _sweep_page(path, summary)
    else:
        page = _run_page(path, store, data, samples, device, out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def _run_page(run: Path, store: str | None, data: str | Path | None, samples: int, device: str, home: Path) -> str:
    """The report of one run."""
    last, best = checkpoint.load_run(run, "last"), checkpoint.load_run(run, "best")
    if store is None and data is None:
        store, data = trained_on(run, best)
    shown: list[tuple] = []

    def keep(predicted):  # the first few val images are drawn below: kept from the one scoring pass
        for item in predicted:
            if len(shown) < samples:
                shown.append(item)
            yield item
    if best.spec.tiled:  # maps are scored whole and stitched; too large to draw here: `predict` writes them
        result = score_maps(run, store, data, device=device, ckpt=best)
    else:
        result = score(keep(predictions(run, store=store, data=data, device=device, ckpt=best)), best.spec.classes)
    dataset = open_dataset(data or _dataset_of(store))
    spec, cfg = best.spec, best.decoder_config
    rows = last.metrics
    top = best_row(rows)
    settings = [
        ("decoder", f"{cfg.name}, reading the last {cfg.layers} of {spec.layers} layer(s)"),
        ("recipe", best.train_config.describe(spec.layers)),
        ("backbone", f"{spec.backbone} @ {spec.input_size[1]}x{spec.input_size[0]} px, {spec.precision}, "
                     f"features {spec.dtype}, views {', '.join(spec.views)}"),
        ("fingerprint", spec.fingerprint), ("weights", best.weights),
        ("features from", str(store) if store else f"live from {data}"),
        ("versions at training", ", ".join(f"{k} {v}" for k, v in best.versions.items()) or "not recorded"),
        ("versions now", ", ".join(f"{k} {v}" for k, v in versions().items()))]
    return _page(f"Run {_name(run)}", [
        f"<p class=muted>best val mIoU <b id=best-miou>{top.val_miou:.4f}</b> at epoch {top.epoch} of "
        f"{len(rows)}; scored below at the labels' native resolution on {result.images} val images with best.pt</p>",
        "<h2>Training</h2>", _svg(curves_figure(rows)), _metrics_table(rows),
        "<h2>Per-class IoU (val, native resolution)</h2>", _class_table(result), _svg(_iou_bars(result)),
        "<h2>Confusion matrix</h2><p class=muted>rows: labelled class, columns: predicted; each row normalised</p>",
        _png(_confusion_figure(result)),
        "<h2>Val images</h2><p class=muted>" + ("image, label, prediction, overlay; the classes shown under each"
                                                if not spec.tiled else "the run was trained on windows of maps, "
                                                "scored above on the stitched val maps; `cachedseg predict MAP` "
                                                "writes a map's labels as a COG") + "</p>",
        *(_sample_row(dataset, id_, labels, pred if pred is not None else live, spec.classes)
          for id_, labels, pred, live in shown),
        "<h2>Settings and provenance</h2>", _kv_table(settings)])


def _sweep_page(run: Path, summary: list[SweepRow]) -> str:
    """The comparison of a sweep's configs, each linking to its own report."""
    rows = "".join(
        f"<tr><td><a href='{html.escape(Path(r.run).name)}/{REPORT}'>{html.escape(r.name)}</a></td>"
        f"<td>{html.escape(r.config.decoder)}</td><td class=n>{r.config.lr:g}</td>"
        f"<td class=n>{r.config.layers or 'all'}</td><td class=n>{r.config.seed}</td>"
        f"<td class=n>{r.best_val_miou:.4f}</td><td class=n>{r.best_epoch}</td>"
        f"<td class=n>{r.best_val_pixel_acc:.4f}</td><td class=n>{r.final_train_loss:.4f}</td></tr>"
        for r in summary)
    return _page(f"Sweep {_name(run)}", [
        f"<p class=muted>{len(summary)} configs trained in one pass over the cache; best: "
        f"<b>{html.escape(summary[0].name)}</b></p>",
        "<table id=sweep><tr><th>run</th><th>decoder</th><th>lr</th><th>layers</th><th>seed</th>"
        f"<th>best val mIoU</th><th>epoch</th><th>pixel acc</th><th>final loss</th></tr>{rows}</table>",
        _svg(_sweep_bars(summary))])


def _name(run: Path) -> str:
    """A run's folder with its parent (`runs/conv`): the last part alone is often just `run`."""
    run = run.resolve()
    return f"{run.parent.name}/{run.name}"


def _page(title: str, parts: list[str]) -> str:
    """A complete, self-contained HTML document."""
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p id=status></p>"
            + "\n".join(parts) + f"{CHECK}</body></html>")


def _metrics_table(rows: list[EpochMetrics]) -> str:
    """Each epoch's numbers, as metrics.json has them (4 decimals)."""
    body = "".join(f"<tr><td class=n>{r.epoch}</td><td class=n>{r.train_loss:.4f}</td>"
                   f"<td class=n>{r.val_miou:.4f}</td><td class=n>{r.val_pixel_acc:.4f}</td>"
                   f"<td class=n>{r.seconds:.1f}</td></tr>" for r in rows)
    return ("<table id=metrics><tr><th>epoch</th><th>train loss</th><th>val mIoU</th><th>val pixel acc</th>"
            f"<th>seconds</th></tr>{body}</table>")


def _class_table(result: EvalResult) -> str:
    """Per-class IoU and labelled pixels, with each class's colour."""
    pixels = result.confusion.sum(1)
    body = "".join(
        f"<tr><td><span class=swatch style='background:rgb{result.classes.colors[i]}'></span> "
        f"{html.escape(name)}</td><td class=n>{'-' if iou is None else f'{iou:.4f}'}</td><td class=n>{int(n)}</td></tr>"
        for i, (name, iou, n) in enumerate(zip(result.class_names, result.iou, pixels)))
    return (f"<p>mIoU <b>{result.miou:.4f}</b>, pixel accuracy <b>{result.pixel_acc:.4f}</b></p>"
            f"<table id=classes><tr><th>class</th><th>IoU</th><th>labelled pixels</th></tr>{body}</table>")


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def _sample_row(dataset: Dataset, id_: str, labels: np.ndarray, pred: np.ndarray, classes: ClassSet) -> str:
    """One val image: the image, its label, the prediction and the overlay, each 1/4 of the width."""
    image = load_image(dataset.image_path(id_))
    label, prediction = colorize(labels, classes), colorize(pred, classes)  # unlabelled pixels black
    panels = [(image, "image", "jpeg", None), (label, "label", "png", labels), (prediction, "prediction", "png", pred),
              (Image.blend(image, prediction, 0.5), "overlay", "jpeg", pred)]
    figures = "".join(f"<figure style='flex:1'>{_img(im, fmt)}<figcaption>{html.escape(id_)}: {what}</figcaption>"
                      f"{'' if shown is None else _legend(shown, classes)}</figure>"
                      for im, what, fmt, shown in panels)
    return f"<div class=row>{figures}</div>"


def _legend(labels: np.ndarray, classes: ClassSet) -> str:
    """The classes present in `labels`, each with its colour, as page text: a legend drawn into the picture
    shrinks with the thumbnail until it cannot be read."""
    keys = "".join(f"<span class=key><span class=swatch style='background:rgb{classes.colors[c]}'>"
                   f"</span> {html.escape(classes.names[c])}</span>"
                   for c in (int(c) for c in np.unique(labels)) if c < len(classes))
    return f"<div class=legend>{keys}</div>"


def _img(image: Image.Image, fmt: str = "png") -> str:
    """An <img> with the picture embedded (scaled down to at most 640 px wide)."""
    if image.width > 640:
        image = image.resize((640, round(image.height * 640 / image.width)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=85)
    return f"<img alt='' src='data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _png(figure) -> str:
    """A matplotlib figure as an embedded PNG."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    close(figure)
    return f"<img alt='' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _svg(figure) -> str:
    """A matplotlib figure as inline SVG (sharp at any zoom)."""
    buf = io.StringIO()
    figure.savefig(buf, format="svg", bbox_inches="tight")
    close(figure)
    return buf.getvalue()[buf.getvalue().index("<svg"):]


def _iou_bars(result: EvalResult):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 3))
    values = [v or 0.0 for v in result.iou]
    ax.bar(range(len(values)), values, color=[tuple(v / 255 for v in c) for c in result.classes.colors], edgecolor="black")
    ax.set_xticks(range(len(values)), result.class_names, rotation=30, ha="right")
    ax.set(ylim=(0, 1), ylabel="IoU", title="Per-class IoU")
    return fig


def _confusion_figure(result: EvalResult):
    plt = pyplot()
    conf = result.confusion.astype(float)
    share = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(result.class_names)), result.class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(result.class_names)), result.class_names)
    ax.set(xlabel="predicted", ylabel="labelled")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    return fig


def _sweep_bars(runs: list[SweepRow]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, max(2, 0.3 * len(runs))))
    ax.barh([r.name for r in runs][::-1], [r.best_val_miou for r in runs][::-1], color="#4a7fb5")
    ax.set(xlabel="best val mIoU", title="Configs, best first")
    return fig


def _dataset_of(store: str) -> str:
    """The dataset a store was extracted from."""
    from cachedseg.store import FeatureStore
    return FeatureStore.open(store).dataset
