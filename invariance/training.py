"""Training loops that produce checkpoint series: classification finetuning of a timm ViT.

Used by the demo (pretrain on one task, finetune on another) and by checkpoint producers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from invariance.data import to_model_input

OptimizerName = Literal["sgd", "adamw"]


@dataclass(frozen=True)
class TrainSettings:
    """Optimizer and schedule: cosine decay over all steps, as the paper's finetuning."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: OptimizerName = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: bool = False
    seed: int = 0


def _optimizer(network: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(network.parameters(), lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)  # fmt: skip
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(network.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {settings.optimizer!r}")


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift by up to 1/8 of the side (reflect padding)."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    pad = max(1, images.shape[-1] // 8)
    padded = nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + images.shape[-2], dx : dx + images.shape[-1]]


@torch.no_grad()
def accuracy(network: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
             labels: torch.Tensor, batch_size: int = 256) -> float:  # fmt: skip
    """Top-1 accuracy of ``network`` on ``images: [n, 3, S, S]`` in [0, 1]."""
    network.eval()
    correct = 0
    for begin in range(0, len(images), batch_size):
        logits = network(normalize(images[begin : begin + batch_size]))
        correct += int((logits.argmax(dim=1) == labels[begin : begin + batch_size]).sum())
    return correct / max(1, len(images))


def train_classifier(
    network: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: TrainSettings,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    on_epoch_end: Callable[[int, float], None] | None = None,
    start_epoch: int = 0,
) -> nn.Module:
    """Cross-entropy training; ``images: [n, 3, S, S]`` in [0, 1], ``labels: [n]``.

    ``on_epoch_end(epoch, mean_loss)`` runs after each epoch (1-based), e.g. to save a
    checkpoint. ``start_epoch`` resumes a schedule after that many finished epochs.
    """
    size = network.patch_embed.img_size[0]
    images = to_model_input(images, size) if images.shape[-1] != size else images
    optimizer = _optimizer(network, settings)
    steps_per_epoch = math.ceil(len(images) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    for _ in range(start_epoch * steps_per_epoch):
        schedule.step()
    generator = torch.Generator().manual_seed(settings.seed)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start_epoch + 1, settings.epochs + 1):
        network.train()
        order = torch.randperm(len(images), generator=generator)
        losses = []
        for begin in range(0, len(images), settings.batch_size):
            batch = order[begin : begin + settings.batch_size]
            inputs = images[batch]
            if settings.augment:
                inputs = _augment(inputs, generator)
            loss = loss_fn(network(normalize(inputs)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        if on_epoch_end is not None:
            on_epoch_end(epoch, sum(losses) / len(losses))
    network.eval()
    return network
