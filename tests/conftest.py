"""Shared fixtures: generated data, a small random backbone, and a CLI runner. Nothing here touches the network."""

import os
import re
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cachedseg.cli import app
from cachedseg.synth import synthesize

SMALL = ["--backbone", "vit_small_patch14_dinov2", "--image-size", "112", "--weights", "random"]
TRAIN = ["--epochs", "2", "--workers", "0", "--device", "cpu"]

# The identity rule (README, "The identity guarantee"). Features of one image computed in another batch, or by
# another CPU's or GPU's kernels, differ by float32 rounding only. Measured on ViT-S/14 @ 112 and ViT-B/14 @ 518
# (random weights): each float32 result lies within 1.1e-6 x max|f| of a float64 forward pass, and AVX2 against
# default kernels differ by at most 6.1e-7 x max|f|; MKL_CBWR=COMPATIBLE makes batches of 1 and 4 differ by
# 1.2e-7 absolute. Two float32 results can differ by at most the sum of their errors, 2.2e-6 x max|f|; the tests
# allow 1e-5 x max|f|, a 4.5x margin that still fails on any real bug (a wrong image, token or layer is off by O(1)).
FEATURE_RTOL = 1e-5
# Where computations differ, predicted labels still agree on at least this share of pixels.
MIN_AGREEMENT = 0.9999


# A test marked `subprocess` fails with its name after this many seconds (pyproject's `timeout` bounds the others):
# the slowest (a SIGKILL loop, a torchrun job of two ranks, the session stores it builds first) take under 3
# minutes on two shared CPU cores. Its own subprocess.run(timeout=...) calls stay: they name the command that hung.
SUBPROCESS_TIMEOUT = 600


def pytest_collection_modifyitems(items) -> None:
    """Give each test marked `subprocess` the SUBPROCESS_TIMEOUT, unless it sets its own timeout."""
    for item in items:
        if item.get_closest_marker("subprocess") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SUBPROCESS_TIMEOUT))


def assert_features_close(a, b) -> None:
    """Equal up to float32 rounding, measured against the largest magnitude (see FEATURE_RTOL)."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape
    bound = FEATURE_RTOL * max(float(np.abs(a).max()), float(np.abs(b).max()), 1e-12)
    assert float(np.abs(a - b).max()) <= bound, f"max |a - b| = {np.abs(a - b).max():.3g} > {bound:.3g}"


# Every array of a store (cachedseg.store's docstring lists them): the copies of one store must agree on all.
STORE_ARRAYS = ("features", "masks", "ids", "split", "done", "sources")


def assert_same_store(a, b, close: tuple[str, ...] = ()) -> None:
    """Two stores (folders or URLs) with the same arrays, equal bit for bit; those in `close` up to float32 rounding
    (FEATURE_RTOL), for features computed in other batches. `sources` too: both were extracted from the same files."""
    a, b = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys()) == sorted(STORE_ARRAYS)
    for name in STORE_ARRAYS:
        if name in close:
            assert_features_close(a[name][:], b[name][:])
        else:
            assert np.array_equal(a[name][:], b[name][:]), name


def chunk_file(store, array: str, index: int):
    """The file holding image `index`'s chunk (or shard) of an array (keys c.<index>.0...: one file each)."""
    return next(p for p in written_chunks(store, array) if p.name.split(".")[1] == str(index))


def written_chunks(store, array: str) -> list:
    """The chunk files of an array that are fully written: zarr writes each one to `c.<uuid>.partial` first
    (Path.with_suffix on `c.0`), a name that a glob for `c.*` would also match."""
    folder = Path(store) / array
    return [p for p in folder.iterdir() if re.fullmatch(r"c(\.\d+)+", p.name)] if folder.is_dir() else []


