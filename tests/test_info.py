"""`cachedseg info`'s rows, from the library: what a store holds and what a run was trained on."""

import json

import pytest

from cachedseg import checkpoint
from cachedseg.errors import CachedsegError
from cachedseg.info import describe
from cachedseg.store import FeatureStore


def test_a_store_is_described_by_its_recorded_settings_and_counts(store32):
    rows = describe(store32)
    shown = dict(rows)
    assert len(shown) == len(rows) and all(isinstance(v, str) for v in shown.values())
    d = FeatureStore.open(store32).describe()
    assert shown["fingerprint"] == d["fingerprint"] and shown["weights"] == d["weights"]
    assert shown["backbone"].startswith(d["backbone"]) and "112x112" in shown["backbone"]
    assert shown["features"].startswith(f"[N, 1, 1, {d['channels']}, 8, 8] float32")
    assert shown["images"].startswith(f"{d['images']} (") and f"{d['done']} done" in shown["images"]
    assert shown["dataset"] == d["dataset"]


def test_a_run_is_described_by_its_last_checkpoint(run32, store32):
    shown = dict(describe(run32))
    ckpt = checkpoint.load_run(run32, "last")
    best = max(json.loads((run32 / "metrics.json").read_text()), key=lambda r: r["val_miou"])
    assert shown["decoder"].startswith(ckpt.decoder_config.name)
    assert shown["features"].endswith(ckpt.spec.fingerprint) and shown["epochs trained"] == str(ckpt.epoch)
    assert f"{best['val_miou']:.4f}" in shown["best val"] and f"epoch {best['epoch']}" in shown["best val"]
    assert shown["trained on"] == ckpt.source and str(store32.resolve()) in ckpt.source
    assert describe(run32 / "last.pt") == describe(run32)  # the checkpoint file itself


def test_what_is_neither_a_store_nor_a_run_is_refused(dataset, tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", next((dataset / "JPEGImages").glob("*.jpg"))):
        with pytest.raises(CachedsegError, match=str(path)):
            describe(path)
