"""Parameter-efficient adapters on a frozen encoder: LoRA (through ``peft``), bottleneck
adapters and FiLM. Each starts as the identity, so the adapted model's features at epoch 0
equal the base's exactly.

- ``lora``: low-rank updates ``W + (alpha / rank) B A`` of the target linears/convs, ``B``
  zero-initialised (peft's default). Default targets: every ``nn.Linear`` and ``nn.Conv2d``
  inside the blocks (a ViT's attention qkv/proj and MLP fc1/fc2; a CNN's stage convs).
- ``bottleneck``: after each block's MLP, ``h + up(gelu(down(h)))`` with ``down: dim -> dim /
  reduction_factor`` and ``up`` zero-initialised (Houlsby et al. 2019, the MLP-side adapter).
- ``film``: in each block, on the residual stream after the attention residual,
  ``x = x * (1 + gamma) + beta`` per channel, gamma and beta zero-initialised (as the FiLM ViT
  wrapper of ``openvla-oft``); the block's own keys are unchanged, FiLM adds ``blocks.N.film.*``.

``adapted_model`` is a model factory: a run config names it under ``finetuned_model:
{factory: invariance.training.adapters:adapted_model, kwargs: {...}}`` to rebuild the adapted
module an unmerged checkpoint holds.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Literal

import torch
from torch import nn

from invariance.errors import ConfigError

AdapterKind = Literal["lora", "bottleneck", "film"]


class BottleneckAdapter(nn.Module):
    """``h: [..., dim] -> h + up(gelu(down(h)))``; ``up`` starts at zero (the identity)."""

    def __init__(self, dim: int, reduction_factor: int) -> None:
        super().__init__()
        hidden = max(1, dim // reduction_factor)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden)))


class FiLM(nn.Module):
    """``h: [..., dim] -> h * (1 + gamma) + beta`` per channel; gamma = beta = 0 at init."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * (1 + self.gamma) + self.beta


class AfterMLP(nn.Sequential):
    """A block's MLP followed by its adapter: ``adapter(mlp(x))``. Keys: ``mlp.0.*``, ``mlp.1.*``."""


_FILM_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_film_classes: dict[type, type] = {}


def _film_block_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A pre-norm transformer block with FiLM on the residual stream after the attention residual."""
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), *args, **kwargs)))
    x = self.film(x)
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _with_film(block: nn.Module, width: int) -> None:
    """Give ``block`` a FiLM after its attention residual: a ``film`` submodule, and the block's
    class swapped for a subclass whose forward applies it (every other key stays as it was)."""
    missing = [part for part in _FILM_PARTS if not hasattr(block, part)]
    if missing:
        raise ConfigError(f"adapter.kind: film goes after the attention residual of a pre-norm transformer block "
                          f"(timm's Block); {type(block).__name__} lacks {missing}. Use adapter.kind: lora")  # fmt: skip
    base = type(block)
    if base not in _film_classes:
        _film_classes[base] = type(f"FiLM{base.__name__}", (base,), {"forward": _film_block_forward})
    block.film = FiLM(width)
    block.__class__ = _film_classes[base]


def _blocks(network: nn.Module) -> list[nn.Module]:
    blocks = getattr(network, "blocks", None)
    if blocks is None or not all(hasattr(block, "mlp") for block in blocks):
        raise ConfigError(
            f"adapter.kind: bottleneck and film go into the blocks of a ViT-style model (network.blocks[i] with "
            f"an mlp: bottleneck after it, film after the attention residual); {type(network).__name__} has none. "
            "Use adapter.kind: lora"
        )
    return list(blocks)


def _mlp_width(mlp: nn.Module) -> int:
    out = getattr(mlp, "fc2", None)
    if isinstance(out, nn.Linear):
        return out.out_features
    linears = [module for module in mlp.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ConfigError(f"adapter: cannot tell the width of the block MLP {type(mlp).__name__}")
    return linears[-1].out_features


def default_lora_targets(network: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` and ungrouped ``nn.Conv2d`` of the network's body: all but the
    image-facing convs (3 input channels: a ViT's patch embedding, a CNN's first conv), anything
    in a stem, and the classifier (timm's ``get_classifier()``). Grouped and depthwise convs are
    left out: a low-rank update of a conv needs its rank divisible by the groups, and cannot be
    merged. A ViT: its blocks' qkv/proj/fc1/fc2; a ResNet: layer1..4; a ConvNeXt: its stages."""
    classifier = network.get_classifier() if callable(getattr(network, "get_classifier", None)) else None
    head = [name for name, module in network.named_modules() if classifier is not None and module is classifier
            and isinstance(classifier, nn.Module) and name]  # fmt: skip
    names = []
    for name, module in network.named_modules():
        if isinstance(module, nn.Linear):
            pass
        elif not (isinstance(module, nn.Conv2d) and module.groups == 1 and module.in_channels != 3):
            continue
        if "stem" in name or any(name == h or name.startswith(h + ".") for h in head):
            continue
        names.append(name)
    if not names:
        raise ConfigError(
            f"adapter.target_modules: {type(network).__name__} has no Linear or ungrouped Conv2d outside its stem "
            "and classifier; name the modules to adapt"
        )
    return names


