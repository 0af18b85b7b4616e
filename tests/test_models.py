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
     ("torch.nn:Linear", "lacks")],
)  # fmt: skip
def test_bad_factories_are_named(factory: str, message: str) -> None:
    kwargs = {"in_features": 2, "out_features": 2} if factory == "torch.nn:Linear" else {}
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
