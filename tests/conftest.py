"""Shared fixtures: generated data, a small random backbone, and a CLI runner. Nothing here touches the network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere

import pytest
from typer.testing import CliRunner

from cachedseg.cli import app
from cachedseg.synth import synthesize

SMALL = ["--backbone", "vit_small_patch14_dinov2", "--image-size", "112", "--weights", "random"]
TRAIN = ["--epochs", "2", "--workers", "0", "--device", "cpu"]


def run_cli(*args: str, ok: bool = True):
    """Run `cachedseg ARGS` in-process; check the exit code unless ok=None."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok is not None:
        assert (result.exit_code == 0) == ok, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Eight generated 160x120 frames in the AeroScapes layout (trn and val)."""
    root = tmp_path_factory.mktemp("data") / "synth"
    synthesize(root, count=8, width=160, height=120, seed=0)
    return root


def _store(dataset, tmp_path_factory, dtype: str):
    """A store of `dataset` in `dtype`, built through the CLI."""
    path = tmp_path_factory.mktemp("stores") / f"small-{dtype}.zarr"
    run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", dtype, "--workers", "0")
    return path


@pytest.fixture(scope="session")
def store32(dataset, tmp_path_factory):
    """A float32 store of `dataset`: its features are bit-identical to the live backbone's."""
    return _store(dataset, tmp_path_factory, "float32")


@pytest.fixture(scope="session")
def store16(dataset, tmp_path_factory):
    """A float16 store of `dataset`."""
    return _store(dataset, tmp_path_factory, "float16")


@pytest.fixture(scope="session")
def run32(store32, tmp_path_factory):
    """A seed decoder trained for 2 epochs on the float32 store."""
    run = tmp_path_factory.mktemp("runs") / "seed32"
    run_cli("train", store32, "--run", run, *TRAIN)
    return run
