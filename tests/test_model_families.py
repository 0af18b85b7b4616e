"""Every timm family through timm's feature API, at tiny sizes, random init: features at every
layer, a 3-step inversion, and exact zeros of forgetting/learning where pt and ft agree."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest
import torch

from invariance.analysis.metrics import forgetting, learning
from invariance.config import InversionConfig, ModelConfig
from invariance.core.inversion import invert, start_noise
from invariance.core.models import FeatureModel, check_models, load_model
from invariance.core.shards import ShardContext
from invariance.errors import ConfigError
from invariance.io.data import EvalImages

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
VIT14 = {"img_size": 28, "patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2}

# (timm name, kwargs, image size, what a layer is, prefix tokens, has a class token)
FAMILIES: dict[str, tuple[str, dict[str, Any], int, str, int, bool]] = {
    "vit": ("vit_tiny_patch16_224", VIT, 32, "0..1: blocks, 2: pre-logits", 1, True),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", VIT, 32, "0..1: blocks, 2: pre-logits", 2, True),
    "dinov2-registers": ("vit_small_patch14_reg4_dinov2", VIT14, 28, "0..1: blocks, 2: pre-logits", 5, True),
    "clip-vit": ("vit_base_patch16_clip_224", VIT, 32, "0..1: blocks, 2: pre-logits", 1, True),
    "siglip": ("vit_base_patch16_siglip_224", VIT, 32, "0..1: blocks, 2: pre-logits", 0, False),
    "eva02": ("eva02_tiny_patch14_224", VIT14, 28, "0..1: blocks, 2: pre-logits", 1, True),
    "beit": ("beit_base_patch16_224", VIT, 32, "0..1: blocks, 2: pre-logits", 1, True),
    "swin": ("swin_tiny_patch4_window7_224",
             {"img_size": 32, "window_size": 2, "embed_dim": 8, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
             32, "0..3: layers, 4: pre-logits", 0, False),
    "convnext": ("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 8, 16, 16)}, 32, "0..3: stages, 4: pre-logits", 0, False),
    "resnet": ("test_resnet", {}, 32, "0: act1, 1: layer1, 2: layer2, 3: layer3, 4: layer4, 5: pre-logits", 0, False),
    "efficientnet": ("test_efficientnet", {}, 32, "", 0, False),
    "regnet": ("regnetx_002", {}, 32, "0: stem, 1: s1, 2: s2, 3: s3, 4: s4, 5: pre-logits", 0, False),
}  # fmt: skip
N_IMAGES = 8


def family_model(family: str, seed: int = 0) -> FeatureModel:
    arch, kwargs, *_ = FAMILIES[family]
    torch.manual_seed(seed)
    model = load_model(ModelConfig(arch=arch, kwargs={**kwargs, "num_classes": 3}), None)
    if family in ("siglip", "beit", "eva02"):
        # zero-initialised parts (layer-scale gammas, attention-pool latents) make some layers constant
        for parameter in model.network.parameters():
            parameter.data.add_(0.02 * torch.randn_like(parameter))
    return model


def eval_images(size: int) -> EvalImages:
    generator = torch.Generator().manual_seed(3)
    return EvalImages(torch.rand(N_IMAGES, 3, size, size, generator=generator), torch.arange(N_IMAGES))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_features_at_every_layer_and_a_three_step_inversion(family: str, torch_single_thread) -> None:
    _, _, size, described, prefix, has_cls = FAMILIES[family]
    model = family_model(family)
    assert model.input_size == size or family in ("convnext", "resnet", "efficientnet", "regnet", "swin")
    if described:
        assert model.describe_layers() == described
    shapes = model.check("flatten", size)  # also: timm's default intermediates == the named layers
    assert sorted(shapes) == list(range(model.n_layers)) and model.layer_names()[-1] == "pre-logits"
    images = eval_images(size).images
    for policy in ("flatten", "mean", *(("cls",) if has_cls else ())):
        features = model.layer_features(images, range(model.n_layers), policy)
        for layer, value in features.items():
            assert value.ndim == 2 and value.shape[0] == N_IMAGES and torch.isfinite(value).all(), (policy, layer)
    if not has_cls:
        with pytest.raises(ConfigError, match="'cls' needs a model with a class token"):
            model.layer_features(images, [0], "cls")
    if model.reader.tokens:  # flatten = prefix tokens + patch tokens, mean leaves the prefix out
        flat = model.layer_features(images, [0], "flatten")[0].view(N_IMAGES, -1, model.layer_features(images, [0], "mean")[0].shape[1])
        assert model.reader.prefix_tokens == prefix
        torch.testing.assert_close(model.layer_features(images, [0], "mean")[0], flat[:, prefix:].mean(1))
    # a 3-step inversion through the middle layer: the loss goes down from the start noise
    layer = model.depth // 2
    noise = start_noise(0, torch.arange(N_IMAGES), (3, size, size))
    result = invert(model, layer, images, noise, InversionConfig(iterations=3, bf16=False, micro_batch=N_IMAGES))
    assert result.images.shape == images.shape and torch.isfinite(result.final_loss).all()
    start = invert(model, layer, images, noise, InversionConfig(iterations=1, step_size=1e-9, bf16=False, micro_batch=N_IMAGES))
    assert (result.final_loss <= start.final_loss).all() and (result.final_loss < start.final_loss).any()


def _curves(pt: FeatureModel, ft: FeatureModel, size: int) -> pl.DataFrame:
    """Forgetting and learning (i = j) at every layer, from one STIR shard per (ref model, layer)."""
    layers = list(range(pt.n_layers))
    context = ShardContext({"pt": pt, "ft": ft}, eval_images(size), layers, "flatten",
                           InversionConfig(iterations=3, bf16=False, micro_batch=N_IMAGES))  # fmt: skip
    rows = [row for ref in ("pt", "ft") for layer in layers for row in context.stir_rows(ref, layer, seed=0)]
    stir = pl.DataFrame(rows).with_columns(checkpoint=pl.lit("c"), epoch=pl.lit(1))
    diagonal = pl.col("ref_layer") == pl.col("target_layer")
    return (
        forgetting(stir).filter(diagonal)
        .join(learning(stir).filter(diagonal), on=["checkpoint", "epoch", "ref_layer", "target_layer", "seed"])
        .sort("ref_layer")
    )  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ft_equal_to_pt_forgets_and_learns_exactly_nothing_and_a_late_change_leaves_early_layers_alone(
    family: str, torch_single_thread
) -> None:
    size = FAMILIES[family][2]
    pt, ft = family_model(family), family_model(family, seed=1)
    ft.network.load_state_dict(pt.network.state_dict())
    curves = _curves(pt, ft, size)
    assert curves["forgetting"].to_list() == [0.0] * pt.n_layers
    assert curves["learning"].to_list() == [0.0] * pt.n_layers

    # ft differs only after layer k: every tensor the forward to k does not read is moved
    k = pt.depth // 2
    used = pt.used_state_keys([k])
    with torch.no_grad():
        for name, parameter in ft.network.named_parameters():
            if name not in used:
                parameter.add_(0.5 * torch.randn_like(parameter) + 0.1)
    images = eval_images(size).images
    before, after = pt.layer_features(images, range(pt.n_layers)), ft.layer_features(images, range(pt.n_layers))
    assert all(torch.equal(before[i], after[i]) for i in range(k + 1))
    assert not torch.equal(before[pt.depth], after[pt.depth])  # the change is real
    curves = _curves(pt, ft, size)
    assert curves["forgetting"].to_list()[: k + 1] == [0.0] * (k + 1)
    assert curves["learning"].to_list()[: k + 1] == [0.0] * (k + 1)


def test_the_vit_layers_are_the_blocks_and_the_pre_logits_as_before(tiny_vit, torch_single_thread) -> None:
    """Pins today's ViT numbering: block k's residual stream (all tokens, CLS first), then the
    final norm + pooling; the forward stops at the deepest block asked for."""
    net, images = tiny_vit.network, torch.rand(2, 3, 32, 32)
    tokens = net.norm_pre(net._pos_embed(net.patch_embed((images - tiny_vit.mean) / tiny_vit.std)))
    expected = {}
    for index, block in enumerate(net.blocks):
        tokens = block(tokens)
        expected[index] = tokens.flatten(1)
    expected[len(net.blocks)] = net.forward_head(net.norm(tokens), pre_logits=True)
    got = tiny_vit.layer_features(images, range(tiny_vit.n_layers))
    assert tiny_vit.describe_layers() == "0..3: blocks, 4: pre-logits"
    for layer, value in expected.items():
        assert torch.equal(got[layer], value), layer
    calls: list[int] = []
    for index, block in enumerate(net.blocks):
        block.register_forward_hook(lambda *_, index=index: calls.append(index))
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    tiny_vit.layer_features(image, [1])[1].sum().backward()  # gradients flow, blocks 2.. never run
    assert calls == [0, 1] and image.grad is not None and image.grad.abs().sum() > 0


def test_an_image_size_a_fixed_size_model_cannot_take_names_data_image_size() -> None:
    config = ModelConfig(arch="vit_tiny_patch16_224", kwargs=VIT)
    with pytest.raises(ConfigError, match=r"data\.image_size: vit_tiny_patch16_224 takes 32x32 images, not 48x48"):
        check_models(config, None, None, "flatten", 48)
    assert check_models(ModelConfig(arch="resnet18"), None, None, "flatten", 32).n_layers == 6  # convolutions take any size


def test_unsupported_models_and_layer_requests_are_named_errors() -> None:
    with pytest.raises(ConfigError, match=r"torch.nn:Linear \(Linear\) lacks timm's feature API"):
        load_model(ModelConfig(factory="torch.nn:Linear", kwargs={"in_features": 2, "out_features": 2}), None)
    with pytest.raises(ConfigError, match="model.arch: unknown timm architecture"):
        load_model(ModelConfig(arch="vit_no_such_model"), None)
    with pytest.raises(ConfigError, match="model.kwargs: vit_tiny_patch16_224 cannot be built"):
        load_model(ModelConfig(arch="vit_tiny_patch16_224", kwargs={"no_such_kwarg": 1}), None)
    with pytest.raises(ConfigError, match=r"token_policy: 'cls' needs a model with a class token; convnext_atto has none"):
        check_models(ModelConfig(arch="convnext_atto", kwargs=FAMILIES["convnext"][1]), None, None, "cls", 32)
    with pytest.raises(ConfigError, match=r"layers.modules: .* has no submodule \['blocks.9'\]"):
        load_model(ModelConfig(arch="vit_tiny_patch16_224", kwargs=VIT), None, modules=["blocks.0", "blocks.9"])
    model = load_model(ModelConfig(arch="vit_tiny_patch16_224", kwargs=VIT), None)
    with pytest.raises(ConfigError, match=r"out of range 0..2 for vit_tiny_patch16_224 \(0..1: blocks, 2: pre-logits\)"):
        model.layer_features(torch.rand(1, 3, 32, 32), [3])


def test_a_finetuned_model_of_another_depth_or_width_is_refused_before_any_task() -> None:
    base = ModelConfig(arch="vit_tiny_patch16_224", kwargs=VIT)
    deeper = ModelConfig(arch="vit_tiny_patch16_224", kwargs={**VIT, "depth": 3})
    wider = ModelConfig(arch="vit_tiny_patch16_224", kwargs={**VIT, "embed_dim": 48})
    with pytest.raises(ConfigError, match=r"finetuned_model: .* has 4 layers .* has 3"):
        check_models(base, deeper, None, "flatten", None)
    with pytest.raises(ConfigError, match=r"finetuned_model: the features .* differ in shape"):
        check_models(base, wider, None, "mean", None)
    other_head = ModelConfig(arch="vit_tiny_patch16_224", kwargs={**VIT, "num_classes": 7})
    assert check_models(base, other_head, None, "flatten", None).n_layers == 3
