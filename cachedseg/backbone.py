"""The frozen DINOv2 backbone: any timm DINOv2 ViT, returning the patch tokens of its last blocks as a
[B, L, C, h, w] grid, at any input size, with the position embedding resized as the official model does."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

from cachedseg.backbone_config import DEFAULT_BACKBONE, BackboneConfig  # noqa: F401 - imported from here
from cachedseg.data import Preprocess
from cachedseg.decoders import mask_size_for
from cachedseg.errors import CachedsegError, first_line, load_failure

# The compute precisions of the forward pass: PyTorch at float32, or under bfloat16/float16 autocast; or the float32
# graph run by onnxruntime on the CPU (`ONNX_RUNTIME`: exported once per weights and size, see `Backbone.forward`).
ONNX_RUNTIME = "onnxruntime"
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
              ONNX_RUNTIME: torch.float32}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def parse_size(text: str) -> tuple[int, int]:
    """'518' -> (518, 518); '924x518' (width x height, as images are described) -> (518, 924), i.e. (H, W)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[1], parts[0]
    raise CachedsegError(f"--image-size {text!r}: give one side (518) or width x height (924x518)")


def size_for_short_side(short: int, width: int, height: int, patch: int) -> tuple[int, int]:
    """The input (H, W) whose short side is `short` and whose aspect ratio is closest to width:height, in
    multiples of the backbone's `patch` size (see `patch_size`)."""
    if short < patch or short % patch:
        raise CachedsegError(f"--short-side {short} is not a multiple of the patch size {patch}; use e.g. "
                             f"{max(patch, round(short / patch) * patch)}")
    long = max(patch, round(short * max(width, height) / min(width, height) / patch) * patch)
    return (short, long) if width >= height else (long, short)


def dinov2_models() -> list[str]:
    """The timm model names this tool accepts."""
    return timm.list_models("*dinov2*")


def _check_name(name: str) -> None:
    """Refuse a model name this tool does not accept."""
    if name not in dinov2_models():
        raise CachedsegError(f"unknown backbone {name!r}; pick a timm DINOv2 model: " + ", ".join(dinov2_models()))


def patch_size(name: str) -> int:
    """The patch size (pixels per token side) of backbone `name`, before any weights exist.

    timm records it in the model's own arguments only, so it is read from the model built on the meta device
    with one block (no memory, no weights: milliseconds).

    Raises:
        CachedsegError: For a name that is not a timm DINOv2 model.
    """
    _check_name(name)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, depth=1)
    height, width = model.patch_embed.patch_size
    assert height == width, f"{name}: non-square patches {height}x{width}"  # every timm ViT's are square
    return height


def pretrained_size(name: str) -> tuple[int, int]:
    """The input (H, W) the model was pretrained at, from timm's pretrained config without building the model (for
    a model that registers none, timm's own default config, the one it would build with)."""
    return tuple(timm.models.resolve_pretrained_cfg(name).input_size[-2:])


def config_from_options(name: str, data: str | Path, image_size: str | None = None, short_side: int | None = None,
                        precision: str = "float32", layers: int = 1) -> BackboneConfig:
    """The `BackboneConfig` that the size options of `extract` (and `train --live`, `demo`) ask for.

    Args:
        name: The timm DINOv2 model.
        data: The dataset (a folder or a dataset file); its first frame gives the aspect ratio `short_side` keeps.
        image_size: `--image-size`: one side or WIDTH x HEIGHT (see `parse_size`), used as given.
        short_side: `--short-side`: the input's short side, the long one following the dataset's aspect ratio.
            With neither size given: the model's pretrained size as the short side.
        precision: Compute precision of the forward pass.
        layers: How many of the last blocks' tokens to return.

    Returns:
        The config, its `image_size` filled in.

    Raises:
        CachedsegError: For both sizes given, a size that is no multiple of the patch size, an unreadable first
            frame, or an unknown model (unless the size is given in full).
    """
    from cachedseg.dataset import open_dataset

    if image_size and short_side:
        raise CachedsegError("give --image-size or --short-side, not both")
    if image_size:
        return BackboneConfig(name, parse_size(image_size), precision, layers)
    patch = patch_size(name)  # refuses an unknown model
    if not short_side:  # the default: the model's own size as the short side, the dataset's aspect ratio kept
        short_side = min(pretrained_size(name))
    return BackboneConfig(name, size_for_short_side(short_side, *open_dataset(data).frame_size(), patch), precision,
                          layers)


