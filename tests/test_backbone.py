"""The frozen backbone: output layout, determinism, and the three ways to get weights."""

import os
import subprocess
import sys
import time

import pytest
import torch

from cachedseg.backbone import BackboneConfig, build_backbone
from cachedseg.errors import CachedsegError
from tests.conftest import assert_features_close

SMALL_CFG = BackboneConfig("vit_small_patch14_dinov2", 112)


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_output_is_the_patch_token_grid(name):
    model = build_backbone(BackboneConfig(name, 112), "random")
    x = torch.randn(2, 3, 112, 112)
    out = model(x)
    assert out.shape == (2, 1, model.channels, 8, 8) and model.channels == 384 and model.grid == (8, 8)
    assert out.is_contiguous()  # same memory layout as cached features, so the decoder computes the same
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # class and register tokens are dropped: the grid is exactly the patch tokens after the final norm
    tokens = model.model.forward_features(x)[:, model.model.num_prefix_tokens:]
    torch.testing.assert_close(out[:, 0], tokens.transpose(1, 2).reshape(2, 384, 8, 8), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_several_layers_are_the_normed_tokens_of_the_last_blocks(name):
    four = build_backbone(BackboneConfig(name, (112, 154), layers=4), "random")
    x = torch.randn(1, 3, 112, 154)
    out = four(x)
    assert out.shape == (1, 4, 384, 8, 11)
    vit = four.model
    tokens, expected = vit.patch_drop(vit._pos_embed(vit.patch_embed(x))), []
    for i, block in enumerate(vit.blocks):
        tokens = block(tokens)
        if i >= len(vit.blocks) - 4:
            expected.append(vit.norm(tokens)[:, vit.num_prefix_tokens:].transpose(1, 2).reshape(1, 384, 8, 11))
    torch.testing.assert_close(out, torch.stack(expected, 1), rtol=0, atol=0)
    # the last of them is what a one-layer backbone returns
    torch.testing.assert_close(out[:, -1:], build_backbone(BackboneConfig(name, (112, 154)), "random")(x),
                               rtol=0, atol=0)


def _official_pos_embed(trained: torch.Tensor, grid: tuple[int, int], registers: bool) -> torch.Tensor:
    """The official DINOv2 resize, written out: plain models add 0.1 to the target size and give interpolate a
    scale factor, antialias off; `_reg` models give it the size, antialias on (their pos_embed has no class entry)."""
    prefix = 0 if registers else 1
    m = int((trained.shape[1] - prefix) ** 0.5)
    patches = trained[:, prefix:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if registers:
        patches = torch.nn.functional.interpolate(patches, size=grid, mode="bicubic", antialias=True)
    else:
        patches = torch.nn.functional.interpolate(patches, scale_factor=((grid[0] + 0.1) / m, (grid[1] + 0.1) / m),
                                                  mode="bicubic", antialias=False)
    return torch.cat([trained[:, :prefix], patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], 1)


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
@pytest.mark.parametrize("size", [(224, 224), (112, 154), (518, 924)])
def test_the_position_embedding_is_resized_as_the_official_model_does(name, size):
    import timm
    with torch.random.fork_rng(devices=[]):  # the weights `random` gives, at the pretrained 37x37 grid
        torch.manual_seed(0)
        trained = timm.create_model(name, pretrained=False, num_classes=0).pos_embed.detach()
    model = build_backbone(BackboneConfig(name, size), "random")
    grid = (size[0] // 14, size[1] // 14)
    assert model.grid == grid
    expected = _official_pos_embed(trained, grid, registers="reg4" in name)
    torch.testing.assert_close(model.model.pos_embed.detach(), expected, rtol=0, atol=0)
    assert model(torch.randn(1, 3, *size)).shape == (1, 1, 384, *grid)


def test_the_patch_size_and_the_mask_grid_are_read_from_the_model(monkeypatch):
    # no timm DINOv2 has patches other than 14: a tiny patch-16 ViT (random weights, offline) stands in for one
    from cachedseg import backbone
    from cachedseg.decoders import OUTPUT_STRIDE
    name = "vit_tiny_patch16_224"
    monkeypatch.setattr(backbone, "dinov2_models", lambda: [name, "vit_small_patch14_dinov2"])
    assert backbone.patch_size("vit_small_patch14_dinov2") == 14 and backbone.patch_size(name) == 16
    model = build_backbone(BackboneConfig(name, (64, 96)), "random")
    assert model.grid == (4, 6) and model.preprocess.mask_size == (4 * OUTPUT_STRIDE, 6 * OUTPUT_STRIDE)
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 1, model.channels, 4, 6)
    with pytest.raises(CachedsegError, match="--image-size"):
        build_backbone(BackboneConfig(name, (126, 126)), "random")  # a multiple of 14, not of 16
    assert backbone.size_for_short_side(64, 1280, 720, backbone.patch_size(name)) == (64, 112)
    with pytest.raises(CachedsegError, match="--short-side"):
        backbone.size_for_short_side(126, 1280, 720, backbone.patch_size(name))
    with pytest.raises(CachedsegError, match="vit_base_patch14_dinov3"):  # refused, named
        backbone.patch_size("vit_base_patch14_dinov3")


def test_a_checkpoint_of_another_variant_is_named(tmp_path):
    from safetensors.torch import save_file
    reg = build_backbone(BackboneConfig("vit_small_patch14_reg4_dinov2", 112), "random")
    save_file({k: v.contiguous() for k, v in reg.model.state_dict().items()}, tmp_path / "reg.safetensors")
    with pytest.raises(CachedsegError, match="--backbone vit_small_patch14_reg4_dinov2"):
        build_backbone(SMALL_CFG, str(tmp_path / "reg.safetensors"))


@pytest.mark.subprocess
def test_random_weights_are_identical_in_every_process():
    a, b = build_backbone(SMALL_CFG, "random"), build_backbone(SMALL_CFG, "random")
    x = torch.randn(1, 3, 112, 112)
    assert a.fingerprint == b.fingerprint
    assert torch.equal(a(x), b(x))
    code = ("from cachedseg.backbone import *; "
            "print(build_backbone(BackboneConfig('vit_small_patch14_dinov2', 112), 'random').fingerprint)")
    other = subprocess.run([sys.executable, "-c", "import torch; torch.manual_seed(123); " + code],
                           capture_output=True, text=True, check=True)
    assert other.stdout.strip() == a.fingerprint


def test_the_same_computation_gives_bit_identical_features():
    # Same batch composition, same input bytes: the same kernels run, so the numbers are the same bit for bit
    # (what resume and the store round trip rely on), also for a fresh copy of a slice of a batch.
    model = build_backbone(SMALL_CFG, "random")
    x = torch.randn(3, 3, 112, 112)
    assert torch.equal(model(x), model(x.clone()))
    assert torch.equal(model(x[1:2].clone()), model(x[1:2].clone()))


def test_another_batch_changes_features_only_by_float32_rounding():
    # Batch size (and on other CPUs or GPUs, the kernels) may change the rounding; the values agree within the
    # documented bound, and each float32 result lies within float32 rounding of a float64 forward pass.
    model = build_backbone(SMALL_CFG, "random")
    x = torch.randn(4, 3, 112, 112)
    batched = model(x)
    for i in range(4):
        assert_features_close(model(x[i:i + 1].clone())[0], batched[i])
    exact = model.model.double().forward_features(x.double())[:, model.model.num_prefix_tokens:]
    exact = exact.transpose(1, 2).reshape(batched.shape)  # [4, 1, C, h, w]
    assert_features_close(batched, exact.float())
    assert (batched.double() - exact).abs().max() <= 2e-6 * exact.abs().max()  # the measured 1.1e-6 with margin


def test_fingerprint_tracks_weights_and_preprocessing():
    base = build_backbone(SMALL_CFG, "random").fingerprint
    assert build_backbone(BackboneConfig("vit_small_patch14_dinov2", 126), "random").fingerprint != base
    assert build_backbone(BackboneConfig("vit_small_patch14_reg4_dinov2", 112), "random").fingerprint != base


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_loads_the_same_model(tmp_path, suffix):
    model = build_backbone(SMALL_CFG, "random")
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in model.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)
    assert build_backbone(SMALL_CFG, str(path)).fingerprint == model.fingerprint


def test_bad_backbone_settings_are_refused():
    # each names the option and value given and, for a size, the nearest multiple of the patch size (14) to use
    with pytest.raises(CachedsegError, match="--image-size 100x100.*98x98"):
        build_backbone(BackboneConfig("vit_small_patch14_dinov2", 100), "random")
    with pytest.raises(CachedsegError, match="--image-size 150x112.*154x112"):  # (H, W) given, W x H named
        build_backbone(BackboneConfig("vit_small_patch14_dinov2", (112, 150)), "random")
    with pytest.raises(CachedsegError, match="--layers 13"):
        build_backbone(BackboneConfig("vit_small_patch14_dinov2", 112, layers=13), "random")
    with pytest.raises(CachedsegError, match="'resnet50'.*vit_small_patch14_dinov2"):  # and the names to pick from
        build_backbone(BackboneConfig("resnet50", 112), "random")
    with pytest.raises(CachedsegError, match="--weights /nonexistent/weights.pth"):
        build_backbone(SMALL_CFG, "/nonexistent/weights.pth")


@pytest.mark.subprocess
@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://127.0.0.1:9"}])
def test_auto_weights_fail_fast_and_say_what_to_do_offline(dataset, tmp_path, env):
    # A fresh process, so huggingface_hub reads the environment anew; an empty HF cache so nothing is found.
    environ = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cachedseg.cli", "extract", str(dataset), "--store",
                           str(tmp_path / "s.zarr"), "--backbone", "vit_small_patch14_dinov2", "--image-size", "112"],
                          capture_output=True, text=True, env=environ, timeout=120)
    assert proc.returncode == 1
    assert time.monotonic() - start < 30
    assert "--weights FILE" in proc.stderr and "--weights random" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.slow
def test_full_size_vit_b_at_518():
    model = build_backbone(BackboneConfig(), "random")
    assert model(torch.randn(1, 3, 518, 518)).shape == (1, 1, 768, 37, 37)
    assert model.preprocess.image_size == (518, 518) and model.preprocess.mask_size == (592, 592)


def test_the_default_input_is_the_pretrained_size_as_the_short_side_with_the_datasets_aspect(dataset):
    import timm

    from cachedseg.backbone import config_from_options
    from cachedseg.dataset import open_dataset
    width, height = open_dataset(dataset).frame_size()  # 160x120: landscape
    name = "vit_small_patch14_dinov2"
    pretrained = timm.models.get_pretrained_cfg(name).input_size[-2:]
    h, w = config_from_options(name, dataset).image_size
    assert h == min(pretrained) and w % 14 == 0 and abs(w / h - width / height) <= 7 / h  # nearest multiple of 14
    h, w = config_from_options(name, dataset, short_side=112, layers=2).image_size
    assert h == 112 and abs(w / h - width / height) <= 7 / h
    assert config_from_options(name, dataset, image_size="154x112", precision="bfloat16", layers=3) == BackboneConfig(
        name, (112, 154), "bfloat16", 3)  # width x height typed, (H, W) kept; the dataset is not read


def test_size_options_that_cannot_both_hold_or_an_unknown_model_are_refused(dataset):
    from cachedseg.backbone import config_from_options
    with pytest.raises(CachedsegError, match="--image-size.*--short-side"):
        config_from_options("vit_small_patch14_dinov2", dataset, image_size="112", short_side=112)
    with pytest.raises(CachedsegError, match="--short-side 100"):
        config_from_options("vit_small_patch14_dinov2", dataset, short_side=100)
    with pytest.raises(CachedsegError, match="'resnet50'"):  # its pretrained size would be the default
        config_from_options("resnet50", dataset)


def test_a_model_without_a_pretrained_config_gets_timms_own_default_size():
    import timm

    from cachedseg.backbone import pretrained_size
    assert timm.models.get_pretrained_cfg("not_a_registered_model") is None
    assert pretrained_size("not_a_registered_model") == tuple(timm.models.PretrainedCfg().input_size[-2:])


def test_the_weights_probe_reads_the_local_cache_without_building_a_model(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm

    from cachedseg import backbone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(timm, "create_model", None)  # building a model would fail the test
    name = "vit_small_patch14_dinov2"
    start = time.monotonic()
    with pytest.raises(CachedsegError, match="--weights random"):  # offline, nothing cached: at once
        backbone.pretrained_file(name)
    assert time.monotonic() - start < 0.5
    # a file in the cache's layout (models--org--name/snapshots/REV/FILE, refs/main naming REV) is found
    repo = tmp_path / "hub" / ("models--" + timm.models.get_pretrained_cfg(name).hf_hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"weights")
    assert backbone.pretrained_file(name) == str(repo / "snapshots" / "abc123" / "model.safetensors")
    with pytest.raises(CachedsegError, match="'resnet50'"):
        backbone.pretrained_file("resnet50")
