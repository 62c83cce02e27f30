"""The feature store: the one owner of its on-disk format, a plain Zarr v3 group (documented in the README).

    <store>.zarr/           attributes: format, format_version, the StoreSpec fields, dataset, weights, bad, ...
        features  [N, V, L, C, h, w] float16|float32
                                   views x last layers x channels x token grid; one (image, view) per chunk;
                                   crc32c; fill NaN (so a missing chunk is refused)
        masks     [N, Mh, Mw]  uint8            class indices of the identity view, 255 = ignore; one image per
                                                chunk; zstd + crc32c; fill 254 (never a label: missing is refused)
        ids       [N, L]       uint8            image ids, UTF-8, zero-padded to L bytes; crc32c
        split     [N]          uint8            index into SPLITS: 0 trn, 1 val; crc32c
        done      [N]          uint8            0 pending, 1 written, 2 skipped as unreadable, 3 empty (a window with no
                                                valid pixel: nothing stored); one chunk per image; crc32c
        sources   [N, 2, 4]    int64            what each entry was computed from: for its image and mask file, size,
                                                mtime_ns and blake2b-128 (two int64, little-endian); size -1: no
                                                record; chunked like `done`; crc32c
        tiles     [N, 3]       int64            tiled stores only: each window's raster (index into the `rasters`
                                                attribute), first row and first column in that raster's grid; crc32c
        labelled  [N]          uint8            tiled stores only: 1 if the window has a labelled pixel (else it is
                                                kept out of training); chunked like `done`; crc32c

Only core Zarr v3 data types, so zarr, xarray, dask and tensorstore all read every array. With
`images_per_shard` N > 1, features, masks and flags are stored in shards of N images (one file each, zarr's
sharding codec): a shard is written whole, so the shard is the unit of work. A store is a local folder or any
fsspec URL (s3://bucket/x.zarr). Every other module goes through `FeatureStore` (or the helpers here) instead of
touching arrays or attributes itself; the attributes are typed by `StoreAttrs`. The feature spec is
`cachedseg.spec.StoreSpec`; converting a version-1 store is `cachedseg.upgrade`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from cachedseg import __version__
from cachedseg.dataset import SPLITS
from cachedseg.errors import CachedsegError
from cachedseg.paths import check_store, exists, filesystem, is_url
from cachedseg.spec import StoreSpec
from cachedseg.tiles import RasterGrid
from cachedseg.views import apply_view

FORMAT = "cachedseg-features"
FORMAT_VERSION = 2
PENDING, DONE, BAD, EMPTY = 0, 1, 2, 3  # values of the `done` flags
FLAG_NAMES = ("pending", "done", "bad", "empty")
MISSING_LABEL = 254  # fill value of `masks`: no label is ever 254, so it marks a chunk that is not there

# The array names, in one place.
FEATURES, MASKS, IDS, SPLIT, FLAGS = "features", "masks", "ids", "split", "done"
# What each entry was computed from (its image and mask file): stats for a fast check, a hash to confirm. One
# array, so one more file per image (or shard), not two. Stores written before it existed lack it; `add_records`
# adds it, every record unknown.
SOURCES = "sources"
SOURCE_FILES, SOURCE_FIELDS = ("image", "mask"), ("size", "mtime_ns", "blake2b_0", "blake2b_1")
HASH_BYTES = 16
NO_STAT = -1  # fill value of `sources`: no record
# Tiled stores (`extract --tile`): where each window lies, and whether it holds labels.
TILES, LABELLED = "tiles", "labelled"
SPLIT_BLOCKS = "split_blocks"  # attribute: the split by blocks a tiled store's windows follow (`Layout.block`)
RASTERS = "rasters"  # attribute: the grid of each image windows are cut from (`cachedseg.tiles.RasterGrid`)
FEATURE_DIMS = ("image", "view", "layer", "channel", "token_y", "token_x")
REINDEX = "reindex"  # attribute journalling a growing image list until every array has caught up
GONE = "gone"  # attribute naming the images gone from the dataset
# Chunk keys c.<i>.0.0...: one file per chunk, no nested folders (a folder per dimension would cost an inode each)
FLAT_KEYS = {"name": "default", "separator": "."}


@dataclass(frozen=True)
class StoreAttrs:
    """The store group's attributes, typed: `to_dict` gives the JSON written, `from_dict` reads it back (keys a
    store of an earlier cachedseg lacks take their defaults).

    Attributes:
        spec: What made the features (its fields are top-level keys).
        num_images: Images in the store.
        dataset: The dataset folder the store was extracted from.
        weights: Where the backbone's weights came from: `auto`, `random` or a file.
        package_version: The cachedseg that created the store.
        bad: Images skipped as unreadable, with the reason.
        images_per_shard: Images per shard file (1: no shards).
        gone: Images no longer in the dataset at the last extract, with the reason (written once there are any).
        reindex: The journal of a growing image list (`ids`, `splits`, and for a tiled store `tiles` and
            `rasters`) until every array has caught up.
        rasters: For a tiled store: the grid of each image its windows are cut from (`RasterGrid.to_dict`).
        split_blocks: For a tiled store of a dataset split by blocks: the rule its windows' splits and masks follow
            (`Dataset.block_rule`); a changed rule rewrites the masks.
        format: Always `FORMAT`.
        format_version: The store format version.
    """

    spec: StoreSpec
    num_images: int
    dataset: str
    weights: str = "auto"
    package_version: str = __version__
    bad: dict[str, str] = field(default_factory=dict)
    images_per_shard: int = 1
    gone: dict[str, str] | None = None
    reindex: dict[str, list] | None = None
    rasters: list[dict] | None = None
    split_blocks: dict | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, attrs: dict) -> StoreAttrs:
        """Read the attributes of a store of this format version."""
        return cls(spec=StoreSpec.from_attrs(attrs), num_images=int(attrs["num_images"]), dataset=attrs["dataset"],
                   weights=attrs.get("weights", "auto"), package_version=attrs.get("package_version", ""),
                   bad=dict(attrs.get("bad", {})), images_per_shard=int(attrs.get("images_per_shard", 1)),
                   gone=None if attrs.get(GONE) is None else dict(attrs[GONE]), reindex=attrs.get(REINDEX),
                   rasters=attrs.get(RASTERS), split_blocks=attrs.get(SPLIT_BLOCKS), format=attrs["format"],
                   format_version=attrs["format_version"])

    def to_dict(self) -> dict:
        """The JSON attributes (in the order a new store has always written them; gone and reindex when set)."""
        return {"format": self.format, "format_version": self.format_version, **asdict(self.spec),
                "num_images": self.num_images, "dataset": self.dataset,
                "weights": self.weights, "package_version": self.package_version, "bad": dict(self.bad),
                "images_per_shard": self.images_per_shard,
                **({} if self.gone is None else {GONE: dict(self.gone)}),
                **({} if self.rasters is None else {RASTERS: list(self.rasters)}),
                **({} if self.split_blocks is None else {SPLIT_BLOCKS: dict(self.split_blocks)}),
                **({} if self.reindex is None else {REINDEX: self.reindex})}


def encode_ids(ids: list[str]) -> np.ndarray:
    """Image ids -> uint8 [N, L]: UTF-8 bytes, zero-padded (a core Zarr type, unlike variable-length strings)."""
    raw = [i.encode("utf-8") for i in ids]
    width = max([len(r) for r in raw] + [1])
    return np.frombuffer(b"".join(r.ljust(width, b"\0") for r in raw), dtype=np.uint8).reshape(len(raw), width).copy()


def decode_ids(array: np.ndarray) -> list[str]:
    """uint8 [N, L] -> image ids (inverse of `encode_ids`)."""
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in np.asarray(array, dtype=np.uint8)]


class FeatureStore:
    """A feature store on disk: create or open it, read an image, write one and flag it done.

    Attributes:
        path: The store folder.
        spec: What made the features (backbone, fingerprint, preprocessing, dtype, sizes).
        ids: Image ids, by index.
        splits: `trn` or `val`, by index.
    """

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = str(path)
        self.group = group
        self.attrs = StoreAttrs.from_dict(dict(group.attrs))
        self.spec = self.attrs.spec
        self._arrays = {name: group[name] for name in (FEATURES, MASKS, IDS, SPLIT, FLAGS)}  # looked up once
        for name in (SOURCES, *((TILES, LABELLED) if self.attrs.rasters is not None else ())):
            with contextlib.suppress(KeyError):  # one lookup (`in` and then [] would fetch its metadata twice)
                self._arrays[name] = group[name]
        try:
            self.ids = decode_ids(self._arrays[IDS][:])
            self.splits = [SPLITS[s] for s in self._arrays[SPLIT][:]]
        except (ValueError, OSError, UnicodeDecodeError, IndexError) as exc:
            raise CachedsegError(f"the store {path} has a corrupt ids or split array ({exc}), so its images cannot be "
                                 f"told apart; rebuild it with `cachedseg extract DATA --store {path} --overwrite`") from None

    @classmethod
    def create(cls, path: str | Path, spec: StoreSpec, ids: list[str], splits: list[str], dataset: str,
               weights: str, images_per_shard: int = 1, tiles: np.ndarray | None = None,
               rasters: list[RasterGrid] | None = None, split_blocks: dict | None = None) -> FeatureStore:
        """Create an empty store for `ids` (every flag pending); `weights` records where the weights came from;
        `images_per_shard` > 1 packs that many images into each file. A tiled store (`spec.tiled`) also takes each
        window's (raster, row, column) `tiles` [N, 3], the `rasters` they index and the `split_blocks` rule."""
        n, (h, w), (mh, mw), per = len(ids), spec.grid, spec.mask_size, images_per_shard
        if per < 1:
            raise CachedsegError("--images-per-shard must be at least 1")
        if spec.tiled != (tiles is not None and rasters is not None):
            raise ValueError("a tiled spec needs tiles and rasters, and only a tiled spec takes them")
        feature_shape = (len(spec.views), spec.layers, spec.channels, h, w)
        attrs = StoreAttrs(spec=spec, num_images=n, dataset=dataset, weights=weights, images_per_shard=per,
                           rasters=None if rasters is None else [r.to_dict() for r in rasters],
                           split_blocks=split_blocks)
        group = zarr.open_group(str(path), mode="w", attributes=attrs.to_dict())
        # One image (and view) per chunk keeps shuffled training reads fast; float features barely compress, so
        # only a checksum: a corrupted chunk fails loudly instead of decoding to wrong numbers.
        shards = (lambda *chunk: (per, *chunk[1:])) if per > 1 else (lambda *chunk: None)
        group.create_array(FEATURES, shape=(n, *feature_shape), chunks=(1, 1, *feature_shape[1:]),
                           shards=shards(1, *feature_shape), dtype=spec.dtype, compressors=[Crc32cCodec()],
                           fill_value=float("nan"), dimension_names=FEATURE_DIMS, chunk_key_encoding=FLAT_KEYS)
        group.create_array(MASKS, shape=(n, mh, mw), chunks=(1, mh, mw), shards=shards(1, mh, mw), dtype="uint8",
                           compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=MISSING_LABEL,
                           dimension_names=("image", "mask_y", "mask_x"), chunk_key_encoding=FLAT_KEYS)
        write_index_arrays(group, ids, splits, np.full(n, PENDING, dtype=np.uint8), flags_per_chunk=per)
        _create_records(group, n, per)
        if tiles is not None:
            _write_tiles(group, tiles)
            _create_labelled(group, n, per)
        return cls(path, group)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r", group: zarr.Group | None = None) -> FeatureStore:
        """Open a feature store, checking that it is one and has this format version.

        Args:
            path: The store folder.
            mode: `r` to read, `r+` to finish writing it.
            group: The store's group, if the caller has opened it already (`open_group`), so it is not opened again:
                on a bucket each open is a round trip.

        Raises:
            CachedsegError: If there is no store there, or it has another format version.
        """
        group = open_group(path, mode) if group is None else group
        if group is None:  # told apart only now, so opening a store costs no separate existence check
            check_store(path)
        if group is None or group.attrs.get("format") != FORMAT:
            raise CachedsegError(f"{path} is not a cachedseg feature store (no {FORMAT} attributes in a Zarr group)")
        version = group.attrs.get("format_version")
        if version == 1:
            raise CachedsegError(f"{path} is a version-1 feature store; convert it in place, without recomputing "
                                 f"its features, with `cachedseg upgrade {path}`")
        if version != FORMAT_VERSION:
            raise CachedsegError(f"{path} has store format version {version}, this cachedseg ({__version__}) reads "
                                 f"version {FORMAT_VERSION}; rebuild it with `cachedseg extract ... --overwrite`")
        if REINDEX in group.attrs:  # an extract that grew the image list was stopped half way
            if mode == "r":
                raise CachedsegError(f"the store {path} was left half way through adding images by an interrupted "
                                     "extract; rerun that `cachedseg extract DATA --store ...` command to finish it")
            _apply_index(group)
        return cls(path, group)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dataset(self) -> str:
        """The dataset folder the store was extracted from."""
        return self.attrs.dataset

    @property
    def weights(self) -> str:
        """Where the backbone's weights came from: `auto`, `random` or a file."""
        return self.attrs.weights

    @property
    def images_per_shard(self) -> int:
        """Images per shard file: the unit of work (1: no shards, one file per image)."""
        return self.attrs.images_per_shard

    @property
    def bad(self) -> dict[str, str]:
        """Images skipped as unreadable, with the reason."""
        return dict(self.attrs.bad)

    def set_bad(self, bad: dict[str, str]) -> None:
        """Record the images skipped as unreadable (left untouched when unchanged, so a no-op rerun writes nothing)."""
        if self.bad != bad:
            self.group.attrs["bad"] = bad
            self.attrs = replace(self.attrs, bad=dict(bad))

    def flags(self, repair: bool = False) -> np.ndarray:
        """The `done` flags [N], read now; a corrupt flag is an error, or with `repair` reset to pending."""
        try:
            return self._arrays[FLAGS][:]
        except (ValueError, OSError):
            pass
        flags, broken = np.zeros(len(self), dtype=np.uint8), []
        for i in range(len(self)):  # one chunk per flag: find the corrupt ones
            try:
                flags[i] = self._arrays[FLAGS][i]
            except (ValueError, OSError):
                broken.append(i)
        if not repair:
            raise CachedsegError(f"the store {self.path} has corrupt done flags for images "
                                 f"{[self.ids[i] for i in broken[:5]]}; rerun the `cachedseg extract DATA --store "
                                 f"{self.path}` that built it to recompute them")
        for i in broken:
            self.mark(i, PENDING)
        return flags

    def states(self) -> list[str]:
        """Each image's flag by name (`FLAG_NAMES`: pending, done, or bad: skipped as unreadable), by index."""
        return [FLAG_NAMES[f] for f in self.flags()]

    def empty_block(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Features [n, V, L, C, h, w] (store dtype) and masks [n, Mh, Mw] for `write_block`, filled with what reads
        as missing (NaN, the missing label), so an image left unfilled is never taken for data."""
        spec, (h, w) = self.spec, self.spec.grid
        return (np.full((n, len(spec.views), spec.layers, spec.channels, h, w), np.nan, dtype=spec.dtype),
                np.full((n, *spec.mask_size), MISSING_LABEL, dtype=np.uint8))

    def check_writable(self, pending: int) -> None:
        """Refuse a local store whose folders this process cannot write, before any of `pending` images is computed."""
        if is_url(self.path):
            return
        for folder in [Path(self.path)] + [Path(self.path) / name for name in (FEATURES, MASKS, FLAGS)]:
            if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
                raise CachedsegError(f"the store {self.path} has {pending} images to compute, but its folder {folder} "
                                     "is read-only for this user; make the store writable, or extract into another "
                                     "--store")

    def mark(self, index: int, flag: int) -> None:
        """Set one image's flag."""
        self._arrays[FLAGS][index] = flag

    def write(self, index: int, features: np.ndarray, mask: np.ndarray, stats: np.ndarray | None = None,
              hashes: np.ndarray | None = None) -> None:
        """Write one image's features [V, L, C, h, w] and mask [Mh, Mw] (and the record of its source files), then
        flag it done (a kill never flags half an image). In a sharded store use `write_block` for whole shards."""
        self.write_block(index, features[None], mask[None], np.array([DONE], dtype=np.uint8),
                         None if stats is None else stats[None], None if hashes is None else hashes[None])

    def write_block(self, start: int, features: np.ndarray, masks: np.ndarray, flags: np.ndarray,
                    stats: np.ndarray | None = None, hashes: np.ndarray | None = None,
                    labelled: np.ndarray | None = None) -> None:
        """Write images start.. (whole shards in a sharded store): features [n, V, L, C, h, w] (NaN for a skipped
        image), masks [n, Mh, Mw], the records of their source files (stats [n, 2, 2], hashes [n, 2, 16]), in a
        tiled store whether each holds labels (`labelled` [n]), then their flags [n] (DONE, BAD or EMPTY), last."""
        end = start + len(flags)
        self._arrays[FEATURES][start:end] = features
        self._arrays[MASKS][start:end] = masks
        if stats is not None and self.has_records:
            self._arrays[SOURCES][start:end] = _pack_records(stats, hashes)
        if labelled is not None and self.tiled:
            self._arrays[LABELLED][start:end] = labelled
        self._arrays[FLAGS][start:end] = flags

    def write_mask(self, index: int, mask: np.ndarray, stats: np.ndarray, hashes: np.ndarray) -> None:
        """Replace one done image's mask [Mh, Mw] (its mask file changed, its image did not), then its record."""
        self._arrays[MASKS][index] = mask
        if self.tiled:
            self._arrays[LABELLED][index] = bool((mask != self.spec.ignore_index).any())
        self.set_record(index, stats, hashes)

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray, int]:
        """One image's stored arrays as they are (features [V, L, C, h, w], mask, flag, stats, hashes, labelled),
        to write them back unchanged with the rest of their shard."""
        row = (self._arrays[SOURCES][index:index + 1] if self.has_records  # this image's record, not all N
               else np.full((1, len(SOURCE_FILES), len(SOURCE_FIELDS)), NO_STAT, np.int64))
        stats, hashes = _unpack_records(row)
        labelled = int(self._arrays[LABELLED][index]) if self.tiled else 1
        return (self._arrays[FEATURES][index], self._arrays[MASKS][index], int(self._arrays[FLAGS][index]),
                stats[0], hashes[0], labelled)

    @property
    def tiled(self) -> bool:
        """Whether the store holds windows cut from images (`extract --tile`), with where each lies."""
        return self.attrs.rasters is not None

    @property
    def rasters(self) -> list[RasterGrid]:
        """A tiled store's image grids, in the order `tiles` indexes them."""
        return [RasterGrid.from_dict(r) for r in self.attrs.rasters or ()]

    def tiles(self) -> np.ndarray:
        """Each window's (raster, first row, first column) [N, 3] int64, read now."""
        return self._arrays[TILES][:]

    def labelled(self) -> np.ndarray:
        """Whether each entry holds a labelled pixel [N] bool (every entry of a store of whole frames)."""
        return self._arrays[LABELLED][:].astype(bool) if self.tiled else np.ones(len(self), dtype=bool)

    @property
    def has_records(self) -> bool:
        """Whether the store records what each entry was computed from (stores made before records do not)."""
        return SOURCES in self._arrays

    def add_records(self) -> None:
        """Add the source-file records to a store made without them, every record unknown."""
        if not self.has_records:
            _create_records(self.group, len(self), self.images_per_shard)
            self._arrays[SOURCES] = self.group[SOURCES]

    def records(self) -> tuple[np.ndarray, np.ndarray]:
        """What each entry was computed from: stats [N, 2, 2] int64 (image, mask) x (size, mtime_ns), -1 where
        unknown, and blake2b-128 hashes [N, 2, 16] uint8; all unknown in a store without records."""
        if not self.has_records:
            return _unpack_records(np.full((len(self), len(SOURCE_FILES), len(SOURCE_FIELDS)), NO_STAT, np.int64))
        return _unpack_records(self._arrays[SOURCES][:])

    def set_record(self, index: int, stats: np.ndarray, hashes: np.ndarray) -> None:
        """Record what one entry was computed from."""
        self._arrays[SOURCES][index] = _pack_records(stats[None], hashes[None])[0]

    @property
    def gone(self) -> dict[str, str]:
        """Images no longer in the dataset at the last extract (kept, left out of training), with the reason."""
        return dict(self.attrs.gone or {})

    def set_gone(self, gone: dict[str, str]) -> None:
        """Record the images gone from the dataset (written only when it changed, so a no-op rerun writes nothing)."""
        if self.gone != gone:
            self.group.attrs[GONE] = gone
            self.attrs = replace(self.attrs, gone=dict(gone))

    def set_split_blocks(self, rule: dict | None) -> None:
        """Record the split by blocks the windows' splits and masks now follow (written only when it changed)."""
        if self.attrs.split_blocks != rule:
            self.group.attrs[SPLIT_BLOCKS] = None if rule is None else dict(rule)
            self.attrs = replace(self.attrs, split_blocks=None if rule is None else dict(rule))

    def set_index(self, ids: list[str], splits: list[str], tiles: np.ndarray | None = None,
                  rasters: list[RasterGrid] | None = None) -> FeatureStore:
        """Grow the image list to `ids` (the present ids first, in their order, then new ones) with `splits` (an
        image may change split); new images are pending. A tiled store also takes every window's `tiles` [N, 3]
        and the `rasters` (the present ones first) they index. Returns the store reopened.

        The new list is journalled in the attributes first, so a kill at any moment leaves a store that the next
        `open(mode="r+")` finishes."""
        if ids[:len(self)] != self.ids or len(set(ids)) != len(ids):
            raise ValueError("set_index keeps every present id at its index and adds new ids only")
        journal: dict[str, list] = {"ids": ids, "splits": splits}
        if self.tiled:
            journal.update(tiles=np.asarray(tiles).tolist(), rasters=[r.to_dict() for r in rasters])
        self.group.attrs[REINDEX] = journal
        _apply_index(self.group)
        return FeatureStore(self.path, zarr.open_group(self.path, mode="r+"))

    def read(self, index: int, view: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """One view of one image: features [L, C, h, w] (store dtype) and its mask [Mh, Mw] uint8, transformed by
        the view as the input was.

        Raises:
            CachedsegError: Naming the image and the command that repairs it, if a chunk is corrupt or missing.
        """
        try:
            features = self._arrays[FEATURES][index, view]
            mask = self._arrays[MASKS][index]
        except (ValueError, OSError) as exc:  # crc32c mismatch, truncated chunk, unreadable file
            raise self._damaged(index, f"is corrupt ({exc})") from None
        # A chunk is written whole or not at all, so one fill value at its start means the whole chunk is missing.
        if np.isnan(features.flat[0]) or mask.flat[0] == MISSING_LABEL:
            raise self._damaged(index, "is missing (a deleted chunk file?)")
        return features, apply_view(mask, self.spec.views[view])

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All features [N, V, L, C, h, w] and masks [N, Mh, Mw] (identity view) in one read (for --in-memory),
        checked like `read`."""
        try:
            features, masks = self._arrays[FEATURES][:], self._arrays[MASKS][:]
        except (ValueError, OSError):  # find and name the corrupt image
            for i in range(len(self)):
                for v in range(len(self.spec.views)):
                    self.read(i, v)
            raise
        flags = self.flags()
        missing = np.isnan(features.reshape(*features.shape[:2], -1)[:, :, 0]).any(1) | (masks[:, 0, 0] == MISSING_LABEL)
        for i in np.flatnonzero(missing):
            if flags[i] == DONE:
                raise self._damaged(int(i), "is missing (a deleted chunk file?)")
        return features, masks

    def class_pixels(self, indices: list[int]) -> np.ndarray:
        """Pixels of each class [K] int64 in the masks of the images `indices` (identity view, at the mask size; the
        ignore label left out), reading one mask chunk at a time, checked like `read`."""
        k, counts = len(self.spec.class_names), np.zeros(256, dtype=np.int64)
        for index in indices:
            try:
                mask = self._arrays[MASKS][index]
            except (ValueError, OSError) as exc:
                raise self._damaged(index, f"is corrupt ({exc})") from None
            if mask.flat[0] == MISSING_LABEL:
                raise self._damaged(index, "is missing (a deleted chunk file?)")
            counts += np.bincount(mask.ravel(), minlength=256)
        return counts[:k]  # extraction stores only class indices and the ignore label

    @property
    def nbytes(self) -> int:
        """Uncompressed bytes of the features and masks."""
        return self._arrays[FEATURES].nbytes + self._arrays[MASKS].nbytes

    def _damaged(self, index: int, what: str) -> CachedsegError:
        """The error for an image whose cached data cannot be used."""
        id_ = self.ids[index]
        return CachedsegError(f"the cached data of image {id_!r} in {self.path} {what}; recompute it with "
                              f"`cachedseg extract DATA --store {self.path} --redo {id_}`")

    def describe(self) -> dict:
        """The store's attributes plus image counts by split and state, and its size on disk."""
        flags, splits = self.flags(), np.array(self.splits)
        tiled = {"empty": int((flags == EMPTY).sum()), "unlabelled": int(((flags == DONE) & ~self.labelled()).sum())
                 } if self.tiled else {}
        return {**self.attrs.to_dict(), "images": len(self), "trn": int((splits == "trn").sum()),
                "val": int((splits == "val").sum()), "done": int((flags == DONE).sum()),
                "pending": int((flags == PENDING).sum()), "skipped_bad": int((flags == BAD).sum()),
                "gone": len(self.gone), **tiled, "bytes_on_disk": disk_bytes(self.path)}


def write_index_arrays(group: zarr.Group, ids: list[str], splits: list[str], flags: np.ndarray,
                        suffix: str = "", flags_per_chunk: int = 1) -> None:
    """Create and fill `ids`, `split` and `done` (names with `suffix`), each checksummed."""
    n = len(ids)
    _write_ids_and_splits(group, ids, splits, suffix)
    # One chunk per unit of work (an image, or a shard): writers never rewrite each other's flags, and a flag
    # lands only after its data.
    done = group.create_array(FLAGS + suffix, shape=(n,), chunks=(flags_per_chunk,), dtype="uint8",
                              compressors=[Crc32cCodec()], chunk_key_encoding=FLAT_KEYS,
                              fill_value=PENDING, dimension_names=("image",),
                              attributes={"flag_values": [PENDING, DONE, BAD, EMPTY],
                                          "flag_meanings": " ".join(FLAG_NAMES)})
    if (flags != PENDING).any():
        done[:] = flags


def _write_ids_and_splits(group: zarr.Group, ids: list[str], splits: list[str], suffix: str = "",
                          overwrite: bool = False) -> None:
    """Create (or replace) and fill `ids` and `split` (names with `suffix`), each checksummed."""
    n = len(ids)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise CachedsegError(f"unknown split names {unknown}; a store holds {' and '.join(SPLITS)} images")
    codes = np.array([SPLITS.index(s) for s in splits], dtype=np.uint8)
    raw = encode_ids(ids)
    group.create_array(IDS + suffix, shape=raw.shape, chunks=raw.shape, dtype="uint8", compressors=[Crc32cCodec()],
                       fill_value=0, dimension_names=("image", "id_byte"), chunk_key_encoding=FLAT_KEYS,
                       attributes={"encoding": "utf-8, zero-padded"}, overwrite=overwrite)[:] = raw
    group.create_array(SPLIT + suffix, shape=(n,), chunks=(max(n, 1),), dtype="uint8", compressors=[Crc32cCodec()],
                       fill_value=0, dimension_names=("image",), chunk_key_encoding=FLAT_KEYS, overwrite=overwrite,
                       attributes={"flag_values": list(range(len(SPLITS))), "flag_meanings": " ".join(SPLITS)})[:] = codes


def _create_records(group: zarr.Group, n: int, per: int) -> None:
    """Create `sources`, every record unknown; chunked like `done` (one chunk per unit of work, so ranks never
    write the same file, and a unit's records land with its data, before its flags)."""
    shape = (len(SOURCE_FILES), len(SOURCE_FIELDS))
    group.create_array(SOURCES, shape=(n, *shape), chunks=(per, *shape), dtype="int64", compressors=[Crc32cCodec()],
                       fill_value=NO_STAT, dimension_names=("image", "source_file", "source_field"),
                       chunk_key_encoding=FLAT_KEYS,
                       attributes={"source_file": list(SOURCE_FILES), "source_field": list(SOURCE_FIELDS),
                                   "hash": "blake2b, digest_size 16, as two little-endian int64"})


def _write_tiles(group: zarr.Group, tiles: np.ndarray, overwrite: bool = False) -> None:
    """Create (or replace) and fill `tiles`: (raster, row, column) [N, 3] of each window, one checksummed chunk."""
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 3)
    group.create_array(TILES, shape=tiles.shape, chunks=(max(len(tiles), 1), 3), dtype="int64",
                       compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=-1,
                       dimension_names=("image", "tile_field"), chunk_key_encoding=FLAT_KEYS, overwrite=overwrite,
                       attributes={"tile_field": ["raster", "row", "column"]})[:] = tiles


