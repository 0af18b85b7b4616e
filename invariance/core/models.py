"""Models: any timm family (through timm's feature API) or any ``nn.Module`` (by module names),
wrapped so that images enter in [0, 1] and come out as per-layer features.

Two ways to read layers, one interface (``FeatureModel``):

- timm models: layer k is the k-th intermediate ``forward_intermediates`` returns by default
  (blocks for ViT-like models, stages for hierarchical and convolutional ones); the last layer is
  the pre-logits, ``forward_head(pre_logits=True)``. For a classic ViT that is block k (all tokens,
  the residual stream) and then the final norm + pooling, as the finetuning paper.
- named modules (``layers: {modules: [...]}``): layer k is the output of the k-th named submodule,
  taken by a forward hook (a tuple output: its first element); the forward stops once every
  asked module has run. There is no extra pre-logits layer: name the modules you want.

The input normalization (mean/std) is applied exactly once, inside ``FeatureModel``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import nn

from invariance.config import ModelConfig, TokenPolicy, did_you_mean
from invariance.errors import CheckpointError, ConfigError, InvarianceError
from invariance.io.checkpoints import check_float_weights, load_state_dict
from invariance.io.storage import redact

logger = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = 224


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


def model_name(config: ModelConfig) -> str:
    """How errors name the model: the timm name or the factory."""
    return config.arch or config.factory or "model"


def build_network(config: ModelConfig) -> nn.Module:
    """The bare network (random init) from a timm name + kwargs, or from the factory."""
    if config.factory is not None:
        factory = resolve_factory(config.factory)
        try:
            network = factory(**config.kwargs)
        except TypeError as exc:
            raise ConfigError(f"model.kwargs: {config.factory} does not accept these kwargs ({exc})") from exc
        except InvarianceError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code: named, never a raw traceback
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(f"model.factory: {config.factory}(**model.kwargs) raised {type(exc).__name__}: {first}") from exc
        if not isinstance(network, nn.Module):
            raise ConfigError(f"model.factory: {config.factory} returned {type(network).__name__}, not a torch nn.Module")
        return network
    import timm

    if not timm.is_model(config.arch):
        close = did_you_mean(config.arch, timm.list_models(), limit=5)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise ConfigError(f"model.arch: unknown timm architecture {config.arch!r}; {hint}")
    try:
        return timm.create_model(config.arch, pretrained=False, **config.kwargs)
    except Exception as exc:  # noqa: BLE001 - timm's asserts, shape and key errors alike: named
        raise ConfigError(f"model.kwargs: {config.arch} cannot be built with {config.kwargs} ({type(exc).__name__}: {exc})") from exc


def network_input_size(network: nn.Module) -> int:
    """Side length of the square input the network expects: timm's data config, a Hugging Face
    config's ``image_size``, else 224 (set ``data.image_size`` for another)."""
    if getattr(network, "pretrained_cfg", None) is not None:
        from timm.data import resolve_model_data_config

        size = resolve_model_data_config(network)["input_size"][-1]
        # timm keeps the pretrained config's size when the model is built for another one
        built = getattr(getattr(network, "patch_embed", None), "img_size", None)
        if built is not None:
            size = built[-1] if isinstance(built, (tuple, list)) else built
        return int(size)
    size = getattr(getattr(network, "config", None), "image_size", None)
    if size is not None:
        return int(size[-1] if isinstance(size, (tuple, list)) else size)
    return DEFAULT_INPUT_SIZE


# ---------------------------------------------------------------------------------------------
# token policies: any feature shape -> [n, d]


def _policy(
    spatial: torch.Tensor, prefix: torch.Tensor | None, token_policy: TokenPolicy, has_class_token: bool, name: str
) -> torch.Tensor:
    """``spatial``: ``[n, L, C]`` tokens, ``[n, C, H, W]`` maps or ``[n, d]``; ``prefix``:
    ``[n, P, C]`` prefix tokens (class, distillation, registers) or None -> ``[n, d]``."""
    if spatial.ndim == 2:
        return spatial
    if token_policy == "flatten":  # all positions, prefix tokens first (as the residual stream)
        tokens = spatial if prefix is None else torch.cat([prefix, spatial], dim=1)
        return tokens.flatten(1)
    if token_policy == "mean":  # as timm pools: prefix tokens left out
        return spatial.mean(dim=1) if spatial.ndim == 3 else spatial.flatten(2).mean(dim=2)
    if token_policy == "cls":
        if not has_class_token or prefix is None or spatial.ndim != 3:
            raise ConfigError(f"token_policy: 'cls' needs a model with a class token; {name} has none; use 'flatten' or 'mean'")
        return prefix[:, 0]
    raise ConfigError(f"token_policy: expected flatten, cls or mean, got {token_policy!r}")


