"""Points on the weight path between the pretrained and a finetuned model (WiSE-FT,
Wortsman et al. 2022): ``theta(alpha) = (1 - alpha) * pretrained + alpha * finetuned``.

Every state-dict tensor the two networks share with one shape is interpolated (parameters and
float buffers alike, as ``wise_ft.py``). Tensors the pretrained network lacks, or has in another
shape (a new head, adapters), follow ``interpolation.extra``: ``keep`` takes the checkpoint's
(refused for a shared key of another shape: there is no path between them), ``scale`` multiplies
them by alpha (for zero-initialised adapters the path from the base model; of a product, LoRA's
``B A`` or a bottleneck's ``up(act(down(h)))``, only the zero-initialised factor is scaled, so the
adapter adds exactly alpha times its finetuned update). Non-float tensors
(counters such as BatchNorm's ``num_batches_tracked``) are the pretrained one's below alpha 0.5,
the checkpoint's from there. Built in memory from the two loaded models: no file is written.

Tensors are matched by name; a finetuned module that wraps a pretrained one names its tensors
one segment deeper, and that segment is dropped to find the pretrained name: peft LoRA's
``qkv.base_layer.weight`` is ``qkv.weight``, this package's adapters' ``mlp.0.fc1.weight``
(``AfterMLP``) is ``mlp.fc1.weight``.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal, Mapping

import torch

from invariance.core.models import FeatureModel
from invariance.errors import ConfigError

log = logging.getLogger(__name__)

Extra = Literal["keep", "scale"]


# peft's wrapped layer anywhere; the first module of an AfterMLP (nn.Sequential) only right after `mlp`
WRAPPER_SEGMENTS = ("base_layer", "0")
# the factor of an adapter's product that starts non-zero (LoRA's A, a bottleneck's down-projection):
# `scale` leaves it as trained and scales only its zero-initialised partner, so that the adapter's
# contribution is alpha times the finetuned one (scaling both factors would give alpha squared)
UNSCALED_FACTORS = (".lora_A.", ".lora_embedding_A", ".mlp.1.down.")


def _wrapper_segment(parts: list[str], position: int) -> bool:
    part = parts[position]
    return part == "base_layer" or (part == "0" and position > 0 and parts[position - 1] == "mlp")


def pretrained_name(key: str, pretrained: Mapping[str, object]) -> str | None:
    """The pretrained tensor a finetuned tensor ``key`` continues: the same name, or the name
    without one wrapper segment (``qkv.base_layer.weight`` -> ``qkv.weight``, ``mlp.0.fc1.weight``
    -> ``mlp.fc1.weight``); None if none."""
    if key in pretrained:
        return key
    parts = key.split(".")
    for position, part in enumerate(parts[:-1]):
        if _wrapper_segment(parts, position):
            candidate = ".".join(parts[:position] + parts[position + 1 :])
            if candidate in pretrained:
                return candidate
    return None


def mismatched_shapes(pretrained: Mapping[str, torch.Size], finetuned: Mapping[str, torch.Size]) -> list[str]:
    """``key: pretrained (a, b) vs checkpoint (c, d)`` for every tensor both have in another shape."""
    differ = []
    for key in sorted(finetuned):
        name = pretrained_name(key, pretrained)
        if name is not None and tuple(pretrained[name]) != tuple(finetuned[key]):
            differ.append(f"{key}: pretrained {tuple(pretrained[name])} vs checkpoint {tuple(finetuned[key])}")
    return differ


def check_interpolable(
    pretrained: Mapping[str, torch.Size], finetuned: Mapping[str, torch.Size], extra: Extra, where: str = "the checkpoint"
) -> None:
    """ConfigError naming ``interpolation.extra`` and the keys when ``extra`` is ``keep`` and
    tensors both networks have differ in shape (``{key: shape}`` of each)."""
    differ = mismatched_shapes(pretrained, finetuned)
    if differ and extra == "keep":
        raise ConfigError(
            f"interpolation.extra: keep, but {len(differ)} tensors of {where} differ in shape from the pretrained "
            f"ones, so no straight path joins them: {differ[:5]}; set interpolation.extra: scale to scale them by "
            "alpha instead (e.g. a new head), or leave interpolation out"
        )


def interpolate_state(
    pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], alpha: float, extra: Extra = "keep"
) -> dict[str, torch.Tensor]:
    """The state dict at ``alpha`` on the path, with the keys of ``finetuned``.

    alpha 0 gives the pretrained tensors exactly (``1 * p + 0 * f``), alpha 1 the checkpoint's."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"interpolation.alphas: {alpha} is outside [0, 1]")
    check_interpolable({k: v.shape for k, v in pretrained.items()}, {k: v.shape for k, v in finetuned.items()}, extra)
    state: dict[str, torch.Tensor] = {}
    for key, tuned in finetuned.items():
        name = pretrained_name(key, pretrained)
        base = pretrained[name] if name is not None else None
        shared = base is not None and base.shape == tuned.shape
        if not tuned.is_floating_point():
            state[key] = (base if shared and alpha < 0.5 else tuned).clone()
        elif shared:
            state[key] = ((1.0 - alpha) * base.to(tuned.device, tuned.dtype) + alpha * tuned).to(tuned.dtype)
        elif extra == "scale" and not any(factor in key for factor in UNSCALED_FACTORS):
            state[key] = tuned * alpha
        else:
            state[key] = tuned.clone()
    return state


def interpolated_model(pretrained: FeatureModel, finetuned: FeatureModel, alpha: float, extra: Extra = "keep") -> FeatureModel:
    """A copy of ``finetuned`` (its module: ``finetuned_model`` where set) whose network holds the
    weights at ``alpha`` between ``pretrained``'s network and its own."""
    state = interpolate_state(pretrained.network.state_dict(), finetuned.network.state_dict(), alpha, extra)
    model = copy.deepcopy(finetuned)
    model.network.load_state_dict(state, strict=True)
    log.debug("interpolated %s at alpha %g (extra: %s)", finetuned.name, alpha, extra)
    return model.eval()
