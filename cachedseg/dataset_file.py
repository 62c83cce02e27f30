"""The dataset file: the one owner of its format, a TOML file describing a dataset of one's own.

    name = "my survey"                    optional, for messages
    images = "images/*.jpg"               a glob below the file's folder (or a template with {id})
    masks = "masks/{stem}.png"            a template: {id}, {stem}, {dir} (PNGs, or label rasters: GeoTIFFs)
    labels = "labels.gpkg"                instead of masks: class polygons (GeoPackage, GeoJSON) for every image
    label_field = "class"                 the polygons' attribute holding the class (index or name)
    mask_encoding = "index" | "rgb"       single-channel class indices (default), or class colours
    ignore_index = 255                    the label of unlabelled pixels (index masks: its value in the file)
    ignore_colors = [[r, g, b], ...]      rgb masks: colours that mean unlabelled
    remap = { "4" = 0, "5" = 255 }        index masks: values merged into a class or dropped, first
    [splits]                              trn/val files or id patterns, or val_fraction (+ seed): default 0.2;
                                          + block = PX: split each map's area in blocks (extract --tile)
    [[classes]]                           in index order: name, color = [r, g, b] (spread hues if omitted)

Every value is checked here, each error naming the file and the key; `cachedseg.dataset.Dataset` is what it reads
into. The README's "Your own data" is the user's guide.
"""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from cachedseg.classes import ClassSet, Color, spread_colors
from cachedseg.dataset import MASK_ENCODINGS, SPLITS, Dataset, Layout, is_id_pattern
from cachedseg.errors import CachedsegError