def _first_tensor(output: Any) -> Any:
    """A module's output -> the tensor it carries (a tuple/list: its first element; a mapping
    such as a Hugging Face ModelOutput: its first value)."""
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    if isinstance(output, Mapping) and output:
        return _first_tensor(next(iter(output.values())))
    return output


class _Stop(Exception):
    """Raised by a forward hook once every asked module has run: the rest of the forward is skipped."""


# ---------------------------------------------------------------------------------------------
# layer readers


class TimmLayers:
    """Layers of a timm model through ``forward_intermediates`` + ``forward_head(pre_logits=True)``."""

    def __init__(self, network: nn.Module, name: str) -> None:
        if not callable(getattr(network, "forward_intermediates", None)) or not hasattr(network, "forward_head"):
            raise ConfigError(
                f"model: {name} ({type(network).__name__}) lacks timm's feature API (forward_intermediates, "
                "forward_head); for another module name its layers: layers: {modules: [name, ...]} (README: "
                "'Bring your own module')"
            )
        self.network, self.name = network, name
        parameters = inspect.signature(network.forward_intermediates).parameters
        # ViT-like models give tokens (NLC) and their prefix tokens; the others NCHW maps
        self.tokens = "return_prefix_tokens" in parameters and "output_fmt" in parameters
        self.prefix_tokens = int(getattr(network, "num_prefix_tokens", 0) or 0) if self.tokens else 0
        self.has_class_token = self.prefix_tokens > 0 and getattr(network, "cls_token", None) is not None
        feature_info = getattr(network, "feature_info", None)
        if not feature_info:
            raise ConfigError(f"model: {name} ({type(network).__name__}) has no feature_info: timm cannot say its layers")
        self.modules = [str(info.get("module", f"feature.{k}")) for k, info in enumerate(feature_info)]

    @property
    def n_intermediates(self) -> int:
        return len(self.modules)

    def names(self) -> list[str]:
        return [*self.modules, "pre-logits"]

    def features(self, x: torch.Tensor, wanted: list[int], token_policy: TokenPolicy) -> dict[int, torch.Tensor]:
        net, last = self.network, self.n_intermediates
        blocks = [k for k in wanted if k < last]
        kwargs: dict[str, Any] = {"output_fmt": "NLC", "return_prefix_tokens": True} if self.tokens else {}
        outputs: dict[int, torch.Tensor] = {}
        if last in wanted:  # the pre-logits need the whole forward
            final, intermediates = net.forward_intermediates(x, indices=blocks or [last - 1], **kwargs)
            pre_logits = net.forward_head(final, pre_logits=True)
            outputs[last] = pre_logits.flatten(1) if pre_logits.ndim > 2 else pre_logits
            intermediates = intermediates if blocks else []
        else:
            intermediates = net.forward_intermediates(x, indices=blocks, stop_early=True, intermediates_only=True, **kwargs)
        for layer, item in zip(blocks, intermediates):
            spatial, prefix = item if isinstance(item, tuple) else (item, None)
            outputs[layer] = _policy(spatial, prefix, token_policy, self.has_class_token, self.name)
        return outputs


