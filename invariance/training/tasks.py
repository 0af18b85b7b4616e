"""Finetuning tasks on a timm ViT: what is trained, its loss, and how a test batch is scored.

- ``classification``: a new linear head (``reset_classifier``), cross-entropy, top-1 accuracy.
- ``reconstruction``: a small convolutional decoder on the ViT's patch tokens predicts the
  input image; L1 loss (as the finetuning paper). Scored on corrupted inputs, the target is
  the clean image. The ViT's own head is left untouched (unused).
Images enter in [0, 1]; the model's mean/std normalization is applied once, here.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

TaskName = Literal["classification", "reconstruction", "contrastive"]


class TokenDecoder(nn.Module):
    """Patch tokens ``[n, prefix + gh * gw, dim]`` -> images ``[n, 3, gh * p, gw * p]`` in [0, 1].

    A 3x3 conv on the token grid, a 1x1 conv to ``3 p^2`` channels, pixel shuffle by the
    patch size ``p``, and a 3x3 refinement in pixel space.
    """

    def __init__(self, dim: int, grid: tuple[int, int], patch: int, prefix_tokens: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.grid, self.prefix_tokens = grid, prefix_tokens
        self.body = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, 3 * patch * patch, 1),
            nn.PixelShuffle(patch),
            nn.Conv2d(3, 16, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(16, 3, 3, padding=1),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.prefix_tokens :]
        grid = patches.transpose(1, 2).reshape(len(tokens), -1, *self.grid)
        return torch.sigmoid(self.body(grid))


class Task(nn.Module):
    """The network (plus whatever the task adds) and its input normalization."""

    name: TaskName

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    # set while only the head trains (linear probing): the encoder then stays in eval mode, so
    # dropout, drop-path and batch statistics leave it bitwise unchanged
    frozen_encoder: bool = False

    def train(self, mode: bool = True) -> "Task":
        super().train(mode)
        if mode and self.frozen_encoder:
            self.network.eval()
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Scalar training loss of a batch ``inputs: [b, 3, S, S]`` in [0, 1]."""
        raise NotImplementedError

    def score(self, inputs: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor) -> tuple[float, int | None]:
        """(summed loss, number correct or None) of a test batch; ``clean`` is the uncorrupted input."""
        raise NotImplementedError

    def head_parameters(self) -> list[nn.Parameter]:
        """What a linear probe trains: the classifier, or the decoder (the encoder stays frozen)."""
        raise ValueError(f"task {self.name} has no head to probe")

    def pre_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[b, 3, S, S]`` in [0, 1] -> the pre-logits ``[b, d]`` (final norm + pooling): the kNN features."""
        network = self.network
        return network.forward_head(network.forward_features(self.normalize(inputs)), pre_logits=True)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Trained weights outside the network (saved beside the optimizer state)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass


class ClassificationTask(Task):
    name: TaskName = "classification"

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float], num_classes: int) -> None:
        network.reset_classifier(num_classes)
        super().__init__(network, mean, std)
        self.cross_entropy = nn.CrossEntropyLoss()

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.cross_entropy(self.network(self.normalize(inputs)), labels)

    def score(self, inputs: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor) -> tuple[float, int | None]:
        logits = self.network(self.normalize(inputs))
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        return float(loss), int((logits.argmax(dim=1) == labels).sum())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.network.get_classifier().parameters())


class ReconstructionTask(Task):
    name: TaskName = "reconstruction"

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(network, mean, std)
        embed = network.patch_embed
        patch = embed.patch_size[0] if isinstance(embed.patch_size, (tuple, list)) else embed.patch_size
        self.decoder = TokenDecoder(network.embed_dim, tuple(embed.grid_size), int(patch), network.num_prefix_tokens)

    def reconstruct(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[b, 3, S, S]`` in [0, 1] -> ``[b, 3, S, S]`` in [0, 1]."""
        return self.decoder(self.network.forward_features(self.normalize(inputs)))

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return nn.functional.l1_loss(self.reconstruct(inputs), inputs)

    def score(self, inputs: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor) -> tuple[float, int | None]:
        per_image = (self.reconstruct(inputs) - clean).abs().flatten(1).mean(dim=1)
        return float(per_image.sum()), None

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu() for key, value in self.decoder.state_dict().items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.decoder.load_state_dict(state)


def build_task(
    name: TaskName, network: nn.Module, mean: Sequence[float], std: Sequence[float], num_classes: int | None = None
) -> Task:
    """The task module around ``network``; classification replaces the head with ``num_classes`` outputs."""
    if name == "classification":
        if num_classes is None:
            raise ValueError("classification needs num_classes")
        return ClassificationTask(network, mean, std, num_classes)
    if name == "reconstruction":
        return ReconstructionTask(network, mean, std)
    raise ValueError(f"task must be 'classification' or 'reconstruction' here (contrastive: contrastive.ContrastiveTask), got {name!r}")