def damage_tile(tif) -> None:
    """Zero the compressed bytes of one inner tile of a tiled GeoTIFF: deflate cannot decode it any more."""
    import rasterio
    with rasterio.open(tif) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        size = int(src.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
    data = bytearray(Path(tif).read_bytes())
    data[offset:offset + size] = bytes(size)
    Path(tif).write_bytes(bytes(data))


def run_cli(*args: str, ok: bool = True):
    """Run `cachedseg ARGS` in-process; check the exit code unless ok=None."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok is not None:
        assert (result.exit_code == 0) == ok, result.output + repr(result.exception)
    return result


def one_line_error(result, *needles) -> str:
    """Assert a clean user error (exit 1, one line on stderr, no traceback) that names every needle; return it."""
    out = result.stderr.strip()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(out.splitlines()) == 1, result.output
    for needle in needles:
        assert str(needle) in out, (needle, out)
    return out


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Eight generated 160x120 frames in the AeroScapes layout (trn and val)."""
    root = tmp_path_factory.mktemp("data") / "synth"
    synthesize(root, count=8, width=160, height=120, seed=0)
    return root


def _store(dataset, tmp_path_factory, dtype: str, *extra: str):
    """A store of `dataset` in `dtype`, built through the CLI."""
    path = tmp_path_factory.mktemp("stores") / f"small-{dtype}.zarr"
    run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", dtype, "--workers", "0", *extra)
    return path


@pytest.fixture(scope="session")
def store32(dataset, tmp_path_factory):
    """A float32 store of `dataset`, extracted in batches of 4."""
    return _store(dataset, tmp_path_factory, "float32")


@pytest.fixture(scope="session")
def store32_single(dataset, tmp_path_factory):
    """A float32 store extracted one image per batch: the same computation as any other batch-1 extraction."""
    return _store(dataset, tmp_path_factory, "float32", "--batch-size", "1")


def one_thread_env() -> dict:
    """The environment of a torchrun rank: offline, one thread (torchrun's default for several ranks)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2"]


def torchrun(*args, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m cachedseg ARGS`, each rank offline with one thread."""
    cmd = [*TORCHRUN[:-1], str(nproc), "-m", "cachedseg", *map(str, args)]
    proc = subprocess.run(cmd, env=one_thread_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def extract_one_thread(dataset, store, *extra: str) -> None:
    """`cachedseg extract` of float32 features, one image per batch, in a one-thread process."""
    subprocess.run([sys.executable, "-m", "cachedseg", "extract", str(dataset), "--store", str(store), *SMALL,
                    "--dtype", "float32", "--batch-size", "1", "--workers", "0", *extra],
                   env=one_thread_env(), check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def store32_one_thread(dataset, tmp_path_factory):
    """A float32 store extracted one image per batch by a one-thread process: the very computation of each rank of
    a two-rank torchrun job. On AVX-512 CPUs (not on AVX2 ones) a process with two threads rounds some features
    differently (measured: up to 6e-8 on 5 of 8 images), so the rank tests compare with this one, bit for bit."""
    path = tmp_path_factory.mktemp("stores") / "small-float32-one-thread.zarr"
    extract_one_thread(dataset, path)
    return path


@pytest.fixture(scope="session")
def store16(dataset, tmp_path_factory):
    """A float16 store of `dataset`."""
    return _store(dataset, tmp_path_factory, "float16")


@pytest.fixture(scope="session")
def run32(store32, tmp_path_factory):
    """The default (conv) decoder trained for 2 epochs on the float32 store."""
    run = tmp_path_factory.mktemp("runs") / "conv32"
    run_cli("train", store32, "--run", run, *TRAIN)
    return run


# For a subprocess: `grown(f)` runs f() and returns how far (in MB) the process's peak RSS rose above its RSS just
# before, the peak reset first (Linux: clear_refs 5 resets VmHWM), so that a higher peak at start-up cannot hide it.
PEAK_GROWTH = '''
def _status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) // 1024
def grown(f):
    open("/proc/self/clear_refs", "w").write("5")
    before = _status("VmRSS")
    result = f()
    return _status("VmHWM") - before, result
'''