class ModuleLayers:
    """Layers of any ``nn.Module``: the outputs of named submodules, taken by forward hooks."""

    def __init__(self, network: nn.Module, name: str, modules: Sequence[str], prefix_tokens: int | None) -> None:
        available = dict(network.named_modules())
        unknown = [m for m in modules if m not in available]
        if unknown:
            close = [n for n in available if n and any(part in n for part in re.split(r"[.\d]+", unknown[0]) if part)][:10]
            raise ConfigError(
                f"layers.modules: {name} ({type(network).__name__}) has no submodule {unknown}; names look like {close or list(available)[1:11]}"
            )
        self.network, self.name, self.modules = network, name, list(modules)
        self.targets = [available[m] for m in modules]
        own = getattr(network, "num_prefix_tokens", None)
        self.prefix_tokens = int(prefix_tokens if prefix_tokens is not None else own or 0)
        self.has_class_token = self.prefix_tokens > 0

    @property
    def n_intermediates(self) -> int:
        return len(self.modules)

    def names(self) -> list[str]:
        return list(self.modules)

    def features(self, x: torch.Tensor, wanted: list[int], token_policy: TokenPolicy) -> dict[int, torch.Tensor]:
        captured: dict[int, Any] = {}

        def hook(layer: int) -> Callable[..., None]:
            def take(_module: nn.Module, _inputs: Any, output: Any) -> None:
                if layer not in captured:  # a module called twice: its first call
                    # a copy: an in-place op after the module (ReLU(inplace=True)) must not change it
                    captured[layer] = _first_tensor(output).clone()
                if len(captured) == len(wanted):
                    raise _Stop  # every asked module has run: no compute (nor gradient) past it

            return take

        handles = [self.targets[layer].register_forward_hook(hook(layer)) for layer in wanted]
        try:
            self.network(x)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        never = [self.modules[layer] for layer in wanted if layer not in captured]
        if never:
            raise ConfigError(f"layers.modules: {never} never ran in the forward of {self.name}")
        outputs = {}
        for layer in wanted:
            value = captured[layer]
            if not isinstance(value, torch.Tensor):
                raise ConfigError(f"layers.modules: {self.modules[layer]} of {self.name} returns {type(value).__name__}, not a tensor")
            prefix = None
            if value.ndim == 3 and self.prefix_tokens:
                prefix, value = value[:, : self.prefix_tokens], value[:, self.prefix_tokens :]
            outputs[layer] = _policy(value, prefix, token_policy, self.has_class_token, self.name)
        return outputs


def describe_layers(names: Sequence[str]) -> str:
    """``["blocks.0", ..., "blocks.11", "pre-logits"]`` -> ``"0..11: blocks, 12: pre-logits"``."""
    parts: list[str] = []
    index = 0
    while index < len(names):
        match = re.fullmatch(r"(.+)\.(\d+)", names[index])
        end = index
        if match:
            while end + 1 < len(names) and re.fullmatch(rf"{re.escape(match.group(1))}\.\d+", names[end + 1]):
                end += 1
        label = match.group(1) if match and end > index else names[index]
        parts.append(f"{index}..{end}: {label}" if end > index else f"{index}: {label}")
        index = end + 1
    return ", ".join(parts)


