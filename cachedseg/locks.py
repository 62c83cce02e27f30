"""One writing job per store: an flock on a local disk, a lease object in a bucket.

Local folder `x.zarr`: an flock on `x.zarr.lock`. It dies with its process, so a killed writer never leaves a
stale lock, and a second writer on the same machine is refused with the holder's pid, host and job.

Bucket URL `s3://b/x.zarr`: object storage has no flock. The lock is the object `s3://b/x.zarr.lock`, created with a
conditional put (`If-None-Match: *`): of two jobs starting together exactly one creates it. It holds the job id,
host and an expiry time, and the holder renews it every LEASE_S / 4 seconds. A second job is refused while the lease
is live; a lease left by a killed job expires after LEASE_S seconds and is then taken over with a put conditional
on its ETag (`If-Match`), so again only one job wins. Backends without conditional puts (not S3) get the same
protocol with a read-back check, which can miss two jobs starting within the same instant.

Within one torchrun job only rank 0 takes the lock; the other ranks are covered by it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from cachedseg.errors import CachedsegError
from cachedseg.paths import filesystem, is_url, unreachable

LEASE_S = 120.0


def holder(job: str) -> dict:
    """Who is writing: pid, host, job and start time."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "job": job, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(info: dict) -> str:
    """A lock holder, for a message."""
    return f"pid {info.get('pid')} on {info.get('host')} (job {info.get('job')}, since {info.get('since')})"


def _refused(path: str, info: dict) -> CachedsegError:
    return CachedsegError(f"the store {path} is being written by {describe(info)}; wait for it to finish (or stop "
                          "it), then rerun to continue")


class LockUnwritable(CachedsegError):
    """The store's lock file cannot be created or opened for writing (a read-only folder or file)."""


@contextlib.contextmanager
def writer_lock(path: str | Path, job: str) -> Iterator[None]:
    """Hold the store's writer lock for the `with` block; refuse with the holder's name if another job has it."""
    if is_url(path):
        with _lease(str(path), job):
            yield
        return
    lock_path = Path(f"{Path(path).resolve()}.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a+")
    except (FileExistsError, NotADirectoryError):  # a file where a folder of the path goes
        blocker = next(p for p in lock_path.parents if p.exists())
        raise CachedsegError(f"cannot create the store {path}: {blocker} is a file, not a folder; give another "
                             "--store") from None
    except OSError as exc:
        raise LockUnwritable(f"cannot write the lock file {lock_path} ({exc.strerror}), which writing the store "
                             f"{path} takes; give a --store in a folder you can write to, or change the folder's "
                             "permissions") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                info = json.loads(f.read())
            except ValueError:
                info = {"pid": "?", "host": "?"}
            raise _refused(str(path), info) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(holder(job)))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _lease(url: str, job: str) -> Iterator[None]:
    """The bucket lease (see the module docstring)."""
    fs, key = filesystem(f"{url.rstrip('/')}.lock")
    try:
        etag = _acquire(fs, key, url, job)
    except CachedsegError:
        raise
    except Exception as exc:  # noqa: BLE001 - the client library's own errors
        raise unreachable(url, exc) from None
    stop = threading.Event()
    state = {"etag": etag}

    def renew() -> None:
        while not stop.wait(LEASE_S / 4):
            try:
                state["etag"] = _put(fs, key, _lease_body(job), match=state["etag"])
            except (FileExistsError, OSError):  # taken over after we stalled past expiry: the next write will tell
                return
    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError, FileNotFoundError):
            fs.rm(key)


def _lease_body(job: str) -> bytes:
    return json.dumps({**holder(job), "expires": time.time() + LEASE_S}).encode()


def _acquire(fs, key: str, url: str, job: str) -> str | None:
    """Create the lease, or take over an expired one; returns its ETag."""
    for _ in range(3):
        try:
            return _put(fs, key, _lease_body(job))
        except FileExistsError:
            pass
        try:
            current, etag = json.loads(fs.cat_file(key)), _etag(fs, key)
        except FileNotFoundError:  # released meanwhile: try again
            continue
        if current.get("job") != job and current.get("expires", 0) > time.time():
            raise _refused(url, current)
        try:  # expired (its job was killed), or our own job's: take it over, if nobody else just did
            return _put(fs, key, _lease_body(job), match=etag)
        except FileExistsError:
            continue
    raise CachedsegError(f"could not take the lock {key} for {url}: other jobs keep taking it; try again")


def _etag(fs, key: str) -> str | None:
    """The object's version tag (S3's ETag; other backends' nearest equivalent)."""
    info = fs.info(key)
    version = next((info[k] for k in ("ETag", "etag", "generation", "mtime", "LastModified") if k in info), None)
    return None if version is None else str(version)


def _put(fs, key: str, body: bytes, match: str | None = None) -> str | None:
    """Write `body` only if the object does not exist (match None) or still has ETag `match`; FileExistsError if not."""
    if type(fs).__name__ == "S3FileSystem":
        bucket, _, name = key.partition("/")
        condition = {"IfMatch": match} if match else {"IfNoneMatch": "*"}
        try:
            return fs.call_s3("put_object", Bucket=bucket, Key=name, Body=body, **condition).get("ETag")
        except FileNotFoundError:  # If-Match on an object deleted meanwhile
            raise FileExistsError(key) from None
    # Without conditional writes: check, write, and read back (a race within the same instant goes unseen).
    if (match is None and fs.exists(key)) or (match is not None and _etag(fs, key) != match):
        raise FileExistsError(key)
    fs.pipe_file(key, body)
    if fs.cat_file(key) != body:
        raise FileExistsError(key)
    return _etag(fs, key)
