"""Pictures: label pictures in the run's class colours with their legends, and the training-curves figure (with
the matplotlib set-up), drawn for `predict`, `train` and `report`. Drawing is neither inference nor training.
Every colour and overlay PNG carries a legend of the classes it shows.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cachedseg.classes import ClassSet

PICTURE_ROWS = 256  # rows of a picture drawn at a time


def colorize(labels: np.ndarray, classes: ClassSet) -> Image.Image:
    """Class indices [H, W] uint8 -> RGB image in the classes' colours (the ignore label and unknown values black)."""
    return Image.fromarray(classes.palette()[labels])


def with_legend(picture: Image.Image, labels: np.ndarray, classes: ClassSet) -> Image.Image:
    """`picture` with a strip below it naming, in its colour, each class present in `labels`."""
    strip = legend_strip(picture.width, present_classes(labels), classes)
    out = Image.new("RGB", (picture.width, picture.height + strip.height))
    out.paste(picture if picture.mode == "RGB" else picture.convert("RGB"), (0, 0))
    out.paste(strip, (0, picture.height))
    return out


def present_classes(labels: np.ndarray) -> list[int]:
    """The class indices in `labels` [H, W], found band by band (np.unique sorts a copy of what it is given)."""
    found: set[int] = set()
    for y in range(0, labels.shape[0], PICTURE_ROWS):
        found.update(np.unique(labels[y:y + PICTURE_ROWS]).tolist())
    return sorted(found)


def legend_strip(width: int, present: list[int], classes: ClassSet) -> Image.Image:
    """The strip under a picture `width` wide naming, in its colour, each class of `present`."""
    class_names = classes.names
    present = [c for c in present if c < len(class_names)]
    size = max(11, min(18, width // 40))
    font = ImageFont.load_default(size=size)
    pad, swatch = size // 2, size
    items, x, rows = [], pad, 0
    for c in present:  # lay the entries out left to right, wrapping to new rows
        entry = swatch + pad // 2 + int(font.getlength(class_names[c])) + 2 * pad
        if x + entry > width and x > pad:
            x, rows = pad, rows + 1
        items.append((c, x, rows))
        x += entry
    row_h = size + pad
    strip = Image.new("RGB", (width, (rows + 1) * row_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for c, x, row in items:
        y = pad + row * row_h
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=classes.colors[c], outline=(0, 0, 0))
        draw.text((x + swatch + pad // 2, y + size // 2), class_names[c], fill=(0, 0, 0), font=font, anchor="lm")
    return strip


def picture_rows(labels: np.ndarray, classes: ClassSet, strip: Image.Image,
                 image: Image.Image | None = None) -> Iterator[np.ndarray]:
    """The colour picture of `labels` (with `image`: the overlay on it) above the legend `strip`, as bands of rows
    [r, W, 3] uint8: pixel for pixel `with_legend(colorize(labels))` (or `with_legend(Image.blend(image,
    colorize(labels), 0.5))`), so that no full-frame picture is made on the way (PIL holds RGB in 4 bytes a pixel)."""
    height, width = labels.shape
    for y in range(0, height, PICTURE_ROWS):
        rows = colorize(labels[y:y + PICTURE_ROWS], classes)
        if image is not None:
            rows = Image.blend(image.crop((0, y, width, y + rows.height)), rows, 0.5)
        yield np.asarray(rows)
    yield np.asarray(strip)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display is needed, or used)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def close(figure) -> None:
    """Free a figure drawn with `pyplot()`."""
    pyplot().close(figure)


def curves_figure(rows: list):
    """Training loss, and val mIoU and pixel accuracy, by epoch, of `cachedseg.runs.EpochMetrics` rows (a matplotlib
    figure; curves.png and reports). Pictures draw what they are given (rows here, a class set above): they read no
    run, store or dataset."""
    from matplotlib.ticker import MaxNLocator
    plt = pyplot()
    epochs = [r.epoch for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    ax1.plot(epochs, [r.train_loss for r in rows], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    ax2.plot(epochs, [r.val_miou for r in rows], marker="o", label="val mIoU")
    ax2.plot(epochs, [r.val_pixel_acc for r in rows], marker="s", label="val pixel accuracy")
    ax2.set(xlabel="epoch", ylim=(0, 1), title="Validation (decoder output size)")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig
