"""The frozen DINOv2 backbone: any timm DINOv2 ViT, returning patch tokens as a [B, C, h, w] grid."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

from cachedseg.data import Preprocess, mask_size_for
from cachedseg.errors import CachedsegError

DEFAULT_BACKBONE = "vit_base_patch14_dinov2"
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone, at which input size and compute precision.

    Attributes:
        name: A timm DINOv2 model name, e.g. `vit_base_patch14_dinov2` or `vit_small_patch14_reg4_dinov2`.
        image_size: Side of the square input in pixels; `None` takes the model's pretrained size (518).
        precision: Compute precision of the forward pass; extraction and prediction must use the same.
    """

    name: str = DEFAULT_BACKBONE
    image_size: int | None = None
    precision: str = "float32"


def dinov2_models() -> list[str]:
    """The timm model names this tool accepts."""
    return timm.list_models("*dinov2*")


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; refuse cuda on a machine without it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CachedsegError("--device cuda was asked for, but torch sees no GPU here; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise CachedsegError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


class Backbone(torch.nn.Module):
    """A frozen DINOv2 ViT returning the final-norm patch tokens as a [B, C, h, w] grid.

    Attributes:
        config: The resolved `BackboneConfig` (image size filled in).
        preprocess: The preprocessing that matches this model (size, mean/std from `pretrained_cfg`).
        channels: Token channels C (768 for ViT-B).
        grid: Token grid (h, w) (37x37 for a 518 input).
        fingerprint: Hash of the weights and preprocessing; it identifies the features for good.
    """

    def __init__(self, model: torch.nn.Module, config: BackboneConfig):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.config = config
        cfg = model.pretrained_cfg
        self.preprocess = Preprocess(image_size=config.image_size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                                     interpolation=cfg.get("interpolation", "bicubic"),
                                     mask_size=mask_size_for(config.image_size))
        self.channels = model.num_features
        self.grid = tuple(model.patch_embed.grid_size)
        self.fingerprint = _fingerprint(model, self.preprocess, config.precision)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode: the backbone is frozen, also inside a module being trained."""
        return super().train(False)

    @torch.no_grad()  # not inference_mode: live training feeds these tensors to a decoder that autograd tracks
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] (preprocessed) -> patch tokens [B, C, h, w] in float32."""
        dtype = PRECISIONS[self.config.precision]
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            tokens = self.model.forward_features(x)  # [B, prefix + h*w, C], after the final norm
        tokens = tokens[:, self.model.num_prefix_tokens:].float()  # drop class and register tokens
        b, _, c = tokens.shape
        # contiguous: a strided view would send the decoder's convs down another kernel path (other rounding)
        # than cached features take, breaking the cache == live guarantee.
        return tokens.transpose(1, 2).reshape(b, c, *self.grid).contiguous()  # [B, C, h, w]


def build_backbone(config: BackboneConfig = BackboneConfig(), weights: str = "auto",
                   device: str | torch.device = "cpu") -> Backbone:
    """Build a frozen DINOv2 backbone.

    Args:
        config: Model name, input size and precision.
        weights: `auto` (pretrained through timm and the Hugging Face hub or its local cache), a path to a
            `.safetensors` / `.pth` state dict, or `random` (a seeded initialisation, identical in every process).
        device: Where the model runs.

    Returns:
        The backbone, in eval mode with gradients off.

    Raises:
        CachedsegError: For an unknown model, a bad input size, or weights that cannot be had.
    """
    if config.name not in dinov2_models():
        raise CachedsegError(f"unknown backbone {config.name!r}; pick a timm DINOv2 model: "
                             + ", ".join(dinov2_models()))
    if config.precision not in PRECISIONS:
        raise CachedsegError(f"unknown precision {config.precision!r}; use one of {', '.join(PRECISIONS)}")
    if config.image_size is None:
        size = timm.models.get_pretrained_cfg(config.name).input_size[-1]
        config = BackboneConfig(config.name, size, config.precision)
    kwargs = dict(img_size=config.image_size, num_classes=0)
    patch = 14
    if config.image_size < patch or config.image_size % patch:
        raise CachedsegError(f"--image-size {config.image_size} is not a multiple of the patch size {patch}; "
                             f"use e.g. {max(patch, round(config.image_size / patch) * patch)}")
    if weights == "random":
        # A private, seeded RNG stream: the same random weights in every process, whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(config.name, pretrained=False, **kwargs)
    elif weights == "auto":
        model = _create_pretrained(config.name, kwargs)
    else:
        path = Path(weights)
        if not path.is_file():
            raise CachedsegError(f"--weights {weights}: no such file; give a .safetensors/.pth state dict, "
                                 "`auto` or `random`")
        try:  # timm's own loader maps original DINOv2 checkpoints and resamples position embeddings
            model = timm.create_model(config.name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                      **kwargs)
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            raise CachedsegError(f"--weights {path} does not fit {config.name}: {str(exc).splitlines()[0]}") from None
    return Backbone(model, config).to(resolve_device(device) if isinstance(device, str) else device)


def backbone_for(spec, weights: str, device: str | torch.device = "cpu") -> Backbone:
    """Rebuild the backbone that made `spec`'s features (a `StoreSpec`), refusing one with another fingerprint."""
    model = build_backbone(BackboneConfig(spec.backbone, spec.image_size, spec.precision), weights, device)
    if model.fingerprint != spec.fingerprint:
        raise CachedsegError(f"the {spec.backbone} built with --weights {weights} has fingerprint {model.fingerprint}, "
                             f"but the decoder was trained on features with fingerprint {spec.fingerprint}; "
                             "pass the --weights the features were extracted with")
    return model


def weights_source(weights: str) -> str:
    """How to find these weights again later: `auto`, `random`, or the absolute path of the file."""
    return weights if weights in ("auto", "random") else str(Path(weights).resolve())


def _create_pretrained(name: str, kwargs: dict) -> torch.nn.Module:
    """timm pretrained weights: the local HF cache first, then the hub, failing fast when neither answers."""
    hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    hint = ("pass --weights FILE for a local .safetensors/.pth state dict, or --weights random for a "
            "seeded random initialisation (tests, offline demos)")
    cached = _cached_weights(hub_id)
    if cached is not None:  # load the cached file directly: no network round trip, no retry stalls
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise CachedsegError(f"pretrained weights for {name} ({hub_id}) are not in the local Hugging Face cache "
                             f"and HF_HUB_OFFLINE is set; {hint}")
    from huggingface_hub import constants
    if not _reachable(constants.ENDPOINT):
        raise CachedsegError(f"cannot reach {constants.ENDPOINT} to download the weights of {name} "
                             f"and they are not cached locally; {hint}")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
        raise CachedsegError(f"could not download the weights of {name}: {str(exc).splitlines()[0]}; {hint}") from None


def _cached_weights(hub_id: str | None) -> str | None:
    """Path of a weights file for `hub_id` in the local Hugging Face cache, if there is one."""
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache
    for filename in _WEIGHT_FILES:
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within a few seconds (assumed yes behind a proxy)."""
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct connection says nothing about a proxied one
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _fingerprint(model: torch.nn.Module, pp: Preprocess, precision: str) -> str:
    """blake2b of every weight tensor (name, dtype, shape, bytes) and the preprocessing settings."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"preprocess": asdict(pp), "precision": precision}, sort_keys=True).encode())
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