def tiling_from_options(name: str, tile: str | None, overlap: int | None = None, gsd: float | None = None):
    """The `cachedseg.tiles.Tiling` that `extract --tile SIZE --tile-overlap PX --gsd M` asks for (None without
    `tile`): windows of SIZE (one side, or WIDTH x HEIGHT) in whole patches of backbone `name`, sharing `overlap`
    pixels (default: an eighth of the window in whole patches).

    Raises:
        CachedsegError: For --tile-overlap or --gsd without --tile, a size that is no multiple of the patch size,
            an overlap over half the window, or a GSD of 0 or less.
    """
    from cachedseg.tiles import Tiling, default_overlap

    if tile is None:
        if overlap is not None or gsd is not None:
            raise CachedsegError("--tile-overlap and --gsd cut images into windows; give --tile SIZE too")
        return None
    size, patch = parse_size(tile), patch_size(name)
    if size[0] % patch or size[1] % patch:
        raise CachedsegError(f"--tile {tile}: a window is the backbone's input, whole patches of {patch} pixels; "
                             f"use e.g. {max(patch, round(size[1] / patch) * patch)}")
    return Tiling(size, default_overlap(size, patch) if overlap is None else overlap, gsd)


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
    """A frozen DINOv2 ViT returning the final-norm patch tokens of its last blocks as a [B, L, C, h, w] grid.

    Attributes:
        config: The resolved `BackboneConfig` (image size filled in).
        preprocess: The preprocessing that matches this model (size, mean/std from `pretrained_cfg`).
        channels: Token channels C (768 for ViT-B).
        grid: Token grid (h, w) (37x37 for a 518x518 input, 37x66 for 924x518).
        fingerprint: Hash of the weights and preprocessing; it identifies the features for good.
    """

    def __init__(self, model: torch.nn.Module, config: BackboneConfig):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.config = config
        cfg = model.pretrained_cfg
        self.channels = model.num_features
        self.grid = tuple(model.patch_embed.grid_size)
        self.preprocess = Preprocess(image_size=config.image_size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                                     interpolation=cfg.get("interpolation", "bicubic"),
                                     mask_size=mask_size_for(self.grid))
        self.fingerprint = _fingerprint(model, self.preprocess, config.precision)
        self._session = None  # onnxruntime's, for the onnxruntime precision
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode: the backbone is frozen, also inside a module being trained."""
        return super().train(False)

    @torch.no_grad()  # not inference_mode: live training feeds these tensors to a decoder that autograd tracks
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] (preprocessed) -> patch tokens [B, L, C, h, w] in float32."""
        if self._session is not None:  # the same computation exported: float32, by onnxruntime's kernels
            return torch.from_numpy(self._session.run(None, {"image": x.detach().cpu().float().numpy()})[0])
        dtype = PRECISIONS[self.config.precision]
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            if self.config.layers == 1:
                layers = [self.model.forward_features(x)]  # [B, prefix + h*w, C], after the final norm
            else:  # the last L blocks, each through the final norm (DINOv2's linear4 / +ms recipes)
                layers = self.model.get_intermediate_layers(x, n=self.config.layers, norm=True,
                                                            return_prefix_tokens=False)
        n = self.model.num_prefix_tokens if self.config.layers == 1 else 0  # class and register tokens dropped
        tokens = torch.stack([t[:, n:] for t in layers], 1).float()  # [B, L, h*w, C]
        b, l, _, c = tokens.shape
        # contiguous: a strided view would send the decoder's convs down another kernel path (other rounding)
        # than cached features take.
        return tokens.transpose(2, 3).reshape(b, l, c, *self.grid).contiguous()  # [B, L, C, h, w]


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
    _check_name(config.name)
    if config.precision not in PRECISIONS:
        raise CachedsegError(f"unknown precision {config.precision!r}; use one of {', '.join(PRECISIONS)}")
    size = config.image_size or pretrained_size(config.name)
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = patch_size(config.name)
    if any(s < patch or s % patch for s in size):
        raise CachedsegError(f"--image-size {size[1]}x{size[0]} (width x height) is not a multiple of the patch "
                             f"size {patch} on both sides; use e.g. "
                             + "x".join(str(max(patch, round(s / patch) * patch)) for s in size[::-1]))
    if not 1 <= config.layers:
        raise CachedsegError(f"--layers {config.layers}: use 1 (the final output) up to the model's depth")
    config = BackboneConfig(config.name, size, config.precision, config.layers)
    # Built at the pretrained size, so the weights load as trained; the position embedding is then resized the
    # way the official model of this variant resizes it (see `_resize_pos_embed`).
    kwargs = dict(num_classes=0)
    if weights == "random":
        # A private, seeded RNG stream: the same random weights in every process, whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(config.name, pretrained=False, **kwargs)
    elif weights == "auto":
        model = _create_pretrained(config.name, kwargs)
    else:
        path = Path(weights)
        if path.is_dir():
            raise CachedsegError(f"--weights {weights} is a folder; give the weights file in it (a .safetensors/.pth "
                                 "state dict), `auto` or `random`")
        if not path.is_file():
            raise CachedsegError(f"--weights {weights}: no such file; give a .safetensors/.pth state dict, "
                                 "`auto` or `random`")
        shapes = _file_shapes(path)
        pos = next((s for k, s in shapes.items() if k.endswith("pos_embed")), None)
        if pos is not None and pos[1] in (n := (size[0] // patch) * (size[1] // patch), n + 1):
            kwargs["img_size"] = size  # saved at the target grid (e.g. by cachedseg): used as it is
        try:  # timm's own loader maps original DINOv2 checkpoints
            model = timm.create_model(config.name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                      **kwargs)
        except Exception as exc:  # noqa: BLE001 - the file reads (checked above): whatever fails is a mismatch
            raise CachedsegError(_mismatch(path, shapes, config.name, exc)) from None
    if config.layers > len(model.blocks):
        raise CachedsegError(f"--layers {config.layers}: {config.name} has {len(model.blocks)} blocks")
    _resize_pos_embed(model, (size[0] // patch, size[1] // patch))
    backbone = Backbone(model, config).to(resolve_device(device) if isinstance(device, str) else device)
    if config.precision == ONNX_RUNTIME:
        if next(backbone.parameters()).device.type != "cpu":
            raise CachedsegError("--precision onnxruntime runs the backbone on the CPU; on a GPU use float32, or "
                                 "bfloat16/float16 autocast")
        from cachedseg.export import backbone_session
        backbone._session = backbone_session(backbone)
    return backbone


def _resize_pos_embed(model: torch.nn.Module, grid: tuple[int, int]) -> None:
    """Set the model to a `grid` of tokens, resizing the position embedding as the official DINOv2 code does.

    The official models resize it on every forward pass, which is the same computation as doing it once here:
    plain models with bicubic, antialias off and `scale_factor = (grid + 0.1) / M` (a historical offset), `_reg`
    models with bicubic, antialias on and the target size. timm's load-time resize is the latter, so it is kept
    for `_reg` models; for plain ones it would differ by up to 6% (the pretrained weights never saw that).
    """
    trained = tuple(model.patch_embed.grid_size)
    if grid == trained:
        return
    plain = model.pos_embed.detach().clone()  # [1, 1 + M*M, C] for plain models
    patch = model.patch_embed.patch_size
    model.set_input_size(img_size=(grid[0] * patch[0], grid[1] * patch[1]))  # timm: antialiased, size-based
    if model.no_embed_class:  # `_reg` variants: timm's resize is the official one
        return
    m, c = trained[0], plain.shape[-1]
    patches = plain[:, 1:].float().reshape(1, m, m, c).permute(0, 3, 1, 2)  # [1, C, M, M]
    patches = torch.nn.functional.interpolate(patches, scale_factor=((grid[0] + 0.1) / m, (grid[1] + 0.1) / m),
                                              mode="bicubic", antialias=False)  # [1, C, h, w]
    resized = torch.cat([plain[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c)], 1)
    model.pos_embed = torch.nn.Parameter(resized.to(plain.dtype), requires_grad=False)


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes in a weights file; refuses a file that is not a state dict of a ViT (say what it is)."""
    expected = "give a .safetensors or .pth state dict of a DINOv2 model (timm's or the original), `auto` or `random`"
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CachedsegError(f"--weights {path}: unknown file type {path.suffix or '(no suffix)'!r}, expected one of "
                             f"{', '.join(WEIGHT_SUFFIXES)}; {expected}")
    size = path.stat().st_size
    if size == 0:
        raise CachedsegError(f"--weights {path} is empty (0 bytes): it was never fully written or copied; {expected}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type: not a (whole) safetensors file
            raise CachedsegError(f"--weights {path} is not a readable safetensors file ({size} bytes: "
                                 f"{first_line(exc)}); {expected}") from None
    else:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format; mmap needs it
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        except Exception as exc:  # noqa: BLE001 - torn, foreign or unsafe pickles all get one message
            what = (f"a damaged PyTorch file ({size} bytes; {load_failure(exc)})" if zipped else
                    f"not a PyTorch file ({size} bytes, not the zip archive torch.save writes)")
            raise CachedsegError(f"--weights {path} is {what}; {expected}") from None
        if isinstance(state, dict) and str(state.get("format", "")).startswith("cachedseg"):
            raise CachedsegError(f"--weights {path} is a cachedseg checkpoint (a trained decoder: give it to --run), "
                                 f"not backbone weights; {expected}")
        if isinstance(state, dict):  # the keys timm unwraps
            state = next((state[k] for k in ("state_dict_ema", "model_ema", "state_dict", "model")
                          if state.get(k) is not None), state)
        if not isinstance(state, dict):
            raise CachedsegError(f"--weights {path} holds a {type(state).__name__}, not a state dict (a dict of "
                                 f"tensors); {expected}")
        shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not any(k.endswith("patch_embed.proj.weight") for k in shapes):
        keys = ", ".join(list(shapes)[:3]) or "none"
        raise CachedsegError(f"--weights {path} holds {len(shapes)} tensors but no ViT patch embedding "
                             f"(patch_embed.proj.weight; its first keys: {keys}), so not a DINOv2 model; {expected}")
    return shapes


def _mismatch(path: Path, shapes: dict[str, tuple[int, ...]], name: str, exc: Exception) -> str:
    """Why a weights file does not load into `name`, naming the variant the file holds when it can tell."""
    dims = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
    proj = next((s for k, s in shapes.items() if k.endswith("patch_embed.proj.weight")), None)  # [C, 3, p, p]
    embed = proj[0] if proj else None
    if embed in dims:
        registers = any("reg_token" in k or "register_tokens" in k for k in shapes)
        held = f"vit_{dims[embed]}_patch{proj[-1]}{'_reg4' if registers else ''}_dinov2"
        if held != name:
            return (f"--weights {path} holds a {held} checkpoint ({embed} channels, "
                    f"{'with' if registers else 'no'} register tokens), not {name}; pass --backbone {held}")
    return (f"--weights {path} holds a ViT that does not fit {name} ({first_line(exc)}); pass the --backbone it was "
            "saved from")


def backbone_for(spec, weights: str, device: str | torch.device = "cpu", layers: int | None = None) -> Backbone:
    """Rebuild the backbone that made `spec`'s features (a `StoreSpec`), refusing one with another fingerprint.

    `layers` asks for fewer of the last blocks than the store holds (what a decoder consumes).
    """
    config = BackboneConfig(spec.backbone, tuple(spec.input_size), spec.precision, layers or spec.layers)
    model = build_backbone(config, weights, device)
    if model.fingerprint != spec.fingerprint:
        raise CachedsegError(f"the {spec.backbone} built with --weights {weights} has fingerprint {model.fingerprint}, "
                             f"but the decoder was trained on features with fingerprint {spec.fingerprint}; "
                             "pass the --weights the features were extracted with")
    return model


def weights_source(weights: str) -> str:
    """How to find these weights again later: `auto`, `random`, or the absolute path of the file."""
    return weights if weights in ("auto", "random") else str(Path(weights).resolve())


_WEIGHTS_HINT = ("pass --weights FILE for a local .safetensors/.pth state dict, or --weights random for a "
                 "seeded random initialisation (tests, offline demos)")


def pretrained_file(name: str) -> str | None:
    """The local file of `name`'s pretrained weights, found without building the model: in the local Hugging Face
    cache, else downloaded into it. Offline it answers from the cache alone, at once.

    Args:
        name: A timm DINOv2 model.

    Returns:
        The file's path; None for a model whose pretrained config names no Hugging Face repository (timm then
        fetches the weights itself, from the URL its config gives).

    Raises:
        CachedsegError: For an unknown model, or weights that can be had from neither the cache nor the hub
            (HF_HUB_OFFLINE set, the hub unreachable, a download that fails).
    """
    _check_name(name)
    hub_id = timm.models.resolve_pretrained_cfg(name).hf_hub_id
    cached = _cached_weights(hub_id)
    if cached is not None:  # no network round trip, no retry stalls
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise CachedsegError(f"pretrained weights for {name} ({hub_id}) are not in the local Hugging Face cache "
                             f"and HF_HUB_OFFLINE is set; {_WEIGHTS_HINT}")
    from huggingface_hub import constants
    if not _reachable(constants.ENDPOINT):
        raise CachedsegError(f"cannot reach {constants.ENDPOINT} to download the weights of {name} "
                             f"and they are not cached locally; {_WEIGHTS_HINT}")
    if not hub_id:
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    why = f"{hub_id} holds none of {', '.join(_WEIGHT_FILES)}"
    for filename in _WEIGHT_FILES:  # the first the repository holds, in the order the cache is searched
        try:
            return hf_hub_download(hub_id, filename)
        except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
            if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
                continue  # the repository has no file of this name (a *local* miss: the hub did not answer)
            why = first_line(exc)
            break
    raise CachedsegError(f"could not download the weights of {name}: {why}; {_WEIGHTS_HINT}")


def _create_pretrained(name: str, kwargs: dict) -> torch.nn.Module:
    """timm pretrained weights: the local HF cache first, then the hub, failing fast when neither answers."""
    path = pretrained_file(name)
    if path is not None:  # the file itself: timm maps it as it would a download
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
        raise CachedsegError(f"could not download the weights of {name}: {first_line(exc)}; {_WEIGHTS_HINT}") from None


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
