"""Generated images for the demo and tests: coloured shapes with textured fills.

Every image has two labels, so one set of images serves two tasks: ``shape`` (disk,
square, triangle, ring) and ``texture`` (solid, horizontal stripes, vertical stripes,
checker). Deterministic for a seed; nothing is downloaded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("disk", "square", "triangle", "ring")
TEXTURES = ("solid", "hstripes", "vstripes", "checker")


@dataclass(frozen=True)
class ShapesDataset:
    """``images: [n, 3, S, S]`` float32 in [0, 1]; ``shape``/``texture``: ``[n]`` int64 labels."""

    images: torch.Tensor
    shape: torch.Tensor
    texture: torch.Tensor

    def labels(self, task: str) -> torch.Tensor:
        if task not in ("shape", "texture"):
            raise ValueError(f"task must be 'shape' or 'texture', got {task!r}")
        return self.shape if task == "shape" else self.texture


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if SHAPES[kind] == "disk":
        return dy**2 + dx**2 <= radius**2
    if SHAPES[kind] == "square":
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    if SHAPES[kind] == "triangle":
        return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    distance = np.sqrt(dy**2 + dx**2)
    return (distance <= radius) & (distance >= radius * 0.55)


def _texture(kind: int, yy: np.ndarray, xx: np.ndarray, period: int) -> np.ndarray:
    name = TEXTURES[kind]
    if name == "solid":
        return np.ones_like(yy, dtype=np.float32)
    if name == "hstripes":
        return ((yy // period) % 2).astype(np.float32)
    if name == "vstripes":
        return ((xx // period) % 2).astype(np.float32)
    return (((yy // period) + (xx // period)) % 2).astype(np.float32)


def make_shapes(n: int, size: int = 32, seed: int = 0) -> ShapesDataset:
    """``n`` images of ``size`` x ``size``, labels drawn uniformly and independently."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    shapes = rng.integers(0, len(SHAPES), n)
    textures = rng.integers(0, len(TEXTURES), n)
    for index in range(n):
        background = rng.uniform(0.0, 0.35, 3)[:, None, None] + rng.normal(0, 0.04, (3, size, size))
        radius = rng.uniform(0.25, 0.4) * size
        cy, cx = rng.uniform(radius, size - radius, 2)
        mask = _shape_mask(shapes[index], yy, xx, cy, cx, radius)
        fill = _texture(textures[index], yy, xx, period=int(rng.integers(2, 4)))
        color = rng.uniform(0.5, 1.0, 3)[:, None, None]
        foreground = color * (0.35 + 0.65 * fill)
        images[index] = np.where(mask[None], foreground, background)
    return ShapesDataset(
        torch.from_numpy(images.clip(0.0, 1.0)),
        torch.from_numpy(shapes).long(),
        torch.from_numpy(textures).long(),
    )


def encode_png(image: torch.Tensor) -> bytes:
    """``[3, H, W]`` in [0, 1] -> PNG bytes."""
    from PIL import Image

    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def to_parquet_bytes(dataset: ShapesDataset, task: str) -> bytes:
    """The images as a Hugging Face style Parquet table: ``image`` {bytes, path}, ``label``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = dataset.labels(task).tolist()
    images = [{"bytes": encode_png(image), "path": f"{index:05d}.png"} for index, image in enumerate(dataset.images)]
    table = pa.table({"image": images, "label": pa.array(labels, pa.int64())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()
