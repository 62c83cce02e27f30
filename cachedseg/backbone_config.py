"""The backbone's configuration, `BackboneConfig`, and the default model: imported from `cachedseg.backbone`, which
builds it. It has this small module of its own (no torch, no timm) so that the CLI can show the default model as an
option's default without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BACKBONE = "vit_base_patch14_dinov2"


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone, at which input size, compute precision and depth of features.

    Attributes:
        name: A timm DINOv2 model name, e.g. `vit_base_patch14_dinov2` or `vit_small_patch14_reg4_dinov2`.
        image_size: Input (height, width) in pixels, multiples of the patch size (an int: a square); `None`
            takes the model's pretrained size (518x518).
        precision: Compute precision of the forward pass; extraction and prediction must use the same.
        layers: How many of the last blocks' patch tokens to return (each after the final norm, as DINOv2's
            `get_intermediate_layers(norm=True)`); 1 is the final output.
    """

    name: str = DEFAULT_BACKBONE
    image_size: tuple[int, int] | int | None = None
    precision: str = "float32"
    layers: int = 1
