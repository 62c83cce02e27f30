"""Checks on the paths a user gives, with hints that name what was given, what was expected, and what to do.

Deliberately light (no torch, no zarr): the CLI runs these before the heavy imports, so a typo is answered in
milliseconds, not after seconds of loading.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from cachedseg.errors import CachedsegError
from cachedseg.runs import RunFolder


def is_url(path: str | Path) -> bool:
    """Whether a store argument is a URL (`s3://bucket/x.zarr`, `gs://...`, any fsspec URL), not a local path."""
    return "://" in str(path)


def check_local(path: str | Path, what: str = "this command") -> None:
    """Refuse a URL where only a local folder will do (a `Path` would turn `s3://b/x` into the folder `s3:/b/x`)."""
    if is_url(path):
        raise CachedsegError(f"{path}: {what} works on local folders only; copy the store down first")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; credentials and endpoint come from the usual environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as every S3 tool reads them."""
    import fsspec
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise CachedsegError(f"{url}: {exc}; for s3:// install s3fs (`pip install 'cachedseg[s3]'`), for gs:// "
                             "gcsfs") from None


def exists(path: str | Path) -> bool:
    """Whether a local path or a URL exists (for a URL prefix: whether any object is under it)."""
    if not is_url(path):
        return Path(path).exists()
    fs, inner = filesystem(str(path))
    try:
        return fs.exists(inner)
    except Exception as exc:  # noqa: BLE001 - every client library has its own errors; all mean "cannot reach it"
        raise unreachable(path, exc) from None


def unreachable(path: str | Path, exc: Exception) -> CachedsegError:
    """The error for a URL whose storage does not answer, or refuses us."""
    return CachedsegError(f"cannot reach {path} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}); check "
                          "the URL, and the endpoint and credentials in the environment (for S3: AWS_ENDPOINT_URL, "
                          "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or an AWS profile)")


def did_you_mean(path: Path) -> str:
    """'; did you mean X?' for the nearest existing sibling of a path that does not exist, else ''."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f"; did you mean {parent / close[0]}?" if close else ""


def check_store(path: str | Path) -> None:
    """A store argument that exists (a missing local one gets near misses and the command that builds it)."""
    if not exists(path):
        hint = "" if is_url(path) else did_you_mean(Path(path))
        raise CachedsegError(f"no feature store at {path}{hint}; build one with `cachedseg extract DATA --store {path}`")


def checkpoint_path(run: str | Path, which: str = "best") -> Path:
    """The checkpoint file of a run folder (or the file itself), or an error saying what is there instead."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.exists():
        raise CachedsegError(f"no run at {run} (expected a run folder with {which}.pt from `cachedseg train`)"
                             f"{did_you_mean(run)}; train one with `cachedseg train STORE --run {run}`")
    path = RunFolder(run).checkpoint(which)
    if not path.exists():  # a folder of that name is refused when loaded
        raise CachedsegError(f"{run} holds no {which}.pt, so it is not a trained run (yet); train it with "
                             f"`cachedseg train STORE --run {run}`, or give the run folder that `train` wrote")
    return path


def check_writable(path: str | Path, what: str, folder: bool = False) -> None:
    """Refuse an output (a file, or a `folder`) that this process cannot create or write, naming the path in the
    way; URLs are left to the storage to answer."""
    if is_url(path):
        return
    path = Path(path)
    if path.is_dir() and not folder:
        raise CachedsegError(f"{what} {path} is a folder, but a file goes there; give a file path")
    if path.exists() and not path.is_dir() and folder:
        raise CachedsegError(f"{what} {path} is a file, but a folder goes there; give a folder path")
    if path.is_file() and not os.access(path, os.W_OK):
        raise CachedsegError(f"cannot write {what} {path}: the file is read-only; give another path, or make it "
                             "writable")
    probe = path if path.is_dir() else path.parent
    while not probe.exists():  # the folders that would be created: the nearest existing one must be writable
        probe = probe.parent
    if not probe.is_dir():
        raise CachedsegError(f"cannot write {what} {path}: {probe} is a file, not a folder; give another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CachedsegError(f"cannot write {what} {path}: the folder {probe} is read-only for this user; give a "
                             "path in a folder you can write to, or change its permissions")


def check_images(inputs: list[str | Path]) -> None:
    """Image inputs: each must exist."""
    for item in map(Path, inputs):
        if not item.exists():
            raise CachedsegError(f"{item}: no such image file or folder{did_you_mean(item)}")
