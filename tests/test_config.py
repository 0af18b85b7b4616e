"""The run config: defaults, errors that name the key, and the settings hash."""

from __future__ import annotations

import copy

import pytest
import yaml

from invariance.config import RunConfig, load_config, parse_config, settings_hash
from invariance.errors import ConfigError


def minimal() -> dict:
    return {
        "output": "s3://lab/invariance/cifar10-sgd",
        "model": {"arch": "vit_base_patch32_224"},
        "pretrained": "timm",
        "checkpoints": "s3://lab/runs/cifar10-sgd/epoch={epoch}.safetensors",
        "data": {"format": "cifar", "path": "s3://lab/data/cifar-10-batches-py"},
    }


def with_value(dotted_key: str, value) -> dict:
    raw = minimal()
    *parents, last = dotted_key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def config_error(raw) -> str:
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    return str(error.value)


def test_minimal_config_gets_the_documented_defaults():
    config = parse_config(minimal())
    assert isinstance(config, RunConfig)
    assert config.layers == "all" and config.token_policy == "flatten" and config.seeds == [0, 1, 2]
    assert config.data.split == "test" and config.data.n_samples == 500 and config.data.selection == "first"
    assert config.data.image_size is None and config.data.image_column == "image"
    assert config.inversion.iterations == 500 and config.inversion.step_size == 0.5
    assert config.inversion.tolerance is None and config.inversion.micro_batch == "auto"
    assert config.model.strict is True and config.model.kwargs == {}
    assert config.resources.num_gpus == 0.0 and config.resources.max_retries == 3
    assert config.storage_options == {}


@pytest.mark.parametrize(
    ("raw", "key", "meant"),
    [
        ({**minimal(), "inversoin": {"iterations": 50}}, "inversoin", "inversion"),
        (with_value("inversion.iteratons", 50), "inversion.iteratons", "iterations"),
        (with_value("data.n_sample", 10), "data.n_sample", "n_samples"),
        (with_value("model.kwrags", {}), "model.kwrags", "kwargs"),
        ({**minimal(), "seed": [0]}, "seed", "seeds"),
    ],
)
def test_misspelt_key_is_named_with_the_closest_keys(raw, key, meant):
    message = config_error(raw)
    assert f"{key}: unknown key (did you mean '{meant}'" in message


def test_an_unknown_key_far_from_every_key_gets_no_guess():
    assert "zzzzzz: unknown key (misspelt?" in config_error({**minimal(), "zzzzzz": 1})


def test_a_format_spec_in_the_epoch_placeholder_gets_its_own_message():
    message = config_error(with_value("checkpoints", "s3://lab/run/epoch={epoch:02d}.safetensors"))
    assert "{epoch:02d} has a format spec; write plain {epoch}" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("data.n_samples", "many"),
        ("inversion.iterations", 2.5),
        ("inversion.step_size", "big"),
        ("inversion.micro_batch", "big"),
        ("seeds", "0,1,2"),
        ("layers", "some"),
        ("data.format", "tfrecord"),
        ("resources.num_gpus", -1),
        ("inversion.iterations", True),  # YAML reads yes/on/true as a boolean
        ("data.n_samples", False),
    ],
)
def test_wrong_type_or_value_names_the_key(key, value):
    message = config_error(with_value(key, value))
    assert f"\n  {key}" in message
    assert repr(value) in message
    assert "literal[" not in message and "function-before" not in message  # no pydantic union tags


def test_too_few_samples_for_debiased_cka_fail_up_front():
    # every row carries debiased CKA, which needs 4 samples: fail at parse time, not after the inversions
    message = config_error(with_value("data.n_samples", 3))
    assert "data" in message and "n_samples" in message and "at least 4" in message
    assert parse_config(with_value("data.n_samples", 4)).data.n_samples == 4


def test_missing_key_is_named():
    raw = minimal()
    del raw["data"]
    assert "data: required key is missing" in config_error(raw)


@pytest.mark.parametrize("pattern", ["s3://lab/runs/final.safetensors", "s3://lab/{epoch}/epoch={epoch}.pt"])
def test_checkpoints_pattern_needs_one_epoch_placeholder(pattern):
    message = config_error(with_value("checkpoints", pattern))
    assert "checkpoints" in message and "{epoch}" in message


