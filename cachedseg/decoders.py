"""Decoders: token grid [B, C, h, w] -> class logits [B, K, M, M]. Built from a config saved in the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cachedseg.errors import CachedsegError


@dataclass(frozen=True)
class DecoderConfig:
    """What a decoder needs to be rebuilt, with no flags, from a checkpoint.

    Attributes:
        name: `seed` (the seed design's transposed-conv decoder) or `linear` (DINOv2's linear head).
        in_channels: Token channels C, read from the store.
        num_classes: Number of output classes K.
        mask_size: Side M of the square output, the store's mask size.
    """

    name: str
    in_channels: int
    num_classes: int
    mask_size: int


class SeedDecoder(nn.Module):
    """The seed design: four ConvTranspose(2, stride 2) + BN + ReLU blocks (16x up), center crop, 1x1 conv."""

    widths = (512, 256, 128, 64)

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        blocks, c = [], cfg.in_channels
        for width in self.widths:
            blocks += [nn.ConvTranspose2d(c, width, kernel_size=2, stride=2), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c = width
        self.up = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(c, cfg.num_classes, kernel_size=1)
        self.mask_size = cfg.mask_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # [B, 64, 16h, 16w]  (37 -> 592)
        if x.shape[-1] < self.mask_size or x.shape[-2] < self.mask_size:
            raise ValueError(f"decoder output {tuple(x.shape[-2:])} is smaller than the mask size {self.mask_size}")
        top, left = (x.shape[-2] - self.mask_size) // 2, (x.shape[-1] - self.mask_size) // 2
        x = x[..., top:top + self.mask_size, left:left + self.mask_size]  # [B, 64, M, M]  (592 -> 512)
        return self.classifier(x)  # [B, K, M, M]


class LinearDecoder(nn.Module):
    """DINOv2's linear segmentation head: BN + 1x1 conv on the token grid, logits upsampled bilinearly."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.norm = nn.BatchNorm2d(cfg.in_channels)
        self.classifier = nn.Conv2d(cfg.in_channels, cfg.num_classes, kernel_size=1)
        self.mask_size = cfg.mask_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.classifier(self.norm(x))  # [B, K, h, w]
        return F.interpolate(x, size=(self.mask_size, self.mask_size), mode="bilinear", align_corners=False)  # [B, K, M, M]


DECODERS = {"seed": SeedDecoder, "linear": LinearDecoder}


def build_decoder(cfg: DecoderConfig) -> nn.Module:
    """Build the decoder a config names.

    Args:
        cfg: The decoder config (from the CLI, or read back from a checkpoint).

    Returns:
        The decoder module, freshly initialised.

    Raises:
        CachedsegError: For an unknown decoder name.
    """
    if cfg.name not in DECODERS:
        raise CachedsegError(f"unknown decoder {cfg.name!r}; pick one of {', '.join(DECODERS)}")
    return DECODERS[cfg.name](cfg)
