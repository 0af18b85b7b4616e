"""What an inversion costs, in floating-point operations, measured by torch's flop counter."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from invariance.config import TokenPolicy
from invariance.core.models import FeatureModel


def inversion_step_flops(
    model: FeatureModel, layer: int, token_policy: TokenPolicy = "flatten", image_size: int | None = None
) -> int:
    """FLOPs of one inversion iteration for one image: forward to ``layer`` and the input
    gradient back (no parameter gradients), as counted on a ``[1, 3, S, S]`` input; S is
    ``image_size`` (``data.image_size``: what the run feeds the model) or the model's input size."""
    size = image_size or model.input_size
    device = model.mean.device
    image = torch.rand(1, 3, size, size, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        output = model.layer_features(image, [layer], token_policy)[layer]
        torch.autograd.grad(output.float().norm(), image)
    return int(counter.get_total_flops())


def inversion_flops(
    model: FeatureModel, layer: int, n_samples: int, iterations: int, token_policy: TokenPolicy = "flatten",
    image_size: int | None = None,
) -> int:  # fmt: skip
    """FLOPs of a whole inversion: ``iterations`` steps plus the final evaluation, n samples of
    ``image_size`` (default: the model's input size)."""
    return inversion_step_flops(model, layer, token_policy, image_size) * n_samples * (iterations + 1)