def test_layer_and_seed_lists_are_validated():
    assert "layers" in config_error(with_value("layers", [0, -1]))
    assert "layers" in config_error(with_value("layers", [1, 1]))
    assert "layers" in config_error(with_value("layers", []))
    assert "seeds" in config_error(with_value("seeds", [3, 3]))
    assert parse_config(with_value("layers", [4, 0, 2])).layers == [0, 2, 4]


def test_model_needs_exactly_one_source():
    assert "model" in config_error(with_value("model", {"arch": "vit_tiny_patch16_224", "factory": "pkg.mod:make"}))
    assert "model" in config_error(with_value("model", {}))
    assert "model.factory" in config_error(with_value("model", {"factory": "pkg.mod.make"}))


def test_resolve_layers():
    assert parse_config(minimal()).resolve_layers(12) == list(range(13))
    assert parse_config(with_value("layers", [0, 12])).resolve_layers(12) == [0, 12]
    with pytest.raises(ConfigError, match="layers") as error:
        parse_config(with_value("layers", [0, 13])).resolve_layers(12)
    assert "13" in str(error.value) and "0..12" in str(error.value)


def test_settings_hash_is_stable_under_key_order():
    raw = minimal()
    raw["inversion"] = {"iterations": 50, "step_size": 0.25, "bf16": False}
    reordered = {key: raw[key] for key in reversed(list(raw))}
    reordered["inversion"] = {key: raw["inversion"][key] for key in reversed(list(raw["inversion"]))}
    a, b = parse_config(raw), parse_config(reordered)
    assert settings_hash(a.numbers_settings()) == settings_hash(b.numbers_settings())
    settings = a.numbers_settings()
    shuffled = {key: settings[key] for key in sorted(settings, reverse=True)}
    assert settings_hash(settings) == settings_hash(shuffled)
    assert len(settings_hash(settings)) == 16
    assert settings_hash(settings) == settings_hash(parse_config(copy.deepcopy(raw)).numbers_settings())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("inversion.iterations", 100),
        ("inversion.step_size", 0.25),
        ("inversion.tolerance", 0.01),
        ("data.n_samples", 100),
        ("data.selection", "random"),
        ("token_policy", "cls"),
        ("layers", [0, 1]),
        ("pretrained", "s3://lab/pt.safetensors"),
        ("model.kwargs", {"img_size": 384}),
        ("checkpoints", "s3://lab/runs/other/epoch={epoch}.pt"),  # another run's epochs are other shards
    ],
)
def test_settings_hash_changes_with_a_setting_that_changes_the_numbers(key, value):
    base = settings_hash(parse_config(minimal()).numbers_settings())
    assert settings_hash(parse_config(with_value(key, value)).numbers_settings()) != base


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("output", "file:///tmp/elsewhere"),
        ("storage_options", {"endpoint_url": "http://localhost:9000"}),
        ("resources", {"num_gpus": 1, "num_cpus": 4, "max_in_flight": 8, "max_retries": 0}),
        ("seeds", [0, 1, 2, 3]),  # seeds are a row key, not a setting
        ("inversion.micro_batch", 4),  # micro-batching is exact
        ("inversion.compile", True),
    ],
)
def test_settings_hash_ignores_what_does_not_change_the_numbers(key, value):
    base = parse_config(minimal())
    changed = parse_config(with_value(key, value))
    assert settings_hash(changed.numbers_settings()) == settings_hash(base.numbers_settings())
    assert settings_hash(changed.inversion_settings()) == settings_hash(base.inversion_settings())


@pytest.mark.parametrize(("key", "value"), [("layers", [0, 1, 2]), ("checkpoints", "s3://lab/runs/other/epoch={epoch}.pt")])
def test_pretrained_inversions_do_not_depend_on_the_layer_set_or_the_checkpoints(key, value):
    a = parse_config(minimal() if key != "layers" else with_value("layers", [0, 1]))
    b = parse_config(with_value(key, value))
    assert settings_hash(a.inversion_settings()) == settings_hash(b.inversion_settings())
    assert settings_hash(a.numbers_settings()) != settings_hash(b.numbers_settings())


