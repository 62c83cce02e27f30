"""Stores in object storage, against a real S3 API: moto's server on 127.0.0.1, reached the way every S3 tool is
configured (AWS_ENDPOINT_URL and credentials in the environment)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cachedseg.errors import CachedsegError
from cachedseg.locks import writer_lock
from cachedseg.store import FeatureStore
from tests.conftest import SMALL, TRAIN, assert_same_store, one_line_error, run_cli, torchrun

pytestmark = pytest.mark.subprocess  # a moto server, torchrun jobs

pytest.importorskip("s3fs")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def moto_log(tmp_path_factory):
    """The moto server's request log: one line per S3 request."""
    return tmp_path_factory.mktemp("moto") / "requests.log"


@pytest.fixture(scope="module")
def bucket(moto_log):
    """A moto S3 server on a free local port with one bucket; the environment points every client at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(moto_log, "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=log)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses clients made under an earlier environment
    try:
        import boto3
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="cachedseg-test")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield "s3://cachedseg-test"
    finally:
        server.terminate()
        server.wait()
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()


def test_extract_train_evaluate_and_info_work_on_a_bucket(bucket, dataset, store32, run32, tmp_path):
    url = f"{bucket}/small.zarr"
    run_cli("extract", dataset, "--store", url, *SMALL, "--dtype", "float32", "--workers", "0")
    assert_same_store(url, store32)  # the same computation as the local store's (batches of 4)
    described = FeatureStore.open(url).describe()  # what info prints
    assert (described["done"], described["pending"]) == (8, 0) and url in run_cli("info", url).output
    run_cli("train", url, "--run", tmp_path / "run", *TRAIN)
    run_cli("evaluate", run32, "--store", url, "--json", tmp_path / "bucket.json")
    run_cli("evaluate", run32, "--store", store32, "--json", tmp_path / "local.json")
    assert json.loads((tmp_path / "bucket.json").read_text()) == json.loads((tmp_path / "local.json").read_text())
    # a rerun finds everything done and writes nothing
    before = run_cli("info", url).output
    run_cli("extract", dataset, "--store", url, *SMALL, "--dtype", "float32", "--workers", "0")
    assert run_cli("info", url).output == before


def requests_logged(log) -> list[str]:
    """The requests the server has logged so far, as "METHOD /path" (waiting for the log to settle)."""
    lines, seen = [], -1
    while len(lines) != seen:
        seen = len(lines)
        time.sleep(0.3)
        lines = [line.split('"')[1] for line in log.read_text(errors="replace").splitlines() if "HTTP/1." in line]
    return [" ".join(line.split()[:2]) for line in lines]


def test_a_resumed_extract_with_nothing_to_do_reads_the_store_once(bucket, moto_log, dataset):
    url = f"{bucket}/resumed.zarr"
    run_cli("extract", dataset, "--store", url, *SMALL, "--dtype", "float32", "--workers", "0")
    before = len(requests_logged(moto_log))
    run_cli("extract", dataset, "--store", url, *SMALL, "--dtype", "float32", "--workers", "0")
    sent = requests_logged(moto_log)[before:]
    # the group opened once, each flag read once (8 images); 143 requests before, 59 now
    assert sum(r.endswith("/resumed.zarr/zarr.json") for r in sent if r.startswith("GET")) == 1, sent
    assert sum("/resumed.zarr/done/c." in r for r in sent if r.startswith("GET")) == 8, sent
    assert len(sent) <= 64, sent


def test_info_on_a_bucket_opens_the_store_once(bucket, moto_log, dataset):
    url = f"{bucket}/described.zarr"
    run_cli("extract", dataset, "--store", url, *SMALL, "--dtype", "float32", "--workers", "0")
    before = len(requests_logged(moto_log))
    run_cli("info", url)
    sent = requests_logged(moto_log)[before:]
    # the group opened once and handed on; 41 requests when info still read the store itself in cli.py
    assert sum(r.endswith("/described.zarr/zarr.json") for r in sent if r.startswith("GET")) == 1, sent
    assert len(sent) <= 41, sent


def test_two_ranks_write_a_sharded_store_to_a_bucket(bucket, dataset, store32_one_thread):
    url = f"{bucket}/sharded.zarr"
    torchrun("extract", dataset, "--store", url, *SMALL, "--dtype", "float32", "--batch-size", "1", "--workers", "0",
             "--images-per-shard", "4")
    assert_same_store(url, store32_one_thread)


def test_the_bucket_lease_refuses_a_second_job_and_expires(bucket, dataset):
    import s3fs
    url = f"{bucket}/leased.zarr"
    with writer_lock(url, "the-other-job"):
        result = run_cli("extract", dataset, "--store", url, *SMALL, "--workers", "0", ok=False)
        one_line_error(result, "the-other-job", f"pid {os.getpid()}")
        with pytest.raises(CachedsegError) as refused:  # the library refuses a third job, naming the holder too
            with writer_lock(url, "a-third-job"):
                pass
        assert "the-other-job" in str(refused.value) and f"pid {os.getpid()}" in str(refused.value)
    # a job killed with its lease held: the lease expires, and the next job takes it over
    fs = s3fs.S3FileSystem()
    fs.pipe_file(f"{url.removeprefix('s3://')}.lock",
                 json.dumps({"pid": 1, "host": "gone", "job": "killed", "expires": time.time() - 1}).encode())
    run_cli("extract", dataset, "--store", url, *SMALL, "--workers", "0")
    assert not fs.exists(f"{url.removeprefix('s3://')}.lock")  # released at the end
