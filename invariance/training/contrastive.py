"""Finetune like you pretrain (FLYP, Goyal et al. 2022): an open_clip CLIP trained with its own
contrastive loss between images and prompts made from their class names.

- Prompts: every class name in every template (``"a photo of a {}."``); a training image is
  paired with its class in one template drawn per image.
- Loss: the symmetric InfoNCE of CLIP over the batch, ``(CE(s I T^T) + CE(s T I^T)) / 2`` with
  L2-normalised image/text embeddings and the learned temperature ``s = exp(logit_scale)``
  (clamped at 100, as CLIP).
- Scoring: the zero-shot head, each class's text embeddings averaged over templates and
  renormalised, rebuilt from the text tower whenever the model has trained since.
- Checkpoints: the image tower only, as a timm VisionTransformer state_dict (the ``vit_*_clip_*``
  architectures timm converts open_clip's ViT towers to), so ``invariance run`` reads them by
  timm name; ``image_tower_model`` gives the run config's ``model`` section.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from invariance.errors import ConfigError
from invariance.training.tasks import Task

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Clip:
    """An open_clip CLIP model with its tokenizer and image preprocessing constants."""

    model: nn.Module
    tokenizer: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise ConfigError("task: contrastive needs open_clip (pip install 'invariance[clip]')") from exc
    return open_clip


def build_clip(model_name: str | None, model_config: dict[str, Any] | None, pretrained: str | None,
               storage_options: dict[str, Any] | None = None) -> Clip:  # fmt: skip
    """The CLIP of the ``clip`` section: an open_clip name (``pretrained``: an open_clip tag, which
    downloads, or a checkpoint URL) or a model config dict (``embed_dim``, ``vision_cfg``,
    ``text_cfg``, ``quick_gelu``) built from scratch, ``pretrained`` then a checkpoint URL."""
    open_clip = _open_clip()
    from open_clip.tokenizer import SimpleTokenizer

    if model_name is not None:
        is_url = pretrained is not None and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors")))
        try:
            model = open_clip.create_model(model_name, pretrained=None if is_url else pretrained)
        except RuntimeError as exc:
            raise ConfigError(f"clip.model_name / clip.pretrained: {str(exc).splitlines()[0]}") from None
        tokenizer = open_clip.get_tokenizer(model_name)
    else:
        settings = dict(model_config or {})
        try:
            model = open_clip.CLIP(**settings)
        except (TypeError, KeyError, ValueError) as exc:
            raise ConfigError(f"clip.model_config: not an open_clip CLIP config ({exc})") from None
        is_url = pretrained is not None
        context = int(settings.get("text_cfg", {}).get("context_length", 77))
        tokenizer = SimpleTokenizer(context_length=context)
    if is_url:
        from invariance.core.models import load_weights
        from invariance.io.checkpoints import load_state_dict

        load_weights(model, load_state_dict(pretrained, storage_options), pretrained)
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    mean = tuple(getattr(visual, "image_mean", None) or _CLIP_MEAN)
    std = tuple(getattr(visual, "image_std", None) or _CLIP_STD)
    return Clip(model, tokenizer, mean, std, int(size))


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """``[class][template]`` prompt texts; underscores in names read as spaces."""
    return [[template.format(name.replace("_", " ")) for template in templates] for name in class_names]


class ContrastiveTask(Task):
    """FLYP: the CLIP model and the tokenised prompts of every class (``[C, T, context]``)."""

    name = "contrastive"

    def __init__(self, clip: Clip, class_names: Sequence[str], templates: Sequence[str], seed: int = 0) -> None:
        super().__init__(clip.model, clip.mean, clip.std)
        texts = prompts(class_names, templates)
        tokens = clip.tokenizer([text for per_class in texts for text in per_class])
        self.register_buffer("prompt_tokens", tokens.view(len(class_names), len(templates), -1), persistent=False)
        self.template_generator = torch.Generator().manual_seed(seed)
        self._head: torch.Tensor | None = None

    def train(self, mode: bool = True) -> "ContrastiveTask":
        if mode:
            self._head = None  # the text tower is about to change: rebuild the zero-shot head at scoring
        return super().train(mode)

    def logit_scale(self) -> torch.Tensor:
        return self.network.logit_scale.exp().clamp(max=100)

    def image_embeddings(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[b, 3, S, S]`` in [0, 1] -> L2-normalised ``[b, embed_dim]``."""
        return nn.functional.normalize(self.network.encode_image(self.normalize(inputs)), dim=-1)

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        picked = torch.randint(self.prompt_tokens.shape[1], (len(labels),), generator=self.template_generator)
        tokens = self.prompt_tokens[labels, picked.to(labels.device)]
        images = self.image_embeddings(inputs)
        texts = nn.functional.normalize(self.network.encode_text(tokens), dim=-1)
        logits = self.logit_scale() * images @ texts.T
        targets = torch.arange(len(images), device=images.device)
        return (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets)) / 2

    @torch.no_grad()
    def zero_shot_head(self) -> torch.Tensor:
        """``[C, embed_dim]``: each class's prompt embeddings, normalised, averaged, renormalised."""
        classes, templates, context = self.prompt_tokens.shape
        texts = nn.functional.normalize(self.network.encode_text(self.prompt_tokens.view(-1, context)), dim=-1)
        return nn.functional.normalize(texts.view(classes, templates, -1).mean(dim=1), dim=-1)

    def score(self, inputs: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor) -> tuple[float, int | None]:
        if self._head is None:
            self._head = self.zero_shot_head()
        logits = self.logit_scale() * self.image_embeddings(inputs) @ self._head.T
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        return float(loss), int((logits.argmax(dim=1) == labels).sum())

    def pre_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.image_embeddings(inputs)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """The whole CLIP (text tower, temperature): checkpoints hold the image tower only."""
        return {key: value.detach().cpu() for key, value in self.network.state_dict().items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.network.load_state_dict(state)


def image_tower_model(clip: Clip) -> dict[str, Any]:
    """The run config's ``model`` section that reads the image tower's checkpoints: the timm
    ``vit_*_clip_*`` architecture with the tower's sizes; ConfigError for towers timm has no
    counterpart of (ResNet, timm-trunk or attention-pooled towers, layer scale)."""
    visual = clip.model.visual
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(visual, "conv1"):
        raise ConfigError(f"clip: the image tower {type(visual).__name__} is not an open_clip ViT; only ViT towers map onto timm")
    if getattr(visual, "attn_pool", None) is not None or not isinstance(blocks[0].ls_1, nn.Identity):
        raise ConfigError("clip: attention pooling and layer scale in the image tower have no timm counterpart")
    width = visual.conv1.out_channels
    patch = visual.conv1.kernel_size[0]
    heads = blocks[0].attn.num_heads
    quick_gelu = type(blocks[0].mlp.gelu).__name__ == "QuickGELU"
    kwargs = {
        "img_size": clip.input_size,
        "patch_size": patch,
        "embed_dim": width,
        "depth": len(blocks),
        "num_heads": heads,
        "mlp_ratio": blocks[0].mlp.c_fc.out_features / width,
        "num_classes": visual.proj.shape[1] if visual.proj is not None else 0,
    }
    arch = "vit_base_patch16_clip_quickgelu_224" if quick_gelu else "vit_base_patch16_clip_224"
    return {"arch": arch, "kwargs": kwargs, "mean": list(clip.mean), "std": list(clip.std)}


def image_tower_state(clip: Clip) -> dict[str, torch.Tensor]:
    """The image tower's weights under timm's VisionTransformer keys (timm's own open_clip converter)."""
    from timm.models.vision_transformer import _convert_openai_clip

    state = {f"visual.{key}": value for key, value in clip.model.visual.state_dict().items()}
    return _convert_openai_clip(state, None, prefix="visual.")


def check_tower_conversion(clip: Clip) -> None:
    """Build the timm model of ``image_tower_model`` with ``image_tower_state`` and check it embeds
    one random batch as open_clip's tower does; ConfigError when it does not."""
    from invariance.config import ModelConfig
    from invariance.core.models import build_network, load_weights

    section = image_tower_model(clip)
    network = build_network(ModelConfig(arch=section["arch"], kwargs=section["kwargs"]))
    load_weights(network, image_tower_state(clip), "the converted image tower")
    images = torch.rand(2, 3, clip.input_size, clip.input_size, generator=torch.Generator().manual_seed(0))
    was_training = clip.model.training
    clip.model.eval()
    network.eval()
    with torch.no_grad():
        ours, theirs = network(images), clip.model.encode_image(images)
    clip.model.train(was_training)
    if not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
        raise ConfigError(
            f"clip: the image tower does not convert to timm's {section['arch']} (largest difference "
            f"{float((ours - theirs).abs().max()):.2e}); its checkpoints could not be analysed by timm name"
        )
