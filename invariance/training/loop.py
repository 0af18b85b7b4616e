"""Training loops that produce checkpoint series: an optimizer and a cosine schedule over
epochs, one epoch at a time, resumable from a plain state dict.

Used by the finetuning runs (``invariance.training.run``: classification and reconstruction,
the demo's pretraining and finetuning included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from torch import nn

from invariance.io.data import to_model_input

OptimizerName = Literal["sgd", "adamw"]
BatchLoss = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``(inputs [b, 3, S, S] in [0, 1] at the model's size, targets [b] or None) -> scalar loss``."""


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
    warmup_steps: int = 0


def make_optimizer(parameters: Iterable[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    parameters = list(parameters)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)  # fmt: skip
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {settings.optimizer!r}")


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A linear warmup from lr / (warmup + 1) to lr over ``warmup_steps``, then lr x 0.5 (1 + cos(pi
    s / S)) over the S = total - warmup steps left: lr at its first step, 0 at the last step."""
    warmup = min(max(0, warmup_steps), max(0, total_steps - 1))
    total = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling/augmentation stream of one epoch: a resumed run draws what an uninterrupted one would."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[n, C, H, W] -> [n, C, H, W]``: a random horizontal flip and a random shift by up to 1/8
    of the side (reflect padding), both drawn per image."""
    n, _, height, width = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None].to(images.device), images.flip(-1), images)
    pad = max(1, width // 8)
    padded = nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).to(images.device)
    rows = (offsets[:, 0, None] + torch.arange(height, device=images.device))[:, :, None]  # [n, H, 1]
    cols = (offsets[:, 1, None] + torch.arange(width, device=images.device))[:, None, :]  # [n, 1, W]
    batch = torch.arange(n, device=images.device)[:, None, None]
    # advanced indices around the channel slice put it last: [n, H, W, C]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()


class Trainer:
    """An optimizer over ``parameters`` and a cosine schedule over ``settings.epochs`` epochs
    of ``n_train`` samples; trains one epoch per call. ``state_dict`` holds plain tensors and
    containers only (``torch.load(weights_only=True)`` reads it back)."""

    def __init__(self, parameters: Iterable[nn.Parameter], settings: TrainSettings, n_train: int) -> None:
        self.settings = settings
        self.steps_per_epoch = math.ceil(n_train / settings.batch_size)
        self.optimizer = make_optimizer(parameters, settings)
        self.schedule = cosine_schedule(self.optimizer, settings.epochs * self.steps_per_epoch, settings.warmup_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def run_epoch(
        self,
        epoch: int,
        module: nn.Module,
        loss_fn: BatchLoss,
        images: torch.Tensor,
        targets: torch.Tensor | None,
        input_size: int,
    ) -> float:
        """One pass over ``images: [n, 3, H, W]`` in [0, 1] (CPU) in a seeded order; the mean loss.

        Batches are augmented at the stored size, moved to ``module``'s device, then resized
        to ``input_size`` (so a dataset kept at 32 px trains a 224 px model).
        """
        device = next(module.parameters()).device
        generator = epoch_generator(self.settings.seed, epoch)
        order = torch.randperm(len(images), generator=generator)
        module.train()
        losses = []
        for begin in range(0, len(images), self.settings.batch_size):
            batch = order[begin : begin + self.settings.batch_size]
            inputs = images[batch]
            if self.settings.augment:
                inputs = augment(inputs, generator)
            inputs = inputs.to(device, non_blocking=True)
            if inputs.shape[-1] != input_size or inputs.shape[-2] != input_size:
                inputs = to_model_input(inputs, input_size)
            batch_targets = targets[batch].to(device, non_blocking=True) if targets is not None else None
            loss = loss_fn(inputs, batch_targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            losses.append(loss.item())
        module.eval()
        return sum(losses) / max(1, len(losses))
