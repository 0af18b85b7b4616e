"""Models: a timm ViT (or a user factory's) wrapped so that images enter in [0, 1].

Layer k (0 <= k < depth) is the output of transformer block k, all tokens (the residual
stream); layer ``depth`` is the pre-logits (final norm + pooling / fc_norm). The input
normalization (mean/std) is applied exactly once, inside ``FeatureModel``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import torch
from torch import nn

from invariance.io.checkpoints import check_float_weights, load_state_dict
from invariance.config import ModelConfig, TokenPolicy
from invariance.errors import CheckpointError, ConfigError

_VIT_PARTS = ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head")


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """``"package.module:function"`` -> the callable."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model.factory: cannot import module {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"model.factory: module {module_name!r} has no attribute {attr!r}") from None


def build_network(config: ModelConfig) -> nn.Module:
    """The bare network (random init) from a timm name + kwargs, or from the factory."""
    if config.factory is not None:
        network = resolve_factory(config.factory)(**config.kwargs)
    else:
        import timm

        if not timm.is_model(config.arch):
            close = timm.list_models(f"*{config.arch.split('_')[0]}*")[:8]
            raise ConfigError(f"model.arch: unknown timm architecture {config.arch!r}; similar names: {close}")
        try:
            network = timm.create_model(config.arch, pretrained=False, **config.kwargs)
        except TypeError as exc:
            raise ConfigError(f"model.kwargs: {config.arch} does not accept these kwargs ({exc})") from exc
    missing = [part for part in _VIT_PARTS if not hasattr(network, part)]
    if missing:
        raise ConfigError(
            f"model: {type(network).__name__} lacks {missing}; invariance reads layers of timm "
            "VisionTransformer-style models (patch_embed, _pos_embed, blocks, norm, forward_head)"
        )
    return network


def network_input_size(network: nn.Module) -> int:
    """Side length of the square input a timm ViT-style network expects."""
    size = getattr(network.patch_embed, "img_size", None)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def check_input_size(network: nn.Module, size: int, name: str) -> None:
    """ConfigError naming ``data.image_size`` when ``network`` cannot take ``size`` x ``size`` images
    (a ViT built for one input size); tried on one blank image."""
    expected = network_input_size(network)
    if size == expected:
        return
    try:
        with torch.no_grad():
            network.forward_features(torch.zeros(1, 3, size, size))
    except Exception as exc:  # noqa: BLE001 - the model's own assertion, whatever its type
        raise ConfigError(
            f"data.image_size: {name} takes {expected}x{expected} images, not {size}x{size} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); leave data.image_size unset "
            f"to use {expected}, or build the model for {size} (model.kwargs.img_size: {size})"
        ) from None


def load_weights(network: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Load ``state`` into ``network``; on mismatch list the missing and unexpected keys."""
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_mismatch = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    check_float_weights(state, own, source)
    if shape_mismatch or (strict and (missing or unexpected)):
        raise CheckpointError(
            f"{source} does not match the model (model.arch/kwargs or model.factory):\n"
            f"  missing keys ({len(missing)}): {missing[:10]}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:10]}\n"
            f"  shape mismatches ({len(shape_mismatch)}): {shape_mismatch[:5]}\n"
            "  (set model.strict: false to ignore missing/unexpected keys, e.g. a new head)"
        )
    network.load_state_dict(state, strict=False)


class FeatureModel(nn.Module):
    """A ViT that takes images in [0, 1] and returns features at chosen layers.

    ``network``: timm VisionTransformer-style module. ``mean``/``std``: per channel.
    """

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.network = network.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.requires_grad_(False)

    @property
    def depth(self) -> int:
        """Number of transformer blocks; layer ``depth`` is the pre-logits."""
        return len(self.network.blocks)

    @property
    def input_size(self) -> int:
        """Side length of the square input the network expects."""
        return network_input_size(self.network)

    def layer_features(
        self, images: torch.Tensor, layers: Sequence[int], token_policy: TokenPolicy = "flatten"
    ) -> dict[int, torch.Tensor]:
        """``images: [n, 3, H, W]`` in [0, 1] -> {layer: ``[n, d]``}; stops at the deepest layer.

        ``flatten``: all tokens of a block, ``[n, tokens * dim]`` (as the paper);
        ``cls``: the class token, ``[n, dim]``; ``mean``: the mean of the patch tokens (prefix
        tokens such as CLS and registers excluded, as timm pools), ``[n, dim]``.
        The pre-logits layer is ``[n, dim]`` under every policy.
        """
        wanted = set(layers)
        if not wanted:
            return {}
        if max(wanted) > self.depth or min(wanted) < 0:
            raise ConfigError(f"layers: {sorted(wanted)} out of range 0..{self.depth} for this model")
        net = self.network
        tokens = (images - self.mean) / self.std
        tokens = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(tokens))))
        outputs: dict[int, torch.Tensor] = {}
        deepest_block = min(max(wanted), self.depth - 1)
        for index in range(deepest_block + 1):
            tokens = net.blocks[index](tokens)
            if index in wanted:
                outputs[index] = self._apply_token_policy(tokens, token_policy)
        if self.depth in wanted:
            outputs[self.depth] = net.forward_head(net.norm(tokens), pre_logits=True)
        return outputs

    def _apply_token_policy(self, tokens: torch.Tensor, token_policy: TokenPolicy) -> torch.Tensor:
        """``tokens: [n, T, dim]`` -> ``[n, d]``."""
        if token_policy == "flatten":
            return tokens.flatten(1)
        if token_policy == "mean":  # as timm's avg pooling: prefix tokens (CLS, registers) left out
            prefix = int(getattr(self.network, "num_prefix_tokens", 0))
            return tokens[:, prefix:].mean(dim=1)
        if token_policy == "cls":
            if getattr(self.network, "cls_token", None) is None:
                raise ConfigError("token_policy: 'cls' needs a model with a class token; use 'flatten' or 'mean'")
            return tokens[:, 0]
        raise ConfigError(f"token_policy: expected flatten, cls or mean, got {token_policy!r}")


def _normalization(network: nn.Module, config: ModelConfig) -> tuple[Sequence[float], Sequence[float]]:
    pretrained_cfg: dict[str, Any] = getattr(network, "pretrained_cfg", None) or {}
    mean = config.mean or pretrained_cfg.get("mean") or (0.485, 0.456, 0.406)
    std = config.std or pretrained_cfg.get("std") or (0.229, 0.224, 0.225)
    return tuple(mean), tuple(std)


def load_model(
    config: ModelConfig, weights: str | None, storage_options: dict[str, Any] | None = None
) -> FeatureModel:
    """Build the network and load ``weights``: a URL (safetensors / torch), ``"timm"`` for timm's
    own pretrained weights (needs network access), or None for the random init."""
    network = build_network(config)
    if weights == "timm":
        if config.arch is None:
            raise ConfigError("pretrained: 'timm' works with model.arch only, not with model.factory")
        import timm

        network = timm.create_model(config.arch, pretrained=True, **config.kwargs)
    elif weights is not None:
        load_weights(network, load_state_dict(weights, storage_options), weights, strict=config.strict)
    mean, std = _normalization(network, config)
    return FeatureModel(network, mean, std)
