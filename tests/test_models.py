"""Models: timm names and user factories, layer features, token policies, normalization once."""

from __future__ import annotations

import pytest
import torch

from invariance.config import ModelConfig
from invariance.errors import ConfigError
from invariance.core.models import load_model
from tests.helpers import TINY_MODEL


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return load_model(ModelConfig(**TINY_MODEL), None)


def test_a_user_factory_builds_the_model_with_its_kwargs() -> None:
    model = load_model(ModelConfig(factory="tests.helpers:tiny_factory", kwargs={"width": 24, "depth": 3}), None)
    assert model.depth == 3 and model.input_size == 16
    features = model.layer_features(torch.rand(2, 3, 16, 16), [0, 3])
    assert features[0].shape == (2, 5 * 24)  # 2 x 2 patches + CLS, flattened
    assert features[3].shape == (2, 24)  # pre-logits


@pytest.mark.parametrize(
    ("factory", "message"),
    [("tests.helpers:no_such_function", "has no attribute"), ("no_such_module:f", "cannot import module"),
     ("torch.nn:Linear", "lacks"),
     # the factory's own error (a weights download, a bad file): named, not a raw traceback
     ("json:loads", r"^model\.factory: json:loads\(\*\*model\.kwargs\) raised JSONDecodeError: Expecting value")],
)  # fmt: skip
def test_bad_factories_are_named(factory: str, message: str) -> None:
    kwargs = {"in_features": 2, "out_features": 2} if factory == "torch.nn:Linear" else {}
    kwargs = {"s": "not json"} if factory == "json:loads" else kwargs
    with pytest.raises(ConfigError, match=message):
        load_model(ModelConfig(factory=factory, kwargs=kwargs), None)


def test_token_policies_and_shapes(tiny) -> None:
    images = torch.rand(3, 3, 16, 16)
    tokens, width = 1 + 4, 16
    assert tiny.layer_features(images, [1], "flatten")[1].shape == (3, tokens * width)
    assert tiny.layer_features(images, [1], "cls")[1].shape == (3, width)
    mean = tiny.layer_features(images, [1], "mean")[1]
    flat = tiny.layer_features(images, [1], "flatten")[1].view(3, tokens, width)
    torch.testing.assert_close(mean, flat[:, 1:].mean(dim=1))  # the CLS token is left out, as timm pools
    assert tiny.layer_features(images, [2], "cls")[2].shape == (3, width)  # pre-logits ignores the policy


def test_the_forward_stops_at_the_deepest_layer_asked_for(tiny) -> None:
    calls: list[int] = []
    for index, block in enumerate(tiny.network.blocks):
        block.register_forward_hook(lambda *_, index=index: calls.append(index))
    tiny.layer_features(torch.rand(1, 3, 16, 16), [0])
    assert calls == [0]
    calls.clear()
    tiny.layer_features(torch.rand(1, 3, 16, 16), [2])  # pre-logits needs every block
    assert calls == [0, 1]


def test_normalization_is_applied_exactly_once(tiny) -> None:
    images = torch.rand(2, 3, 16, 16)
    network = tiny.network
    expected = network.forward_head(network.forward_features((images - 0.5) / 0.5), pre_logits=True)
    torch.testing.assert_close(tiny.layer_features(images, [2])[2], expected)
    custom = load_model(ModelConfig(**TINY_MODEL, mean=(0.1, 0.2, 0.3), std=(0.9, 0.8, 0.7)), None)
    custom.network.load_state_dict(network.state_dict())
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.9, 0.8, 0.7]).view(1, 3, 1, 1)
    expected = network.forward_head(network.forward_features((images - mean) / std), pre_logits=True)
    torch.testing.assert_close(custom.layer_features(images, [2])[2], expected)


def test_layers_out_of_range_are_refused(tiny) -> None:
    with pytest.raises(ConfigError, match="out of range 0..2"):
        tiny.layer_features(torch.rand(1, 3, 16, 16), [3])


# ---- bring your own module: layers by module names ------------------------------------------------

