"""Property-based fuzzing of the dataset reader and mask validation with malformed files.

Whatever the bytes, reading a sample gives either a well-formed item or an error message naming the file;
never another exception, and never labels outside the class range.
"""

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cachedseg.data import Preprocess, SegmentationDataset
from cachedseg.dataset import AEROSCAPES, Dataset, Sample

PP = Preprocess(image_size=(28, 42), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic",
                mask_size=(32, 48))
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def encode(array: np.ndarray, fmt: str) -> bytes:
    """An array as image-file bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def valid_image() -> bytes:
    return encode(np.full((12, 16, 3), 120, dtype=np.uint8), "JPEG")


def valid_mask() -> bytes:
    return encode(np.zeros((12, 16), dtype=np.uint8), "PNG")


arrays = st.tuples(st.integers(1, 24), st.integers(1, 24), st.sampled_from(["L", "RGB", "RGBA", "I;16"]),
                   st.integers(0, 2**31 - 1))


@st.composite
def image_files(draw) -> bytes:
    """Random bytes, or a real PNG/JPEG of random mode and size, possibly truncated or bit-flipped."""
    kind = draw(st.sampled_from(["bytes", "image", "truncated", "flipped"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400))
    h, w, mode, seed = draw(arrays)
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        data = encode(rng.integers(0, 2**16, (h, w), dtype=np.uint16), "PNG")
    else:
        channels = {"L": (h, w), "RGB": (h, w, 3), "RGBA": (h, w, 4)}[mode]
        data = encode(rng.integers(0, 256, channels, dtype=np.uint8), draw(st.sampled_from(["PNG", "JPEG"]))
                      if mode != "RGBA" else "PNG")
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "flipped":
        pos = draw(st.integers(0, len(data) - 1))
        return data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1:]
    return data


def read(tmp_path, image: bytes, mask: bytes) -> dict:
    """Write one sample and read it through the dataset."""
    (tmp_path / "x.jpg").write_bytes(image)
    (tmp_path / "x.png").write_bytes(mask)
    return SegmentationDataset([Sample("x", "trn", tmp_path / "x.jpg", tmp_path / "x.png")], PP,
                               Dataset(tmp_path, AEROSCAPES).sample_labels)[0]


def check(item: dict, tmp_path) -> None:
    """The property: a clean error naming a file, or a well-formed sample."""
    if "error" in item:
        assert str(tmp_path / "x.jpg") in item["error"] or str(tmp_path / "x.png") in item["error"]
    else:
        assert item["image"].shape == (3, 28, 42) and bool(item["image"].isfinite().all())
        assert item["mask"].shape == (32, 48)
        labels = item["mask"].numpy()
        assert ((labels < 12) | (labels == 255)).all()


@FUZZ
@given(image=image_files())
def test_fuzzed_images(tmp_path, image):
    check(read(tmp_path, image, valid_mask()), tmp_path)


@FUZZ
@given(mask=image_files())
def test_fuzzed_masks(tmp_path, mask):
    check(read(tmp_path, valid_image(), mask), tmp_path)
