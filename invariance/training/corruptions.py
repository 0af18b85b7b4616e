"""Corrupted copies of a test set, CIFAR-10-C style, generated in code (nothing downloaded).

Each corruption maps ``images: [n, 3, H, W]`` in [0, 1] and a severity 1..5 to corrupted
images of the same shape, in [0, 1]. The parameters per severity follow CIFAR-10-C
(Hendrycks & Dietterich 2019), with blur radii and pixelation measured relative to a
32-pixel side so that they scale with the image. Random corruptions draw from a generator
seeded by (seed, name, severity): the same call gives the same images, on any batch split
of the calling code (the whole set is corrupted at once).
"""

from __future__ import annotations

import hashlib
import io
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from invariance.errors import ConfigError

SEVERITIES = (1, 2, 3, 4, 5)

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]

# CIFAR-10-C parameters, index = severity - 1.
_NOISE_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
_BLUR_SIGMA_AT_32 = (0.4, 0.6, 0.7, 0.8, 1.0)
_CONTRAST_FACTOR = (0.75, 0.5, 0.4, 0.3, 0.15)
_JPEG_QUALITY = (80, 65, 58, 50, 40)
_BRIGHTNESS_SHIFT = (0.05, 0.1, 0.15, 0.2, 0.3)
_PIXELATE_SCALE = (0.95, 0.9, 0.85, 0.75, 0.65)


def gaussian_noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Add N(0, std^2) per pixel and channel."""
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype) * _NOISE_STD[severity - 1]
    return images + noise


def gaussian_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur, sigma scaled by side / 32, reflect padding."""
    sigma = _BLUR_SIGMA_AT_32[severity - 1] * images.shape[-1] / 32
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def contrast(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Pull every pixel toward the image's mean: (x - mean) * factor + mean."""
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * _CONTRAST_FACTOR[severity - 1] + mean


def brightness(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Raise the HSV value: every channel scaled by (V + shift) / V, i.e. hue and saturation kept."""
    value = images.amax(dim=1, keepdim=True)
    brighter = (value + _BRIGHTNESS_SHIFT[severity - 1]).clamp(max=1.0)
    return torch.where(value > 0, images * brighter / value.clamp(min=1e-6), brighter.expand_as(images))


def jpeg(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Encode each image as JPEG at the severity's quality and decode it again (PIL)."""
    from PIL import Image

    quality = _JPEG_QUALITY[severity - 1]
    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    out = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            out.append(np.asarray(decoded.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.dtype).div(255.0)


def pixelate(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Box-downsample to scale x side, then nearest-upsample back: blocks of about 1/scale pixels.

    The resolution falls with severity; the pixel error need not rise (it is dominated by
    where the block edges fall), as with CIFAR-10-C's own pixelate.
    """
    height, width = images.shape[-2:]
    scale = _PIXELATE_SCALE[severity - 1]
    small = F.interpolate(images, size=(max(1, int(height * scale)), max(1, int(width * scale))), mode="area")
    return F.interpolate(small, size=(height, width), mode="nearest-exact")


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "jpeg": jpeg,
    "brightness": brightness,
    "pixelate": pixelate,
}


def corruption_seed(seed: int, name: str, severity: int) -> int:
    """A generator seed for (seed, corruption, severity): independent streams, stable across runs."""
    digest = hashlib.sha256(f"{seed}/{name}/{severity}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``images: [n, 3, H, W]`` in [0, 1] -> the corrupted copy, ``[n, 3, H, W]`` in [0, 1], on CPU.

    Deterministic for (images, name, severity, seed).
    """
    if name not in CORRUPTIONS:
        raise ConfigError(f"corruptions.names: unknown corruption {name!r}; known: {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ConfigError(f"corruptions.severities: severity must be 1..5, got {severity!r}")
    generator = torch.Generator().manual_seed(corruption_seed(seed, name, severity))
    corrupted = CORRUPTIONS[name](images.detach().float().cpu(), severity, generator)
    return corrupted.clamp(0.0, 1.0).contiguous()