HF_VIT = ModelConfig(factory="tests.helpers:hf_vit_factory", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _hf_blocks(model) -> list[str]:
    import re

    # transformers 4 names ViT blocks encoder.layer.N, transformers 5 layers.N
    return [name for name, _ in model.named_modules() if re.fullmatch(r"(encoder\.layer|layers)\.\d+", name)]


def test_a_transformers_vit_by_module_names_stops_after_the_deepest(torch_single_thread) -> None:
    pytest.importorskip("transformers", reason="the transformers extra: pip install 'invariance[transformers]'")
    from invariance.core.models import check_models

    torch.manual_seed(0)
    probe = load_model(HF_VIT, None, modules=["layernorm"])
    modules = [*_hf_blocks(probe.network), "layernorm"]
    model = check_models(HF_VIT, None, modules, "flatten", None)
    assert model.input_size == 32 and model.describe_layers() == f"0..1: {modules[0][:-2]}, 2: layernorm"
    torch.manual_seed(0)
    model = load_model(HF_VIT, None, modules=modules, layers=None)
    images = torch.rand(3, 3, 32, 32)
    features = model.layer_features(images, [0, 1, 2], "flatten")
    assert [tuple(f.shape) for f in features.values()] == [(3, 17 * 32)] * 3  # CLS + 4 x 4 patches
    expected = model.network(pixel_values=(images - 0.5) / 0.5).last_hidden_state
    torch.testing.assert_close(features[2], expected.flatten(1))  # the module's output, normalized once
    mean = model.layer_features(images, [1], "mean")[1]
    assert mean.shape == (3, 32)  # no prefix tokens declared: every position
    calls: list[str] = []
    for name in modules:
        model.network.get_submodule(name).register_forward_hook(lambda *_, name=name: calls.append(name))
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    model.layer_features(image, [0])[0].sum().backward()
    assert calls == [modules[0]] and image.grad.abs().sum() > 0  # the forward stopped after block 0
    with_prefix = load_model(HF_VIT.model_copy(update={"prefix_tokens": 1}), None, modules=modules)
    with_prefix.network.load_state_dict(model.network.state_dict())
    flat = with_prefix.layer_features(images, [1], "flatten")[1].view(3, 17, 32)
    torch.testing.assert_close(with_prefix.layer_features(images, [1], "cls")[1], flat[:, 0])
    torch.testing.assert_close(with_prefix.layer_features(images, [1], "mean")[1], flat[:, 1:].mean(1))
    with pytest.raises(ConfigError, match="'cls' needs a model with a class token"):
        model.layer_features(images, [1], "cls")


def test_a_lora_adapted_model_matches_its_base_layer_by_layer(tmp_path, torch_single_thread) -> None:
    pytest.importorskip("peft", reason="the adapters extra: pip install 'invariance[adapters]'")
    from safetensors.torch import save_file

    from invariance.core.models import check_models

    base = ModelConfig(factory="tests.helpers:tiny_factory")
    adapted = ModelConfig(factory="tests.helpers:lora_vit_factory")
    pt = check_models(base, adapted, None, "flatten", None)
    torch.manual_seed(0)
    save_file(load_model(base, None).network.state_dict(), str(tmp_path / "base.safetensors"))
    torch.manual_seed(1)
    save_file(load_model(adapted, None).network.state_dict(), str(tmp_path / "ft.safetensors"))  # LoRA B = 0
    pt = load_model(base, str(tmp_path / "base.safetensors"))
    # the adapter checkpoint carries its base tensors too: here the pretrained ones, as a fresh LoRA run
    ft_state = load_model(adapted, str(tmp_path / "ft.safetensors")).network.state_dict()
    ft_state.update({key.replace("attn.qkv.", "attn.qkv.base_layer."): value for key, value in pt.network.state_dict().items()})
    assert any("lora_A" in key for key in ft_state)
    save_file({k: v.contiguous() for k, v in ft_state.items()}, str(tmp_path / "ft.safetensors"))
    ft = load_model(adapted, str(tmp_path / "ft.safetensors"))
    images = torch.rand(4, 3, 16, 16)
    before, after = pt.layer_features(images, range(pt.n_layers)), ft.layer_features(images, range(ft.n_layers))
    assert ft.n_layers == pt.n_layers == 3
    assert all(torch.equal(before[k], after[k]) for k in before)  # zero-initialised B: identical features
    with torch.no_grad():
        ft.network.blocks[1].attn.qkv.lora_B["default"].weight.fill_(0.1)
    after = ft.layer_features(images, range(ft.n_layers))
    assert torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])


