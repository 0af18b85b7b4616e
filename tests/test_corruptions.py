"""Corruptions: deterministic, in [0, 1], shape-preserving, more distortion at higher severity."""

from __future__ import annotations

import pytest
import torch

from invariance.training.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from invariance.errors import ConfigError
from invariance.io.synthetic import make_shapes


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return make_shapes(12, size=32, seed=4).images


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_same_call_same_images_in_range(images, name) -> None:
    for severity in SEVERITIES:
        first = corrupt(images, name, severity, seed=3)
        again = corrupt(images, name, severity, seed=3)
        assert torch.equal(first, again)
        assert first.shape == images.shape and first.dtype == torch.float32
        assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
        assert not torch.equal(first, images)


@pytest.mark.parametrize("name", sorted(set(CORRUPTIONS) - {"pixelate"}))
def test_distortion_grows_with_severity(images, name) -> None:
    distortion = [float((corrupt(images, name, severity) - images).abs().mean()) for severity in SEVERITIES]
    assert all(a < b for a, b in zip(distortion, distortion[1:])), distortion


def test_pixelate_resolution_falls_with_severity(images) -> None:
    # pixelate's pixel error depends on where block edges fall; what grows is the block size:
    # count the distinct rows (a row equal to the one above belongs to the same block)
    def distinct_rows(corrupted: torch.Tensor) -> int:
        changes = (corrupted[..., 1:, :] != corrupted[..., :-1, :]).any(dim=-1).any(dim=1)  # [n, H - 1]
        return int(changes.sum(dim=1).max()) + 1

    rows = [distinct_rows(corrupt(images, "pixelate", severity)) for severity in SEVERITIES]
    assert rows == [30, 28, 27, 24, 20]  # int(32 x CIFAR-10-C's scales 0.95, 0.9, 0.85, 0.75, 0.65)


def test_noise_depends_on_the_seed_and_not_on_other_corruptions(images) -> None:
    assert not torch.equal(corrupt(images, "gaussian_noise", 3, seed=0), corrupt(images, "gaussian_noise", 3, seed=1))
    # deterministic corruptions ignore the seed
    assert torch.equal(corrupt(images, "gaussian_blur", 3, seed=0), corrupt(images, "gaussian_blur", 3, seed=1))


@pytest.mark.parametrize("size", [16, 48])
def test_other_image_sizes(size) -> None:
    images = make_shapes(3, size=size, seed=1).images
    for name in CORRUPTIONS:
        assert corrupt(images, name, 5).shape == (3, 3, size, size)


def test_unknown_corruption_and_severity_name_the_key(images) -> None:
    with pytest.raises(ConfigError, match="corruptions.names"):
        corrupt(images, "fog", 1)
    with pytest.raises(ConfigError, match="corruptions.severities"):
        corrupt(images, "contrast", 6)