def test_load_config_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    assert load_config(path) == parse_config(minimal())
    assert load_config(f"file://{path}") == parse_config(minimal())
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "broken.yaml").write_text("output: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_storage_options_never_appear_in_errors_or_reprs():
    secret = "AKIA-SECRET-KEY-123"
    with pytest.raises(ConfigError, match="storage_options") as error:
        parse_config(with_value("storage_options", f"key={secret}"))
    assert secret not in str(error.value) and "may hold credentials" in str(error.value)
    config = parse_config(with_value("storage_options", {"key": secret}))
    assert secret not in repr(config) and secret not in str(config)
    from invariance.io.storage import Store

    assert secret not in repr(Store("/tmp/out", {"key": secret}))


def test_an_unknown_architecture_suggests_the_closest_names_first():
    from invariance.core.models import build_network

    with pytest.raises(ConfigError, match=r"unknown timm architecture 'vit_tiny_patch8_32'; did you mean .*vit_tiny_patch16_224"):
        build_network(parse_config(with_value("model.arch", "vit_tiny_patch8_32")).model)
    with pytest.raises(ConfigError, match=r"did you mean resnet18,"):
        build_network(parse_config({**with_value("model.arch", "resnet_18"), "model": {"arch": "resnet_18"}}).model)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        # issue 25: image_size 100000 passed the config and ended in a raw traceback deep in a worker
        ("data.image_size", 100000, r"data\.image_size: .*must be in 1\.\.4096 pixels"),
        ("data.image_size", 0, r"data\.image_size: .*must be in 1\.\.4096 pixels"),
        ("knn", {"train": {"format": "cifar", "path": "s3://lab/c", "image_size": 5000}},
         r"knn\.train\.image_size: .*1\.\.4096"),
        # siblings: numbers without bounds that failed (or went NaN) far from the config
        ("data.selection_seed", -1, r"data\.selection_seed: .*greater than or equal to 0"),
        ("inversion.micro_batch", 0, r"inversion\.micro_batch: .*greater than or equal to 1"),
        ("inversion.step_size", float("inf"), r"inversion\.step_size: .*finite"),
        ("inversion.tolerance", float("inf"), r"inversion\.tolerance: .*finite"),
        ("knn", {"train": {"format": "cifar", "path": "s3://lab/c"}, "temperature": float("inf")},
         r"knn\.temperature: .*finite"),
        ("resources.num_gpus", float("inf"), r"resources\.num_gpus: .*finite"),
        ("resources.inversion_cache_gb", float("inf"), r"resources\.inversion_cache_gb: .*finite"),
    ],
)
def test_numbers_out_of_range_are_named_config_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(with_value(key, value))


def test_the_settings_hash_of_a_config_without_a_factory_is_pinned():
    """Hashes key every stored result: a code change must not move them for unchanged configs."""
    from invariance.config import knn_settings_hash

    config = parse_config(minimal())
    assert (settings_hash(config.numbers_settings()), settings_hash(config.inversion_settings())) == (
        "a9202ad0ba6259a7", "8eb3fb15920eb73a")  # fmt: skip
    bank = {"format": "cifar", "path": "s3://lab/data/cifar-10-batches-py", "split": "train"}
    with_bank = parse_config({**minimal(), "knn": {"train": {**bank, "n_samples": 5000}}})
    assert knn_settings_hash("abc", with_bank, "bank") == "b664d22140a2b9cf"
    assert knn_settings_hash("abc", parse_config({**minimal(), "knn": {"train": bank}}), "bank") == "c2583b7f3c21ae65"


def test_the_knn_hash_recomputes_only_the_temperatures_that_overflowed_float32():
    from invariance.config import knn_settings_hash

    bank = {"format": "cifar", "path": "s3://lab/data/cifar-10-batches-py", "split": "train"}

    def knn_hash(temperature: float) -> str:
        config = parse_config({**minimal(), "knn": {"train": bank, "temperature": temperature}})
        plain = settings_hash({"run": "abc", "knn": config.knn.numbers_settings(), "bank": "bank"})
        return knn_settings_hash("abc", config, "bank"), plain

    assert knn_hash(0.07)[0] == knn_hash(0.07)[1]  # unchanged: exp(1 / 0.07) is finite in float32
    assert knn_hash(0.01)[0] != knn_hash(0.01)[1]  # exp(100) overflowed: computed anew