def load_dataset_file(path: str | Path, root: str | Path | None = None) -> Dataset:
    """Read a dataset file (TOML; see the README's "Your own data"); its paths are relative to its folder.

    Raises:
        CachedsegError: For a file that is not TOML, an unknown or missing key, or a value out of range, naming
            the file and the key.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CachedsegError(f"{path} is not a valid TOML dataset file ({exc}); fix it") from None
    return _from_dict(raw, path, Path(root) if root is not None else path.parent)


_KEYS = ("name", "images", "masks", "labels", "label_field", "splits", "mask_encoding", "classes", "ignore_index",
         "ignore_colors", "remap")


def _from_dict(raw: dict, path: Path, root: Path) -> Dataset:
    """A Dataset from a parsed dataset file, every value checked."""
    def bad(key: str, why: str) -> CachedsegError:
        return CachedsegError(f"{path}: {key} {why}")

    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise bad(repr(unknown[0]), f"is not a dataset-file key; the keys are {', '.join(_KEYS)}")
    for key in ("images", "classes"):
        if key not in raw:
            raise bad(key, "is missing; see the README's \"Your own data\" for an example")
    if ("masks" in raw) == ("labels" in raw):
        raise bad("masks", "or labels must be given (not both): mask files by a template, or one vector file of "
                  "class polygons")
    images, masks = raw["images"], raw.get("masks", "")
    if not isinstance(images, str) or not images or Path(images).is_absolute():
        raise bad("images", f"= {images!r}: give a glob relative to the file's folder, e.g. \"images/*.jpg\"")
    labels, label_field = _vector_labels(raw, bad)
    if labels is None and (not isinstance(masks, str) or not any(f"{{{k}}}" in masks for k in ("id", "stem"))):
        raise bad("masks", f"= {masks!r}: give a path template with {{id}} or {{stem}}, e.g. \"masks/{{stem}}.png\"")
    try:
        masks.format(id="x", stem="x", dir="x")  # "" for vector labels
    except (KeyError, IndexError, ValueError) as exc:
        raise bad("masks", f"= {masks!r} names {exc}; the fields are {{id}}, {{stem}} and {{dir}}") from None
    encoding = raw.get("mask_encoding", "index")
    if encoding not in MASK_ENCODINGS:
        raise bad("mask_encoding", f"= {encoding!r}: use \"index\" or \"rgb\"")
    table = raw["classes"]
    if not isinstance(table, list) or not table or not all(isinstance(c, dict) for c in table):
        raise bad("classes", "must be [[classes]] tables, one per class in index order, each with name and color")
    for i, entry in enumerate(table):
        extra = sorted(set(entry) - {"name", "color"})
        if extra or not isinstance(entry.get("name"), str):
            raise bad(f"[[classes]] {i}", f"needs a name (and a color = [r, g, b]), not {entry!r}")
        if "color" not in entry and encoding == "rgb":
            raise bad(f"[[classes]] {i} ({entry['name']})", "needs a color: rgb masks are read by it")
        if "color" in entry and not (isinstance(entry["color"], list) and len(entry["color"]) == 3
                                     and all(isinstance(v, int) and 0 <= v <= 255 for v in entry["color"])):
            raise bad(f"[[classes]] {i} ({entry['name']})", f"color = {entry['color']!r}: give [r, g, b], each 0-255")
    spread = spread_colors(len(table))
    ignore_index = raw.get("ignore_index", 255)
    if not isinstance(ignore_index, int):
        raise bad("ignore_index", f"= {ignore_index!r}: give a whole number")
    classes = ClassSet(tuple(c["name"] for c in table), tuple(tuple(c.get("color", spread[i])) for i, c in
                                                              enumerate(table)), ignore_index)
    ignore_colors = raw.get("ignore_colors", [])
    if encoding != "rgb" and ignore_colors:
        raise bad("ignore_colors", "is for rgb masks; index masks mark unlabelled pixels with ignore_index")
    if not isinstance(ignore_colors, list) or not all(isinstance(c, list) and len(c) == 3 and all(
            isinstance(v, int) and 0 <= v <= 255 for v in c) for c in ignore_colors):
        raise bad("ignore_colors", f"= {ignore_colors!r}: give a list of [r, g, b]")
    ignore_colors = tuple(tuple(c) for c in ignore_colors)
    if encoding == "rgb":
        seen: dict[Color, str] = {}
        for name, color in zip(classes.names, classes.colors):
            if color in seen or color in ignore_colors:
                raise bad(f"[[classes]] {name}", f"has the colour {list(color)} of "
                          f"{seen.get(color, 'ignore_colors')}; in rgb masks each class needs its own colour")
            seen[color] = name
    remap = raw.get("remap", {})
    if remap and encoding != "index":
        raise bad("remap", "is for index masks; for rgb masks give the classes' colours")
    if not isinstance(remap, dict):
        raise bad("remap", f"= {remap!r}: give a table, e.g. remap = {{ \"4\" = 0, \"5\" = 255 }}")
    pairs = []
    for key, value in remap.items():
        if not (str(key).isdigit() and isinstance(value, int)
                and (0 <= value < len(classes) or value == ignore_index)):
            raise bad("remap", f"{key!r} = {value!r}: map a mask value to a class index 0..{len(classes) - 1} or "
                      f"to ignore_index {ignore_index}")
        pairs.append((int(key), value))
    if labels is not None and ("mask_encoding" in raw or remap):
        raise bad("labels", "are polygons whose label_field names the class; mask_encoding and remap are for masks")
    return Dataset(root=root, classes=classes, layout=_layout(raw.get("splits"), images, masks, bad),
                   name=str(raw.get("name", path.stem)), mask_encoding=encoding, ignore_colors=ignore_colors,
                   remap=tuple(sorted(pairs)), file=path, labels=None if labels is None else root / labels,
                   label_field=label_field)


def _vector_labels(raw: dict, bad) -> tuple[str | None, str]:
    """The `labels` vector file (relative to the file's folder; None for masks) and its `label_field`."""
    from cachedseg.vector_labels import VECTOR_SUFFIXES
    labels, field = raw.get("labels"), raw.get("label_field", "class")
    if "label_field" in raw and labels is None:
        raise bad("label_field", "names the class attribute of vector labels; give labels = \"labels.gpkg\" too")
    if labels is not None and (not isinstance(labels, str) or Path(labels).is_absolute()
                               or Path(labels).suffix.lower() not in VECTOR_SUFFIXES):
        raise bad("labels", f"= {labels!r}: give a vector file relative to the file's folder "
                  f"({', '.join(VECTOR_SUFFIXES)}), e.g. \"labels.gpkg\"")
    if not isinstance(field, str) or not field:
        raise bad("label_field", f"= {field!r}: give the name of the attribute that holds the class")
    return labels, field


def _layout(splits, images: str, masks: str, bad) -> Layout:
    """The layout of a dataset file's images, masks and [splits]."""
    splits = {"val_fraction": 0.2} if splits is None else splits
    if not isinstance(splits, dict):
        raise bad("splits", "must be a [splits] table: trn and val files, or val_fraction (and seed)")
    files = {k: v for k, v in splits.items() if k in SPLITS}
    rest = sorted(set(splits) - set(SPLITS) - {"val_fraction", "seed", "block"})
    if rest:
        raise bad(f"[splits] {rest[0]!r}", "is not a split key; give trn and val files, or val_fraction and seed")
    if files:
        if set(files) != set(SPLITS) or "val_fraction" in splits or "block" in splits:
            raise bad("[splits]", "needs both trn and val files, or val_fraction (and block) instead, not both")
        if not all(isinstance(v, str) for v in files.values()):
            raise bad("[splits]", "trn and val must be file paths relative to the dataset file's folder, or id "
                      "patterns such as \"train/*\"")
        if "{id}" in images and any(is_id_pattern(v) for v in files.values()):
            raise bad("images", "must be a glob (the images are listed by it) when a split is an id pattern")
        return Layout(images, masks, tuple((s, files[s]) for s in SPLITS))
    fraction, seed = splits.get("val_fraction"), splits.get("seed", 0)
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1 or not isinstance(seed, int):
        raise bad("[splits]", f"val_fraction = {fraction!r}, seed = {seed!r}: give a fraction between 0 and 1 and a "
                  "whole-number seed")
    if "{id}" in images:
        raise bad("images", "must be a glob (the images are listed by it) when the split is by val_fraction")
    block = splits.get("block")
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
        raise bad("[splits] block", f"= {block!r}: give the side of a split block in pixels of the images, e.g. 2048 "
                  "(a few windows; larger blocks leak less across their edges)")
    return Layout(images, masks, None, float(fraction), seed, block)
