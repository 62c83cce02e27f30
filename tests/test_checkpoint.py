"""The checkpoint format: round trip, refusals, atomic writes."""

import pytest
import torch

from cachedseg import checkpoint
from cachedseg.checkpoint import Checkpoint
from cachedseg.dataset import AEROSCAPES
from cachedseg.decoders import DECODERS, build_decoder, decoder_config
from cachedseg.errors import CachedsegError
from cachedseg.runs import EpochMetrics
from cachedseg.spec import StoreSpec
from cachedseg.train import TrainConfig

SPEC = StoreSpec(backbone="vit_small_patch14_dinov2", fingerprint="f" * 32, input_size=(112, 154),
                 mask_size=(128, 176), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic",
                 precision="float32", dtype="float16", channels=48, grid=(8, 11), class_names=AEROSCAPES.names)


def make_checkpoint(decoder: str = "linear") -> Checkpoint:
    """A small trained-looking checkpoint of a registered decoder."""
    cfg = decoder_config(decoder, SPEC)
    torch.manual_seed(1)
    decoder = build_decoder(cfg)
    return Checkpoint(decoder_config=cfg, train_config=TrainConfig(epochs=3, lr=3e-4), spec=SPEC, weights="random",
                      epoch=2, metrics=[EpochMetrics(1, 2.0, 0.1, 0.5, 1.0, 1.5), EpochMetrics(2, 1.5, 0.2, 0.6, 1.0, 1.5)],
                      decoder_state=decoder.state_dict(), optimizer_state=None,
                      rng={"sampler": torch.Generator().get_state(), "torch": torch.get_rng_state()})


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_a_checkpoint_reads_back_whole_and_rebuilds_the_same_decoder(tmp_path, decoder):
    ckpt = make_checkpoint(decoder)
    checkpoint.save(ckpt, tmp_path / "last.pt")
    back = checkpoint.load_run(tmp_path, "last")
    assert back.spec == SPEC and back.decoder_config == ckpt.decoder_config and back.train_config == ckpt.train_config
    assert back.weights == "random" and back.epoch == 2 and back.metrics == ckpt.metrics
    assert torch.equal(back.rng["torch"], ckpt.rng["torch"])
    x = torch.randn(1, 1, 48, 8, 11)
    reference = build_decoder(ckpt.decoder_config)
    reference.load_state_dict(ckpt.decoder_state)
    assert torch.equal(back.decoder()(x), reference.eval()(x))
    assert not back.decoder().training
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    plain = torch.load(tmp_path / "last.pt", weights_only=True)  # readable without cachedseg
    assert plain["spec"]["backbone"] == SPEC.backbone and "decoder" in plain


def test_load_run_takes_a_folder_or_a_file_and_names_what_is_missing(tmp_path):
    checkpoint.save(make_checkpoint(), tmp_path / "best.pt")
    assert checkpoint.load_run(tmp_path).epoch == checkpoint.load_run(tmp_path / "best.pt").epoch == 2
    with pytest.raises(CachedsegError, match="last.pt"):
        checkpoint.load_run(tmp_path, "last")
    typo = tmp_path.with_name(tmp_path.name + "x")
    with pytest.raises(CachedsegError) as err:
        checkpoint.load_run(typo)
    assert str(typo) in str(err.value) and str(err.value).replace(str(typo), "").count(str(tmp_path)) == 1  # meant


def test_foreign_files_are_refused_with_their_path(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    for name in ("garbage.pt", "other.pt"):
        with pytest.raises(CachedsegError, match=str(tmp_path / name)):
            checkpoint.load(tmp_path / name)