def add_adapter(
    network: nn.Module,
    kind: AdapterKind,
    rank: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    reduction_factor: int = 16,
) -> nn.Module:
    """Adapt ``network`` in place (and return it): the adapter modules are added, the identity at init.

    Freezing is the caller's: ``adapter_parameters`` names what an adapter adds."""
    if kind == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:
            raise ConfigError("adapter.kind: lora needs peft (pip install 'invariance[adapters]')") from exc
        targets = target_modules or default_lora_targets(network)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        try:
            return inject_adapter_in_model(config, network)
        except ValueError as exc:  # peft: "Target modules ... not found in the base model"
            raise ConfigError(f"adapter.target_modules: {str(exc).splitlines()[0]}") from None
    if kind in ("bottleneck", "film"):
        for block in _blocks(network):
            width = _mlp_width(block.mlp)
            if kind == "film":
                _with_film(block, width)
            else:
                block.mlp = AfterMLP(block.mlp, BottleneckAdapter(width, reduction_factor))
        return network
    raise ConfigError(f"adapter.kind: expected lora, bottleneck or film, got {kind!r}")


def adapter_parameters(network: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything an adapter added: LoRA's ``lora_*`` and the MLP adapters."""
    for name, parameter in network.named_parameters():
        if "lora_" in name or ".mlp.1." in name or ".film." in name:
            yield name, parameter


def merged_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of a LoRA-adapted ``network`` with every update merged into its base weights,
    under the base architecture's keys (``blocks.0.attn.qkv.weight``); the network is left as is."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(network)
    for module in merged.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    state = {}
    for key, value in merged.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    return state


def adapted_model(arch: str | None = None, kwargs: dict[str, Any] | None = None, factory: str | None = None,
                  adapter: dict[str, Any] | None = None) -> nn.Module:  # fmt: skip
    """A model factory for run configs: the base network (timm ``arch`` + ``kwargs``, or a
    ``factory``) with ``adapter`` (the finetune config's ``adapter`` section) added, random init;
    an unmerged adapter checkpoint then loads into it."""
    from invariance.config import ModelConfig
    from invariance.core.models import build_network

    if adapter is None or "kind" not in adapter:
        raise ConfigError("finetuned_model.kwargs.adapter: give the finetune config's adapter section, e.g. {kind: lora, rank: 8}")
    base = ModelConfig(arch=arch, factory=factory, kwargs=kwargs or {})
    settings = {key: value for key, value in adapter.items() if key != "merge"}
    return add_adapter(build_network(base), **settings)