def _create_labelled(group: zarr.Group, n: int, per: int) -> None:
    """Create `labelled`, every entry 0 until written; chunked like `done`."""
    group.create_array(LABELLED, shape=(n,), chunks=(per,), dtype="uint8", compressors=[Crc32cCodec()],
                       fill_value=0, dimension_names=("image",), chunk_key_encoding=FLAT_KEYS)


def _pack_records(stats: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """stats [n, 2, 2] int64 and hashes [n, 2, 16] uint8 -> `sources` rows [n, 2, 4] int64."""
    packed = np.ascontiguousarray(hashes, dtype=np.uint8).view("<i8").astype(np.int64)  # [n, 2, 2]
    return np.concatenate([np.asarray(stats, dtype=np.int64), packed], axis=-1)


def _unpack_records(sources: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`sources` rows [n, 2, 4] int64 -> stats [n, 2, 2] int64 and hashes [n, 2, 16] uint8."""
    return sources[..., :2].copy(), np.ascontiguousarray(sources[..., 2:].astype("<i8")).view(np.uint8)


def _apply_index(group: zarr.Group) -> None:
    """Bring every array to the image list journalled in the `reindex` attribute, then drop the journal (each
    step can be redone after a kill)."""
    attrs = StoreAttrs.from_dict(dict(group.attrs))
    ids, splits = attrs.reindex["ids"], attrs.reindex["splits"]
    for name in (FEATURES, MASKS, FLAGS, SOURCES, LABELLED):  # new rows read as the fill values: pending, missing
        if name in group and group[name].shape[0] != len(ids):
            array = group[name]
            array.resize((len(ids), *array.shape[1:]))
    _write_ids_and_splits(group, ids, splits, overwrite=True)
    rasters = attrs.rasters
    if "tiles" in attrs.reindex:
        _write_tiles(group, np.array(attrs.reindex["tiles"], dtype=np.int64), overwrite=True)
        rasters = attrs.reindex["rasters"]
    # one write: the journal goes with the new count
    group.attrs.put(replace(attrs, reindex=None, num_images=len(ids), rasters=rasters).to_dict())


def open_group(path: str | Path, mode: str = "r") -> zarr.Group | None:
    """The Zarr group at `path`, or None if there is none (or it cannot be read: for a URL the caller's existence
    check then names why, as `exists` does)."""
    try:
        return zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, ValueError, OSError, zarr.errors.BaseZarrError):
        return None
    except Exception:  # noqa: BLE001 - a storage client's own errors (no credentials, refused): told by `exists`
        if is_url(path):
            return None
        raise


def is_store(path: str | Path, group: zarr.Group | None = None) -> bool:
    """Whether `path` (or its already opened `group`) holds a cachedseg feature store (of any format version)."""
    group = open_group(path) if group is None else group
    return group is not None and group.attrs.get("format") == FORMAT


def remove_store(path: str | Path) -> None:
    """Delete a store, refusing anything that is not one (so --overwrite never deletes user data)."""
    if exists(path):
        if not is_store(path):
            raise CachedsegError(f"{path} exists and is not a cachedseg feature store; refusing to overwrite it")
        if is_url(path):
            fs, inner = filesystem(str(path))
            fs.rm(inner, recursive=True)
        else:
            shutil.rmtree(path)


def remove_partials(path: str | Path) -> int:
    """Delete the temporary chunk files a killed local writer leaves behind (an object PUT leaves none)."""
    if is_url(path):
        return 0
    orphans = list(Path(path).rglob("*.partial"))
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return len(orphans)


def disk_bytes(path: str | Path) -> int:
    """Bytes used by the files (or objects) under `path`."""
    if is_url(path):
        fs, inner = filesystem(str(path))
        return int(fs.du(inner))
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def file_count(path: str | Path) -> int:
    """Files (or objects) under `path`, folders included for a local store (both cost inodes)."""
    if is_url(path):
        fs, inner = filesystem(str(path))
        return len(fs.find(inner))
    return sum(1 for _ in Path(path).rglob("*"))