class FeatureModel(nn.Module):
    """A vision model that takes images in [0, 1] and returns features at chosen layers.

    ``network``: a timm model (read through ``forward_intermediates``), or any module when
    ``modules`` names the submodules whose outputs are the layers. ``mean``/``std``: per channel.
    """

    def __init__(
        self,
        network: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        modules: Sequence[str] | None = None,
        prefix_tokens: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.network = network.eval()
        self.name = name or type(network).__name__
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.reader: TimmLayers | ModuleLayers = (
            ModuleLayers(network, self.name, modules, prefix_tokens) if modules else TimmLayers(network, self.name)
        )

    @property
    def n_layers(self) -> int:
        """How many layers: the intermediates plus the pre-logits (timm), or the named modules."""
        return len(self.reader.names())

    @property
    def depth(self) -> int:
        """Index of the last layer (the pre-logits for timm models)."""
        return self.n_layers - 1

    @property
    def input_size(self) -> int:
        """Side length of the square input the network expects."""
        return network_input_size(self.network)

    def layer_names(self) -> list[str]:
        """What each layer is: ``["blocks.0", ..., "pre-logits"]`` or the named modules."""
        return self.reader.names()

    def describe_layers(self) -> str:
        """``"0..11: blocks, 12: pre-logits"``."""
        return describe_layers(self.layer_names())

    def layer_features(
        self, images: torch.Tensor, layers: Sequence[int], token_policy: TokenPolicy = "flatten"
    ) -> dict[int, torch.Tensor]:
        """``images: [n, 3, H, W]`` in [0, 1] -> {layer: ``[n, d]``}; stops at the deepest layer.

        ``flatten``: every position of the layer (tokens with their prefix tokens, or a feature
        map's C x H x W), as the paper; ``mean``: the mean over positions (prefix tokens such as
        CLS and registers left out, as timm pools), ``[n, C]``; ``cls``: the class token,
        ``[n, C]`` (models with one). The pre-logits layer is ``[n, d]`` under every policy.
        """
        wanted = sorted(set(layers))
        if not wanted:
            return {}
        if wanted[-1] > self.depth or wanted[0] < 0:
            raise ConfigError(f"layers: {wanted} out of range 0..{self.depth} for {self.name} ({self.describe_layers()})")
        return self.reader.features((images - self.mean) / self.std, wanted, token_policy)

    def check(self, token_policy: TokenPolicy = "flatten", size: int | None = None) -> dict[int, tuple[int, ...]]:
        """One blank image through every layer: {layer: feature shape}, or a ConfigError naming
        the model and what it lacks (never the model's own TypeError/AssertionError)."""
        size = size or self.input_size
        image = torch.zeros(1, 3, size, size, device=self.mean.device)
        try:
            with torch.no_grad():
                features = self.layer_features(image, range(self.n_layers), token_policy)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the model raises, named for the user
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(
                f"model: {self.name} ({type(self.network).__name__}) fails on a {size}x{size} image "
                f"({type(exc).__name__}: {first}); check model.arch/kwargs, data.image_size and layers"
            ) from None
        if self.reader is not None and isinstance(self.reader, TimmLayers):
            with torch.no_grad():
                count = len(self.network.forward_intermediates(image, intermediates_only=True))
            if count != self.reader.n_intermediates:
                raise ConfigError(
                    f"model: {self.name} returns {count} intermediates but its feature_info lists "
                    f"{self.reader.n_intermediates}; name its layers with layers: {{modules: [...]}}"
                )
        return {layer: tuple(value.shape[1:]) for layer, value in features.items()}

    def used_state_keys(self, layers: Sequence[int] | None = None) -> set[str]:
        """The state-dict keys that the forward to ``layers`` (default: all) reads: every parameter
        the features depend on (by autograd, so a weight read without calling its module counts
        too), and the buffers of every submodule that runs and of the network itself."""
        layers = list(range(self.n_layers)) if layers is None else list(layers)
        called: set[str] = set()
        handles = [
            module.register_forward_pre_hook(lambda *_, name=name: called.add(name))
            for name, module in self.network.named_modules()
        ]
        parameters = dict(self.network.named_parameters())
        trainable = {name: parameter.requires_grad for name, parameter in parameters.items()}
        image = torch.rand(2, 3, self.input_size, self.input_size, device=self.mean.device)
        try:
            for parameter in parameters.values():
                parameter.requires_grad_(True)
            with torch.enable_grad():
                features = self.layer_features(image, layers)
                total = sum(value.float().sum() for value in features.values())
                grads = torch.autograd.grad(total, list(parameters.values()), allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
            for name, parameter in parameters.items():
                parameter.requires_grad_(trainable[name])
        keys = {name for name, grad in zip(parameters, grads) if grad is not None}
        for name, module in self.network.named_modules():
            if name and name not in called:
                continue
            prefix = f"{name}." if name else ""
            keys |= {prefix + key for key, _ in module.named_buffers(recurse=False)}
        return keys & set(self.network.state_dict())


# ---------------------------------------------------------------------------------------------
# weights


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """A hint when the checkpoint's keys are the model's under a prefix (e.g. Lightning's 'model.')."""
    for key in unexpected:
        for own in missing:
            if key.endswith("." + own):
                prefix = key[: -len(own)]
                return f"\n  the checkpoint's keys carry a prefix {prefix!r} (e.g. a Lightning module): save the inner model's state_dict"
    return ""


def load_weights(
    network: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True, used: set[str] | None = None
) -> None:
    """Load ``state`` into ``network``; on mismatch list the missing and unexpected keys.

    ``strict=False`` skips (and logs) only what the analysed layers do not read: ``used`` holds
    the keys they read (None: every key); a checkpoint missing any of those is refused.
    """
    from timm.models import clean_state_dict  # strips DataParallel's 'module.' prefix

    state = clean_state_dict(state)
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_mismatch = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    check_float_weights(state, own, source)
    needed = missing if used is None else [k for k in missing if k in used]
    if shape_mismatch or (strict and (missing or unexpected)) or needed:
        why = (
            f"  {len(needed)} missing keys are read by the analysed layers (model.strict: false skips only "
            f"tensors they do not use, e.g. a head): {needed[:20]}"
            if not strict and needed
            else "  (set model.strict: false to skip tensors the analysed layers do not read, e.g. a new head)"
        )
        raise CheckpointError(
            f"{source} does not match the model (model.arch/kwargs or model.factory):\n"
            f"  missing keys ({len(missing)}): {missing[:10]}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:10]}\n"
            f"  shape mismatches ({len(shape_mismatch)}): {shape_mismatch[:5]}\n"
            f"{why}{_prefix_hint(missing, unexpected)}"
        )
    if missing or unexpected:
        logger.warning(
            "%s: model.strict false: kept the random init of %d tensors the analysed layers do not read %s; "
            "ignored %d checkpoint tensors the model lacks %s",
            redact(str(source)), len(missing), missing[:10], len(unexpected), unexpected[:10],
        )  # fmt: skip (runs on Ray workers, where no redacting handler stands: the URL's credentials go here)
    network.load_state_dict(state, strict=False)


def _normalization(network: nn.Module, config: ModelConfig) -> tuple[Sequence[float], Sequence[float]]:
    pretrained_cfg: dict[str, Any] = getattr(network, "pretrained_cfg", None) or {}
    mean = config.mean or pretrained_cfg.get("mean") or (0.485, 0.456, 0.406)
    std = config.std or pretrained_cfg.get("std") or (0.229, 0.224, 0.225)
    return tuple(mean), tuple(std)


def load_model(
    config: ModelConfig,
    weights: str | None,
    storage_options: dict[str, Any] | None = None,
    modules: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
) -> FeatureModel:
    """Build the network and load ``weights``: a URL (safetensors / torch), ``"timm"`` for timm's
    own pretrained weights (needs network access), or None for the random init.

    ``modules``: the submodules whose outputs are the layers (any nn.Module); None: timm's
    feature API. ``layers``: the analysed layers, which ``model.strict: false`` must not leave
    at their random init (None: all)."""
    network = build_network(config)
    if weights == "timm":
        if config.arch is None:
            raise ConfigError("pretrained: 'timm' works with model.arch only, not with model.factory")
        import timm

        network = timm.create_model(config.arch, pretrained=True, **config.kwargs)
    mean, std = _normalization(network, config)
    model = FeatureModel(network, mean, std, modules=modules, prefix_tokens=config.prefix_tokens, name=model_name(config))
    if weights is not None and weights != "timm":
        used = None if config.strict else model.used_state_keys(layers)
        load_weights(network, load_state_dict(weights, storage_options), weights, strict=config.strict, used=used)
    return model


def _checked_shapes(model: FeatureModel, token_policy: TokenPolicy, image_size: int | None) -> dict[int, tuple[int, ...]]:
    """``model.check`` at the eval size; a size the model cannot take names ``data.image_size``."""
    expected = model.input_size
    if image_size is None or image_size == expected:
        return model.check(token_policy, expected)
    try:
        return model.check(token_policy, image_size)
    except ConfigError as exc:
        if "fails on a" not in str(exc):
            raise
        reason = str(exc).split("image (", 1)[-1].split("); check", 1)[0]
        raise ConfigError(
            f"data.image_size: {model.name} takes {expected}x{expected} images, not {image_size}x{image_size} "
            f"({reason}); leave data.image_size unset to use {expected}, or build the model for {image_size} "
            f"(model.kwargs.img_size: {image_size})"
        ) from None


def check_models(
    model: ModelConfig,
    finetuned: ModelConfig | None,
    modules: Sequence[str] | None,
    token_policy: TokenPolicy,
    image_size: int | None,
) -> FeatureModel:
    """Before any task: build the pretrained model (random init) and, when it differs, the
    finetuned one; run one blank image through every layer of each; a finetuned model must
    have as many layers, of the same shapes. Returns the pretrained model."""
    pretrained = load_model(model, None, modules=modules)
    shapes = _checked_shapes(pretrained, token_policy, image_size)
    if finetuned is None:
        return pretrained
    try:
        other = load_model(finetuned, None, modules=modules)
    except ConfigError as exc:  # the factory's errors say model.factory / model.kwargs: name this section
        message = str(exc)
        raise ConfigError(f"finetuned_{message}" if message.startswith("model.") else message) from None
    other_shapes = _checked_shapes(other, token_policy, image_size or pretrained.input_size)
    if len(other_shapes) != len(shapes):
        raise ConfigError(
            f"finetuned_model: {other.name} has {len(other_shapes)} layers ({other.describe_layers()}), "
            f"model {pretrained.name} has {len(shapes)} ({pretrained.describe_layers()}): layers are matched by index"
        )
    differ = [f"layer {k}: {shapes[k]} vs {other_shapes[k]}" for k in shapes if shapes[k] != other_shapes[k]]
    if differ:
        raise ConfigError(
            f"finetuned_model: the features of {other.name} differ in shape from those of {pretrained.name} "
            f"(token_policy {token_policy}): {differ[:5]}"
        )
    return pretrained
