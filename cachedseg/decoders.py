"""Decoders: token grids [B, L, C, h, w] -> class logits [B, K, H, W]. Built from a config saved in the checkpoint.

    seed     the seed design, reproduced faithfully: four ConvTranspose(2, stride 2) + BN + ReLU blocks (16x up),
             then a center crop to the input size rounded down to 16 (592 -> 512 for 37 tokens), 1x1 conv. The crop
             drops the border, so its output pixels do not sit over the labels they are scored against.
    upconv   the same blocks, aligned: the 16x map covers the whole frame, as the masks do; no crop.
    linear   DINOv2's linear head: BN + 1x1 conv on the (concatenated last L layers') tokens, bilinear upsampling.
             With L = 4 this is DINOv2's "linear4".
    conv     a light head with spatial context: BN, two 3x3 conv + BN + ReLU blocks on the token grid, 1x1 conv,
             bilinear upsampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cachedseg.errors import CachedsegError

# The widths of the four ConvTranspose(2, stride 2) blocks of `seed` and `upconv`: each doubles the grid.
_UPCONV_WIDTHS = (512, 256, 128, 64)
# Output pixels per token side: the 2**4 of those blocks. The masks are stored at this resolution, so every
# decoder's output pixels sit over their labels.
OUTPUT_STRIDE = 2 ** len(_UPCONV_WIDTHS)


def mask_size_for(grid: tuple[int, int]) -> tuple[int, int]:
    """Training masks: `OUTPUT_STRIDE` pixels per token, the transposed-conv decoders' output grid (37x37 -> 592x592).

    Masks and images both cover the whole frame, so mask pixel j sits under the decoder's output pixel j.
    """
    return grid[0] * OUTPUT_STRIDE, grid[1] * OUTPUT_STRIDE


@dataclass(frozen=True)
class DecoderConfig:
    """What a decoder needs to be rebuilt, with no flags, from a checkpoint.

    Attributes:
        name: `seed`, `upconv`, `linear` or `conv` (see the module docstring).
        in_channels: Token channels C per layer, read from the store.
        num_classes: Number of output classes K.
        out_size: (height, width) of the logits: the store's mask size, or for `seed` its crop.
        layers: How many of the last cached layers it reads (their channels are concatenated).
    """

    name: str
    in_channels: int
    num_classes: int
    out_size: tuple[int, int]
    layers: int = 1


def decoder_config(name: str, spec, layers: int = 1) -> DecoderConfig:
    """The config of decoder `name` on the features of `spec` (a `StoreSpec`), reading its last `layers` layers."""
    if name not in DECODERS:
        raise CachedsegError(f"unknown decoder {name!r}; pick one of {', '.join(DECODERS)}")
    if layers < 1:
        raise CachedsegError(f"--layers {layers}: give 1 (the last layer) up to the {spec.layers} the features hold")
    if layers > spec.layers:
        raise CachedsegError(f"--layers {layers}: the features hold {spec.layers} layer(s); extract with --layers "
                             f"{layers} for a head that reads {layers}")
    out = (tuple(s // OUTPUT_STRIDE * OUTPUT_STRIDE for s in spec.input_size) if name == "seed"
           else tuple(spec.mask_size))
    return DecoderConfig(name, spec.channels, len(spec.class_names), out, layers)


class Decoder(nn.Module):
    """Reads the last `layers` layers of the token grid, concatenated along channels."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.layers, self.out_size = cfg.layers, tuple(cfg.out_size)
        self.memory_format = torch.contiguous_format

    def channels_last(self) -> Decoder:
        """Run in channels-last memory layout (faster convolutions on GPUs); the numbers stay within rounding."""
        self.memory_format = torch.channels_last
        return self.to(memory_format=torch.channels_last)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L', C, h, w] (L' >= layers) -> [B, layers * C, h, w]."""
        return x[:, -self.layers:].flatten(1, 2).contiguous(memory_format=self.memory_format)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """Bilinear resize to the output size; align_corners=False keeps pixel centres over the same frame points."""
        if tuple(x.shape[-2:]) == self.out_size:
            return x
        return F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)


def _upconv_blocks(channels: int, widths=_UPCONV_WIDTHS) -> nn.Sequential:
    """Four ConvTranspose(2, stride 2) + BN + ReLU blocks: each token becomes a 16x16 patch."""
    blocks = []
    for width in widths:
        blocks += [nn.ConvTranspose2d(channels, width, kernel_size=2, stride=2), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        channels = width
    return nn.Sequential(*blocks)


class UpconvDecoder(Decoder):
    """The seed's blocks without the crop: the 16x map covers the whole frame, like the masks."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.up = _upconv_blocks(cfg.in_channels * cfg.layers)
        self.classifier = nn.Conv2d(_UPCONV_WIDTHS[-1], cfg.num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.upsample(self.up(self.tokens(x)))  # [B, 64, Mh, Mw] (16h x 16w: a resize only for other mask sizes)
        return self.classifier(x)  # [B, K, Mh, Mw]


class SeedDecoder(UpconvDecoder):
    """The seed design: the same 16x transposed-conv upsampling, then a center crop to the output size, 1x1 conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.tokens(x))  # [B, 64, 16h, 16w]  (37 -> 592)
        (mh, mw), (h, w) = self.out_size, x.shape[-2:]
        if h < mh or w < mw:
            raise ValueError(f"decoder output {(h, w)} is smaller than the output size {self.out_size}")
        top, left = (h - mh) // 2, (w - mw) // 2
        return self.classifier(x[..., top:top + mh, left:left + mw])  # [B, K, Mh, Mw]  (592 -> 512)


class LinearDecoder(Decoder):
    """DINOv2's linear segmentation head: BN + 1x1 conv on the token grid, logits upsampled bilinearly."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.norm = nn.BatchNorm2d(cfg.in_channels * cfg.layers)
        self.classifier = nn.Conv2d(cfg.in_channels * cfg.layers, cfg.num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.classifier(self.norm(self.tokens(x))))  # [B, K, h, w] -> [B, K, Mh, Mw]


class ConvDecoder(Decoder):
    """Spatial context on the token grid: BN, two 3x3 conv + BN + ReLU blocks, 1x1 conv, bilinear upsampling."""

    width = 256

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        c = cfg.in_channels * cfg.layers
        self.body = nn.Sequential(
            nn.BatchNorm2d(c),
            nn.Conv2d(c, self.width, 3, padding=1, bias=False), nn.BatchNorm2d(self.width), nn.ReLU(inplace=True),
            nn.Conv2d(self.width, self.width, 3, padding=1, bias=False), nn.BatchNorm2d(self.width),
            nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(self.width, cfg.num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.classifier(self.body(self.tokens(x))))  # [B, K, h, w] -> [B, K, Mh, Mw]


DECODERS = {"seed": SeedDecoder, "upconv": UpconvDecoder, "linear": LinearDecoder, "conv": ConvDecoder}


def build_decoder(cfg: DecoderConfig) -> nn.Module:
    """Build the decoder a config names.

    Args:
        cfg: The decoder config (from `decoder_config`, or read back from a checkpoint).

    Returns:
        The decoder module, freshly initialised.

    Raises:
        CachedsegError: For an unknown decoder name.
    """
    if cfg.name not in DECODERS:
        raise CachedsegError(f"unknown decoder {cfg.name!r}; pick one of {', '.join(DECODERS)}")
    return DECODERS[cfg.name](cfg)