# ---- model.strict: false skips only what the analysed layers do not read (issue 13) ------------


def test_strict_false_refuses_a_checkpoint_missing_what_the_layers_read(tmp_path, tiny, caplog) -> None:
    from safetensors.torch import save_file

    from invariance.errors import CheckpointError

    lenient = ModelConfig(**TINY_MODEL, strict=False)
    state = tiny.network.state_dict()
    # a Lightning module's keys: every tensor under 'model.' -> nothing would load: refused, the prefix named
    save_file({f"model.{k}": v for k, v in state.items()}, str(tmp_path / "lightning.safetensors"))
    with pytest.raises(CheckpointError, match=r"read by the analysed layers.*\n?.*prefix 'model.'") as error:
        load_model(lenient, str(tmp_path / "lightning.safetensors"))
    assert "blocks.0.attn.qkv.weight" in str(error.value)
    # a checkpoint without block 1: refused for layers that need it, fine for layer 0 alone
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.1.")}, str(tmp_path / "noblock.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.qkv\.weight"):
        load_model(lenient, str(tmp_path / "noblock.safetensors"))
    partial = load_model(lenient, str(tmp_path / "noblock.safetensors"), layers=[0])
    torch.testing.assert_close(partial.network.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    # a head only missing (a new head): loads, and says what it skipped
    save_file({k: v for k, v in state.items() if not k.startswith("head.")}, str(tmp_path / "nohead.safetensors"))
    with caplog.at_level("WARNING", logger="invariance.core.models"):
        loaded = load_model(lenient, str(tmp_path / "nohead.safetensors"))
    assert "head.weight" in caplog.text and "kept the random init of 2 tensors" in caplog.text
    torch.manual_seed(123)  # another random init of what was skipped: the analysed layers do not see it
    again = load_model(lenient, str(tmp_path / "nohead.safetensors"))
    images = torch.rand(2, 3, 16, 16)
    first, second = loaded.layer_features(images, [0, 1, 2]), again.layer_features(images, [0, 1, 2])
    assert all(torch.equal(first[k], second[k]) for k in first)


def inplace_relu_net():
    """conv -> bn -> ReLU(inplace) -> conv: the in-place ReLU overwrites bn's output tensor."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3))


def test_a_named_modules_features_are_its_output_even_when_a_later_op_works_in_place() -> None:
    torch.manual_seed(0)
    model = load_model(ModelConfig(factory="tests.test_models:inplace_relu_net"), None, modules=["1", "3"])
    images = torch.rand(2, 3, 12, 12)
    together = model.layer_features(images, [0, 1], "flatten")[0]
    alone = model.layer_features(images, [0], "flatten")[0]
    torch.testing.assert_close(together, alone)
    assert together.min() < 0  # bn's output, not the ReLU's


def test_a_finetuned_factory_that_fails_is_named_by_its_own_key() -> None:
    """issue 25 (sibling): finetuned_model.factory's errors said model.factory, the other section."""
    from invariance.core.models import check_models

    pretrained = ModelConfig(factory="tests.helpers:tiny_factory")
    with pytest.raises(ConfigError, match=r"^finetuned_model\.factory: module 'tests\.helpers' has no attribute 'nope'"):
        check_models(pretrained, ModelConfig(factory="tests.helpers:nope"), None, "flatten", None)
    with pytest.raises(ConfigError, match=r"^finetuned_model\.kwargs: tests\.helpers:tiny_factory does not accept"):
        check_models(pretrained, ModelConfig(factory="tests.helpers:tiny_factory", kwargs={"bad": 1}), None, "flatten", None)
